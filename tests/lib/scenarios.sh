# shellcheck shell=bash
#
# tests/lib/scenarios.sh - helpers shared by the tier-3 scenario scripts
# (ipv6.sh, connect.sh, ipam_options.sh, live_restore.sh, many_networks.sh).
# Source it after tests/lib/harness.sh, after harness_init. Everything here
# is built on the harness functions: no daemon, namespace or device is made
# here that the harness's teardown would not remove.

if [[ -n "${_SCENARIOS_SOURCED:-}" ]]; then
    return 0
fi
_SCENARIOS_SOURCED=1

export SC_T_START=$SECONDS

# sc_boot_etcd_hosts N... - start etcd, then hosts N... on it, each with the
# busybox test image.
sc_boot_etcd_hosts() {
    local h
    harness_start_etcd
    for h in "$@"; do
        harness_start_host "$h" --store "$(harness_etcd_url)"
        harness_busybox_image "$h"
    done
}

# sc_net_create N NAME ARGS... - docker network create with both rustoverlay
# drivers on host N.
sc_net_create() {
    local n="$1" name="$2"
    shift 2
    hdocker "$n" network create -d rustoverlay --ipam-driver rustoverlay "$@" "$name"
}

# sc_run N NAME NETWORK [docker run args...] - a sleeping busybox (stops in 1 s).
sc_run() {
    local n="$1" name="$2" net="$3"
    shift 3
    hdocker "$n" run -d --stop-timeout 1 --network "$net" --name "$name" "$@" "$HARNESS_IMAGE" sleep 3600
}

# sc_ping N CONTAINER IP - one IPv4 ping (2 s to answer).
sc_ping() { hdocker "$1" exec "$2" ping -c 1 -W 2 "$3"; }

# sc_ping6 N CONTAINER IP - one IPv6 ping (2 s to answer).
sc_ping6() { hdocker "$1" exec "$2" ping6 -c 1 -W 2 "$3"; }

# sc_ip6 N CONTAINER NETWORK - the container's global IPv6 address on NETWORK.
sc_ip6() {
    hdocker "$1" inspect -f "{{with index .NetworkSettings.Networks \"$3\"}}{{.GlobalIPv6Address}}{{end}}" "$2"
}

# sc_mac N CONTAINER NETWORK - the container's MAC on NETWORK (lower case).
sc_mac() {
    hdocker "$1" inspect -f "{{with index .NetworkSettings.Networks \"$3\"}}{{.MacAddress}}{{end}}" "$2" |
        tr 'A-F' 'a-f'
}

# sc_net_id N NETWORK - Docker's network id on host N.
sc_net_id() { hdocker "$1" network inspect -f '{{.Id}}' "$2"; }

# sc_vni_of_subnet STORE SUBNET - the VNI of the overlay that has SUBNET, from
# the store (STORE: a host number or etcd/consul, as harness_store_dump).
sc_vni_of_subnet() {
    harness_store_dump "$1" |
        awk -v s="\"$2\"" '$1 ~ /^\/rustoverlay\/v1\/overlay\/[^/]+\/record$/ && index($0, s) { print $2 }' |
        sed -n 's/.*"vni":\([0-9]*\).*/\1/p' | head -n 1
}

# sc_has_ovl_ns N VNI - host N has the overlay namespace ro-VNI.
sc_has_ovl_ns() { hexec_mnt "$1" test -e "/run/rustoverlay/netns/ro-$2"; }

# sc_in_ovl N VNI CMD... - CMD inside host N's overlay namespace ro-VNI.
sc_in_ovl() {
    local n="$1" vni="$2"
    shift 2
    hexec_mnt "$n" nsenter --net="/run/rustoverlay/netns/ro-$vni" -- "$@"
}

# sc_alloc_keys STORE - the store's allocation keys (pools, addresses, VNIs,
# overlays, endpoints, host->network), sorted.
sc_alloc_keys() {
    harness_store_dump "$1" | grep -E "$HARNESS_ALLOC_KEY_RE" | awk '{ print $1 }' | sort || true
}

