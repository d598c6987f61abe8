#!/usr/bin/env bash
# Runs the boot-storm benchmark inside a network namespace of its own (deleted on exit, also on
# failure): a veth pair, the server end with two addresses (herd; dnsmasq and nginx), the client end
# for 200 simulated DHCP clients.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
ns=herd-bench-$$
trap 'ip netns del "$ns" 2>/dev/null || true' EXIT
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add vs type veth peer name vc
ip -n "$ns" addr add 10.98.0.1/24 dev vs
ip -n "$ns" addr add 10.98.0.3/24 dev vs
# Both ends live in this namespace: let each accept packets from the other's (local) address.
ip netns exec "$ns" sysctl -q -w net.ipv4.conf.vs.accept_local=1 net.ipv4.conf.vc.accept_local=1
ip -n "$ns" link set vs up
ip -n "$ns" addr add 10.98.0.2/24 dev vc  # the simulated clients send from here (no raw sockets)
ip -n "$ns" link set vc up
ip netns exec "$ns" env HERD_BENCH_SERVER_IF=vs HERD_BENCH_CLIENT_IF=vc \
  go test -run '^$' -bench BootStorm -benchtime 1x -v ./e2e/bootbench/
