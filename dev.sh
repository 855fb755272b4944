#!/usr/bin/env bash
# One entry point for a fresh machine (Debian, as root):
#   ./dev.sh serve   install what is needed, then run the daemon with the example config
#   ./dev.sh test    install what is needed, then lint, type-check and run the whole suite
# Extra arguments go to the daemon or to pytest.
set -euo pipefail
cd "$(dirname "$0")"

# Debian packages: the real container runtimes and a static busybox for test rootfs,
# strace and gcc for tests and the benchmark, libseccomp for pyseccomp, systemd and
# prometheus for `systemd-analyze verify`, `promtool` and the dashboard's queries against a
# real Prometheus server, tmux to test `seccomp-supervisor top` in a real terminal.
# (promtool comes only in the package prometheus, which on a host booted with systemd
# also enables the Prometheus server on :9090: setup() disables it when it installs the
# package; the tests start their own server on loopback.)
DEB_PACKAGES=(runc crun busybox-static strace gcc libseccomp2 python3-venv systemd prometheus
              tmux)

setup() {
    local missing=() pkg
    for pkg in "${DEB_PACKAGES[@]}"; do
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
        if [[ " ${missing[*]} " == *" prometheus "* && -d /run/systemd/system ]]; then
            "${sudo[@]}" systemctl disable --now prometheus.service >/dev/null 2>&1 || true
        fi
    fi
    if [[ ! -x .venv/bin/python ]]; then
        # The distribution's python3, the one python3-venv is for: Debian builds it with
        # PGO and LTO, and the daemon spends less CPU per notification on it than on a
        # plain source build such as pyenv's (README, Performance). Else python3 on PATH.
        local python=/usr/bin/python3
        [[ -x $python ]] || python=python3
        "$python" -m venv .venv
    fi
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
}

case "${1:-}" in
    serve)
        shift
        setup
        exec .venv/bin/seccomp-supervisor serve --config systemd/seccomp-supervisor.toml "$@"
        ;;
    test)
        shift
        setup
        .venv/bin/ruff check supervisor tests policies bench
        .venv/bin/mypy
        exec .venv/bin/python -m pytest "$@"
        ;;
    *)
        echo "usage: $0 serve [daemon args] | test [pytest args]" >&2
        exit 2
        ;;
esac
