"""Every Python, TOML and shell example of the documentation runs here.

The blocks of ``docs/**/*.md`` and ``README.md`` are taken in page order; each page gets
a work directory of its own, shared by its blocks (a policy file written by one block is
what the next block tests), with ``.venv``, ``policies``, ``systemd``, ``bench``,
``examples`` and ``deploy`` linking to this tree. How a block runs depends on its language:

- ``python``: a block whose first line is ``# NAME.py`` is written to NAME.py; a
  ``test_*.py`` file then runs under pytest, any other named file is loaded with
  ``supervisor.testing.load`` (it must be a policy). A block without a name is executed
  with ``python``.
- ``toml``: written to a file and loaded with the daemon's config loader; when every
  policy path of it exists, ``check_config`` loads the policies too.
- ``sh``: run with ``bash -euo pipefail``; ``console``: each ``$ `` line is run and its
  output (stdout and stderr) must match the lines that follow, where ``...`` matches any
  text (across lines too). Both run in a sandbox: a private mount and network namespace
  whose ``/run`` is a fresh tmpfs and whose loopback holds the daemon of
  ``./dev.sh serve`` (``serve --config systemd/seccomp-supervisor.toml``, started once
  for the module), so the documented paths and ports are the real ones.

An HTML comment on the line before a block changes that:

- ``<!-- example: not run: REASON -->``: not run; the reason is shown in the page source;
- ``<!-- example: file NAME -->``: the block (any language) is written to NAME only;
- ``<!-- example: with policies/all.toml -->``: a TOML fragment checked together with
  the ``[[policy]]`` entries of ``policies/all.toml``.

Blocks in other languages (``text``, ``json``, ``ini``...) are output or data, not
examples, and are not run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisor.config import load_config
from supervisor.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
RUN_LANGUAGES = {"python", "toml", "sh", "console"}
# Output and data: shown, not run. Any other language (bash, shell, py...) is refused, so
# no example hides from this test behind another name.
DATA_LANGUAGES = {"text", "json"}
# Written to a file by a ``file NAME`` marker, for a later block to use (e.g. a Prometheus
# config that a console block checks with promtool).
FILE_LANGUAGES = {"yaml"}

_FENCE = re.compile(r"^( *)```(.*)$")
_MARKER = re.compile(r"^ *<!-- example: (.*?) -->$")


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    marker: str  # "" or what follows "example: " in the comment before the block

    @property
    def name(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name
        return f"{page}:{self.line}"


def blocks(page: Path) -> Iterator[Block]:
    """Every fenced block, also those indented in a list item (the indent is removed)."""
    lines = page.read_text("utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent, language = fence[1], fence[2].strip()
        marker = _MARKER.match(lines[i - 1]) if i else None
        end = next(j for j in range(i + 1, len(lines)) if lines[j] == indent + "```")
        text = "\n".join(line.removeprefix(indent) for line in lines[i + 1:end]) + "\n"
        yield Block(page, i + 1, language, text, marker[1] if marker else "")
        i = end + 1


ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]


def block_problems(found: list[Block]) -> list[str]:
    """Why blocks would escape this test: a language it neither runs nor knows as data, a
    marker it does not know, a 'not run' without its reason."""
    problems = []
    for block in found:
        if block.language.startswith("{"):  # a MyST directive ({toctree}), not code
            continue
        known = RUN_LANGUAGES | DATA_LANGUAGES | (FILE_LANGUAGES if block.marker else set())
        if block.language not in known:
            problems.append(f"{block.name}: block language {block.language!r}: use one of "
                            f"{sorted(RUN_LANGUAGES)} (run by this test) or "
                            f"{sorted(DATA_LANGUAGES)}")
        marker = block.marker
        if marker.startswith("not run"):
            if not re.fullmatch(r"not run: \S.{9,}", marker):
                problems.append(f"{block.name}: 'not run' needs a reason: 'not run: WHY'")
        elif marker and not re.fullmatch(r"file \S+|with policies/all\.toml", marker):
            problems.append(f"{block.name}: unknown example marker {marker!r}")
    return problems


def test_every_example_block_runs_or_says_why_not() -> None:
    assert block_problems(ALL_BLOCKS) == []
    run = [b for b in ALL_BLOCKS if b.language in RUN_LANGUAGES]
    assert len([b for b in run if not b.marker.startswith("not run")]) >= 30


def test_blocks_that_would_escape_are_reported(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```bash\nrm -rf /\n```\n\n```\nplain\n```\n\n"
                    "<!-- example: not run -->\n```sh\ntrue\n```\n\n"
                    "<!-- example: skip -->\n```python\npass\n```\n\n"
                    "- item\n\n  ```py\n  pass\n  ```\n\n"
                    "<!-- example: not run: needs a real Kubernetes cluster -->\n"
                    "```sh\nkubectl\n```\n")
    problems = block_problems(list(blocks(page)))
    assert [p.split(":", 2)[1] for p in problems] == ["1", "5", "10", "15", "21"], problems


def test_console_output_must_match() -> None:
    assert _ellipsis_match("pid ..., up ...\nsessions: 0", "pid 12, up 3s\nsessions: 0")
    assert _ellipsis_match("a\n...\nz", "a\nb\nc\nz")
    assert not _ellipsis_match("sessions: 0", "sessions: 1")
    assert not _ellipsis_match("Operation not permitted", "")


# --------------------------------------------------------------------------- the sandbox


@dataclass
class Sandbox:
    pid: int  # the daemon: its mount and network namespaces are the sandbox's

    def run(self, script: str, cwd: Path, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-n", "--",
             "bash", "-euo", "pipefail", "-c", f"cd {str(cwd)!r}\n{script}"],
            capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    """The daemon of ``./dev.sh serve`` in a private /run and loopback."""
    exe = Path(sys.executable).parent / "seccomp-supervisor"
    setup = ("mount -t tmpfs -o mode=0755 tmpfs /run && ip link set lo up && exec "
             f"{str(exe)!r} serve --config systemd/seccomp-supervisor.toml")
    daemon = subprocess.Popen(
        ["unshare", "--mount", "--net", "--propagation", "private", "--", "sh", "-c", setup],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    box = Sandbox(daemon.pid)
    try:
        deadline = time.monotonic() + 30
        while True:
            status = box.run(f"{str(exe)!r} status", ROOT)
            if status.returncode == 0 and "metrics: http" in status.stdout:
                break
            if daemon.poll() is not None or time.monotonic() > deadline:
                daemon.kill()
                pytest.fail(f"the daemon did not start: {daemon.communicate()[1]}")
            time.sleep(0.1)
        yield box
    finally:
        daemon.terminate()
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        assert daemon.stderr is not None
        daemon.stderr.close()


# --------------------------------------------------------------------------- running blocks


def _workdir(base: Path, page: Path) -> Path:
    work = base / str(page.relative_to(ROOT)).replace("/", "_")
    if not work.exists():
        work.mkdir()
        (work / ".venv").symlink_to(Path(sys.prefix))
        for name in ("policies", "systemd", "bench", "deploy", "examples"):
            (work / name).symlink_to(ROOT / name)
    return work


def _python(block: Block, work: Path) -> None:
    first = block.text.splitlines()[0]
    named = re.fullmatch(r"# ([\w.-]+\.py)", first.strip())
    if named is None:
        done = subprocess.run([sys.executable, "-c", block.text], cwd=work,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{block.name}: {done.stderr}"
        return
    path = work / named[1]
    path.write_text(block.text, "utf-8")
    if path.name.startswith("test_"):
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error",
             "--rootdir", str(work), str(path)],
            cwd=work, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{block.name}: {done.stdout}{done.stderr}"
    else:
        from supervisor.testing import load

        load(path)


def _toml(block: Block, work: Path) -> None:
    text = block.text
    if block.marker == "with policies/all.toml":
        policies = tomllib.loads((ROOT / "policies/all.toml").read_text("utf-8"))["policy"]
        entries = "".join(
            f'\n[[policy]]\nname = "{p["name"]}"\npath = "{ROOT / "policies" / p["path"]}"\n'
            for p in policies)
        text += entries
    path = work / f"example-{block.line}.toml"
    path.write_text(text, "utf-8")
    try:
        config = load_config(path)
    except ConfigError as exc:
        pytest.fail(f"{block.name}: {exc}")
    if all(p.path and (path.parent / p.path).exists() for p in config.policies):
        from supervisor.plugins import check_config

        assert check_config(str(path)) == [], block.name


def _ellipsis_match(expected: str, got: str) -> bool:
    pattern = ".*?".join(re.escape(part) for part in expected.split("..."))
    return re.fullmatch(pattern, got, re.DOTALL) is not None


def _console(block: Block, work: Path, box: Sandbox) -> None:
    commands: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        else:
            assert commands, f"{block.name}: output before the first '$ ' line"
            commands[-1][1].append(line)
    for command, output in commands:
        done = box.run(f"exec 2>&1\n{command}", work)
        expected = "\n".join(output).strip()
        got = done.stdout.strip()
        assert _ellipsis_match(expected, got), (
            f"{block.name}: `{command}` printed\n{got}\n--- the page says\n{expected}")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_examples(page: Path, sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
                       ) -> None:
    base = tmp_path_factory.mktemp("docs-examples")
    for block in blocks(page):
        if block.language not in RUN_LANGUAGES and not block.marker.startswith("file "):
            continue
        if block.marker.startswith("not run"):
            continue
        work = _workdir(base, page)
        if block.marker.startswith("file "):
            (work / block.marker.removeprefix("file ")).write_text(block.text, "utf-8")
        elif block.language == "python":
            _python(block, work)
        elif block.language == "toml":
            _toml(block, work)
        elif block.language == "sh":
            done = sandbox.run(block.text, work)
            assert done.returncode == 0, f"{block.name}: {done.stdout}{done.stderr}"
        else:
            _console(block, work, sandbox)
    shutil.rmtree(base, ignore_errors=True)
