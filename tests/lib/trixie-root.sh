#!/usr/bin/env bash
# tests/lib/trixie-root.sh - the Debian trixie root that tier 3's second
# engine (Docker 26, HARNESS_ENGINE=docker26) runs from.
#
#   tests/lib/trixie-root.sh            build the root unless a good one is cached
#   tests/lib/trixie-root.sh --check    exit 0 if a good root is cached, else 1
#   tests/lib/trixie-root.sh --path     print the root's path
#   tests/lib/trixie-root.sh --versions print "docker=X compose=Y" of the cached root
#   tests/lib/trixie-root.sh --rebuild  build it again even if cached
#
# The root: `debootstrap --variant=minbase` of trixie from Debian's default
# mirror, with docker.io (dockerd 26.1), docker-cli, containerd, runc, iproute2,
# iptables, ca-certificates and docker-compose (Compose v2). About two
# minutes and ~600 MB. It lives at ROTEST_TRIXIE_ROOT
# (/var/cache/rustoverlay-test/trixie-root unless set), outside the
# repository, and is kept between runs. It is built in a temporary directory
# beside it and renamed into place only when complete and checked, with a
# stamp naming this recipe: an interrupted or failed build is never taken for
# a good root, and a changed recipe builds a new one. debootstrap runs in a
# private mount namespace, so the /proc and /sys it mounts in the target go
# with it, also when it is killed.
#
# The harness never writes into it: every simulated host mounts an overlay
# over it (upper layer in the host's temp dir), see _harness_start_anchor in
# tests/lib/harness.sh.
set -euo pipefail

ROOT="${ROTEST_TRIXIE_ROOT:-/var/cache/rustoverlay-test/trixie-root}"
SUITE=trixie
PACKAGES=docker.io,docker-cli,containerd,runc,docker-compose,iproute2,iptables,ca-certificates,procps
# Bump when the recipe changes: a cached root with another stamp is rebuilt.
RECIPE="rotest-trixie-root v1 suite=$SUITE variant=minbase include=$PACKAGES"
STAMP=.rotest-root

die() {
    printf 'trixie-root: %s\n' "$*" >&2
    exit 1
}

root_ok() {
    [[ -f "$ROOT/$STAMP" && "$(head -n 1 "$ROOT/$STAMP")" == "$RECIPE" ]] &&
        [[ -x "$ROOT/usr/sbin/dockerd" && -x "$ROOT/usr/bin/docker" && -x "$ROOT/usr/bin/docker-compose" ]]
}

versions() {
    root_ok || die "no good root at $ROOT (run tests/lib/trixie-root.sh)"
    sed -n 2p "$ROOT/$STAMP"
}

# chroot is fine here: only version queries and apt-get clean, no containers.
in_root() { chroot "$1" "${@:2}"; }

build() {
    [[ "$(id -u)" -eq 0 ]] || die "must run as root (debootstrap)"
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap not found (Debian package debootstrap)"
    local cache tmp t0 dver cver
    cache="$(dirname "$ROOT")"
    mkdir -p "$cache"
    # One builder at a time; the others wait and then find the root built.
    exec 9>"$cache/.$(basename "$ROOT").lock"
    flock 9
    if root_ok; then
        echo "trixie root already built at $ROOT ($(versions))"
        return 0
    fi
    # Leftovers of interrupted builds (their mounts died with their namespace).
    rm -rf --one-file-system "$ROOT".tmp.* "$ROOT".old.* 2>/dev/null || true
    tmp="$(mktemp -d "$ROOT.tmp.XXXXXX")"
    # shellcheck disable=SC2064 # expand now
    trap "rm -rf --one-file-system '$tmp'" EXIT
    t0=$SECONDS
    echo "building the Debian $SUITE root for Docker 26 in $tmp (about 2 minutes)"
    unshare --mount --propagation private -- \
        debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tmp" >"$tmp.log" 2>&1 || {
        tail -n 30 "$tmp.log" >&2
        rm -f "$tmp.log"
        die "debootstrap failed"
    }
    rm -f "$tmp.log"
    in_root "$tmp" apt-get clean
    rm -rf "$tmp"/var/lib/apt/lists/* "$tmp"/var/cache/apt/*.bin
    # pivot_root's put-old, and the directories the harness binds onto.
    mkdir -p "$tmp/.oldroot"
    chmod 0755 "$tmp"
    dver="$(in_root "$tmp" dockerd --version | sed -n 's/^Docker version \([^ ,]*\).*/\1/p')"
    cver="$(in_root "$tmp" docker-compose version --short 2>/dev/null || true)"
    [[ "$dver" == 2[6-9].* ]] || die "unexpected dockerd version in $tmp: '$dver'"
    [[ "$cver" == 2.* ]] || die "unexpected docker-compose version in $tmp: '$cver'"
    printf '%s\ndocker=%s compose=%s\nbuilt %s\n' "$RECIPE" "${dver%%+*}" "${cver%%-*}" "$(date -u +%FT%TZ)" >"$tmp/$STAMP"
    if [[ -e "$ROOT" ]]; then
        mv -T "$ROOT" "$(mktemp -u "$ROOT.old.XXXXXX")"
    fi
    mv -T "$tmp" "$ROOT"
    trap - EXIT
    rm -rf --one-file-system "$ROOT".old.* 2>/dev/null || true
    echo "trixie root built at $ROOT in $((SECONDS - t0))s: $(versions)"
}

case "${1:-}" in
    "") root_ok && echo "trixie root cached at $ROOT ($(versions))" || build ;;
    --check) root_ok ;;
    --path) printf '%s\n' "$ROOT" ;;
    --versions) versions ;;
    --rebuild)
        rm -f "$ROOT/$STAMP" 2>/dev/null || true
        build
        ;;
    *) die "usage: $0 [--check|--path|--versions|--rebuild]" ;;
esac
