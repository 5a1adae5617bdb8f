#!/usr/bin/env bash
# The multi-host end-to-end test (multi_host.sh) on the test-only Consul
# server instead of etcd, with Consul's default session_ttl_min of 10 s (the
# other Consul runs lower it to 1 s). The hosts' 10 s TTL is then the
# shortest Consul takes, and a session expires up to 2x after its last
# renewal: multi_host.sh waits for no expiry, so its timings hold.
HARNESS_CONSUL_SESSION_TTL_MIN=10 STORE=consul exec bash "$(dirname "$0")/multi_host.sh"
