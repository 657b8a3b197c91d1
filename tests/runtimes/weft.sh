#!/usr/bin/env bash
# Real runtimes calling weft: a lab node (weft-router in namespace <prefix>-node1) and podman and
# containerd run *inside that node's network namespace* (nsenter --net, so the host's own network
# is never touched), each starting two containers that get weft addresses and ping each other.
# Afterwards the router must hold no pod allocation. Needs `cargo build --release --bins` first.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/../.." && pwd)
lab_dir=${WEFT_RT_LAB_DIR:-/run/weft-lab-rt}
prefix=${WEFT_RT_PREFIX:-wrt}
bin=$top/target/release

lab() { WEFT_LAB_DIR=$lab_dir "$bin/weft-lab" --prefix "$prefix" "$@"; }
cleanup() { lab down >/dev/null 2>&1 || echo "weft.sh: lab cleanup failed" >&2; }
trap cleanup EXIT

bash "$here/setup.sh" >/dev/null
lab up --nodes 1 --pods-per-node 0
node=$lab_dir/lab/node1
for runtime in podman containerd; do
	nsenter --net="/run/netns/$prefix-node1" bash "$here/$runtime.sh" "$node/cni/bin" "$node/cni/net.d/10-weft.conflist"
	left=$("$bin/weftctl" --socket "$node/weft.sock" -o json status | jq '.pods | length')
	if [ "$left" != 0 ]; then
		echo "weft.sh: $runtime left $left allocation(s) in weft-router" >&2
		"$bin/weftctl" --socket "$node/weft.sock" status >&2
		exit 1
	fi
	echo "$runtime: weft-router holds 0 pod allocations afterwards"
done
