# shellcheck shell=bash
#
# tests/lib/harness.sh - simulated Docker hosts in network namespaces.
#
# Source it from a test script that runs as root with `set -euo pipefail`:
#
#   source "$(dirname "$0")/../lib/harness.sh"
#   harness_init single_host          # temp dir, underlay, world, cleanup trap
#   harness_start_host 1              # plugin + dockerd in host 1
#   harness_busybox_image 1           # rotest/busybox:latest in host 1
#   hdocker 1 run -d --name c1 rotest/busybox:latest sleep 3600
#   assert_ok "c1 reaches the world" hdocker 1 exec c1 ping -c 1 -W 1 "$HARNESS_WORLD_IP"
#   harness_summary                   # "N passed, N failed"; non-zero on failure
#
# Topology (all names carry a unique run prefix, "$HARNESS_PREFIX"):
#
#   ${prefix}-ul     bridge br0; one veth per host (hN) and one to the world
#   ${prefix}-world  ul0 = 10.250.0.254/24; answers ping; runs helpers (httpd, nc)
#   ${prefix}-hN     ul0 = 10.250.0.N/24 (MTU 1500), default route via the world
#   ${prefix}-etcd   ul0 = 10.250.0.200/24: etcd on :2379/:2380 (harness_start_etcd)
#   ${prefix}-reg    ul0 = 10.250.0.210/24: a plugin registry on :5000 (harness_start_registry)
#
# Each started host runs the plugin and a dockerd inside its network namespace
# and inside one private mount namespace (tmpfs on /run, so that dockerd only
# finds this host's plugin socket and no system containerd; a sysfs of the
# host's network namespace on /sys, with the cgroup mounts carried over).
# Nothing is added to the root network namespace: no address, route, link or
# firewall rule. The EXIT/INT/TERM trap kills every process of the run, removes
# its cgroups, namespaces and temp dir, also when setup broke half way.
#
# Assertion helpers count passes and failures in the calling shell: call them
# in the test script itself, not inside $(...) or a pipeline.
#
# Environment:
#   RUSTOVERLAY_BIN    plugin binary (default: target/release/rustoverlay of
#                      this repo, or of $CARGO_TARGET_DIR)
#   HARNESS_KEEP=1     keep the temp dir (logs) after the run
#   HARNESS_PLUGIN_LOG RUSTOVERLAY_LOG filter for the plugin (default:
#                      info,rustoverlay=debug)
#   HARNESS_BOOT_TIMEOUT  seconds to wait for plugin/dockerd sockets (default 60)
#   HARNESS_ETCD_TIMEOUT  seconds to wait for etcd to become healthy (default 30)
#   HARNESS_ENGINE     docker20 (default: the machine's Docker 20.10) or
#                      docker26 (trixie's Docker 26.1 from the root that
#                      tests/lib/trixie-root.sh caches); see below
#   HARNESS_COMPOSE    docker-compose binary (default: harness_compose_bin)
#   HARNESS_IMAGE_CACHE  a directory where the test image's tar is kept for
#                      later runs (default: none, built in each run's temp dir)

if [[ -n "${_HARNESS_SOURCED:-}" ]]; then
    return 0
fi
_HARNESS_SOURCED=1

HARNESS_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HARNESS_UL_NET="10.250.0"
HARNESS_UL_PREFIXLEN=24
HARNESS_WORLD_IP="${HARNESS_UL_NET}.254"
HARNESS_UL_MTU=1500
HARNESS_IMAGE="rotest/busybox:latest"
HARNESS_PLUGIN_SOCKET="/run/docker/plugins/rustoverlay.sock"
HARNESS_BOOT_TIMEOUT="${HARNESS_BOOT_TIMEOUT:-60}"
HARNESS_PASSED=0
HARNESS_FAILED=0
HARNESS_SUMMARY_DONE=0
HARNESS_CLEANUP_HOOKS=()
HARNESS_PREFIX=""
HARNESS_TMP=""
HARNESS_NAME=""

# The engine (HARNESS_ENGINE): which dockerd the simulated hosts run.
#   docker20  the machine's own (Debian bookworm's docker.io 20.10), default
#   docker26  Debian trixie's docker.io 26.1 from the cached root that
#             tests/lib/trixie-root.sh builds (ROTEST_TRIXIE_ROOT): each host
#             runs plugin and dockerd in that root (overlay, pivot_root), see
#             _harness_start_anchor. Everything else is the same.
HARNESS_ENGINE="${HARNESS_ENGINE:-docker20}"
HARNESS_ENGINE_ROOT=""
if [[ "$HARNESS_ENGINE" == docker26 ]]; then
    HARNESS_ENGINE_ROOT="$("$HARNESS_REPO_ROOT/tests/lib/trixie-root.sh" --path)"
fi

# Each engine's CLI matches its daemon: Debian's docker.io CLI (bookworm's,
# or trixie's docker-cli from the root, which runs here as it is); fall back
# to whatever is on PATH.
if [[ -n "$HARNESS_ENGINE_ROOT" && -x "$HARNESS_ENGINE_ROOT/usr/bin/docker" ]]; then
    HARNESS_DOCKER_CLI="${HARNESS_DOCKER_CLI:-$HARNESS_ENGINE_ROOT/usr/bin/docker}"
elif [[ -x /usr/bin/docker ]]; then
    HARNESS_DOCKER_CLI="${HARNESS_DOCKER_CLI:-/usr/bin/docker}"
else
    HARNESS_DOCKER_CLI="${HARNESS_DOCKER_CLI:-docker}"
fi

# harness_engine_check - fail unless HARNESS_ENGINE names a usable engine.
harness_engine_check() {
    case "$HARNESS_ENGINE" in
        docker20) command -v dockerd >/dev/null 2>&1 || _hdie "dockerd not found (Debian package docker.io)" ;;
        docker26)
            "$HARNESS_REPO_ROOT/tests/lib/trixie-root.sh" --check ||
                _hdie "HARNESS_ENGINE=docker26: no trixie root at $HARNESS_ENGINE_ROOT (build it: tests/lib/trixie-root.sh)"
            ;;
        *) _hdie "HARNESS_ENGINE must be docker20 or docker26, not '$HARNESS_ENGINE'" ;;
    esac
}

# harness_engine_version - the engine's dockerd version, e.g. "26.1.5".
harness_engine_version() {
    local v
    case "$HARNESS_ENGINE" in
        docker26) v="$("$HARNESS_REPO_ROOT/tests/lib/trixie-root.sh" --versions)" && v="${v#docker=}" && v="${v%% *}" ;;
        *) v="$(dockerd --version 2>/dev/null | sed -n 's/^Docker version \([^ ,+]*\).*/\1/p')" ;;
    esac
    printf '%s\n' "${v:-unknown}"
}

# harness_compose_bin - the docker-compose of the engine: Compose v1
# (bookworm's docker-compose 1.29, on PATH) with docker20, Compose v2
# (trixie's docker-compose 2.x from the root, which runs here as it is) with
# docker26. HARNESS_COMPOSE overrides it.
harness_compose_bin() {
    if [[ -n "${HARNESS_COMPOSE:-}" ]]; then
        printf '%s\n' "$HARNESS_COMPOSE"
    elif [[ -n "$HARNESS_ENGINE_ROOT" ]]; then
        printf '%s\n' "$HARNESS_ENGINE_ROOT/usr/bin/docker-compose"
    else
        command -v docker-compose || printf 'docker-compose\n'
    fi
}

