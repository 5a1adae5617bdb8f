#!/usr/bin/env bash
# The host death and partition test (host_death.sh) on the test-only Consul
# server instead of etcd.
STORE=consul exec bash "$(dirname "$0")/host_death.sh"
