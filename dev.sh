#!/usr/bin/env bash
# One entry point for a fresh machine (Debian, as root):
#   ./dev.sh serve   install what is needed, then run the daemon with the example config
#   ./dev.sh test    install what is needed, then lint, type-check, build the docs (strict)
#                    and run the whole suite
#   ./dev.sh docs    build the docs and serve them on http://127.0.0.1:8000/ [--port N]
#   ./dev.sh image   build the daemon's container image with podman (deploy/image/build.sh)
#   ./dev.sh asan    install what is needed, then run the tests of the compiled code
#                    (supervisor/_hotloop.c) under AddressSanitizer and UBSan
# Extra arguments go to the daemon or to pytest.
set -euo pipefail
cd "$(dirname "$0")"

# Debian packages the daemon needs (`serve`): libseccomp for pyseccomp, python3-venv for
# .venv, curl for the README's tour, gcc and python3-dev to build the compiled hot loop
# (supervisor/_hotloop.c; without them the install warns and the daemon runs pure Python).
SERVE_PACKAGES=(libseccomp2 python3-venv curl gcc python3-dev)
# ...and the tests (`test`, `docs`): the real container runtimes and a static busybox for
# test rootfs, strace for tests, gcc for them and the benchmark too, systemd and prometheus for
# `systemd-analyze verify`/`security`, `promtool` and the dashboard's queries against a
# real Prometheus server; tmux to test `seccomp-supervisor top` in a real terminal;
# iproute2 for the documentation's examples (tests/test_docs_examples.py), groff-base and
# man-db to render the man pages; podman, docker.io and containerd for the engine tests
# (tests/test_podman*.py, test_docker*.py, test_containerd.py), rootlesskit and uidmap
# for their rootless variants; mmdebstrap for the container image's Debian rootfs
# (deploy/image/build.sh, tests/test_image.py).
# (promtool comes only in the package prometheus, which on a host booted with systemd
# also enables the Prometheus server on :9090; docker.io and containerd likewise enable
# their daemons: setup() disables them when it installs the packages; the tests start
# their own servers, on loopback or on sockets in a temporary directory.)
TEST_PACKAGES=("${SERVE_PACKAGES[@]}" runc crun busybox-static strace systemd prometheus
               tmux iproute2 groff-base man-db docker.io containerd rootlesskit uidmap podman
               mmdebstrap)

# The unprivileged user of the rootless podman tests (tests/podman.py), with a fixed uid
# so routes can name it, subordinate ids for its user namespace (newuidmap, from uidmap),
# and the group that may reach the daemon's notify socket (docs/runtimes.md).
ROOTLESS_USER=seccomp-rootless
ROOTLESS_UID=2950
HANDOFF_GROUP=seccomp-handoff
SUBID_RANGE=2950000:65536

# rootless_user: create ROOTLESS_USER, HANDOFF_GROUP and the subuid/subgid ranges when
# they are missing (idempotent: a second run changes nothing).
rootless_user() {
    [[ $(id -u) -eq 0 ]] || return 0   # the tests run as root; nothing to do otherwise
    getent group "$HANDOFF_GROUP" >/dev/null || groupadd --system "$HANDOFF_GROUP"
    if ! getent passwd "$ROOTLESS_USER" >/dev/null; then
        useradd --uid "$ROOTLESS_UID" --user-group --create-home \
            --shell /usr/sbin/nologin "$ROOTLESS_USER"
    fi
    id -nG "$ROOTLESS_USER" | grep -qw "$HANDOFF_GROUP" \
        || usermod --append --groups "$HANDOFF_GROUP" "$ROOTLESS_USER"
    local file
    for file in /etc/subuid /etc/subgid; do
        grep -q "^$ROOTLESS_USER:" "$file" 2>/dev/null \
            || echo "$ROOTLESS_USER:$SUBID_RANGE" >>"$file"
    done
}