# now_ms - wall clock in milliseconds.
now_ms() {
    local t="$EPOCHREALTIME"
    printf '%s\n' $((${t%.*} * 1000 + 10#${t#*.} / 1000))
}

# ms_since T0_MS - milliseconds since T0_MS.
ms_since() { printf '%s\n' $(($(now_ms) - $1)); }

# phase NAME - a phase header with the seconds since the script's start
# (T_START, or SC_T_START of scenarios.sh).
phase() { printf '\n=== [%3ss] %s\n' $((SECONDS - ${T_START:-${SC_T_START:-0}})) "$*"; }

# Scripts with one overlay network: NET (its name) and NET_OVERLAY (its
# subnet segment in the store's keys), and a store_dump function.

# containers_on HOST... - "host name ip mac" of every running container on NET.
containers_on() {
    local h ids
    for h in "$@"; do
        ids="$(hdocker "$h" ps -q --filter "network=$NET")" || continue
        [[ -n "$ids" ]] || continue
        # shellcheck disable=SC2086 # one id per word
        hdocker "$h" inspect -f "{{.Name}} {{with index .NetworkSettings.Networks \"$NET\"}}{{.IPAddress}} {{.MacAddress}}{{end}}" $ids |
            awk -v h="$h" '{ sub(/^\//, "", $1); print h, $1, $2, tolower($3) }'
    done
}

# store_addresses - "ip holder" of every plain address allocated in NET's pool.
store_addresses() {
    store_dump | awk -v p="/rustoverlay/v1/ipam/pool/$NET_OVERLAY/addr/" '
        index($1, p) == 1 && $2 ~ /"kind":"address"/ {
            ip = substr($1, length(p) + 1)
            h = $2; sub(/.*"host":"/, "", h); sub(/".*/, "", h)
            print ip, h
        }' | sort -V || true
}

_hlog() { printf '[harness %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
_hdie() {
    printf '[harness] ERROR: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------
# init and cleanup
# ---------------------------------------------------------------------------

# harness_init NAME - start a run: prefix, temp dir, trap, underlay and world.
harness_init() {
    local name="${1:?usage: harness_init NAME}"
    [[ "$(id -u)" -eq 0 ]] || _hdie "harness_init: must run as root (network and mount namespaces)"
    local tool
    for tool in ip nsenter unshare setsid mount umount "$HARNESS_DOCKER_CLI" timeout; do
        command -v "$tool" >/dev/null 2>&1 || _hdie "harness_init: '$tool' not found (scripts/test installs the packages)"
    done
    harness_engine_check

    harness_sweep_stale

    # Say where a `set -e` abort came from (errtrace: also inside functions).
    set -E
    trap '_harness_on_err "$?" "$BASH_COMMAND" "${FUNCNAME[0]:-main}" "$LINENO"' ERR
    trap '_harness_on_exit' EXIT
    trap '_harness_on_signal INT 130' INT
    trap '_harness_on_signal TERM 143' TERM
    trap '_harness_on_signal HUP 129' HUP

    HARNESS_NAME="$(printf '%s' "$name" | tr -c 'a-zA-Z0-9' '-' | cut -c1-12)"
    HARNESS_TMP="$(mktemp -d "/tmp/rot-${HARNESS_NAME}.XXXXXX")"
    HARNESS_PREFIX="rot-${HARNESS_NAME}-${HARNESS_TMP##*.}"
    HARNESS_PREFIX="${HARNESS_PREFIX,,}"
    printf '%s\n' "$HARNESS_PREFIX" >"$HARNESS_TMP/.prefix"
    printf '%s\n' "$$" >"$HARNESS_TMP/.owner"
    : >"$HARNESS_TMP/.netns"
    : >"$HARNESS_TMP/.pids"
    : >"$HARNESS_TMP/.hosts"
    export DOCKER_CONFIG="$HARNESS_TMP/docker-cli"
    mkdir -p "$DOCKER_CONFIG"
    printf '{}\n' >"$DOCKER_CONFIG/config.json"

    _hlog "run $HARNESS_PREFIX, temp dir $HARNESS_TMP, engine $HARNESS_ENGINE (dockerd $(harness_engine_version))"
    _harness_setup_underlay
}

# harness_on_cleanup FUNC - run FUNC (no arguments) first thing at cleanup.
harness_on_cleanup() {
    HARNESS_CLEANUP_HOOKS+=("$1")
}

_harness_on_err() {
    # Only in the test's own shell: a failing command inside $(...) is often
    # expected (grep without match) and does not abort the script.
    [[ "$BASH_SUBSHELL" -eq 0 ]] || return 0
    printf '[harness] command failed (exit %s) in %s, line %s: %s\n' "$1" "$3" "$4" "$2" >&2
}

_harness_on_signal() {
    local sig="$1" rc="$2"
    printf '[harness] caught SIG%s, cleaning up\n' "$sig" >&2
    exit "$rc"
}

_harness_on_exit() {
    local rc=$?
    set +e
    trap - INT TERM HUP ERR
    local hook
    for hook in "${HARNESS_CLEANUP_HOOKS[@]}"; do
        "$hook" || _hlog "cleanup hook $hook failed"
    done
    if [[ "$HARNESS_SUMMARY_DONE" -eq 0 ]]; then
        # The script died before harness_summary (set -e, signal, _hdie).
        printf 'FAIL - test script aborted (exit status %s) before harness_summary\n' "$rc"
        HARNESS_FAILED=$((HARNESS_FAILED + 1))
        harness_dump_logs
        printf '%s passed, %s failed\n' "$HARNESS_PASSED" "$HARNESS_FAILED"
        [[ "$rc" -ne 0 ]] || rc=1
    fi
    if [[ -n "$HARNESS_TMP" && -d "$HARNESS_TMP" ]]; then
        if [[ "${HARNESS_KEEP:-0}" == 1 ]]; then
            _harness_teardown "$HARNESS_TMP" keep
            _hlog "HARNESS_KEEP=1: logs kept in $HARNESS_TMP"
        else
            _harness_teardown "$HARNESS_TMP"
        fi
    fi
    exit "$rc"
}

# _harness_starttime PID - the process start time (field 22 of stat).
_harness_starttime() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    # shellcheck disable=SC2086 # split the fields
    set -- $stat
    printf '%s\n' "${20}"
}

# _harness_record_pid PID - remember PID (with its start time, so that a
# reused pid is never killed) for teardown.
_harness_record_pid() {
    local st
    st="$(_harness_starttime "$1")" || return 0
    printf '%s %s\n' "$1" "$st" >>"$HARNESS_TMP/.pids"
}

# _harness_spawn PIDFILE LOG CMD... - start CMD detached (own session, stdin
# /dev/null, output appended to LOG); CMD itself writes its pid to PIDFILE
# (it may enter namespaces first: the pid is the one that execs the command).
# Returns when PIDFILE exists; records the pid for teardown.
_harness_spawn() {
    local pidfile="$1" log="$2" pid
    shift 2
    rm -f "$pidfile"
    setsid "$@" >>"$log" 2>&1 </dev/null &
    disown "$!" 2>/dev/null || true
    if ! _harness_wait 15 test -s "$pidfile"; then
        _harness_tail "$log" >&2
        _hdie "could not start: $*"
    fi
    pid="$(cat "$pidfile")"
    _harness_record_pid "$pid"
}

# Prefix for _harness_spawn commands: writes $$ to the pidfile, then execs.
# shellcheck disable=SC2016 # expanded by the inner bash
_HARNESS_PIDWRAP=(bash -c 'echo "$$" >"$0.tmp" && mv "$0.tmp" "$0" && exec "$@"')

# _harness_pid_alive PID - true if PID exists and is not a zombie.
_harness_pid_alive() {
    local pid="$1" stat
    [[ -r "/proc/$pid/stat" ]] || return 1
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ "${stat:0:1}" != "Z" ]]
}

# _harness_run_pids DIR - every live pid that belongs to the run in DIR:
# recorded pids, processes in its network namespaces (dockerd, containerd,
# shims, plugin, helpers) and processes in its cgroups (containers).
_harness_run_pids() {
    local dir="$1" prefix pid ns f
    prefix="$(cat "$dir/.prefix" 2>/dev/null)" || return 0
    [[ -n "$prefix" ]] || return 0
    {
        if [[ -f "$dir/.pids" ]]; then
            local st
            while read -r pid st; do
                [[ -n "$pid" && "$(_harness_starttime "$pid")" == "$st" ]] && printf '%s\n' "$pid"
            done <"$dir/.pids"
        fi
        if [[ -f "$dir/.netns" ]]; then
            while read -r ns; do
                [[ -n "$ns" && -e "/run/netns/$ns" ]] && ip netns pids "$ns" 2>/dev/null
            done <"$dir/.netns"
        fi
        for f in /sys/fs/cgroup/*/"$prefix"-*/ /sys/fs/cgroup/"$prefix"-*/; do
            [[ -d "$f" ]] || continue
            find "$f" -name cgroup.procs -exec cat {} + 2>/dev/null
        done
    } | sort -un | while read -r pid; do
        [[ "$pid" =~ ^[0-9]+$ ]] || continue
        [[ "$pid" -gt 1 && "$pid" -ne "$$" && "$pid" -ne "$BASHPID" ]] || continue
        _harness_pid_alive "$pid" && printf '%s\n' "$pid"
    done
    return 0
}

# _harness_teardown DIR [keep] - kill, unmount, delete. Safe to repeat and to
# run on a half-built run; also used by harness_sweep_stale on dead runs.
_harness_teardown() {
    local dir="$1" keep="${2:-}" prefix pids i ns f
    prefix="$(cat "$dir/.prefix" 2>/dev/null)" || prefix=""

    # Stop the daemons' containers quickly first (fewer stray processes), then
    # SIGKILL everything that is left, until nothing is.
    local killed=""
    for i in $(seq 1 50); do
        pids="$(_harness_run_pids "$dir")"
        [[ -n "$pids" ]] || break
        # shellcheck disable=SC2086 # one pid per word
        kill -9 $pids 2>/dev/null
        killed+=" $pids"
        _harness_nap "$((i - 1))" 100
    done
    pids="$(_harness_run_pids "$dir")"
    [[ -z "$pids" ]] || _hlog "teardown: processes survive SIGKILL: ${pids//$'\n'/ }"
    # Wait (bounded) until the killed processes are reaped, not just zombies,
    # so that a check right after the run sees none of them.
    local p
    for i in $(seq 1 52); do
        pids=""
        for p in $killed; do
            [[ ! -e "/proc/$p" ]] || pids+=" $p"
        done
        [[ -n "$pids" ]] || break
        _harness_nap "$((i - 1))" 100
    done
    [[ -z "$pids" ]] || _hlog "teardown: killed processes not reaped yet:$pids"

    # Cgroups made by the hosts' dockerd (--cgroup-parent /${prefix}-hN).
    if [[ -n "$prefix" ]]; then
        for f in /sys/fs/cgroup/*/"$prefix"-*/ /sys/fs/cgroup/"$prefix"-*/; do
            [[ -d "$f" ]] || continue
            find "$f" -depth -type d -exec rmdir {} + 2>/dev/null
            [[ ! -d "$f" ]] || _hlog "teardown: cannot remove cgroup $f"
        done
    fi
    # Cgroups of managed plugins: dockerd puts them at /<plugin id> of every
    # hierarchy, outside --cgroup-parent (recorded by harness_managed_plugin_create).
    if [[ -f "$dir/.cgroups" ]]; then
        while read -r f; do
            [[ "$f" =~ ^[0-9a-f]{64}$ ]] || continue
            for p in /sys/fs/cgroup/*/"$f"/ /sys/fs/cgroup/"$f"/; do
                [[ -d "$p" ]] || continue
                find "$p" -depth -type d -exec rmdir {} + 2>/dev/null
                [[ ! -d "$p" ]] || _hlog "teardown: cannot remove cgroup $p"
            done
        done <"$dir/.cgroups"
    fi

    # Network namespaces, hosts first, the underlay last. Links inside them go
    # with them.
    if [[ -f "$dir/.netns" ]]; then
        while read -r ns; do
            [[ -n "$ns" ]] || continue
            if [[ -e "/run/netns/$ns" ]]; then
                ip netns del "$ns" 2>/dev/null || _hlog "teardown: cannot delete netns $ns"
            fi
        done < <(tac "$dir/.netns")
    fi

    # Nothing of a run is mounted in the root mount namespace, but a process
    # could have escaped: detach whatever is under the temp dir.
    while read -r f; do
        umount -l "$f" 2>/dev/null || _hlog "teardown: cannot unmount $f"
    done < <(awk -v d="$dir" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r)

    if [[ "$keep" != keep ]]; then
        rm -rf --one-file-system "$dir" 2>/dev/null || _hlog "teardown: cannot remove $dir"
    fi
}

# harness_sweep_stale - tear down runs whose test script is gone (killed with
# SIGKILL, machine-level timeout): temp dirs /tmp/rot-*.* whose owner pid is
# dead, and rot-* namespaces that no live run owns.
harness_sweep_stale() {
    local dir owner ns owned=""
    for dir in /tmp/rot-*.*; do
        [[ -d "$dir" && -f "$dir/.prefix" ]] || continue
        owner="$(cat "$dir/.owner" 2>/dev/null)" || owner=""
        if [[ -n "$owner" ]] && _harness_pid_alive "$owner"; then
            owned+=" $(cat "$dir/.prefix")"
            continue
        fi
        _hlog "sweeping stale run in $dir"
        _harness_teardown "$dir"
    done
    while read -r ns _; do
        [[ "$ns" == rot-* ]] || continue
        local p skip=0
        for p in $owned; do
            [[ "$ns" == "$p"-* ]] && skip=1
        done
        [[ "$skip" -eq 0 ]] || continue
        _hlog "sweeping stale netns $ns"
        local pids
        pids="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
        # shellcheck disable=SC2086
        [[ -z "${pids// /}" ]] || kill -9 $pids 2>/dev/null
        ip netns del "$ns" 2>/dev/null || true
    done < <(ip netns list 2>/dev/null)
    return 0
}

# ---------------------------------------------------------------------------
# underlay, world, hosts
# ---------------------------------------------------------------------------

_harness_netns_add() {
    local ns="$1"
    printf '%s\n' "$ns" >>"$HARNESS_TMP/.netns"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
}

harness_ul_ns() { printf '%s-ul' "$HARNESS_PREFIX"; }
harness_world_ns() { printf '%s-world' "$HARNESS_PREFIX"; }
harness_host_ns() { printf '%s-h%s' "$HARNESS_PREFIX" "${1:?host number}"; }
harness_host_ip() { printf '%s.%s' "$HARNESS_UL_NET" "${1:?host number}"; }
harness_host_dir() { printf '%s/h%s' "$HARNESS_TMP" "${1:?host number}"; }

_harness_setup_underlay() {
    local ul world
    ul="$(harness_ul_ns)"
    world="$(harness_world_ns)"
    _harness_netns_add "$ul"
    ip -n "$ul" link add br0 type bridge
    ip -n "$ul" link set br0 up
    _harness_netns_add "$world"
    ip -n "$ul" link add world mtu "$HARNESS_UL_MTU" type veth peer name ul0 mtu "$HARNESS_UL_MTU" netns "$world"
    ip -n "$ul" link set world master br0 up
    ip -n "$world" addr add "$HARNESS_WORLD_IP/$HARNESS_UL_PREFIXLEN" dev ul0
    ip -n "$world" link set ul0 up
}

# harness_add_host N - create host N's namespace and underlay link (idempotent).
harness_add_host() {
    local n="${1:?usage: harness_add_host N}" ul ns
    [[ "$n" =~ ^[0-9]+$ && "$n" -ge 1 && "$n" -le 200 ]] || _hdie "harness_add_host: host number 1..200, got '$n'"
    ns="$(harness_host_ns "$n")"
    [[ -e "/run/netns/$ns" ]] && return 0
    ul="$(harness_ul_ns)"
    _harness_netns_add "$ns"
    ip -n "$ul" link add "h$n" mtu "$HARNESS_UL_MTU" type veth peer name ul0 mtu "$HARNESS_UL_MTU" netns "$ns"
    ip -n "$ul" link set "h$n" master br0 up
    ip -n "$ns" addr add "$(harness_host_ip "$n")/$HARNESS_UL_PREFIXLEN" dev ul0
    ip -n "$ns" link set ul0 up
    ip -n "$ns" route add default via "$HARNESS_WORLD_IP" dev ul0
    mkdir -p "$(harness_host_dir "$n")"
    grep -qx "$n" "$HARNESS_TMP/.hosts" || printf '%s\n' "$n" >>"$HARNESS_TMP/.hosts"
}

# harness_host_link N up|down - cut or restore host N's underlay cable.
harness_host_link() {
    local n="${1:?host}" state="${2:?up|down}"
    ip -n "$(harness_ul_ns)" link set "h$n" "$state"
}

# hexec N CMD... - run CMD in host N's network namespace (root mount view).
hexec() {
    local n="${1:?usage: hexec N CMD...}"
    shift
    nsenter --net="/run/netns/$(harness_host_ns "$n")" -- "$@"
}

# hexec_mnt N CMD... - run CMD in host N's network AND mount namespace (its
# /run with the plugin socket, its /sys). Started hosts only; cwd becomes /.
hexec_mnt() {
    local n="${1:?usage: hexec_mnt N CMD...}" anchor
    shift
    anchor="$(_harness_anchor_pid "$n")" || _hdie "hexec_mnt: host $n is not started"
    nsenter --target "$anchor" --mount --net -- "$@"
}

# hworld CMD... - run CMD in the world namespace.
hworld() {
    nsenter --net="/run/netns/$(harness_world_ns)" -- "$@"
}

# harness_bg NS LOGNAME CMD... - run CMD in the background in network namespace
# NS (e.g. "$(harness_world_ns)"); output to $HARNESS_TMP/LOGNAME.log; prints
# the pid. Killed at cleanup.
harness_bg() {
    local ns="${1:?netns}" logname="${2:?log name}" pidfile
    shift 2
    pidfile="$HARNESS_TMP/$logname.pid"
    _harness_spawn "$pidfile" "$HARNESS_TMP/$logname.log" \
        nsenter --net="/run/netns/$ns" -- "${_HARNESS_PIDWRAP[@]}" "$pidfile" "$@"
    cat "$pidfile"
}

_harness_anchor_pid() {
    local n="$1" pid
    pid="$(cat "$(harness_host_dir "$n")/anchor.pid" 2>/dev/null)" || return 1
    [[ -n "$pid" ]] && _harness_pid_alive "$pid" || return 1
    printf '%s\n' "$pid"
}

# _harness_nap TRY MAX_MS [FIRST_MS] - the pause before try TRY+1 (TRY = 0,
# 1, ...) of a poll: FIRST_MS (default 20) doubling at each try, at most
# MAX_MS. What the harness waits for (a pid file, a socket, a dead process)
# mostly takes a few tens of ms: a fixed 0.2 s pause cost most of that again
# on every wait. Deadlines stay as they were.
_harness_nap() {
    local try="$1" max_ms="$2" ms="${3:-20}"
    ((try < 8)) || try=8
    ms=$((ms << try))
    ((ms <= max_ms)) || ms="$max_ms"
    printf -v ms '%d.%03d' $((ms / 1000)) $((ms % 1000))
    sleep "$ms"
}

# _harness_wait TIMEOUT_S CMD... - poll CMD until it succeeds (every 0.2 s,
# sooner at first: _harness_nap).
_harness_wait() {
    # (_hw_try: CMD may be an eval of the caller's words; no name of theirs)
    local timeout="$1" deadline _hw_try=0
    shift
    deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        _harness_nap "$_hw_try" 200
        _hw_try=$((_hw_try + 1))
    done
}

_harness_tail() {
    local file="$1" lines="${2:-40}"
    printf -- '----- last %s lines of %s -----\n' "$lines" "$file"
    if [[ -f "$file" ]]; then tail -n "$lines" "$file"; else echo "(no such file)"; fi
    printf -- '----- end of %s -----\n' "$file"
}

# _harness_start_anchor N - the process that holds host N's mount namespace
# (in its network namespace), set up for the engine:
#  docker20: the machine's root with /run a fresh tmpfs (only this host's
#    plugin socket in /run/docker/plugins, no system containerd socket, no
#    /run/systemd) and /sys a sysfs of the host's netns, with the cgroup
#    hierarchies moved over from the old /sys.
#  docker26: the trixie root (HARNESS_ENGINE_ROOT) as an overlay whose upper
#    layer is the host's $dir/root.upper (the cached root is never written; a
#    host's /etc, /var... persist across harness_stop_host/start_host like a
#    disk), with proc, a sysfs of the host's netns, /sys/fs/cgroup and /dev
#    (rbind), the same fresh tmpfs /run, and at their own paths the run's temp
#    dir (data-roots, sockets, logs, plugin dirs) and the plugin binary's
#    directory; then pivot_root into it (not chroot: runc would then see the
#    machine's /sys, e.g. the machine's MTU for eth0).
# Plugin and dockerd join it with nsenter (so both see the same /run, and
# dockerd's netns files); hexec_mnt too.
_harness_start_anchor() {
    local n="$1" dir ns bindir
    dir="$(harness_host_dir "$n")"
    ns="$(harness_host_ns "$n")"
    if [[ "$HARNESS_ENGINE" == docker26 ]]; then
        bindir="$(dirname "$(harness_bin)")"
        mkdir -p "$dir/root" "$dir/root.upper" "$dir/root.work"
        # shellcheck disable=SC2016 # expanded by the inner bash
        _harness_spawn "$dir/anchor.pid" "$dir/anchor.log" \
            unshare --mount --propagation private -- \
            nsenter --net="/run/netns/$ns" -- \
            bash -c '
                set -eu
                dir="$1" lower="$2" tmp="$3" bindir="$4"
                r="$dir/root"
                # -n: no utab (libmount would lock /run/mount/utab in the root fs)
                mount -n -t overlay rotest-root \
                    -o "lowerdir=$lower,upperdir=$dir/root.upper,workdir=$dir/root.work" "$r"
                mount -n -t proc rotest-proc "$r/proc"
                if mount -n -t sysfs rotest-sys "$r/sys"; then
                    mount -n --rbind /sys/fs/cgroup "$r/sys/fs/cgroup"
                else
                    echo "warning: cannot mount a sysfs for this netns; binding the root one" >&2
                    mount -n --rbind /sys "$r/sys"
                fi
                mount -n --rbind /dev "$r/dev"
                mount -n -t tmpfs -o mode=0755,size=256m rotest-run "$r/run"
                mkdir -p "$r/run/docker/plugins" "$r/run/containerd" "$r/run/lock"
                mkdir -p "$r$tmp"
                mount -n --bind "$tmp" "$r$tmp"
                case "$bindir/" in
                    "$tmp/"*) ;;
                    *)
                        mkdir -p "$r$bindir"
                        mount -n --bind "$bindir" "$r$bindir"
                        mount -n -o remount,bind,ro "$r$bindir"
                        ;;
                esac
                cd "$r"
                pivot_root . .oldroot
                cd /
                umount -n -l /.oldroot
                echo "$$" >"$dir/anchor.pid.tmp"
                mv "$dir/anchor.pid.tmp" "$dir/anchor.pid"
                exec sleep infinity
            ' rotest-anchor "$dir" "$HARNESS_ENGINE_ROOT" "$HARNESS_TMP" "$bindir"
        return 0
    fi
    # shellcheck disable=SC2016 # expanded by the inner bash
    _harness_spawn "$dir/anchor.pid" "$dir/anchor.log" \
        unshare --mount --propagation private -- \
        nsenter --net="/run/netns/$ns" -- \
        bash -c '
            set -eu
            dir="$1"
            # -n: no utab (libmount would lock /run/mount/utab in the root fs)
            mount -n -t tmpfs -o mode=0755,size=256m rotest-run /run
            mkdir -p /run/docker/plugins /run/containerd /run/lock
            mkdir /run/.cg
            mount -n --rbind /sys/fs/cgroup /run/.cg
            if mount -n -t sysfs rotest-sys /sys; then
                mount -n --move /run/.cg /sys/fs/cgroup
            else
                echo "warning: cannot mount a sysfs for this netns; keeping the root one" >&2
                umount -n -l /run/.cg
            fi
            rmdir /run/.cg
            echo "$$" >"$dir/anchor.pid.tmp"
            mv "$dir/anchor.pid.tmp" "$dir/anchor.pid"
            exec sleep infinity
        ' rotest-anchor "$dir"
}

# harness_start_host N [--no-plugin] [plugin args...] - start host N: the
# private mount namespace, the plugin (unless --no-plugin), then dockerd.
# Plugin args are appended to `serve`; --socket, --store, --host-id and
# --vtep-ip default to this host's values unless given, and --linger to 0
# (devices go with the host's last container, as the tests expect).
harness_start_host() {
    local n="${1:?usage: harness_start_host N [--no-plugin] [plugin args...]}"
    shift
    local with_plugin=1
    if [[ "${1:-}" == --no-plugin ]]; then
        with_plugin=0
        shift
    fi
    harness_add_host "$n"
    local dir ns
    dir="$(harness_host_dir "$n")"
    ns="$(harness_host_ns "$n")"
    _harness_anchor_pid "$n" >/dev/null && _hdie "harness_start_host: host $n already started"
    mkdir -p "$dir/data"
    rm -f "$dir/anchor.pid" "$dir/no-plugin"

    _harness_start_anchor "$n"

    if [[ "$with_plugin" -eq 1 ]]; then
        : >"$dir/plugin.args"
        (($# == 0)) || printf '%s\0' "$@" >"$dir/plugin.args"
        harness_restart_plugin "$n"
    else
        : >"$dir/plugin.args"
        touch "$dir/no-plugin"
    fi

    _harness_start_dockerd "$n"
    local what
    what="dockerd pid $(cat "$dir/dockerd.pid")"
    [[ "$with_plugin" -eq 0 ]] || what+=", plugin pid $(cat "$dir/plugin.pid")"
    _hlog "host $n up: netns $ns, ip $(harness_host_ip "$n"), $what, engine $HARNESS_ENGINE (server $(hdocker "$n" version -f '{{.Server.Version}}' 2>&1))"
}

# _harness_start_dockerd N - dockerd in host N's namespaces; waits until it
# answers. Its exec-root is /run/docker of the host's private /run (gone with
# the mount namespace, like /run after a reboot); data-root is on disk.
_harness_start_dockerd() {
    local n="$1" dir anchor dpid
    dir="$(harness_host_dir "$n")"
    anchor="$(_harness_anchor_pid "$n")" || _hdie "host $n is not started"
    # deprecated-key-path: dockerd 20.10 otherwise writes /etc/docker/key.json.
    printf '{"deprecated-key-path": "%s/key.json"}\n' "$dir" >"$dir/daemon.json"
    printf '\n===== dockerd start %s =====\n' "$(date +%T)" >>"$dir/dockerd.log"
    _harness_spawn "$dir/dockerd.pid" "$dir/dockerd.log" \
        nsenter --target "$anchor" --mount --net -- \
        "${_HARNESS_PIDWRAP[@]}" "$dir/dockerd.pid" \
        dockerd \
        --data-root "$dir/data" \
        --exec-root /run/docker \
        --pidfile /run/docker.pid \
        -H "unix://$dir/docker.sock" \
        --config-file "$dir/daemon.json" \
        --cgroup-parent "/$HARNESS_PREFIX-h$n" \
        --exec-opt native.cgroupdriver=cgroupfs \
        --shutdown-timeout 2
    dpid="$(cat "$dir/dockerd.pid")"

    local deadline=$((SECONDS + HARNESS_BOOT_TIMEOUT)) try=0
    until hdocker "$n" version >/dev/null 2>&1; do
        if ! _harness_pid_alive "$dpid"; then
            _harness_tail "$dir/dockerd.log" >&2
            _hdie "host $n: dockerd exited during startup (log: $dir/dockerd.log)"
        fi
        if ((SECONDS >= deadline)); then
            _harness_tail "$dir/dockerd.log" >&2
            _hdie "host $n: dockerd not answering on $dir/docker.sock after ${HARNESS_BOOT_TIMEOUT}s"
        fi
        # Each try is a docker CLI run: from 50 ms, at most every 0.3 s.
        _harness_nap "$try" 300 50
        try=$((try + 1))
    done
}

# harness_restart_dockerd N [--kill] - restart only host N's dockerd (SIGTERM,
# or SIGKILL with --kill: containerd and the containers keep running then).
# The plugin and the host's /run stay.
harness_restart_dockerd() {
    local n="${1:?usage: harness_restart_dockerd N [--kill]}" dir pid sig=TERM
    [[ "${2:-}" != --kill ]] || sig=KILL
    dir="$(harness_host_dir "$n")"
    pid="$(cat "$dir/dockerd.pid" 2>/dev/null)" || pid=""
    if [[ -n "$pid" ]] && _harness_pid_alive "$pid"; then
        kill -s "$sig" "$pid" 2>/dev/null || true
        _harness_wait 30 eval "! _harness_pid_alive $pid" || {
            _hlog "host $n: dockerd ignored SIG$sig for 30s, killing it"
            kill -9 "$pid" 2>/dev/null || true
            _harness_wait 5 eval "! _harness_pid_alive $pid" || true
        }
    fi
    [[ -z "$pid" ]] || _harness_wait 10 eval "[[ ! -e /proc/$pid ]]" || true
    # dockerd's containerd gets SIGKILL when dockerd dies (pdeathsig); a new
    # dockerd that still sees its pid (zombie, not reaped yet) takes it for
    # a live containerd and times out on its socket. Wait for it to vanish;
    # a containerd that really survives is adopted by the new dockerd.
    local anchor cpid
    anchor="$(_harness_anchor_pid "$n")" || _hdie "host $n is not started"
    cpid="$(cat "/proc/$anchor/root/run/docker/containerd/containerd.pid" 2>/dev/null)" || cpid=""
    if [[ "$cpid" =~ ^[0-9]+$ ]]; then
        sleep 0.3
        _harness_wait 10 eval "[[ ! -e /proc/$cpid ]] || _harness_pid_alive $cpid" || true
    fi
    _harness_start_dockerd "$n"
}

# harness_plugin_pid N - pid of host N's plugin (empty + failure if not running).
harness_plugin_pid() {
    local pid
    pid="$(cat "$(harness_host_dir "$1")/plugin.pid" 2>/dev/null)" || return 1
    [[ -n "$pid" ]] && _harness_pid_alive "$pid" || return 1
    printf '%s\n' "$pid"
}

# harness_store_url N - the store URL host N's plugin was started with.
harness_store_url() {
    cat "$(harness_host_dir "$1")/store.url"
}

# harness_kill_plugin N [SIGNAL] - kill host N's plugin (default SIGKILL) and
# wait until it is gone. The socket file stays, as after a real crash.
harness_kill_plugin() {
    local n="${1:?usage: harness_kill_plugin N [SIGNAL]}" sig="${2:-KILL}" pid
    pid="$(harness_plugin_pid "$n")" || return 0
    kill -s "$sig" "$pid" 2>/dev/null || true
    if ! _harness_wait 15 eval "! _harness_pid_alive $pid"; then
        _hlog "host $n: plugin pid $pid ignored SIG$sig for 15s, sending SIGKILL"
        kill -9 "$pid" 2>/dev/null || true
        _harness_wait 5 eval "! _harness_pid_alive $pid" || _hdie "host $n: plugin pid $pid does not die"
    fi
}

_harness_socket_id() {
    local n="$1" anchor
    anchor="$(_harness_anchor_pid "$n")" || return 1
    stat -c '%i.%Z' "/proc/$anchor/root$HARNESS_PLUGIN_SOCKET" 2>/dev/null
}

_harness_plugin_ready() {
    local n="$1" before="$2" now
    now="$(_harness_socket_id "$n")" || return 1
    [[ "$now" != "$before" ]] && test -S "/proc/$(_harness_anchor_pid "$n")/root$HARNESS_PLUGIN_SOCKET"
}

_harness_has_flag() {
    local flag="$1" a
    shift
    for a in "$@"; do
        [[ "$a" == "$flag" || "$a" == "$flag="* ]] && return 0
    done
    return 1
}

# harness_restart_plugin N - (re)start host N's plugin with the args given to
# harness_start_host (SIGKILLs a running one first). Waits for a NEW socket.
harness_restart_plugin() {
    local n="${1:?usage: harness_restart_plugin N}" dir anchor bin before
    dir="$(harness_host_dir "$n")"
    [[ ! -f "$dir/no-plugin" ]] || _hdie "host $n was started with --no-plugin"
    anchor="$(_harness_anchor_pid "$n")" || _hdie "host $n is not started"
    harness_kill_plugin "$n" KILL
    bin="$(harness_bin)"
    [[ -x "$bin" ]] || _hdie "plugin binary $bin missing: run 'cargo build --release -p rustoverlay' or set RUSTOVERLAY_BIN"
    # docker26: the host's root holds only the run's temp dir and the plugin
    # binary's directory as it was at harness_start_host.
    [[ -x "/proc/$anchor/root$bin" ]] ||
        _hdie "plugin binary $bin is not visible in host $n's root (engine $HARNESS_ENGINE: put it under $HARNESS_TMP)"

    local -a extra=() args=()
    if [[ -s "$dir/plugin.args" ]]; then
        mapfile -d '' -t extra <"$dir/plugin.args"
    fi
    _harness_has_flag --socket "${extra[@]}" || args+=(--socket "$HARNESS_PLUGIN_SOCKET")
    if ! _harness_has_flag --store "${extra[@]}"; then
        args+=(--store "file://$dir/state.redb")
        printf '%s\n' "file://$dir/state.redb" >"$dir/store.url"
    else
        local i
        for ((i = 0; i < ${#extra[@]}; i++)); do
            case "${extra[i]}" in
                --store) printf '%s\n' "${extra[i + 1]:-}" >"$dir/store.url" ;;
                --store=*) printf '%s\n' "${extra[i]#--store=}" >"$dir/store.url" ;;
            esac
        done
    fi
    _harness_has_flag --host-id "${extra[@]}" || args+=(--host-id "h$n")
    # Devices go with a host's last container (the tests check that), unless
    # a test asks for the linger users get by default.
    _harness_has_flag --linger "${extra[@]}" || args+=(--linger 0)
    _harness_has_flag --vtep-ip "${extra[@]}" || args+=(--vtep-ip "$(harness_host_ip "$n")")
    # Names across hosts: this host's dockerd, and upstreams from a file of
    # the run's (empty unless a test writes one), never the machine's.
    _harness_has_flag --docker-socket "${extra[@]}" || args+=(--docker-socket "unix://$dir/docker.sock")
    if ! _harness_has_flag --resolv-conf "${extra[@]}"; then
        [[ -e "$dir/resolv.conf" ]] || : >"$dir/resolv.conf"
        args+=(--resolv-conf "$dir/resolv.conf")
    fi

    before="$(_harness_socket_id "$n")" || before=none
    printf '\n===== plugin start %s: %s serve %s %s =====\n' "$(date +%T)" "$bin" "${args[*]}" "${extra[*]}" >>"$dir/plugin.log"
    _harness_spawn "$dir/plugin.pid" "$dir/plugin.log" \
        nsenter --target "$anchor" --mount --net -- \
        "${_HARNESS_PIDWRAP[@]}" "$dir/plugin.pid" \
        env RUSTOVERLAY_LOG="${HARNESS_PLUGIN_LOG:-info,rustoverlay=debug}" RUST_BACKTRACE=1 NO_COLOR=1 \
        "$bin" serve "${args[@]}" "${extra[@]}"
    local pid
    pid="$(cat "$dir/plugin.pid")"

    local deadline=$((SECONDS + HARNESS_BOOT_TIMEOUT)) try=0
    until _harness_plugin_ready "$n" "$before"; do
        if ! _harness_pid_alive "$pid"; then
            _harness_tail "$dir/plugin.log" >&2
            _hdie "host $n: plugin exited during startup (log: $dir/plugin.log)"
        fi
        if ((SECONDS >= deadline)); then
            _harness_tail "$dir/plugin.log" >&2
            _hdie "host $n: plugin socket $HARNESS_PLUGIN_SOCKET not (re)created after ${HARNESS_BOOT_TIMEOUT}s"
        fi
        _harness_nap "$try" 200
        try=$((try + 1))
    done
}

# harness_set_plugin_args N [serve args...] - replace the `serve` args host
# N's plugin gets from its next (re)start on (harness_restart_plugin); the
# same defaults as harness_start_host apply (--socket, --store, --host-id,
# --vtep-ip, --linger 0). The running plugin is not touched.
harness_set_plugin_args() {
    local n="${1:?usage: harness_set_plugin_args N [serve args...]}" dir
    shift
    dir="$(harness_host_dir "$n")"
    [[ -d "$dir" ]] || _hdie "harness_set_plugin_args: host $n does not exist"
    [[ ! -f "$dir/no-plugin" ]] || _hdie "host $n was started with --no-plugin"
    : >"$dir/plugin.args"
    (($# == 0)) || printf '%s\0' "$@" >"$dir/plugin.args"
}

# harness_host_block N IP / harness_host_unblock N IP - drop every IPv4 packet
# between host N and IP, both ways, with iptables rules in host N's own
# namespace (INPUT -s IP, OUTPUT -d IP): a partition between that host and
# one address (e.g. the store) while the rest of the underlay stays reachable.
# Silent loss for TCP: connections hang and time out, nothing is refused.
# The rules go with the namespace at cleanup.
harness_host_block() {
    local n="${1:?usage: harness_host_block N IP}" ip="${2:?usage: harness_host_block N IP}"
    command -v iptables >/dev/null 2>&1 || _hdie "harness_host_block: 'iptables' not found (Debian package iptables)"
    hexec "$n" iptables -w 5 -I INPUT 1 -s "$ip" -j DROP
    hexec "$n" iptables -w 5 -I OUTPUT 1 -d "$ip" -j DROP
}

harness_host_unblock() {
    local n="${1:?usage: harness_host_unblock N IP}" ip="${2:?usage: harness_host_unblock N IP}"
    hexec "$n" iptables -w 5 -D INPUT -s "$ip" -j DROP
    hexec "$n" iptables -w 5 -D OUTPUT -d "$ip" -j DROP
}

# harness_bin - absolute path of the plugin binary.
harness_bin() {
    local bin="${RUSTOVERLAY_BIN:-${CARGO_TARGET_DIR:-$HARNESS_REPO_ROOT/target}/release/rustoverlay}"
    realpath -m "$bin"
}

# hdocker N ARGS... - docker CLI against host N's dockerd.
hdocker() {
    local n="${1:?usage: hdocker N ARGS...}"
    shift
    "$HARNESS_DOCKER_CLI" -H "unix://$(harness_host_dir "$n")/docker.sock" "$@"
}

# harness_stop_host N [--rm] - clean shutdown of host N: dockerd (SIGTERM:
# it stops the containers, which stay defined), then the plugin, then what is
# left (containerd, anchor). --rm removes all containers first. The namespace,
# data-root and store stay: harness_start_host N starts the host again.
harness_stop_host() {
    local n="${1:?usage: harness_stop_host N [--rm]}" dir pid
    dir="$(harness_host_dir "$n")"
    if [[ "${2:-}" == --rm ]]; then
        local ids
        ids="$(timeout 30 "$HARNESS_DOCKER_CLI" -H "unix://$dir/docker.sock" ps -aq 2>/dev/null)" || ids=""
        # shellcheck disable=SC2086
        [[ -z "$ids" ]] || timeout 60 "$HARNESS_DOCKER_CLI" -H "unix://$dir/docker.sock" rm -f $ids >/dev/null 2>&1 || true
    fi
    pid="$(cat "$dir/dockerd.pid" 2>/dev/null)" || pid=""
    if [[ -n "$pid" ]] && _harness_pid_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        _harness_wait 30 eval "! _harness_pid_alive $pid" || {
            _hlog "host $n: dockerd ignored SIGTERM for 30s, killing it"
            kill -9 "$pid" 2>/dev/null || true
        }
    fi
    [[ -f "$dir/no-plugin" ]] || harness_kill_plugin "$n" TERM
    _harness_kill_host_procs "$n"
}

# harness_crash_host N [--reboot] - power loss on host N: SIGKILL to its
# plugin, dockerd, containerd, shims and containers at once. Its /run (plugin
# state dir, socket) is gone with its mount namespace; data-root and store
# stay. --reboot also replaces the host's network namespace with a fresh one
# (no leftover bridges, veths, routes or firewall rules), as after a reboot.
# harness_start_host N brings it back.
harness_crash_host() {
    local n="${1:?usage: harness_crash_host N [--reboot]}" ns
    _harness_kill_host_procs "$n"
    if [[ "${2:-}" == --reboot ]]; then
        ns="$(harness_host_ns "$n")"
        ip -n "$(harness_ul_ns)" link del "h$n" 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
        # The kernel dismantles a namespace asynchronously.
        _harness_wait 10 eval "! ip -n $(harness_ul_ns) link show h$n" ||
            _hdie "host $n: underlay link h$n still there after deleting $ns"
        harness_add_host "$n"
    fi
}

# _harness_kill_host_procs N - SIGKILL every process of host N (its netns:
# anchor, plugin, dockerd, containerd, shims; its cgroups: containers) and
# wait until they are gone.
_harness_kill_host_procs() {
    local n="$1" ns cg i pids p f killed=""
    ns="$(harness_host_ns "$n")"
    cg="$HARNESS_PREFIX-h$n"
    for i in $(seq 1 50); do
        pids="$(
            ip netns pids "$ns" 2>/dev/null
            for f in /sys/fs/cgroup/*/"$cg"/ /sys/fs/cgroup/"$cg"/; do
                [[ ! -d "$f" ]] || find "$f" -name cgroup.procs -exec cat {} + 2>/dev/null
            done
            true
        )"
        # `if`, not `&&`: a dead last pid must not fail the loop (pipefail).
        pids="$(for p in $pids; do if _harness_pid_alive "$p"; then echo "$p"; fi; done | sort -u)"
        [[ -n "$pids" ]] || break
        # shellcheck disable=SC2086
        kill -9 $pids 2>/dev/null || true
        killed+=" $pids"
        _harness_nap "$((i - 1))" 100
    done
    [[ -z "$pids" ]] || _hlog "host $n: processes survive SIGKILL: ${pids//$'\n'/ }"
    # Wait until they are reaped too: a zombie containerd still "exists" for a
    # dockerd started right after and would be taken for a running one.
    for i in $(seq 1 52); do
        pids=""
        for p in $killed; do
            [[ ! -e "/proc/$p" ]] || pids+=" $p"
        done
        [[ -n "$pids" ]] || break
        _harness_nap "$((i - 1))" 100
    done
    rm -f "$(harness_host_dir "$n")/anchor.pid"
}

