#!/usr/bin/env bash
# The multi-host end-to-end test (multi_host.sh) on the test-only Consul
# server instead of etcd.
STORE=consul exec bash "$(dirname "$0")/multi_host.sh"
