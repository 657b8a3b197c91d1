#!/usr/bin/env bash
# Runs podman 4.3 (CNI backend, runc, cgroupfs, vfs) against a CNI plugin: two busybox containers
# on the conflist's network get addresses, ping each other both ways, are removed, and the host
# is checked for leftovers (netns, host veths, CNI cache entries, IPAM reservations, routes,
# iptables rules naming them, containers, processes). Everything podman writes goes to a temp
# dir; the host's podman/containers config and storage are not used.
#
#   bash tests/runtimes/podman.sh <cni_bin_dir> <conflist_path>     # as root
#
# Env: WEFT_RT_TRACE=0 runs the plugins untraced (default: each CNI call is logged through a
# wrapper, which is how "the runtime called DEL" is checked); WEFT_RT_KEEP=1 keeps the temp dir;
# WEFT_RT_SKIP_SETUP=1 skips setup.sh (packages + rootfs).
# Exit 0 only if every step and check passed; on failure the reason is printed as "podman: FAIL: ...".
set -euo pipefail
RT=podman
# shellcheck source=lib.sh disable=SC2034,SC2153
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
start=$SECONDS

preflight "$@"
TMP=$(mktemp -d /tmp/weft-rt-podman.XXXXXX)
CG=weft-rt-$SUFFIX # cgroup parent: conmon and both containers live under it
NAME_A=weft-rt-$SUFFIX-a
NAME_B=weft-rt-$SUFFIX-b
IPAM_DIRS=$(ipam_dirs)
export CONTAINERS_CONF=$TMP/containers.conf CONTAINERS_STORAGE_CONF=$TMP/storage.conf
export CONTAINERS_REGISTRIES_CONF=$TMP/registries.conf
PODMAN=(podman --root "$TMP/storage" --runroot "$TMP/runroot" --tmpdir "$TMP/libpod"
	--storage-driver vfs --cgroup-manager cgroupfs --events-backend file --runtime runc
	--network-config-dir "$TMP/net.d" --runtime-flag "root=$TMP/runc")

cleanup() {
	local rc=$? p
	trap - EXIT INT TERM
	set +e
	# Containers first (podman tears their network down), then whatever podman left running.
	[ -f "$CONTAINERS_CONF" ] && with_timeout 60 "${PODMAN[@]}" rm -a -f -t 0 >/dev/null 2>&1
	for p in $(our_pids "$TMP"); do kill -KILL "$p" 2>/dev/null; done
	rm_cgroup_tree "$CG"
	purge_net_leftovers
	# shellcheck disable=SC2046 # one id a word
	purge_cni_state "${ID_A:-}" "${ID_B:-}" $(ids_from_trace)
	finish_cleanup "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

remember_dirs /var/lib/cni # libcni's cache (results/); removed again if this run made it and it is empty
snapshot "$TMP/before"
mkdir -p "$TMP/net.d" "$TMP/storage" "$TMP/runroot" "$TMP/libpod" "$TMP/runc"
cp "$CONFLIST" "$TMP/net.d/$(basename "$CONFLIST")"
if [ "${WEFT_RT_TRACE:-1}" = 1 ]; then
	make_trace_bin "$TMP/cni-bin" "$BIN"
	PLUGIN_DIR=$TMP/cni-bin
else
	PLUGIN_DIR=$BIN
fi

# RLIMIT_NPROC: podman's default (1048576) is above what runc may set without CAP_SYS_RESOURCE
# in this kind of VM ("error setting rlimit type 6: operation not permitted"), same for NOFILE.
nproc=$(ulimit -Hu)
[ "$nproc" = unlimited ] || [ "$nproc" -gt 4096 ] && nproc=4096
cat >"$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=$nproc:$nproc"]
log_driver = "k8s-file"

[network]
network_backend = "cni"
network_config_dir = "$TMP/net.d"
cni_plugin_dirs = ["$PLUGIN_DIR"]
default_network = "$NETNAME"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$TMP/events.log"
runtime = "runc"
tmp_dir = "$TMP/libpod"
lock_type = "file"
EOF
cat >"$CONTAINERS_STORAGE_CONF" <<EOF
[storage]
driver = "vfs"
graphroot = "$TMP/storage"
runroot = "$TMP/runroot"
EOF
: >"$CONTAINERS_REGISTRIES_CONF"

backend=$("${PODMAN[@]}" info --format '{{.Host.NetworkBackend}}' 2>&1) || fail "podman info: $backend"
[ "$backend" = cni ] || fail "podman uses network backend '$backend', not cni"
out=$(with_timeout 30 "${PODMAN[@]}" network inspect "$NETNAME" 2>&1) ||
	fail "podman does not see network '$NETNAME' from $(basename "$CONFLIST"): $out"
say "plugin dir $BIN, network $NETNAME ($(jq -r '.cniVersion' "$CONFLIST"), $(jq -r '[.plugins[].type] | join("+")' "$CONFLIST"))"

run_ctr() { # run_ctr <label> <name>
	local label=$1 name=$2 out id
	cp -a "$ROOTFS" "$TMP/rootfs-$label" # podman writes /etc/mtab, /run/.containerenv into it
	out=$(with_timeout 60 "${PODMAN[@]}" run -d --name "$name" --network "$NETNAME" \
		--cgroup-parent "/$CG" --rootfs "$TMP/rootfs-$label" /bin/sleep 3600 2>&1) ||
		fail "podman run of container $label failed: $(grep -v 'level=warning' <<<"$out" | tr '\n' ' ')"
	id=$(tail -n1 <<<"$out")
	printf -v "ID_$label" %s "$id"
	printf -v "NETNS_$label" %s "$("${PODMAN[@]}" inspect --format '{{.NetworkSettings.SandboxKey}}' "$name")"
	container_net "$label" "${PODMAN[@]}" exec "$name"
	local ipv="IP_$label" peer="PEERNAME_$label" ns="NETNS_$label"
	say "container $label ip=${!ipv} (id ${id:0:12}, netns ${!ns}${!peer:+, host veth ${!peer}})"
}

t0=$SECONDS
run_ctr A "$NAME_A"
run_ctr B "$NAME_B"
[ "$IP_A" != "$IP_B" ] || fail "both containers got the same address $IP_A"
ping_check A B "${PODMAN[@]}" exec "$NAME_A"
ping_check B A "${PODMAN[@]}" exec "$NAME_B"

out=$(with_timeout 60 "${PODMAN[@]}" rm -f -t 0 "$NAME_A" "$NAME_B" 2>&1) || fail "podman rm failed: $out"
left=$("${PODMAN[@]}" ps -a -q 2>&1) || fail "podman ps: $left"
[ -z "$left" ] || fail "containers remain after podman rm: $left"
say "removed both containers"
# conmon runs 'podman container cleanup' after the container exits: wait for it to finish.
no_helpers() { [ -z "$(our_pids "$TMP")" ]; }
wait_for 15 no_helpers ||
	fail "podman helper processes still running: $(our_pids "$TMP" | xargs -r ps -o pid=,args= -p)"
check_trace "$ID_A" A
check_trace "$ID_B" B
check_leftovers "$ID_A" "$ID_B"
say "cleanup ok"
say "passed in $((SECONDS - start))s (containers up to removed: $((SECONDS - t0))s)"
