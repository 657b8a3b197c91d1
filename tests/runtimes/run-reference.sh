#!/usr/bin/env bash
# shellcheck disable=SC2010
# Proves the runtime harness with Debian's reference CNI plugins (bridge + host-local + loopback
# from containernetworking-plugins, in /usr/lib/cni): writes a cniVersion 1.0.0 conflist with a
# bridge name unique to this run on a private /24 that collides with nothing on the host, runs
# podman.sh and containerd.sh against it N times each, and deletes the bridge at the end.
#
#   bash tests/runtimes/run-reference.sh [runs=1] [podman|containerd|both=both]    # as root
#
# The bridge is layer 2 only (isGateway=false, ipMasq=false): the host gets no address on it,
# no route, no iptables rule and ip_forward is not touched, so the host's network is untouched.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
runs=${1:-1}
which=${2:-both}
bin=${WEFT_RT_REF_BIN:-/usr/lib/cni}

bash "$here/setup.sh" >/dev/null

ip2int() { local IFS=.; read -r a b c d <<<"$1"; echo $(((a << 24) | (b << 16) | (c << 8) | d)); }
# free_subnet — the first 10.250.N.0/24 that overlaps no address or route on the host.
free_subnet() {
	local n cand prefixes p net len m
	prefixes=$({
		ip -4 -o addr show | awk '{print $4}'
		ip -4 route show table all | awk '{print ($1 ~ /^(local|broadcast|unicast|blackhole|unreachable|prohibit)$/) ? $2 : $1}'
	} | grep -E '^[0-9.]+(/[0-9]+)?$' | sort -u)
	for n in $(seq 0 255); do
		cand=$(ip2int "10.250.$n.0")
		for p in $prefixes; do
			net=${p%/*}
			len=32
			[ "$p" = "$net" ] || len=${p#*/}
			[ "$len" -lt 24 ] || len=24 # compare on the shorter of the two prefixes
			m=$(((0xffffffff << (32 - len)) & 0xffffffff))
			[ $((cand & m)) -ne $(($(ip2int "$net") & m)) ] || continue 2
		done
		echo "10.250.$n.0/24"
		return 0
	done
	return 1
}

tmp=$(mktemp -d /tmp/weft-rt-ref.XXXXXX)
bridge=weftrt$(head -c3 /dev/urandom | od -An -tx1 | tr -d ' \n') # 12 chars, unique to this run
cleanup() {
	local rc=$?
	ip link show "$bridge" >/dev/null 2>&1 && ip link del "$bridge"
	rm -rf "$tmp"
	exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

subnet=$(free_subnet) || {
	echo "reference: no free 10.250.N.0/24 on this host" >&2
	exit 1
}
conflist=$tmp/10-weftref.conflist
cat >"$conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "weftref-$bridge",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$bridge",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$subnet"}]],
        "dataDir": "$tmp/ipam"
      }
    },
    { "type": "loopback" }
  ]
}
EOF
echo "reference: bridge $bridge on $subnet, plugins from $bin, conflist $conflist"

rc=0
for i in $(seq 1 "$runs"); do
	for rt in podman containerd; do
		[ "$which" = both ] || [ "$which" = "$rt" ] || continue
		echo "reference: run $i/$runs: $rt.sh"
		s=$SECONDS
		if WEFT_RT_SKIP_SETUP=1 bash "$here/$rt.sh" "$bin" "$conflist"; then
			echo "reference: run $i/$runs: $rt.sh passed in $((SECONDS - s))s"
		else
			echo "reference: run $i/$runs: $rt.sh FAILED after $((SECONDS - s))s" >&2
			rc=1
		fi
		# host-local keeps last_reserved_ip/lock files only; no address may stay reserved.
		if ls "$tmp/ipam/"*/ 2>/dev/null | grep -qE '^[0-9.]+$'; then
			echo "reference: FAIL: host-local reservations remain: $(ls "$tmp/ipam/"*/)" >&2
			rc=1
		fi
	done
done
exit $rc
