#!/usr/bin/env bash
# The README's demo, one command on a fresh Debian 12 machine, as root: installs what the lab
# needs (iproute2, nftables, ping, tcpdump, wireguard-tools, curl), builds weft, starts three
# simulated nodes with a pod each on real WireGuard, and checks that pod traffic between nodes
# crosses the underlay only encrypted. Leaves the lab running (`target/release/weft-lab down`
# removes it); prints what to try next.
#
#   bash tests/demo.sh [--nodes N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$HOME/.cargo/bin:$PATH"
# shellcheck source=tests/lib.sh
. tests/lib.sh
nodes=3
[ "${1:-}" = --nodes ] && nodes=${2:?--nodes needs a number}

[ "$(id -u)" = 0 ] || { echo "demo: run as root (network namespaces, WireGuard, bridges)" >&2; exit 2; }
if command -v dpkg-query >/dev/null; then
	ensure_packages iproute2 nftables iputils-ping tcpdump wireguard-tools curl ca-certificates
fi
command -v cargo >/dev/null || {
	echo "demo: cargo not found: install Rust (https://rustup.rs), then run this again" >&2
	exit 2
}
cargo build --release --bins
# Without the WireGuard kernel module the nodes run wireguard-go: the image's pin when Go is
# here to build it (tests/wireguard-go.sh), else an installed one, else WireGuard in-process.
if command -v go >/dev/null || [ -x /usr/local/go/bin/go ]; then
	WEFT_WIREGUARD_GO=$(bash tests/wireguard-go.sh) && export WEFT_WIREGUARD_GO
fi
target/release/weft-lab up --nodes "$nodes" --pods-per-node 1
target/release/weft-lab check
cat <<'NEXT'

The lab is up. Try:
  ip netns exec wlab-node1 wg show wlabwg1
  target/release/weftctl --socket /run/weft-lab/lab/node1/weft.sock status
  target/release/weftctl --socket /run/weft-lab/lab/node1/weft.sock peers
  ip netns exec wlab-node1 curl -s 127.0.0.1:6782/metrics | grep ^weft_peer
  target/release/weft-lab down
NEXT