# ---------------------------------------------------------------------------
# image
# ---------------------------------------------------------------------------

# harness_busybox_image N - import rotest/busybox:latest into host N, from a
# rootfs built of Debian's busybox-static (built once per run, cached; with
# HARNESS_IMAGE_CACHE set, once per busybox binary for every run using that
# directory: scripts/test gives its tier-3 scripts one, which saves each
# script building the same tar, about 1.5 s of forks).
harness_busybox_image() {
    local n="${1:?usage: harness_busybox_image N}"
    local tarball="$HARNESS_TMP/busybox-rootfs.tar"
    if [[ -n "${HARNESS_IMAGE_CACHE:-}" ]]; then
        local id
        # The binary the tar is made of, by size, mtime and inode: a new
        # busybox-static makes a new tar.
        id="$(stat -L -c '%s-%Y-%i' /bin/busybox 2>/dev/null)" || id=none
        mkdir -p "$HARNESS_IMAGE_CACHE"
        tarball="$HARNESS_IMAGE_CACHE/busybox-rootfs-$id.tar"
    fi
    if [[ ! -s "$tarball" ]]; then
        _harness_build_busybox_tar "$tarball"
    fi
    hdocker "$n" import --change 'CMD ["/bin/sh"]' "$tarball" "$HARNESS_IMAGE" >/dev/null
}

