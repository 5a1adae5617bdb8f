#!/usr/bin/env bash
# TLS and authentication to the store, through the plugin, as an operator
# sets them up. One etcd serves https only, with --client-cert-auth, and has
# authentication enabled (user "rustoverlay", whose role may read and write
# /rustoverlay/ and nothing else). The client certificate's name is no etcd
# user, so a plugin gets in only with both: a certificate signed by the CA
# etcd trusts, and the password. Certificates are made here with openssl: a
# CA, etcd's server certificate, a client certificate, one that expired in
# 2020, and a second CA.
# - Host 1 runs the plugin binary with --store-ca/--store-cert/--store-key and
#   RUSTOVERLAY_STORE_USER/PASSWORD from its environment.
# - Host 2 runs the managed plugin, which reads its certificates from the
#   certs mount (certs.source; /etc/rustoverlay in the plugin) and gets the
#   same settings with `docker plugin set`.
# Containers on the two hosts talk across hosts, so both plugins share the
# store over TLS. Then a wrong CA, a wrong password, an expired client
# certificate and a missing password each stop `rustoverlay serve` at start
# with an error that names the cause; a store that is merely down does not
# stop it. Everything is removed at the end, and the store holds nothing.
# shellcheck disable=SC2016 # eval'd assertions expand when they run
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh

harness_init storeauth
T_START=$SECONDS

img="$HARNESS_IMAGE"
PLUGIN=rustoverlay:latest
NET=appnet
NET_SUBNET=10.77.0.0/24
PKI="$HARNESS_TMP/pki"
ETCD_IP="$HARNESS_ETCD_IP"
STORE="etcd://$ETCD_IP:$HARNESS_ETCD_CLIENT_PORT"
METRICS_PORT=2381
USER_NAME=rustoverlay
PASSWORD='s3cret pass'

# make_pki DIR IP - the CA (ca.pem), etcd's server certificate for IP, a
# client certificate, one of the same CA that expired in 2020, and a second
# CA (other-ca.pem). P-256 keys.
make_pki() {
    local d="$1" ip="$2"
    mkdir -p "$d"
    (
        cd "$d"
        key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
        for ca in ca other-ca; do
            key "$ca-key.pem"
            openssl req -x509 -new -key "$ca-key.pem" -subj "/CN=rustoverlay test $ca" -days 2 \
                -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
                -out "$ca.pem"
        done
        # csr NAME CN EXT - a key and request for NAME, its extensions in NAME.ext.
        csr() {
            key "$1-key.pem"
            openssl req -new -key "$1-key.pem" -subj "/CN=$2" -out "$1.csr"
            printf '%s\n' "$3" >"$1.ext"
        }
        csr server etcd "subjectAltName=IP:$ip
extendedKeyUsage=serverAuth"
        csr client rustoverlay-client "extendedKeyUsage=clientAuth"
        csr expired rustoverlay-client "extendedKeyUsage=clientAuth"
        for c in server client; do
            openssl x509 -req -in "$c.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 2 \
                -extfile "$c.ext" -out "$c.pem" 2>/dev/null
        done
        # `openssl ca` is the command that takes dates in the past.
        mkdir -p ca-db && : >ca-db/index && echo 01 >ca-db/serial
        printf '%s\n' '[ca]' 'default_ca=d' '[d]' 'database=ca-db/index' 'serial=ca-db/serial' \
            'new_certs_dir=ca-db' 'default_md=sha256' 'policy=p' '[p]' 'commonName=supplied' >ca.cnf
        openssl ca -batch -config ca.cnf -cert ca.pem -keyfile ca-key.pem -in expired.csr \
            -startdate 20200101000000Z -enddate 20200102000000Z -extfile expired.ext \
            -notext -out expired.pem 2>/dev/null
    )
}

# etcd_healthy - the TLS etcd answers /health on its plain-HTTP metrics port.
etcd_healthy() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    nsenter --net="/run/netns/$(harness_etcd_ns)" -- timeout 3 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "GET /health HTTP/1.0\r\nHost: %s\r\n\r\n" "$0" >&3
        cat <&3' "$ETCD_IP" "$METRICS_PORT" 2>/dev/null | grep -q '"health":"true"'
}

