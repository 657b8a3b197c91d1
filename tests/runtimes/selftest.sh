#!/usr/bin/env bash
# shellcheck disable=SC2010
# Tests the harness itself: podman.sh and containerd.sh must FAIL, with a clear message, against
# sabotaged plugins, and must still leave the host clean (no containers, runtime processes,
# cgroups, temp dirs, /run/containerd). The sabotaged "bridge" wraps Debian's reference bridge:
#   addfail — ADD returns a CNI error              -> the container does not start
#   delfail — DEL returns a CNI error              -> the plugin's error, from the trace or ctr's log
#   nodel   — DEL does nothing and says it worked  -> "IPAM reservations ... remain"
#
#   bash tests/runtimes/selftest.sh [podman|containerd|both=both]      # as root
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
which=${1:-both}
bash "$here/setup.sh" >/dev/null

tmp=$(mktemp -d /tmp/weft-rt-self.XXXXXX)
bridge=weftst$(head -c3 /dev/urandom | od -An -tx1 | tr -d ' \n')
trap 'ip link del "$bridge" 2>/dev/null; rm -rf "$tmp"' EXIT

mkdir "$tmp/bin"
for p in bridge host-local loopback; do cp /usr/lib/cni/$p "$tmp/bin/real-$p"; done
ln -s real-host-local "$tmp/bin/host-local"
ln -s real-loopback "$tmp/bin/loopback"
cat >"$tmp/bin/bridge" <<'EOF'
#!/bin/sh
# selftest sabotage: the mode is the first line of the file "mode" beside this script.
here=$(dirname "$0")
mode=$(cat "$here/mode")
case "$mode/$CNI_COMMAND" in
addfail/ADD) echo '{"cniVersion":"1.0.0","code":11,"msg":"selftest: ADD refused on purpose"}'; exit 1 ;;
delfail/DEL) echo '{"cniVersion":"1.0.0","code":11,"msg":"selftest: DEL refused on purpose"}'; exit 1 ;;
nodel/DEL) cat >/dev/null; exit 0 ;;
esac
exec "$here/real-bridge"
EOF
chmod 755 "$tmp/bin/bridge"
cat >"$tmp/selftest.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "weftself-$bridge", "plugins": [
  {"type": "bridge", "bridge": "$bridge", "isGateway": false, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.250.254.0/24"}]], "dataDir": "$tmp/ipam"}}]}
EOF
if ip -4 route show table all | grep -q '10\.250\.254\.'; then
	echo "selftest: 10.250.254.0/24 is in use on this host" >&2
	exit 1
fi

host_clean() { # the harness left nothing of its own behind
	local bad=()
	ls -d /tmp/weft-rt-podman.* /tmp/weft-rt-ctd.* >/dev/null 2>&1 && bad+=("temp dirs: $(ls -d /tmp/weft-rt-podman.* /tmp/weft-rt-ctd.* 2>/dev/null)")
	ls -d /sys/fs/cgroup/*/weft-rt-* >/dev/null 2>&1 && bad+=("cgroups: $(ls -d /sys/fs/cgroup/*/weft-rt-*)")
	grep -lsF /tmp/weft-rt- /proc/[0-9]*/cmdline >/dev/null 2>&1 && bad+=("processes: $(grep -lsF /tmp/weft-rt- /proc/[0-9]*/cmdline)")
	ls /var/lib/cni/results 2>/dev/null | grep -q "^weftself-$bridge-" && bad+=("CNI cache: $(ls /var/lib/cni/results | grep "^weftself-$bridge-")")
	ls "$tmp/ipam"/*/ 2>/dev/null | grep -qE '^[0-9.]+$' && bad+=("reservations: $(ls "$tmp/ipam"/*/)")
	[ ${#bad[@]} -eq 0 ] || {
		printf 'selftest: FAIL: left behind: %s\n' "${bad[@]}" >&2
		return 1
	}
}

rc=0
for rt in podman containerd; do
	[ "$which" = both ] || [ "$which" = "$rt" ] || continue
	for mode in addfail delfail nodel; do
		echo "$mode" >"$tmp/bin/mode"
		want=$(case $mode in addfail) echo 'ADD refused on purpose' ;; delfail) echo 'DEL refused on purpose' ;; nodel) echo 'IPAM reservations for' ;; esac)
		if out=$(WEFT_RT_SKIP_SETUP=1 bash "$here/$rt.sh" "$tmp/bin" "$tmp/selftest.conflist" 2>&1); then
			echo "selftest: FAIL: $rt.sh passed with a '$mode' plugin" >&2
			rc=1
		elif ! grep -qF "$want" <<<"$out"; then
			echo "selftest: FAIL: $rt.sh failed with a '$mode' plugin but without '$want':" >&2
			sed 's/^/    /' <<<"$out" >&2
			rc=1
		else
			echo "selftest: $rt.sh rejects a '$mode' plugin: $(grep -m1 'FAIL' <<<"$out")"
		fi
		# The harness purges what the failed DEL left (cache entries, reservations) at exit.
		host_clean || rc=1
		rm -rf "$tmp/ipam"
	done
done
[ $rc -eq 0 ] && echo "selftest: ok"
exit $rc