_harness_build_busybox_tar() {
    local tarball="$1" root bb applet
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' ||
        _hdie "busybox-static is not installed (a dynamic busybox would not run in the image)"
    bb="/bin/busybox"
    [[ -x "$bb" ]] || _hdie "$bb missing"
    root="$HARNESS_TMP/busybox-rootfs"
    rm -rf "$root"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,root,run,var/tmp}
    chmod 1777 "$root/tmp" "$root/var/tmp"
    cp "$bb" "$root/bin/busybox"
    while read -r applet; do
        [[ -n "$applet" && "$applet" != bin/busybox ]] || continue
        mkdir -p "$root/$(dirname "$applet")"
        ln -sf /bin/busybox "$root/$applet"
    done < <("$bb" --list-full)
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
    # Written aside and renamed: another run may share the cache directory.
    tar --numeric-owner --owner=0 --group=0 -C "$root" -cf "$tarball.tmp.$$" .
    mv -f "$tarball.tmp.$$" "$tarball"
    rm -rf "$root"
}

# hcontainer_ip N CONTAINER NETWORK - the container's IPv4 address on NETWORK.
hcontainer_ip() {
    local n="$1" c="$2" net="$3"
    hdocker "$n" inspect -f "{{with index .NetworkSettings.Networks \"$net\"}}{{.IPAddress}}{{end}}" "$c"
}

