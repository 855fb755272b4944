#!/usr/bin/env bash
# One entry point for a fresh machine (Debian, as root):
#   ./dev.sh serve   install what is needed, then run the daemon with the example config
#   ./dev.sh test    install what is needed, then lint, type-check, build the docs (strict)
#                    and run the whole suite
#   ./dev.sh docs    build the docs and serve them on http://127.0.0.1:8000/ [--port N]
#   ./dev.sh image   build the daemon's container image with podman (deploy/image/build.sh)
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
    *)
        echo "usage: $0 serve [daemon args] | test [pytest args] | docs [--port N]" \
             "| image [--tag TAG] [--fresh-rootfs]" >&2
        exit 2
        ;;
esac
