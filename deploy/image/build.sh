#!/usr/bin/env bash
# Build the daemon's container image with podman, from nothing but Debian's packages and
# this repository:
#
#   deploy/image/build.sh [--tag TAG] [--fresh-rootfs]
#
# 1. A Debian bookworm rootfs (mmdebstrap, variant minbase, merged /usr, no docs, man
#    pages or locales) with python3 and libseccomp2, from this machine's apt sources when
#    they name bookworm. Cached as a tarball under $SECCOMP_SUPERVISOR_IMAGE_CACHE
#    (default /var/cache/seccomp-supervisor/image), keyed by the release, the variant,
#    the package list, the options and the sources: a second build reuses it. The key
#    does not see new package versions on the mirror: --fresh-rootfs rebuilds it (do so
#    for security updates).
# 2. `podman import` of the tarball (skipped when this storage already has it).
# 3. This project's wheel and its dependencies' wheels, built on the host with the pip of
#    the project's venv ($PYTHON, default .venv/bin/python) at the versions that venv has
#    installed (the tested ones).
# 4. `podman build` with deploy/image/Containerfile, which installs the wheels offline.
#
# Default TAG: localhost/seccomp-supervisor:VERSION (VERSION from pyproject.toml), the
# image deploy/kubernetes/daemonset.yaml names. $PODMAN is the podman command with its
# global options (default "podman"; the tests point it at a private storage).
# Needs root (mmdebstrap's root mode, rootful podman).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