# ---------------------------------------------------------------------------
# the plugin's store
# ---------------------------------------------------------------------------

# Keys that mean "something is still allocated". What may stay after every
# network is gone: cursors such as vni/next and the (empty) ipam/pools index.
HARNESS_ALLOC_KEY_RE='^/rustoverlay/v1/(ipam/pool/|vni/[0-9]|overlay/|host/|ipam/pools \{"pools":\[[^]])'

# harness_store_dump N|etcd - print a store ("key value" lines) with
# `rustoverlay dump`: host N's store, or with "etcd" the run's etcd (see
# harness_start_etcd). The embedded store is locked by a running plugin, so for
# file:// stores the plugin is stopped (SIGTERM) first and started again after;
# an etcd store is read while the plugins run.
harness_store_dump() {
    local n="${1:?usage: harness_store_dump N|etcd|consul}" url rc=0 restart=0
    if [[ "$n" == etcd || "$n" == consul ]]; then
        # From the store's own namespace: no host needs to be up.
        nsenter --net="/run/netns/$(harness_shared_store_ns "$n")" -- \
            timeout 30 "$(harness_bin)" dump --store "$(harness_shared_store_url "$n")" || rc=$?
        return "$rc"
    fi
    url="$(harness_store_url "$n")"
    if [[ "$url" == memory:* ]]; then
        echo "host $n uses a memory:// store: only its plugin can see it" >&2
        return 1
    fi
    if [[ "$url" == file://* ]] && harness_plugin_pid "$n" >/dev/null; then
        harness_kill_plugin "$n" TERM
        restart=1
    fi
    # In the host's netns, so that a networked store is reached the same way.
    hexec "$n" timeout 30 "$(harness_bin)" dump --store "$url" || rc=$?
    if [[ "$restart" -eq 1 ]]; then
        harness_restart_plugin "$n" >&2
    fi
    return "$rc"
}

# assert_store_empty N|etcd - HOOK: the store holds no allocation (no pool,
# address, VNI claim, overlay, endpoint or host->network key). Hosts sharing
# one etcd share one store: check it once (`assert_store_empty etcd`, or with
# any one of those hosts). Live host registrations (hosts/<id>) may stay.
assert_store_empty() {
    local n="${1:?usage: assert_store_empty N|etcd|consul}" dump left what url
    if [[ "$n" == etcd || "$n" == consul ]]; then
        url="$(harness_shared_store_url "$n")"
        what="shared store $url"
    else
        url="$(harness_store_url "$n")"
        what="host $n's store"
        [[ "$url" != etcd://* && "$url" != consul://* ]] || what="shared store $url (via host $n)"
    fi
    if ! dump="$(harness_store_dump "$n" 2>&1)"; then
        harness_fail "$what: store dump failed ($(harness_bin) dump --store $url)"
        printf '%s\n' "$dump" | _harness_indent
        return 0
    fi
    left="$(printf '%s\n' "$dump" | grep -E "$HARNESS_ALLOC_KEY_RE" || true)"
    if [[ -z "$left" ]]; then
        harness_pass "$what holds no allocation"
    else
        harness_fail "$what still holds allocations:"
        printf '%s\n' "$left" | _harness_indent
    fi
}

# ---------------------------------------------------------------------------
# a shared etcd store
# ---------------------------------------------------------------------------
#
# One etcd member in its own namespace ${prefix}-etcd, cabled to the underlay
# bridge like a host (ul0 = 10.250.0.200/24), listening only on that address
# (client 2379, peer 2380). Data dir $HARNESS_TMP/etcd/data, log
# $HARNESS_TMP/etcd/etcd.log. Its namespace is recorded like a host's, so the
# cleanup trap kills it and removes the namespace.

HARNESS_ETCD_IP="${HARNESS_UL_NET}.200"
HARNESS_ETCD_CLIENT_PORT=2379
HARNESS_ETCD_PEER_PORT=2380
HARNESS_ETCD_TIMEOUT="${HARNESS_ETCD_TIMEOUT:-30}"

harness_etcd_ns() { printf '%s-etcd' "$HARNESS_PREFIX"; }
harness_etcd_dir() { printf '%s/etcd' "$HARNESS_TMP"; }
# harness_etcd_url - the store URL for the plugins: etcd://10.250.0.200:2379
harness_etcd_url() { printf 'etcd://%s:%s' "$HARNESS_ETCD_IP" "$HARNESS_ETCD_CLIENT_PORT"; }

# harness_etcd_pid - pid of the run's etcd (failure if it is not running).
harness_etcd_pid() {
    local pid
    pid="$(cat "$(harness_etcd_dir)/etcd.pid" 2>/dev/null)" || return 1
    [[ -n "$pid" ]] && _harness_pid_alive "$pid" || return 1
    printf '%s\n' "$pid"
}

# hetcdctl ARGS... - etcdctl (API v3, bounded timeouts) against the run's etcd,
# from its namespace. Needs etcdctl (Debian package etcd-client); the harness
# itself does not.
hetcdctl() {
    command -v etcdctl >/dev/null 2>&1 || _hdie "hetcdctl: 'etcdctl' not found (Debian package etcd-client)"
    nsenter --net="/run/netns/$(harness_etcd_ns)" -- \
        env ETCDCTL_API=3 etcdctl --endpoints="http://$HARNESS_ETCD_IP:$HARNESS_ETCD_CLIENT_PORT" \
        --dial-timeout=2s --command-timeout=5s "$@"
}

# _harness_etcd_healthy - etcd answers GET /health with "health":"true" (it has
# a leader and serves). Plain HTTP over bash's /dev/tcp: no etcdctl needed.
_harness_etcd_healthy() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    nsenter --net="/run/netns/$(harness_etcd_ns)" -- timeout 3 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "GET /health HTTP/1.0\r\nHost: %s\r\n\r\n" "$0" >&3
        cat <&3' "$HARNESS_ETCD_IP" "$HARNESS_ETCD_CLIENT_PORT" 2>/dev/null | grep -q '"health":"true"'
}

# harness_start_etcd - start the run's etcd (its namespace on first use) and
# wait until it reports healthy (HARNESS_ETCD_TIMEOUT s, default 30). Started
# again after harness_stop_etcd it keeps its data dir.
harness_start_etcd() {
    local ns ul dir pid client peer
    command -v etcd >/dev/null 2>&1 || _hdie "harness_start_etcd: 'etcd' not found (Debian package etcd-server)"
    harness_etcd_pid >/dev/null && _hdie "harness_start_etcd: etcd already running"
    ns="$(harness_etcd_ns)"
    ul="$(harness_ul_ns)"
    dir="$(harness_etcd_dir)"
    if [[ ! -e "/run/netns/$ns" ]]; then
        _harness_netns_add "$ns"
        ip -n "$ul" link add etcd mtu "$HARNESS_UL_MTU" type veth peer name ul0 mtu "$HARNESS_UL_MTU" netns "$ns"
        ip -n "$ul" link set etcd master br0 up
        ip -n "$ns" addr add "$HARNESS_ETCD_IP/$HARNESS_UL_PREFIXLEN" dev ul0
        ip -n "$ns" link set ul0 up
    fi
    mkdir -p "$dir"
    client="http://$HARNESS_ETCD_IP:$HARNESS_ETCD_CLIENT_PORT"
    peer="http://$HARNESS_ETCD_IP:$HARNESS_ETCD_PEER_PORT"
    printf '\n===== etcd start %s =====\n' "$(date +%T)" >>"$dir/etcd.log"
    # env -i: ETCD_* variables of the caller would override the flags.
    _harness_spawn "$dir/etcd.pid" "$dir/etcd.log" \
        nsenter --net="/run/netns/$ns" -- \
        "${_HARNESS_PIDWRAP[@]}" "$dir/etcd.pid" \
        env -i PATH="$PATH" \
        etcd --name rotest \
        --data-dir "$dir/data" \
        --listen-client-urls "$client" --advertise-client-urls "$client" \
        --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
        --initial-cluster "rotest=$peer" --initial-cluster-state new \
        --initial-cluster-token "$HARNESS_PREFIX" \
        --logger zap --log-outputs stderr
    pid="$(cat "$dir/etcd.pid")"

    local deadline=$((SECONDS + HARNESS_ETCD_TIMEOUT)) try=0
    until _harness_etcd_healthy; do
        if ! _harness_pid_alive "$pid"; then
            _harness_tail "$dir/etcd.log" >&2
            _hdie "etcd exited during startup (log: $dir/etcd.log)"
        fi
        if ((SECONDS >= deadline)); then
            _harness_tail "$dir/etcd.log" >&2
            _hdie "etcd not healthy at $client after ${HARNESS_ETCD_TIMEOUT}s (log: $dir/etcd.log)"
        fi
        _harness_nap "$try" 200 50
        try=$((try + 1))
    done
    _hlog "etcd up: netns $ns, $client, pid $pid"
}

# harness_stop_etcd [--kill] - stop the run's etcd: SIGTERM (SIGKILL after
# 15 s), or SIGKILL at once with --kill; waits until it is gone. Its namespace
# and data dir stay (harness_start_etcd / harness_restart_etcd).
harness_stop_etcd() {
    local sig=TERM pid
    [[ "${1:-}" != --kill ]] || sig=KILL
    pid="$(harness_etcd_pid)" || return 0
    kill -s "$sig" "$pid" 2>/dev/null || true
    if ! _harness_wait 15 eval "! _harness_pid_alive $pid"; then
        _hlog "etcd pid $pid ignored SIG$sig for 15s, sending SIGKILL"
        kill -9 "$pid" 2>/dev/null || true
        _harness_wait 5 eval "! _harness_pid_alive $pid" || _hdie "etcd pid $pid does not die"
    fi
    _harness_wait 5 eval "[[ ! -e /proc/$pid ]]" || true
    printf '===== etcd stopped (SIG%s) %s =====\n' "$sig" "$(date +%T)" >>"$(harness_etcd_dir)/etcd.log"
}

# harness_etcd_link up|down - cut or restore the etcd's underlay cable (etcd
# keeps running but nobody reaches it: packets are dropped, not refused).
harness_etcd_link() {
    ip -n "$(harness_ul_ns)" link set etcd "${1:?up|down}"
}

# harness_restart_etcd [--kill] - stop (SIGTERM, or SIGKILL with --kill) and
# start the run's etcd again on the same data dir; waits until healthy.
harness_restart_etcd() {
    harness_stop_etcd "$@"
    harness_start_etcd
}

# ---------------------------------------------------------------------------
# a three-member etcd cluster (the plugins given every member)
# ---------------------------------------------------------------------------
#
# Member K (1..3) runs in its own namespace ${prefix}-emK, cabled to the
# underlay bridge like a host (ul0 = 10.250.0.20K/24, link emK in the
# underlay namespace), client :2379 and peer :2380 on that address only.
# Data dir $HARNESS_TMP/etcd-cluster/mK, log .../mK.log. The namespaces are
# recorded like a host's: the cleanup trap kills the members and removes them.
# Cutting a member from its peers drops TCP port 2380 both ways with iptables
# in the member's own namespace: its clients still reach it, and it answers
# them "no leader" once it notices.

HARNESS_ETCD_CLUSTER_SIZE=3

# harness_etcd_member_ns K, harness_etcd_member_ip K - member K's namespace and address.
harness_etcd_member_ns() { printf '%s-em%s' "$HARNESS_PREFIX" "${1:?member 1..3}"; }
harness_etcd_member_ip() { printf '%s.%s' "$HARNESS_UL_NET" "$((200 + ${1:?member 1..3}))"; }
_harness_etcd_cluster_dir() { printf '%s/etcd-cluster' "$HARNESS_TMP"; }

# harness_etcd_cluster_url - the plugins' --store: every member, e.g.
# etcd://10.250.0.201:2379,10.250.0.202:2379,10.250.0.203:2379
harness_etcd_cluster_url() {
    local k sep="" url="etcd://"
    for k in $(seq 1 "$HARNESS_ETCD_CLUSTER_SIZE"); do
        url+="$sep$(harness_etcd_member_ip "$k"):$HARNESS_ETCD_CLIENT_PORT"
        sep=","
    done
    printf '%s\n' "$url"
}

# harness_etcd_member_pid K - pid of member K (failure if it is not running).
harness_etcd_member_pid() {
    local pid
    pid="$(cat "$(_harness_etcd_cluster_dir)/m${1:?member}.pid" 2>/dev/null)" || return 1
    [[ -n "$pid" ]] && _harness_pid_alive "$pid" || return 1
    printf '%s\n' "$pid"
}

# _harness_etcd_member_http K METHOD PATH [BODY] - one HTTP request to member
# K's client port from its own namespace (bash's /dev/tcp; no curl needed).
_harness_etcd_member_http() {
    local k="$1"
    # shellcheck disable=SC2016 # expanded by the inner bash
    nsenter --net="/run/netns/$(harness_etcd_member_ns "$k")" -- timeout 3 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "%s %s HTTP/1.0\r\nHost: %s\r\nContent-Length: %s\r\n\r\n%s" "$2" "$3" "$0" "${#4}" "$4" >&3
        cat <&3' "$(harness_etcd_member_ip "$k")" "$HARNESS_ETCD_CLIENT_PORT" "$2" "$3" "${4:-}" 2>/dev/null
}

# harness_etcd_member_healthy K - member K says /health true (it has a leader).
harness_etcd_member_healthy() {
    _harness_etcd_member_http "${1:?member}" GET /health | grep -q '"health":"true"'
}

# harness_etcd_cluster_leader - the member number (1..3) of the leader, as the
# members that answer see it; failure when none names one.
harness_etcd_cluster_leader() {
    local k status id leader="" member_ids=()
    for k in $(seq 1 "$HARNESS_ETCD_CLUSTER_SIZE"); do
        status="$(_harness_etcd_member_http "$k" POST /v3/maintenance/status '{}' || true)"
        id="$(sed -n 's/.*"member_id":"\([0-9]*\)".*/\1/p' <<<"$status")"
        member_ids[k]="$id"
        [[ -n "$leader" ]] || leader="$(sed -n 's/.*"leader":"\([0-9]*\)".*/\1/p' <<<"$status")"
    done
    for k in $(seq 1 "$HARNESS_ETCD_CLUSTER_SIZE"); do
        if [[ -n "$leader" && "${member_ids[k]:-}" == "$leader" ]]; then
            printf '%s\n' "$k"
            return 0
        fi
    done
    return 1
}

# harness_start_etcd_cluster - the members' namespaces and cables, then the
# three members; waits until every member reports healthy (HARNESS_ETCD_TIMEOUT).
harness_start_etcd_cluster() {
    local k ns ul dir ip initial="" sep="" deadline try=0
    command -v etcd >/dev/null 2>&1 || _hdie "harness_start_etcd_cluster: 'etcd' not found (Debian package etcd-server)"
    ul="$(harness_ul_ns)"
    dir="$(_harness_etcd_cluster_dir)"
    mkdir -p "$dir"
    for k in $(seq 1 "$HARNESS_ETCD_CLUSTER_SIZE"); do
        initial+="${sep}m$k=http://$(harness_etcd_member_ip "$k"):$HARNESS_ETCD_PEER_PORT"
        sep=","
    done
    for k in $(seq 1 "$HARNESS_ETCD_CLUSTER_SIZE"); do
        ns="$(harness_etcd_member_ns "$k")"
        ip="$(harness_etcd_member_ip "$k")"
        harness_etcd_member_pid "$k" >/dev/null && _hdie "harness_start_etcd_cluster: member $k already running"
        if [[ ! -e "/run/netns/$ns" ]]; then
            _harness_netns_add "$ns"
            ip -n "$ul" link add "em$k" mtu "$HARNESS_UL_MTU" type veth peer name ul0 mtu "$HARNESS_UL_MTU" netns "$ns"
            ip -n "$ul" link set "em$k" master br0 up
            ip -n "$ns" addr add "$ip/$HARNESS_UL_PREFIXLEN" dev ul0
            ip -n "$ns" link set ul0 up
        fi
        printf '\n===== etcd member m%s start %s =====\n' "$k" "$(date +%T)" >>"$dir/m$k.log"
        # env -i: ETCD_* variables of the caller would override the flags.
        _harness_spawn "$dir/m$k.pid" "$dir/m$k.log" \
            nsenter --net="/run/netns/$ns" -- \
            "${_HARNESS_PIDWRAP[@]}" "$dir/m$k.pid" \
            env -i PATH="$PATH" \
            etcd --name "m$k" \
            --data-dir "$dir/m$k" \
            --listen-client-urls "http://$ip:$HARNESS_ETCD_CLIENT_PORT" \
            --advertise-client-urls "http://$ip:$HARNESS_ETCD_CLIENT_PORT" \
            --listen-peer-urls "http://$ip:$HARNESS_ETCD_PEER_PORT" \
            --initial-advertise-peer-urls "http://$ip:$HARNESS_ETCD_PEER_PORT" \
            --initial-cluster "$initial" --initial-cluster-state new \
            --initial-cluster-token "$HARNESS_PREFIX-cluster" \
            --logger zap --log-outputs stderr
    done
    deadline=$((SECONDS + HARNESS_ETCD_TIMEOUT))
    for k in $(seq 1 "$HARNESS_ETCD_CLUSTER_SIZE"); do
        until harness_etcd_member_healthy "$k"; do
            if ! harness_etcd_member_pid "$k" >/dev/null || ((SECONDS >= deadline)); then
                _harness_tail "$dir/m$k.log" >&2
                _hdie "etcd member m$k not healthy after ${HARNESS_ETCD_TIMEOUT}s (log: $dir/m$k.log)"
            fi
            _harness_nap "$try" 200 50
            try=$((try + 1))
        done
    done
    _hlog "etcd cluster up: $(harness_etcd_cluster_url)"
}

# _harness_etcd_member_rules K -A|-D - add or delete the rules that drop member
# K's peer traffic (TCP 2380 to and from it), in its own namespace.
_harness_etcd_member_rules() {
    local k="$1" op="$2" chain dir
    command -v iptables >/dev/null 2>&1 || _hdie "harness_etcd_member_cut: 'iptables' not found (Debian package iptables)"
    for chain in INPUT OUTPUT; do
        for dir in --dport --sport; do
            ip netns exec "$(harness_etcd_member_ns "$k")" \
                iptables -w 5 "$op" "$chain" -p tcp "$dir" "$HARNESS_ETCD_PEER_PORT" -j DROP
        done
    done
}

# harness_etcd_member_cut K - cut member K off from its peers (silent loss);
# its clients still reach it. harness_etcd_member_heal K undoes it.
harness_etcd_member_cut() { _harness_etcd_member_rules "${1:?member}" -A; }
harness_etcd_member_heal() { _harness_etcd_member_rules "${1:?member}" -D; }

# harness_etcd_member_kill K - SIGKILL member K; waits until it is gone.
harness_etcd_member_kill() {
    local k="${1:?member}" pid
    pid="$(harness_etcd_member_pid "$k")" || return 0
    kill -9 "$pid" 2>/dev/null || true
    _harness_wait 5 eval "[[ ! -e /proc/$pid ]]" || _hdie "etcd member m$k (pid $pid) does not die"
    printf '===== etcd member m%s killed %s =====\n' "$k" "$(date +%T)" >>"$(_harness_etcd_cluster_dir)/m$k.log"
}

# ---------------------------------------------------------------------------
# what the plugin left on a host (for the tests' clean-up checks)
# ---------------------------------------------------------------------------

# host_ro_links N - rustoverlay's links (ro-*, rc-*) in host N's namespace.
host_ro_links() {
    hexec "$1" ip -o link | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }' | grep -E '^r[oc]-' || true
}

# ovl_namespaces N - the overlay namespaces under host N's /run/rustoverlay/netns.
ovl_namespaces() {
    hexec_mnt "$1" sh -c 'ls -A /run/rustoverlay/netns 2>/dev/null' || true
}

# plugin_log_since_start N - host N's plugin log since its last start.
plugin_log_since_start() {
    local log start
    log="$(harness_host_dir "$1")/plugin.log"
    start="$(grep -n '^===== plugin start' "$log" | tail -n 1 | cut -d: -f1)"
    tail -n "+${start:-1}" "$log"
}

# ---------------------------------------------------------------------------
# a shared Consul store: the project's test-only Consul server
# (consul-test-server, following Consul's documented HTTP API; no real Consul
# can be installed here) in its own namespace ${prefix}-consul at
# 10.250.0.201:8500, with a 1 s minimum session TTL so liveness tests stay
# short (plugins then need --consul-session-ttl-min 1).
# ---------------------------------------------------------------------------

HARNESS_CONSUL_IP="${HARNESS_UL_NET}.201"
HARNESS_CONSUL_PORT=8500

harness_consul_ns() { printf '%s-consul' "$HARNESS_PREFIX"; }
harness_consul_dir() { printf '%s/consul' "$HARNESS_TMP"; }
harness_consul_url() { printf 'consul://%s:%s' "$HARNESS_CONSUL_IP" "$HARNESS_CONSUL_PORT"; }
harness_consul_bin() { printf '%s' "${HARNESS_CONSUL_BIN:-$PWD/target/release/consul-test-server}"; }

harness_consul_pid() {
    local pid
    pid="$(cat "$(harness_consul_dir)/consul.pid" 2>/dev/null)" || return 1
    [[ -n "$pid" ]] && _harness_pid_alive "$pid" || return 1
    printf '%s\n' "$pid"
}

_harness_consul_healthy() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    nsenter --net="/run/netns/$(harness_consul_ns)" -- timeout 3 bash -c \
        'exec 3<>"/dev/tcp/$0/$1"' "$HARNESS_CONSUL_IP" "$HARNESS_CONSUL_PORT" 2>/dev/null
}

# harness_consul_session_ttl_min - the test server's session_ttl_min in
# seconds: HARNESS_CONSUL_SESSION_TTL_MIN, 1 unless set (Consul's own default
# is 10). Plugins need the same number as --consul-session-ttl-min.
harness_consul_session_ttl_min() { printf '%s' "${HARNESS_CONSUL_SESSION_TTL_MIN:-1}"; }

# harness_start_consul - start the Consul test server (its namespace on first
# use) and wait until it listens. Its data lives in memory: a restart is a
# fresh cluster. Its minimum session TTL is harness_consul_session_ttl_min;
# it reaps tombstones HARNESS_CONSUL_TOMBSTONE_TTL (5s unless set; Consul: 15s)
# after a delete, so list indexes go backwards as in production. Sessions
# expire 2x their TTL after the last renewal (Consul's worst case).
harness_start_consul() {
    local ns ul dir pid bin
    bin="$(harness_consul_bin)"
    [[ -x "$bin" ]] || _hdie "harness_start_consul: $bin missing (cargo build --release -p consul-test-server)"
    harness_consul_pid >/dev/null && _hdie "harness_start_consul: already running"
    ns="$(harness_consul_ns)"
    ul="$(harness_ul_ns)"
    dir="$(harness_consul_dir)"
    if [[ ! -e "/run/netns/$ns" ]]; then
        _harness_netns_add "$ns"
        ip -n "$ul" link add consul mtu "$HARNESS_UL_MTU" type veth peer name ul0 mtu "$HARNESS_UL_MTU" netns "$ns"
        ip -n "$ul" link set consul master br0 up
        ip -n "$ns" addr add "$HARNESS_CONSUL_IP/$HARNESS_UL_PREFIXLEN" dev ul0
        ip -n "$ns" link set ul0 up
    fi
    mkdir -p "$dir"
    printf '\n===== consul-test-server start %s =====\n' "$(date +%T)" >>"$dir/consul.log"
    _harness_spawn "$dir/consul.pid" "$dir/consul.log" \
        nsenter --net="/run/netns/$ns" -- \
        "${_HARNESS_PIDWRAP[@]}" "$dir/consul.pid" \
        "$bin" --listen "$HARNESS_CONSUL_IP:$HARNESS_CONSUL_PORT" --in-test-namespace \
        --session-ttl-min "$(harness_consul_session_ttl_min)s" \
        --tombstone-ttl "${HARNESS_CONSUL_TOMBSTONE_TTL:-5s}"
    pid="$(cat "$dir/consul.pid")"
    local deadline=$((SECONDS + 30)) try=0
    until _harness_consul_healthy; do
        _harness_pid_alive "$pid" || { _harness_tail "$dir/consul.log" >&2; _hdie "consul-test-server exited during startup"; }
        ((SECONDS < deadline)) || _hdie "consul-test-server not listening after 30s (log: $dir/consul.log)"
        _harness_nap "$try" 200
        try=$((try + 1))
    done
    _hlog "consul-test-server up: netns $ns, $(harness_consul_url), pid $pid"
}

# harness_stop_consul [--kill] - stop the Consul test server.
harness_stop_consul() {
    local sig=TERM pid
    [[ "${1:-}" != --kill ]] || sig=KILL
    pid="$(harness_consul_pid)" || return 0
    kill -s "$sig" "$pid" 2>/dev/null || true
    _harness_wait 15 eval "! _harness_pid_alive $pid" || kill -9 "$pid" 2>/dev/null || true
    _harness_wait 5 eval "[[ ! -e /proc/$pid ]]" || true
}

# harness_consul_link up|down - cut or restore the Consul server's cable.
harness_consul_link() {
    ip -n "$(harness_ul_ns)" link set consul "${1:?up|down}"
}

# --- one interface over both shared stores (KIND = etcd | consul) -----------

harness_shared_store_ns() {
    case "${1:?etcd|consul}" in
        etcd) harness_etcd_ns ;;
        consul) harness_consul_ns ;;
        *) _hdie "unknown store kind $1 (etcd or consul)" ;;
    esac
}
harness_shared_store_url() {
    case "${1:?etcd|consul}" in
        etcd) harness_etcd_url ;;
        consul) harness_consul_url ;;
        *) _hdie "unknown store kind $1 (etcd or consul)" ;;
    esac
}
harness_shared_store_ip() {
    case "${1:?etcd|consul}" in
        etcd) printf '%s' "$HARNESS_ETCD_IP" ;;
        consul) printf '%s' "$HARNESS_CONSUL_IP" ;;
        *) _hdie "unknown store kind $1 (etcd or consul)" ;;
    esac
}
# harness_shared_store_args KIND - plugin arguments the store needs, one a line.
harness_shared_store_args() {
    case "${1:?etcd|consul}" in
        etcd) ;;
        consul) printf '%s\n' --consul-session-ttl-min "$(harness_consul_session_ttl_min)" ;;
        *) _hdie "unknown store kind $1 (etcd or consul)" ;;
    esac
}
harness_shared_store_start() { "harness_start_${1:?etcd|consul}"; }
harness_shared_store_stop() {
    local kind="${1:?etcd|consul}"
    shift
    "harness_stop_$kind" "$@"
}
harness_shared_store_link() { "harness_${1:?etcd|consul}_link" "${2:?up|down}"; }
harness_shared_store_healthy() { "_harness_${1:?etcd|consul}_healthy"; }

