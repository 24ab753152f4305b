#!/usr/bin/env bash
# Build a COLO-capable qemu-system-x86_64 for the real-pair tests.
#
# Why: Debian 12's QEMU 7.2 deadlocks at the first COLO checkpoint under TCG, and stock 10.0.2
# never reaches COLO (see shared reference qemu-colo.md 8b). This builds Debian's bookworm-backports
# source of QEMU 10.0.2 with our patches in tools/patches/, only the x86_64 softmmu target and the
# features COLO needs, into a cache directory outside the checkout. A stamp file records the
# tarball and patch hashes and the configure flags; a matching stamp means the build is reused.
#
# Usage: tools/build_colo_qemu.sh            (prints the binary's path on its last line)
# Env:   COLO_QEMU_PREFIX  install dir (default /var/cache/colo-proxy/qemu-10.0.2-colo)
#        COLO_QEMU_JOBS    ninja parallelism (default: nproc)
# Needs root the first time (apt deb-src line and build dependencies).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
PATCHES="$HERE/patches"
PREFIX="${COLO_QEMU_PREFIX:-/var/cache/colo-proxy/qemu-10.0.2-colo}"
SRCDIR="$PREFIX.src"
JOBS="${COLO_QEMU_JOBS:-$(nproc)}"
VERSION="10.0.2"
TARBALL="qemu_${VERSION}+ds.orig.tar.xz"
SUITE="bookworm-backports"
BIN="$PREFIX/bin/qemu-system-x86_64"
CONFIGURE_FLAGS=(
    --target-list=x86_64-softmmu --without-default-features --enable-tcg --enable-kvm
    --enable-slirp --enable-replication --enable-colo-proxy --enable-pixman --enable-fdt=system
    --disable-docs --disable-install-blobs --disable-werror
)
BUILD_DEPS=(libglib2.0-dev libslirp-dev libpixman-1-dev libfdt-dev ninja-build flex bison
            pkg-config gcc make python3-venv xz-utils dpkg-dev patch)

log() { echo "build_colo_qemu: $*" >&2; }

stamp_text() {
    echo "qemu $VERSION $TARBALL"
    echo "flags ${CONFIGURE_FLAGS[*]}"
    (cd "$PATCHES" && sha256sum ./*.patch)
}

if [[ -x "$BIN" && -f "$PREFIX/stamp" ]] && [[ "$(cat "$PREFIX/stamp")" == "$(stamp_text)" ]]; then
    log "reusing $BIN"
    echo "$BIN"
    exit 0
fi

ensure_apt() {
    # Debian's registry only: a deb-src line for bookworm-backports, then the build deps.
    local missing=()
    for p in "${BUILD_DEPS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    local src=/etc/apt/sources.list.d/colo-qemu-src.sources
    local need_update=0
    if ! apt-cache showsrc qemu 2>/dev/null | grep -q "^Version: 1:$VERSION+ds"; then
        [[ $EUID -eq 0 ]] || { log "need root to add a deb-src line for $SUITE"; exit 1; }
        cat >"$src" <<EOF
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        need_update=1
    fi
    if ((need_update)); then apt-get update -qq; fi
    if ((${#missing[@]})); then
        [[ $EUID -eq 0 ]] || { log "need root to install: ${missing[*]}"; exit 1; }
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
}

fetch_source() {
    mkdir -p "$SRCDIR"
    if [[ ! -f "$SRCDIR/$TARBALL" ]]; then
        # apt verifies the tarball against the signed Sources index. The .dsc/.debian.tar.xz of the
        # backport may be missing from the mirror; the orig tarball is all we need.
        (cd "$SRCDIR" && apt-get source --download-only "qemu/$SUITE" >&2 || true)
        [[ -f "$SRCDIR/$TARBALL" ]] || { log "could not download $TARBALL"; exit 1; }
    fi
}

build() {
    local work="$SRCDIR/build-tree"
    rm -rf "$work"
    mkdir -p "$work"
    log "unpacking $TARBALL"
    tar -C "$work" -xf "$SRCDIR/$TARBALL"
    local tree="$work/qemu-$VERSION"
    for p in "$PATCHES"/*.patch; do
        log "applying $(basename "$p")"
        patch -d "$tree" -p1 --quiet <"$p"
    done
    # The +ds tarball has no bundled Python wheels; configure's venv wants these exact ones.
    mkdir -p "$tree/python/wheels"
    python3 -m venv "$work/pip"  # a pip of our own: the system's may be missing or managed
    "$work/pip/bin/pip" download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "$tree/python/wheels" meson==1.5.0 pycotap==1.3.1 >&2
    mkdir -p "$tree/build"
    (cd "$tree/build" && ../configure --prefix="$PREFIX" "${CONFIGURE_FLAGS[@]}" >&2)
    log "building qemu-system-x86_64 with $JOBS jobs (about 15 minutes on 2 cores)"
    ninja -C "$tree/build" -j "$JOBS" qemu-system-x86_64 >&2
    mkdir -p "$PREFIX/bin"
    install -m 0755 "$tree/build/qemu-system-x86_64" "$BIN.new"
    mv "$BIN.new" "$BIN"
    stamp_text >"$PREFIX/stamp"
    rm -rf "$work"
}

ensure_apt
fetch_source
build
"$BIN" --version | head -1 >&2
echo "$BIN"