# start_tls_etcd - the run's etcd again on its data dir, serving clients
# over https only and asking them for a certificate of ca.pem.
start_tls_etcd() {
    local dir client peer
    dir="$(harness_etcd_dir)"
    client="https://$ETCD_IP:$HARNESS_ETCD_CLIENT_PORT"
    peer="http://$ETCD_IP:$HARNESS_ETCD_PEER_PORT"
    printf '\n===== etcd (TLS) start %s =====\n' "$(date +%T)" >>"$dir/etcd.log"
    _harness_spawn "$dir/etcd.pid" "$dir/etcd.log" \
        nsenter --net="/run/netns/$(harness_etcd_ns)" -- \
        "${_HARNESS_PIDWRAP[@]}" "$dir/etcd.pid" \
        env -i PATH="$PATH" \
        etcd --name rotest --data-dir "$dir/data" \
        --listen-client-urls "$client" --advertise-client-urls "$client" \
        --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
        --initial-cluster "rotest=$peer" --initial-cluster-state new \
        --initial-cluster-token "$HARNESS_PREFIX" \
        --cert-file "$PKI/server.pem" --key-file "$PKI/server-key.pem" \
        --trusted-ca-file "$PKI/ca.pem" --client-cert-auth \
        --listen-metrics-urls "http://$ETCD_IP:$METRICS_PORT" \
        --logger zap --log-outputs stderr
}

# serve_fails WHAT PATTERN [ENV=VALUE...] -- [serve args] - `rustoverlay
# serve` in host 1's namespaces, on a socket of its own, must exit non-zero
# within 20 s and say PATTERN (extended regex).
serve_fails() {
    local what="$1" pattern="$2" rc=0 serve_out t0
    shift 2
    local -a envs=()
    while [[ "$1" != -- ]]; do
        envs+=("$1")
        shift
    done
    shift
    t0="$(now_ms)"
    serve_out="$(hexec_mnt 1 timeout 20 env NO_COLOR=1 "${envs[@]}" "$(harness_bin)" serve \
        --socket "/run/rustoverlay-check.sock" --host-id check --state-dir /run/rustoverlay-check \
        --vtep-ip "$(harness_host_ip 1)" --store "$STORE" "$@" 2>&1)" || rc=$?
    echo "serve with $what: exit $rc after $(ms_since "$t0") ms"
    printf '%s\n' "$serve_out" | tail -n 3 | cut -c1-400 | sed 's/^/    /'
    assert_ok "$what: serve stops at start (exit $rc, not 0 and not the 20 s timeout)" \
        test "$rc" -ne 0 -a "$rc" -ne 124
    assert_ok "$what: the error says /$pattern/" eval 'grep -Eq -- "$pattern" <<<"$serve_out"'
}

# with_store_env CMD... - CMD (a function too) with the user, the password and
# the TLS files in the environment, as `rustoverlay dump` and serve read them.
with_store_env() {
    RUSTOVERLAY_STORE_USER="$USER_NAME" RUSTOVERLAY_STORE_PASSWORD="$PASSWORD" \
        RUSTOVERLAY_STORE_CA="$PKI/ca.pem" RUSTOVERLAY_STORE_CERT="$PKI/client.pem" \
        RUSTOVERLAY_STORE_KEY="$PKI/client-key.pem" "$@"
}
tls_args=(--store-ca "$PKI/ca.pem" --store-cert "$PKI/client.pem" --store-key "$PKI/client-key.pem")

run_c() { hdocker "$1" run -d --stop-timeout 1 --network "$NET" --name "$2" "$img" sleep 3600; }
cping() { hdocker "$1" exec "$2" ping -c 1 -W 2 "$3"; }
plugin_log_2() { harness_managed_plugin_log 2 "$PLUGIN_ID"; }

# --- the store --------------------------------------------------------------
phase "certificates (openssl), etcd with a user and a role, then https with client certificates"
assert_ok "make the CA, etcd's and the clients' certificates" make_pki "$PKI" "$ETCD_IP"
assert_ok "the expired certificate is from 2020" \
    eval 'openssl x509 -in "$PKI/expired.pem" -noout -enddate | grep -q 2020'
harness_start_etcd
assert_ok "add the root user" hetcdctl user add root:rootpw --interactive=false
assert_ok "add the role $USER_NAME" hetcdctl role add "$USER_NAME"
assert_ok "the role may read and write /rustoverlay/" \
    hetcdctl role grant-permission "$USER_NAME" --prefix=true readwrite /rustoverlay/