# ---------------------------------------------------------------------------
# managed plugins (docker plugin create/enable), for hosts started --no-plugin
# ---------------------------------------------------------------------------

# harness_share_run N - make host N's /run a shared mount (rshared), as /run
# is on a systemd host. A managed plugin gets the host's /run through an
# rshared bind (config.json, mount "run"): the network namespaces it mounts
# there then show up in the host's /run too and outlive the plugin's own
# mount namespace. Only host N's private mount namespace is changed.
harness_share_run() {
    local n="${1:?usage: harness_share_run N}"
    hexec_mnt "$n" mount -n --make-rshared /run
}

# harness_plugin_dir - build the managed plugin directory once per run with
# scripts/build-plugin (config.json + rootfs of harness_bin) and print its path.
harness_plugin_dir() {
    local pdir="$HARNESS_TMP/plugin-dir"
    if [[ ! -f "$pdir/config.json" ]]; then
        RUSTOVERLAY_BIN="$(harness_bin)" "$HARNESS_REPO_ROOT/scripts/build-plugin" "$pdir" >&2 ||
            _hdie "scripts/build-plugin $pdir failed"
    fi
    printf '%s\n' "$pdir"
}

# harness_managed_plugin_create N NAME [DIR] - `docker plugin create NAME DIR`
# on host N (DIR: harness_plugin_dir) and record the plugin's id, whose
# cgroups (outside the host's --cgroup-parent) teardown removes.
harness_managed_plugin_create() {
    local n="${1:?usage: harness_managed_plugin_create N NAME [DIR]}" name="${2:?plugin name}" pdir="${3:-}" id
    [[ -n "$pdir" ]] || pdir="$(harness_plugin_dir)"
    hdocker "$n" plugin create "$name" "$pdir" >/dev/null || return 1
    id="$(harness_managed_plugin_id "$n" "$name")" || return 1
    printf '%s\n' "$id" >>"$HARNESS_TMP/.cgroups"
}

