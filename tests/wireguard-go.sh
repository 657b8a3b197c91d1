#!/usr/bin/env bash
# Builds wireguard-go from its Go module at the version the Dockerfile pins (ARG
# WIREGUARD_GO_VERSION), once, into the cache, and prints the binary's path:
#
#   export WEFT_WIREGUARD_GO=$(bash tests/wireguard-go.sh)    # weft-router's --wireguard-go
#
# Why not Debian 12's package: its 0.0.20220316 predates wireguard-go's TUN offloads (GSO/GRO)
# and batched UDP I/O; here it carries 1.0 Gbit/s where the pinned one carries 3.2 (README,
# "Throughput"). The image ships the same pin (the Dockerfile's wireguard-go stage).
#
# Cache: ${WEFT_CACHE:-$HOME/.cache/weft}/wireguard-go/<version>/wireguard-go (about 10 s to
# build on 2 cores when the Go module cache is cold).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODULE=golang.zx2c4.com/wireguard
VERSION=$(sed -n 's/^ARG WIREGUARD_GO_VERSION=//p' "$REPO/Dockerfile")
[ -n "$VERSION" ] || { echo "wireguard-go.sh: no ARG WIREGUARD_GO_VERSION in $REPO/Dockerfile" >&2; exit 1; }
dir=${WEFT_CACHE:-${HOME:-/root}/.cache/weft}/wireguard-go/$VERSION
if [ ! -x "$dir/wireguard-go" ]; then
	export PATH="/usr/local/go/bin:$HOME/go/bin:$PATH"
	command -v go >/dev/null || { echo "wireguard-go.sh: needs go (Go 1.22 or newer)" >&2; exit 1; }
	echo "wireguard-go.sh: building $MODULE@$VERSION" >&2
	mkdir -p "$dir"
	tmp=$(mktemp -d "$dir/.build.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	(cd "$tmp" && GOBIN=$tmp GOFLAGS=-mod=mod CGO_ENABLED=0 go install -trimpath "$MODULE@$VERSION") >&2
	"$tmp/wireguard" --version | grep -q '^wireguard-go ' || { echo "wireguard-go.sh: $tmp/wireguard --version says no wireguard-go" >&2; exit 1; }
	mv "$tmp/wireguard" "$dir/wireguard-go"
fi
echo "$dir/wireguard-go"