assert_ok "add the user $USER_NAME" hetcdctl user add "$USER_NAME:$PASSWORD" --interactive=false
assert_ok "give it the role" hetcdctl user grant-role "$USER_NAME" "$USER_NAME"
assert_ok "enable authentication" hetcdctl auth enable
harness_stop_etcd
start_tls_etcd
assert_eventually "etcd serves again, over https" 30 etcd_healthy
harness_stop_if_failed "the TLS etcd did not start"
assert_fails "plain http is refused now" \
    hetcdctl get /rustoverlay/ --prefix
assert_fails "the user's password without a client certificate is refused" \
    nsenter --net="/run/netns/$(harness_etcd_ns)" -- env ETCDCTL_API=3 etcdctl \
    --endpoints="https://$ETCD_IP:$HARNESS_ETCD_CLIENT_PORT" --cacert "$PKI/ca.pem" \
    --user "$USER_NAME:$PASSWORD" --dial-timeout=2s --command-timeout=3s get /rustoverlay/x

# --- host 1: the binary ---------------------------------------------------------
phase "host 1: rustoverlay serve with --store-ca/--store-cert/--store-key and the user's password"
RUSTOVERLAY_STORE_USER="$USER_NAME" RUSTOVERLAY_STORE_PASSWORD="$PASSWORD" \
    harness_start_host 1 --store "$STORE" "${tls_args[@]}"
harness_busybox_image 1
assert_ok "host 1: the plugin reached the store" \
    eval 'plugin_log_since_start 1 | grep -q "store reached"'

# --- host 2: the managed plugin ---------------------------------------------
phase "host 2: the managed plugin, its certificates from certs.source"
harness_start_host 2 --no-plugin
harness_share_run 2
harness_busybox_image 2
certs="$(harness_host_dir 2)/certs"
mkdir -p "$certs/rustoverlay" "$(harness_host_dir 2)/state"
cp "$PKI/ca.pem" "$PKI/client.pem" "$PKI/client-key.pem" "$certs/rustoverlay/"
assert_ok "host 2: docker plugin create $PLUGIN" harness_managed_plugin_create 2 "$PLUGIN"
PLUGIN_ID="$(harness_managed_plugin_id 2 "$PLUGIN")" || PLUGIN_ID=none
assert_ok "host 2: docker plugin set: store, TLS files under /etc/rustoverlay, user, password" \
    hdocker 2 plugin set "$PLUGIN" certs.source="$certs" state.source="$(harness_host_dir 2)/state" \
    RUSTOVERLAY_STORE="$STORE" RUSTOVERLAY_HOST_ID=h2 RUSTOVERLAY_VTEP_IP="$(harness_host_ip 2)" \
    RUSTOVERLAY_STORE_CA=/etc/rustoverlay/ca.pem RUSTOVERLAY_STORE_CERT=/etc/rustoverlay/client.pem \
    RUSTOVERLAY_STORE_KEY=/etc/rustoverlay/client-key.pem \
    RUSTOVERLAY_STORE_USER="$USER_NAME" RUSTOVERLAY_STORE_PASSWORD="$PASSWORD"
assert_ok "host 2: docker plugin enable" hdocker 2 plugin enable "$PLUGIN"
assert_eventually "host 2: the managed plugin reached the store" 15 \
    eval 'plugin_log_2 | grep -q "store reached"'
harness_stop_if_failed "a plugin did not reach the TLS store"

phase "containers on both hosts talk: both plugins share the store over TLS"
assert_ok "host 1: network create -d rustoverlay" \
    hdocker 1 network create -d rustoverlay --ipam-driver rustoverlay --subnet "$NET_SUBNET" "$NET"
assert_ok "host 2: network create -d $PLUGIN" \
    hdocker 2 network create -d "$PLUGIN" --ipam-driver "$PLUGIN" --subnet "$NET_SUBNET" "$NET"
assert_ok "host 1: run c1" run_c 1 c1
assert_ok "host 2: run c2" run_c 2 c2
ip1="$(hcontainer_ip 1 c1 "$NET")"
ip2="$(hcontainer_ip 2 c2 "$NET")"
assert_ok "c1 ($ip1) and c2 ($ip2) have distinct addresses of $NET_SUBNET" \
    test "${ip1%.*}" = 10.77.0 -a "${ip2%.*}" = 10.77.0 -a "$ip1" != "$ip2"