# harness_managed_plugin_id N NAME - the full id of host N's plugin NAME.
harness_managed_plugin_id() {
    hdocker "${1:?host}" plugin inspect -f '{{.Id}}' "${2:?plugin name}"
}

# harness_managed_plugin_pid N NAME - pid of the running managed plugin NAME on
# host N (its process sits in a cgroup named after the plugin's id).
harness_managed_plugin_pid() {
    local n="${1:?host}" name="${2:?plugin name}" id pid
    id="$(harness_managed_plugin_id "$n" "$name" 2>/dev/null)" || return 1
    for pid in $(ip netns pids "$(harness_host_ns "$n")" 2>/dev/null); do
        [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == rustoverlay ]] || continue
        grep -q "/$id\$" "/proc/$pid/cgroup" 2>/dev/null || continue
        _harness_pid_alive "$pid" || continue
        printf '%s\n' "$pid"
        return 0
    done
    return 1
}

# harness_managed_plugin_log N ID - the output of host N's managed plugin
# with id ID, as dockerd logs it (one dockerd line per plugin line, tagged
# plugin=ID).
harness_managed_plugin_log() {
    local n="${1:?usage: harness_managed_plugin_log N ID}" id="${2:?plugin id}"
    grep -F "plugin=$id" "$(harness_host_dir "$n")/dockerd.log" || true
}

# ---------------------------------------------------------------------------
# a plugin registry (docker plugin push / install / upgrade)
# ---------------------------------------------------------------------------
#
# Debian's docker-registry (distribution 2.8) in its own namespace
# ${prefix}-reg, cabled to the underlay bridge like a host (ul0 =
# 10.250.0.210/24, link reg in the underlay namespace), plain HTTP on
# 10.250.0.210:5000 only, no auth; its own config file, storage and log in
# $HARNESS_TMP/registry. The hosts' dockerd must list it in
# insecure-registries (harness_registry_addr). A cleanup hook stops it and
# removes its storage (the log stays with HARNESS_KEEP=1); its namespace is
# recorded like a host's, so the trap and the sweep of dead runs remove it.

HARNESS_REGISTRY_IP="${HARNESS_UL_NET}.210"
HARNESS_REGISTRY_PORT=5000

harness_registry_ns() { printf '%s-reg' "$HARNESS_PREFIX"; }
harness_registry_dir() { printf '%s/registry' "$HARNESS_TMP"; }
# harness_registry_addr - host:port for image and plugin references: 10.250.0.210:5000
harness_registry_addr() { printf '%s:%s' "$HARNESS_REGISTRY_IP" "$HARNESS_REGISTRY_PORT"; }

# harness_registry_pid - pid of the run's registry (failure if not running).
harness_registry_pid() {
    local pid
    pid="$(cat "$(harness_registry_dir)/registry.pid" 2>/dev/null)" || return 1
    [[ -n "$pid" ]] && _harness_pid_alive "$pid" || return 1
    printf '%s\n' "$pid"
}

# harness_registry_http METHOD PATH [ACCEPT] - one HTTP/1.0 request to the
# registry from its own namespace (bash's /dev/tcp; no curl needed); prints
# the raw response, headers included.
harness_registry_http() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    nsenter --net="/run/netns/$(harness_registry_ns)" -- timeout 5 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "%s %s HTTP/1.0\r\nHost: %s:%s\r\nAccept: %s\r\n\r\n" "$2" "$3" "$0" "$1" "$4" >&3
        cat <&3' "$HARNESS_REGISTRY_IP" "$HARNESS_REGISTRY_PORT" "${1:?method}" "${2:?path}" "${3:-*/*}" 2>/dev/null
}

