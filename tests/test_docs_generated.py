"""The generated references and man pages match their sources, render, and install.

The config reference comes from ``supervisor/default.toml``, the command-line reference
from the argparse parser, the metrics reference from a real Daemon's registry
(:mod:`supervisor.docgen`); they are committed, and these tests fail when a source
changed without ``python -m supervisor.docgen`` being run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from supervisor import docgen

ROOT = Path(__file__).resolve().parent.parent
MAN_PAGES = ["man/seccomp-supervisor.8", "man/seccomp-supervisor.toml.5"]


def test_generated_files_are_current(capsys: pytest.CaptureFixture[str]) -> None:
    status = docgen.main(["--check", "--root", str(ROOT)])
    assert status == 0, capsys.readouterr().err


def test_check_names_the_stale_file_and_the_command(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    for relative in docgen.generated_files():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / relative, tmp_path / relative)
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 0
    page = tmp_path / "docs/reference/config.md"
    page.write_text(page.read_text().replace("Default: `64`", "Default: `32`"))
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "docs/reference/config.md" in err and "python -m supervisor.docgen" in err
    assert docgen.main(["--root", str(tmp_path)]) == 0  # rewrites it
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 0


def test_every_config_key_is_documented_with_its_default() -> None:
    text = (ROOT / "supervisor/default.toml").read_text("utf-8")
    doc = docgen.parse_default_toml(text)
    data = tomllib.loads(text)
    documented = {(t.name, k.name): k for t in doc.tables for k in t.keys}
    assert {(table, key) for table, keys in data.items() for key in keys} == set(documented)
    for (table, name), key in documented.items():
        assert key.doc, f"[{table}] {name} has no comment in default.toml"
        assert tomllib.loads(f"v = {key.default}")["v"] == data[table][name]
    arrays = {t.name for t in doc.tables if t.example}
    assert arrays == {"[policy]", "[route]"}


def test_config_model_reads_multi_line_values_and_trailing_comments() -> None:
    doc = docgen.parse_default_toml(
        "# Title.\n# Intro.\n\n[listen]\n# The uids.\nallowed_uids = [\n    0,\n    1000,\n]\n"
        "# Where.\nsocket = \"/run/x.sock\"  # a trailing comment stays in the default\n")
    assert doc.intro == ["Intro."]
    keys = {k.name: k for k in doc.tables[0].keys}
    assert keys["allowed_uids"].default == "[ 0, 1000, ]"
    assert keys["allowed_uids"].doc == ["The uids."]
    assert keys["socket"].doc == ["Where."]


def test_cli_reference_has_every_command_and_option() -> None:
    from supervisor.cli import _parser

    commands = {c.path: c for c in docgen.cli_commands(_parser())}
    assert {("serve",), ("run",), ("check",), ("status",), ("record",), ("profile",),
            ("profile", "check"), ("profile", "explain")} <= set(commands)
    page = (ROOT / "docs/reference/cli.md").read_text("utf-8")
    for command in commands.values():
        for option in command.options:
            assert f"`{option.invocation}`" in page


def test_metrics_reference_lists_what_a_scrape_exports() -> None:
    families = docgen.metric_families()
    from supervisor.config import default_config
    from supervisor.daemon import Daemon
    from supervisor.systemd import Notifier

    scraped = generate_latest(Daemon(default_config(), {}, notifier=Notifier(None)).registry)
    type_lines = [line.split()[2] for line in scraped.decode().splitlines()
                  if line.startswith("# TYPE ") and not line.split()[2].endswith("_created")]
    assert set(type_lines) == {f.name for f in families}
    labelled = {f.name: f.labels for f in families}
    assert labelled["seccomp_supervisor_notifications_total"] == ("syscall", "policy", "decision")


@pytest.mark.parametrize("page", MAN_PAGES)
def test_man_page_renders_without_warnings(page: Path) -> None:
    done = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(ROOT / page)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    shown = subprocess.run(["man", "-l", str(ROOT / page)], capture_output=True, text=True,
                           env={**os.environ, "MANPAGER": "cat", "MANWIDTH": "80"},
                           check=True)
    assert "SEE ALSO" in shown.stdout and shown.stderr == ""


def test_pip_install_puts_the_man_pages_where_man_finds_them(tmp_path: Path) -> None:
    """Build the wheel (offline, with this environment's setuptools) and install it into
    a fresh venv: man(1) finds the pages from that venv's bin on PATH."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
         "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "wheel"),
         str(ROOT)], check=True, capture_output=True, timeout=300)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # pip --python installs into that venv, not into ours
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install", "-q",
         "--disable-pip-version-check", "--no-deps", "--no-index",
         *map(str, (tmp_path / "wheel").glob("*.whl"))],
        check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "MANPATH"}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"  # man maps PREFIX/bin to PREFIX/share/man
    found = subprocess.run(["man", "-w", "seccomp-supervisor", "seccomp-supervisor.toml"],
                           env=env, capture_output=True, text=True, check=True)
    assert found.stdout.split() == [str(venv / "share/man/man8/seccomp-supervisor.8"),
                                    str(venv / "share/man/man5/seccomp-supervisor.toml.5")]
    for page in MAN_PAGES:
        installed = venv / "share/man" / f"man{page[-1]}" / Path(page).name
        assert installed.read_text() == (ROOT / page).read_text()


def test_readme_stays_short() -> None:
    lines = (ROOT / "README.md").read_text("utf-8").splitlines()
    assert len(lines) < 150, "README.md: move details to a page of docs/"