# setup EXTRAS [serve]: the Debian packages, the Python package and the extras of
# pyproject.toml it needs ("test,docs"); with "serve" only what the daemon needs.
setup() {
    local extras=$1 missing=() pkg
    local -a packages=("${TEST_PACKAGES[@]}")
    [[ ${2:-} == serve ]] && packages=("${SERVE_PACKAGES[@]}")
    for pkg in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" \
            || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        local sudo=()
        [[ $(id -u) -eq 0 ]] || sudo=(sudo)
        echo "dev.sh: installing ${missing[*]}" >&2
        "${sudo[@]}" apt-get update -qq
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq \
            --no-install-recommends "${missing[@]}" >/dev/null
        if [[ -d /run/systemd/system ]]; then
            local units=()
            [[ " ${missing[*]} " == *" prometheus "* ]] && units+=(prometheus.service)
            [[ " ${missing[*]} " == *" docker.io "* ]] && units+=(docker.service docker.socket)
            [[ " ${missing[*]} " == *" containerd "* ]] && units+=(containerd.service)
            if ((${#units[@]})); then
                "${sudo[@]}" systemctl disable --now "${units[@]}" >/dev/null 2>&1 || true
            fi
        fi
    fi
    if [[ ! -x .venv/bin/python ]]; then
        # The distribution's python3, the one python3-venv is for: Debian builds it with
        # PGO and LTO, and the daemon spends less CPU per notification on it than on a
        # plain source build such as pyenv's (docs/performance.md). Else python3 on PATH.
        local python=/usr/bin/python3
        [[ -x $python ]] || python=python3
        "$python" -m venv .venv
    fi
    local spec=.
    [[ -n $extras ]] && spec=".[$extras]"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"
    [[ ${2:-} == serve ]] || rootless_user
}

# The documentation site, from docs/ into docs/_build/html. -W: any warning (a broken
# link or cross-reference, a missing page) fails the build.
build_docs() {
    .venv/bin/sphinx-build -q -W --keep-going -n -b html docs docs/_build/html
}

# The tests that run supervisor/_hotloop.c (`asan`): its direct tests, the reads and
# the audit lines it makes for the daemon, the hostile inputs that reach it, and
# test_crash.py for the crash journal's slots (journal_record), which no other file here
# writes. (Measured with gcov: ten more files that run the daemon, test_shadow.py to
# test_hostile_listen.py, add only journal_record's lines; the others were not measured.)
ASAN_TESTS=(tests/test_hotloop.py tests/test_accel.py tests/test_audit.py
            tests/test_round_reads.py tests/test_declared_paths.py tests/test_inline_reader.py
            tests/test_read_batch.py tests/test_read_signal.py tests/test_poller.py
            tests/test_session.py tests/test_hostile_compiled.py tests/test_hostile_reads.py
            tests/test_hostile_trace_audit.py tests/test_hostile_abi.py
            tests/test_policy_api.py tests/test_path_guard.py tests/test_crash.py)
# Tests that map a page 4 GiB above a MAP_32BIT page (tests/test_hostile_abi.py's
# decoy_pair), to give an i386 pointer and its 64-bit reading different strings: ASan's
# shadow memory occupies that range, so they fail under it with "no free page 4 GiB
# above a MAP_32BIT page". The normal suite runs them.
ASAN_DESELECT=(
    tests/test_hostile_abi.py::test_i386_path_pointer_with_bit_32_set_is_read_where_the_kernel_reads
    tests/test_hostile_abi.py::test_x32_path_pointers_are_read_whole
    tests/test_hostile_abi.py::test_i386_memory_reads_at_an_undecoded_register_are_refused
    tests/test_hostile_abi.py::test_i386_emulated_mknod_uses_the_path_the_kernel_would
    tests/test_hostile_abi.py::test_i386_set_id_modes_with_garbage_upper_halves_are_refused
    tests/test_round_reads.py::test_the_round_reads_an_i386_path_where_the_kernel_reads
    tests/test_round_reads.py::test_the_round_reads_x32_path_pointers_whole
)
ASAN_CFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1"

# asan_suite [pytest args]: build the extension with ASAN_CFLAGS in a copy of the work
# tree (its tracked and untracked files as they are now, not the ignored ones: .venv,
# build/, the built .so), removed on exit, so this tree's extension stays the normal
# one; run pytest there with the sanitizers preloaded, on ASAN_TESTS unless the
# arguments name tests (pytest's testpaths rule; paths relative to this directory);
# fail if pytest fails or a sanitizer wrote a report. tests/asan/sitecustomize.py
# fixes what the suite needs fixed under ASan.
asan_suite() {
    local name lib preload=()
    for name in libasan.so libubsan.so; do
        lib=$(gcc -print-file-name="$name")
        # gcc prints the bare name back when it has no such library.
        if [[ $lib != /* || ! -e $lib ]]; then
            echo "dev.sh: gcc has no $name (gcc -print-file-name=$name): Debian's gcc" \
                 "brings it with libgcc-<version>-dev" >&2
            exit 1
        fi
        preload+=("$lib")
    done
    local here=$PWD tmp file logs
    tmp=$(mktemp -d -t seccomp-asan.XXXXXX)
    logs=$tmp/logs
    # shellcheck disable=SC2064  # $tmp expanded now: it is local to this function
    trap "rm -rf '$tmp'" EXIT
    mkdir "$tmp/tree" "$logs"
    git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' file; do
              if [[ -e $file || -L $file ]]; then printf '%s\0' "$file"; fi  # not deleted
          done \
        | tar --null --files-from=- -cf - | tar -C "$tmp/tree" -xf -
    cd "$tmp/tree"
    echo "dev.sh: building supervisor/_hotloop.c with ASan and UBSan in $tmp/tree" >&2
    if ! CFLAGS=$ASAN_CFLAGS "$here/.venv/bin/python" setup.py -q build_ext --inplace \
            --force >"$tmp/build.log" 2>&1; then
        cat "$tmp/build.log" >&2
        exit 1
    fi
    # PYTHONMALLOC=malloc: CPython's own pools (blocks of 512 bytes or less) are not
    # ASan's; through malloc every buffer is checked. log_path: each report goes to a
    # file (its name ends in the process id) whichever process it came from, pytest or a
    # daemon it started, and whatever pytest captured (UBSan's through sitecustomize.py). abort_on_error=1: ASan aborts, so
    # faulthandler prints the Python stack of a report in the pytest process.
    # detect_leaks=0: CPython keeps much of what it allocates until it exits.
    local run=(env PYTHONPATH="$tmp/tree/tests/asan:$tmp/tree" PYTHONMALLOC=malloc
               LD_PRELOAD="${preload[*]}"
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:print_summary=1:log_path=$logs/asan"
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$logs/ubsan"
               "$here/.venv/bin/python")
    # The editable install of .venv maps `supervisor` to this tree; PYTHONPATH comes first.
    local module
    module=$("${run[@]}" -c 'import supervisor._hotloop as m; print(m.__file__)')
    if [[ $module != "$tmp/tree/supervisor/"* ]]; then
        echo "dev.sh: the run imports $module, not the sanitized build" >&2
        exit 1
    fi
    local arg args=(-o "testpaths=${ASAN_TESTS[*]}") status=0
    for arg in "${ASAN_DESELECT[@]}"; do args+=(--deselect "$arg"); done
    "${run[@]}" -m pytest "${args[@]}" "$@" || status=$?
    local reports=("$logs"/*)
    if [[ -e ${reports[0]} ]]; then
        for file in "${reports[@]}"; do
            echo "==== dev.sh: ${file##*/}" >&2
            cat "$file" >&2
        done
        echo "dev.sh: ${#reports[@]} sanitizer report(s), above" >&2
        ((status)) || status=1
    fi
    return "$status"
}

case "${1:-}" in
    serve)
        shift
        setup "" serve
        exec .venv/bin/seccomp-supervisor serve --config systemd/seccomp-supervisor.toml "$@"
        ;;
    test)
        shift
        setup test,docs
        .venv/bin/ruff check supervisor tests policies bench docs examples
        .venv/bin/mypy
        build_docs
        exec .venv/bin/python -m pytest "$@"
        ;;
    image)
        shift
        setup test
        exec deploy/image/build.sh "$@"
        ;;
    docs)
        shift
        port=8000
        if [[ ${1:-} == --port ]]; then port=${2:?"--port needs a number"}; fi
        setup test,docs
        build_docs
        echo "dev.sh: serving docs/_build/html on http://127.0.0.1:$port/" >&2
        exec .venv/bin/python -m http.server --bind 127.0.0.1 --directory docs/_build/html \
            "$port"
        ;;
    asan)
        shift
        setup test
        asan_suite "$@"
        ;;
    *)
        echo "usage: $0 serve [daemon args] | test [pytest args] | docs [--port N]" \
             "| image [--tag TAG] [--fresh-rootfs] | asan [pytest args]" >&2
        exit 2
        ;;
esac