_harness_registry_healthy() {
    harness_registry_http GET /v2/ | head -n 1 | grep -q ' 200 '
}

# harness_registry_digest REPO TAG - the digest the registry serves for
# REPO:TAG's manifest (its Docker-Content-Digest header, schema 2).
harness_registry_digest() {
    harness_registry_http HEAD "/v2/${1:?repo}/manifests/${2:?tag}" \
        application/vnd.docker.distribution.manifest.v2+json |
        tr -d '\r' | sed -n 's/^[Dd]ocker-[Cc]ontent-[Dd]igest: *//p' | grep .
}

# harness_start_registry - start the registry (its namespace on first use)
# and wait until GET /v2/ answers 200.
harness_start_registry() {
    local ns ul dir pid bin=/usr/bin/docker-registry
    [[ -x "$bin" ]] || _hdie "harness_start_registry: $bin not found (Debian package docker-registry)"
    harness_registry_pid >/dev/null && _hdie "harness_start_registry: already running"
    ns="$(harness_registry_ns)"
    ul="$(harness_ul_ns)"
    dir="$(harness_registry_dir)"
    if [[ ! -e "/run/netns/$ns" ]]; then
        _harness_netns_add "$ns"
        ip -n "$ul" link add reg mtu "$HARNESS_UL_MTU" type veth peer name ul0 mtu "$HARNESS_UL_MTU" netns "$ns"
        ip -n "$ul" link set reg master br0 up
        ip -n "$ns" addr add "$HARNESS_REGISTRY_IP/$HARNESS_UL_PREFIXLEN" dev ul0
        ip -n "$ns" link set ul0 up
    fi
    mkdir -p "$dir/storage"
    cat >"$dir/config.yml" <<YAML
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
http:
  addr: $(harness_registry_addr)
YAML
    [[ " ${HARNESS_CLEANUP_HOOKS[*]} " == *" _harness_registry_cleanup "* ]] ||
        harness_on_cleanup _harness_registry_cleanup
    printf '\n===== registry start %s =====\n' "$(date +%T)" >>"$dir/registry.log"
    # env -i: REGISTRY_* variables of the caller would override the file.
    _harness_spawn "$dir/registry.pid" "$dir/registry.log" \
        nsenter --net="/run/netns/$ns" -- \
        "${_HARNESS_PIDWRAP[@]}" "$dir/registry.pid" \
        env -i PATH="$PATH" "$bin" serve "$dir/config.yml"
    pid="$(cat "$dir/registry.pid")"
    local deadline=$((SECONDS + 30)) try=0
    until _harness_registry_healthy; do
        _harness_pid_alive "$pid" || { _harness_tail "$dir/registry.log" >&2; _hdie "registry exited during startup"; }
        ((SECONDS < deadline)) || _hdie "registry not answering on $(harness_registry_addr) after 30s (log: $dir/registry.log)"
        _harness_nap "$try" 200 50
        try=$((try + 1))
    done
    _hlog "registry up: netns $ns, http://$(harness_registry_addr), pid $pid"
}

# harness_stop_registry - stop the registry (SIGTERM, SIGKILL after 10 s).
harness_stop_registry() {
    local pid
    pid="$(harness_registry_pid)" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    _harness_wait 10 eval "! _harness_pid_alive $pid" || kill -9 "$pid" 2>/dev/null || true
    _harness_wait 5 eval "[[ ! -e /proc/$pid ]]" || true
}

# Cleanup hook: the registry stopped and its storage removed, also with
# HARNESS_KEEP=1 (its config and log stay then).
_harness_registry_cleanup() {
    harness_stop_registry
    rm -rf --one-file-system "$(harness_registry_dir)/storage"
}

# harness_managed_plugin_install N ALIAS REF [SETTING=VALUE...] - `docker
# plugin install --grant-all-permissions --alias ALIAS REF SETTING=VALUE...`
# on host N (pull, settings, enable), then record the plugin's id like
# harness_managed_plugin_create does (teardown removes its cgroups), also
# when the install failed after the pull. Returns the install's status.
harness_managed_plugin_install() {
    local n="${1:?usage: harness_managed_plugin_install N ALIAS REF [SETTING=VALUE...]}" alias="${2:?alias}" ref="${3:?reference}" rc=0 id
    shift 3
    hdocker "$n" plugin install --grant-all-permissions --alias "$alias" "$ref" "$@" </dev/null || rc=$?
    if id="$(harness_managed_plugin_id "$n" "$alias" 2>/dev/null)"; then
        printf '%s\n' "$id" >>"$HARNESS_TMP/.cgroups"
    fi
    return "$rc"
}

# ---------------------------------------------------------------------------
# continuous ping from a container (outage measurements)
# ---------------------------------------------------------------------------

# harness_ping_start N CONTAINER IP NAME - ping IP every 100 ms from CONTAINER
# on host N, in the background, until harness_ping_stop NAME; the output goes
# to $HARNESS_TMP/NAME.ping. Call it in the test's own shell.
harness_ping_start() {
    local n="${1:?usage: harness_ping_start N CONTAINER IP NAME}" c="${2:?container}" ip="${3:?ip}" name="${4:?name}"
    hdocker "$n" exec "$c" ping -i 0.1 -W 1 "$ip" >"$HARNESS_TMP/$name.ping" 2>&1 &
    printf '%s %s %s\n' "$!" "$n" "$c" >"$HARNESS_TMP/$name.ping.job"
}

# harness_ping_stop NAME - stop that ping (SIGINT to the container's ping, so
# that it prints its statistics) and wait for it.
harness_ping_stop() {
    local name="${1:?usage: harness_ping_stop NAME}" pid n c
    read -r pid n c <"$HARNESS_TMP/$name.ping.job" || return 1
    hdocker "$n" exec "$c" killall -INT ping >/dev/null 2>&1 || true
    if ! _harness_wait 10 eval "! kill -0 $pid 2>/dev/null"; then
        kill "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# harness_ping_lost NAME - "SENT LOST LONGEST" of a stopped ping: pings
# between the first and the last answered one, how many of those were never
# answered, and the longest run of them (a ping still in flight when ping
# stopped is not counted). "0 -1 0" if nothing was answered.
harness_ping_lost() {
    awk '
        match($0, /seq=[0-9]+/) {
            s = substr($0, RSTART + 4, RLENGTH - 4) + 0; got[s] = 1; n++
            if (n == 1 || s < first) first = s
            if (n == 1 || s > last) last = s
        }
        END {
            if (n == 0) { print "0 -1 0"; exit }
            lost = 0; run = 0; longest = 0
            for (i = first; i <= last; i++) {
                if (i in got) { run = 0 } else { lost++; run++; if (run > longest) longest = run }
            }
            printf "%d %d %d\n", last - first + 1, lost, longest
        }' "$HARNESS_TMP/${1:?usage: harness_ping_lost NAME}.ping"
}

# ---------------------------------------------------------------------------
# assertions
# ---------------------------------------------------------------------------

harness_pass() {
    HARNESS_PASSED=$((HARNESS_PASSED + 1))
    printf 'ok   - %s\n' "$*"
}

harness_fail() {
    HARNESS_FAILED=$((HARNESS_FAILED + 1))
    printf 'FAIL - %s\n' "$*"
    # Right under the first failure, where a short CI excerpt still shows
    # it: what the plugins and engines complained of last.
    [[ "$HARNESS_FAILED" -ne 1 ]] || _harness_failure_context
}

_harness_failure_context() {
    [[ -n "$HARNESS_TMP" && -f "$HARNESS_TMP/.hosts" ]] || return 0
    local n dir
    while read -r n; do
        dir="$(harness_host_dir "$n")"
        if [[ -f "$dir/plugin.log" ]]; then
            grep -E ' (WARN|ERROR) ' "$dir/plugin.log" | tail -n 6 | cut -c1-400 |
                sed -e "s/^/       | h$n plugin: /" || true
        fi
        if [[ -f "$dir/dockerd.log" ]]; then
            grep -E 'level=error|Failed deleting endpoint' "$dir/dockerd.log" | tail -n 3 | cut -c1-400 |
                sed -e "s/^/       | h$n dockerd: /" || true
        fi
    done < <(sort -un "$HARNESS_TMP/.hosts")
    return 0
}

_harness_indent() { sed -e 's/^/       | /' | tail -n 30; }

# assert_ok DESC CMD... - CMD exits 0.
assert_ok() {
    local desc="$1" out
    shift
    if out="$("$@" 2>&1)"; then
        harness_pass "$desc"
    else
        harness_fail "$desc (command failed: $*)"
        printf '%s\n' "$out" | _harness_indent
    fi
}

# assert_fails DESC CMD... - CMD exits non-zero.
assert_fails() {
    local desc="$1" out
    shift
    if out="$("$@" 2>&1)"; then
        harness_fail "$desc (command unexpectedly succeeded: $*)"
        printf '%s\n' "$out" | _harness_indent
    else
        harness_pass "$desc"
    fi
}

# assert_eventually DESC TIMEOUT_S CMD... - CMD succeeds within TIMEOUT_S
# (tried again after 0.1, 0.2, 0.4 s, then every 0.5 s).
assert_eventually() {
    local desc="$1" timeout="$2" out deadline _ae_try=0
    shift 2
    deadline=$((SECONDS + timeout))
    while true; do
        if out="$("$@" 2>&1)"; then
            harness_pass "$desc"
            return 0
        fi
        if ((SECONDS >= deadline)); then
            harness_fail "$desc (still failing after ${timeout}s: $*)"
            printf '%s\n' "$out" | _harness_indent
            return 0
        fi
        _harness_nap "$_ae_try" 500 100
        _ae_try=$((_ae_try + 1))
    done
}

# assert_eq DESC EXPECTED ACTUAL
assert_eq() {
    if [[ "$2" == "$3" ]]; then
        harness_pass "$1"
    else
        harness_fail "$1 (expected '$2', got '$3')"
    fi
}

# assert_contains DESC NEEDLE HAYSTACK
assert_contains() {
    if [[ "$3" == *"$2"* ]]; then
        harness_pass "$1"
    else
        harness_fail "$1 (no '$2' in:)"
        printf '%s\n' "$3" | _harness_indent
    fi
}

# assert_empty DESC VALUE
assert_empty() {
    if [[ -z "$2" ]]; then
        harness_pass "$1"
    else
        harness_fail "$1 (expected nothing, got:)"
        printf '%s\n' "$2" | _harness_indent
    fi
}

# harness_dump_logs - tails of every host's plugin and dockerd log.
harness_dump_logs() {
    [[ -n "$HARNESS_TMP" && -f "$HARNESS_TMP/.hosts" ]] || return 0
    local n dir
    while read -r n; do
        dir="$(harness_host_dir "$n")"
        [[ -f "$dir/plugin.log" ]] && _harness_tail "$dir/plugin.log" 60
        [[ -f "$dir/dockerd.log" ]] && _harness_tail "$dir/dockerd.log" 40
        [[ -s "$dir/anchor.log" ]] && _harness_tail "$dir/anchor.log" 20
    done < <(sort -un "$HARNESS_TMP/.hosts")
    [[ ! -f "$HARNESS_TMP/etcd/etcd.log" ]] || _harness_tail "$HARNESS_TMP/etcd/etcd.log" 30
    return 0
}

# harness_stop_if_failed [WHY] - end the test now (summary, exit 1) if any
# assertion failed so far: for setup steps the rest depends on.
harness_stop_if_failed() {
    if [[ "$HARNESS_FAILED" -gt 0 ]]; then
        printf 'stopping: %s\n' "${1:-setup failed, the remaining checks depend on it}"
        harness_summary || exit 1
    fi
}

# harness_summary - print "N passed, N failed"; returns 1 if anything failed.
harness_summary() {
    HARNESS_SUMMARY_DONE=1
    if [[ "$HARNESS_FAILED" -gt 0 ]]; then
        harness_dump_logs
    fi
    if [[ "$HARNESS_PASSED" -eq 0 && "$HARNESS_FAILED" -eq 0 ]]; then
        printf 'FAIL - no assertion ran\n'
        HARNESS_FAILED=1
    fi
    printf '%s passed, %s failed\n' "$HARNESS_PASSED" "$HARNESS_FAILED"
    [[ "$HARNESS_FAILED" -eq 0 ]]
}