assert_eventually "c1 (h1) pings c2 (h2)" 15 cping 1 c1 "$ip2"
assert_eventually "c2 (h2) pings c1 (h1)" 15 cping 2 c2 "$ip1"
dump="$(with_store_env harness_store_dump etcd 2>&1)" || true
assert_ok "the store (read with the same TLS files and password) holds both addresses" \
    eval 'grep -q "addr/$ip1 " <<<"$dump" && grep -q "addr/$ip2 " <<<"$dump"'

# --- what an operator gets wrong -----------------------------------------------
phase "a wrong CA, a wrong password, an expired certificate, no password: serve stops at start, saying why"
serve_fails "a CA that did not sign etcd's certificate" "--store-ca.*not signed by the given CA" \
    RUSTOVERLAY_STORE_USER="$USER_NAME" RUSTOVERLAY_STORE_PASSWORD="$PASSWORD" -- \
    --store-ca "$PKI/other-ca.pem" --store-cert "$PKI/client.pem" --store-key "$PKI/client-key.pem"
serve_fails "a wrong password" "RUSTOVERLAY_STORE_USER/PASSWORD.*authentication failed, invalid user ID or password" \
    RUSTOVERLAY_STORE_USER="$USER_NAME" RUSTOVERLAY_STORE_PASSWORD=wrong -- "${tls_args[@]}"
serve_fails "an expired client certificate" "expired.pem: expired on .*2020.*renew it" \
    RUSTOVERLAY_STORE_USER="$USER_NAME" RUSTOVERLAY_STORE_PASSWORD="$PASSWORD" -- \
    --store-ca "$PKI/ca.pem" --store-cert "$PKI/expired.pem" --store-key "$PKI/expired-key.pem"
serve_fails "no user and password" "RUSTOVERLAY_STORE_USER/PASSWORD.*permission denied" -- "${tls_args[@]}"
assert_fails "none of them left a socket" hexec_mnt 1 test -e /run/rustoverlay-check.sock

phase "a store that is down is not a reason to stop: serve starts and waits for it"
harness_etcd_link down
rc=0
down_out="$(hexec_mnt 1 timeout 8 env NO_COLOR=1 RUSTOVERLAY_STORE_USER="$USER_NAME" \
    RUSTOVERLAY_STORE_PASSWORD="$PASSWORD" "$(harness_bin)" serve --socket /run/rustoverlay-check.sock \
    --host-id check --state-dir /run/rustoverlay-check --vtep-ip "$(harness_host_ip 1)" \
    --store "$STORE" --store-timeout 2 "${tls_args[@]}" 2>&1)" || rc=$?
harness_etcd_link up
printf '%s\n' "$down_out" | grep -m 1 'not reachable' | cut -c1-300 | sed 's/^/    /' || true
assert_eq "serve with the store unreachable still runs after 8 s (ended by timeout)" 124 "$rc"
assert_ok "it said the store is not reachable yet" \
    eval 'grep -q "the store is not reachable yet" <<<"$down_out"'
hexec_mnt 1 rm -rf /run/rustoverlay-check /run/rustoverlay-check.sock
assert_eventually "etcd answers again" 10 etcd_healthy

# --- teardown -----------------------------------------------------------------
phase "remove everything; nothing is left"
assert_ok "host 1: remove c1" hdocker 1 rm -f c1
assert_ok "host 2: remove c2" hdocker 2 rm -f c2
assert_ok "host 1: remove $NET" hdocker 1 network rm "$NET"
assert_ok "host 2: remove $NET" hdocker 2 network rm "$NET"
assert_ok "host 2: disable the managed plugin" hdocker 2 plugin disable "$PLUGIN"
assert_ok "host 2: remove it" hdocker 2 plugin rm "$PLUGIN"
for h in 1 2; do
    assert_empty "host $h: no overlay namespace left" "$(ovl_namespaces "$h")"
    assert_empty "host $h: no ro-*/rc-* link left" "$(host_ro_links "$h")"
done
with_store_env assert_store_empty etcd

echo "total time: $((SECONDS - T_START))s"
harness_summary