RELEASE=bookworm
VARIANT=minbase
PACKAGES=(python3 libseccomp2)
MMDEBSTRAP_OPTIONS=(
    --variant="$VARIANT"
    # bookworm's essential packages pull usrmerge (and with it perl, 50 MB) unless the
    # rootfs is merged from the start.
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
    --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/locale/*'
)
# Bump when what goes into the rootfs changes in a way the options above do not show.
LAYOUT=1

usage() { echo "usage: $0 [--tag TAG] [--fresh-rootfs]" >&2; exit 2; }
tag="" fresh=0
while (($#)); do
    case $1 in
        --tag) tag=${2:?"--tag needs a value"}; shift 2 ;;
        --fresh-rootfs) fresh=1; shift ;;
        *) usage ;;
    esac
done

python=${PYTHON:-$root/.venv/bin/python}
if [[ ! -x $python ]]; then
    echo "build.sh: no $python: run ./dev.sh image (it sets the venv up), or set PYTHON" >&2
    exit 1
fi
for tool in mmdebstrap podman; do
    command -v "$tool" >/dev/null \
        || { echo "build.sh: $tool is missing (apt-get install $tool)" >&2; exit 1; }
done
read -ra podman <<<"${PODMAN:-podman}"
version=$("$python" -c 'import sys, tomllib
print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$root/pyproject.toml")
tag=${tag:-localhost/seccomp-supervisor:$version}
cache=${SECCOMP_SUPERVISOR_IMAGE_CACHE:-/var/cache/seccomp-supervisor/image}
started=$SECONDS

# This machine's apt sources when they are bookworm's (a local mirror or proxy, as the
# host's own apt uses it); else mmdebstrap's default, deb.debian.org with its updates
# and security suites.
sources=()
for file in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [[ -r $file ]] && grep -Eq "^[^#]*\b$RELEASE\b" "$file"; then
        sources=("$file")
        break
    fi
done

key=$(
    {
        echo "layout=$LAYOUT release=$RELEASE packages=${PACKAGES[*]}"
        printf '%s\n' "${MMDEBSTRAP_OPTIONS[@]}"
        ((${#sources[@]})) && cat "${sources[@]}"
        true
    } | sha256sum | cut -c1-16
)
rootfs=$cache/rootfs-$RELEASE-$VARIANT-$key.tar

# The cached tarball becomes the image, which runs as root on every node: use it only
# when no one but us could have put it there or changed it.
ours() {  # PATH: owned by our uid (after symlinks), writable by no one else
    local owner mode
    read -r owner mode < <(stat -L -c '%u %a' -- "$1")
    [[ $owner == "$(id -u)" ]] && (((8#$mode & 8#022) == 0))
}
# Every directory above PATH (which has no symlinks) is root's or ours, and others may
# not write to it unless it is sticky (then they cannot rename what root or we own): else
# whoever may write there could move our cache away and put theirs in its place.
above_ours() {
    local dir=$1 owner mode
    while [[ $dir != / ]]; do
        dir=$(dirname -- "$dir")
        read -r owner mode < <(stat -c '%u %a' -- "$dir")
        [[ $owner == 0 || $owner == "$(id -u)" ]] || return 1
        (((8#$mode & 8#022) == 0 || (8#$mode & 8#1000) != 0)) || return 1
    done
}
mkdir -p "$cache"
# Resolved once: a symlink on the way, retargeted later, cannot change what we read.
cache=$(realpath -e -- "$cache")
if ! ours "$cache" || ! above_ours "$cache"; then
    echo "build.sh: $cache is not ours alone (its owner or group/other write, or a" \
         "directory above it that others may write): a rootfs cached there could be" \
         "anyone's; fix it (chown, chmod go-w) or set SECCOMP_SUPERVISOR_IMAGE_CACHE" >&2
    exit 1
fi
if ((fresh)) || [[ ! -s $rootfs ]]; then
    partial=$(mktemp "$cache/.rootfs-XXXXXX.tar")
    trap 'rm -f "$partial"' EXIT
    echo "build.sh: building the $RELEASE rootfs (mmdebstrap)..." >&2
    step=$SECONDS
    include=$(IFS=,; echo "${PACKAGES[*]}")
    log=$cache/mmdebstrap.log
    if ! mmdebstrap "${MMDEBSTRAP_OPTIONS[@]}" --include="$include" \
            "$RELEASE" "$partial" "${sources[@]}" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "build.sh: mmdebstrap failed (all of it in $log)" >&2
        exit 1
    fi
    chmod 0644 "$partial"
    mv -f "$partial" "$rootfs"   # atomically: a concurrent build never sees half a tarball
    trap - EXIT
    echo "build.sh: rootfs built in $((SECONDS - step)) s: $rootfs" >&2
else
    if ! ours "$rootfs"; then
        echo "build.sh: $rootfs is not ours alone (its owner or group/other write):" \
             "not using it; remove it" >&2
        exit 1
    fi
    echo "build.sh: rootfs from the cache: $rootfs" >&2
fi
# Named by its content: a rebuilt tarball is imported again, the same one only once.
base=localhost/seccomp-supervisor-rootfs:$(sha256sum "$rootfs" | cut -c1-16)
if ! "${podman[@]}" image exists "$base"; then
    "${podman[@]}" import --quiet "$rootfs" "$base" >/dev/null
fi

ctx=$(mktemp -d /tmp/seccomp-supervisor-image-XXXXXX)
trap 'rm -rf "$ctx"' EXIT
mkdir "$ctx/wheels" "$ctx/tools" "$ctx/src"
# The sources the wheel needs, copied so that building it leaves nothing in the tree.
tar -C "$root" --exclude=__pycache__ --exclude="*.so" -cf - pyproject.toml setup.py README.md \
    supervisor man \
    | tar -C "$ctx/src" -xf -
pip=("$python" -m pip --disable-pip-version-check --quiet)
"${pip[@]}" wheel --no-deps --no-build-isolation --wheel-dir "$ctx/wheels" "$ctx/src"
"${pip[@]}" freeze --exclude-editable >"$ctx/constraints.txt"
"${pip[@]}" wheel --constraint "$ctx/constraints.txt" --wheel-dir "$ctx/wheels" \
    "$ctx"/wheels/seccomp_supervisor-*.whl
# Debian's own pip wheel (python3-pip-whl, which python3-venv brings), else the venv's.
pip_wheel=$(ls /usr/share/python-wheels/pip-*.whl 2>/dev/null | tail -n 1 || true)
if [[ -z $pip_wheel ]]; then
    "${pip[@]}" download --no-deps --dest "$ctx/tools" pip
    pip_wheel=$(ls "$ctx"/tools/pip-*.whl)
fi
cp "$pip_wheel" "$ctx/tools/pip.whl"
mkdir "$ctx/policies"
cp "$root"/policies/*.py "$root"/policies/*.toml "$ctx/policies/"
chmod -R a+rX,go-w "$ctx"

step=$SECONDS
# --no-cache: a cached RUN layer would not notice new wheels behind its bind mount.
# --isolation chroot: the RUN step needs no OCI runtime and no cgroup (crun refuses some
# hosts' hybrid cgroup layout), and it runs nothing but pip on our own wheels.
# unshare --net: podman and its RUN step in a network namespace of their own, with no
# interface but loopback (chroot isolation has no --network none): the build cannot
# reach the network, so it provably does not need it.
unshare --net "${podman[@]}" build --quiet --pull=never --no-cache --isolation chroot \
    --file "$here/Containerfile" --build-arg "BASE=$base" --build-arg "VERSION=$version" \
    --tag "$tag" "$ctx" >/dev/null
size=$("${podman[@]}" image inspect --format '{{.Size}}' "$tag")
echo "build.sh: $tag: $((size / 1000000)) MB; podman build $((SECONDS - step)) s," \
     "all $((SECONDS - started)) s" >&2
echo "$tag"