# sc_rm_all N - remove every container on host N (counted assertion).
sc_rm_all() {
    local n="$1" ids
    ids="$(hdocker "$n" ps -aq)"
    # shellcheck disable=SC2086 # one id per word
    [[ -z "$ids" ]] || assert_ok "host $n: remove all containers" hdocker "$n" rm -f $ids
}

# sc_assert_host_clean N - no rustoverlay network in Docker, no overlay
# namespace, no ro-*/rc-* link left on host N, and its plugin still runs.
sc_assert_host_clean() {
    local n="$1"
    assert_empty "host $n: no rustoverlay network left in Docker" \
        "$(hdocker "$n" network ls -q --filter driver=rustoverlay)"
    assert_empty "host $n: no overlay namespace left under /run/rustoverlay/netns" "$(ovl_namespaces "$n")"
    assert_empty "host $n: no ro-*/rc-* link left in its namespace" "$(host_ro_links "$n")"
    assert_ok "host $n: the plugin is still running" harness_plugin_pid "$n"
}

# sc_plugin_errors N - ERROR lines in host N's plugin log.
sc_plugin_errors() {
    grep -E '^[^ ]+ +ERROR ' "$(harness_host_dir "$1")/plugin.log" || true
}

# --- extra dockerd settings ----------------------------------------------------
#
# The harness writes each host's daemon.json itself, at every dockerd start,
# and offers no hook for more settings. sc_dockerd_config N MEMBERS makes
# every later dockerd start of host N add MEMBERS (JSON object members, e.g.
# '"live-restore": true') to the file dockerd is given with --config-file,
# right before dockerd is spawned: _harness_spawn is wrapped for that (only
# spawns whose pid file is a host's dockerd.pid are touched). A test that
# relies on it must check the setting took (e.g. `docker info`), so that a
# harness change that bypasses the wrapper fails loudly.
declare -A SC_DOCKERD_EXTRA=()

sc_dockerd_config() {
    SC_DOCKERD_EXTRA[${1:?usage: sc_dockerd_config N MEMBERS}]="${2:?JSON members}"
}

if ! declare -F _sc_harness_spawn_orig >/dev/null; then
    eval "_sc_harness_spawn_orig() $(declare -f _harness_spawn | tail -n +2)"
    _harness_spawn() {
        local pidfile="$1" hostdir n cfg="" a prev=""
        if [[ "$pidfile" == */dockerd.pid ]]; then
            hostdir="$(dirname "$pidfile")"
            n="${hostdir##*/h}"
            if [[ -n "${SC_DOCKERD_EXTRA[$n]:-}" ]]; then
                for a in "$@"; do
                    [[ "$prev" != --config-file ]] || cfg="$a"
                    [[ "$a" != --config-file=* ]] || cfg="${a#--config-file=}"
                    prev="$a"
                done
                [[ -n "$cfg" ]] || cfg="$hostdir/daemon.json"
                _sc_json_add "$cfg" "${SC_DOCKERD_EXTRA[$n]}"
            fi
        fi
        _sc_harness_spawn_orig "$@"
    }
fi

# _sc_json_add FILE MEMBERS - add members to the JSON object in FILE (created
# as {} if missing).
_sc_json_add() {
    local file="$1" members="$2" body
    body="$(cat "$file" 2>/dev/null)" || body=""
    body="$(printf '%s' "$body" | tr -d '\n' | sed 's/^[[:space:]]*//; s/[[:space:]]*$//')"
    if [[ -z "$body" || "$body" =~ ^\{[[:space:]]*\}$ ]]; then
        printf '{%s}\n' "$members" >"$file"
    else
        printf '%s, %s}\n' "${body%\}}" "$members" >"$file"
    fi
}

# sc_wait_ms LIMIT_S CMD... - milliseconds until CMD succeeds (polled every
# 50 ms); fails when that is not within LIMIT_S (a check that succeeds only
# after a slow answer fails too).
sc_wait_ms() {
    local limit="$1" t0 ms
    shift
    t0="$(now_ms)"
    until "$@"; do
        (($(ms_since "$t0") < limit * 1000)) || return 1
        sleep 0.05
    done
    ms="$(ms_since "$t0")"
    ((ms <= limit * 1000)) || return 1
    echo "$ms"
}
