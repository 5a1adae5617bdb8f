#!/usr/bin/env bash
# The status test (status.sh) on the test-only Consul server instead of
# etcd.
STORE=consul exec bash "$(dirname "$0")/status.sh"
