#!/usr/bin/env bash
# Runs containerd 1.6 + `ctr run --cni` against a CNI plugin: starts its own containerd (own
# config, root, state and socket under a temp dir; the CRI plugin disabled), runs two busybox
# containers from a rootfs dir (no images), reads their addresses, pings both ways, kills and
# removes them (ctr then sends CNI DEL with an empty CNI_NETNS), checks the host for leftovers,
# and stops its containerd. A system containerd, if any, is not touched.
#
#   bash tests/runtimes/containerd.sh <cni_bin_dir> <conflist_path>     # as root
#
# `ctr run --cni` has no knob for the CNI dirs: it always loads the first config file in
# /etc/cni/net.d and searches the plugins in [/opt/cni/bin /usr/lib/cni] (Debian's build). So each
# `ctr run` here runs in a private mount namespace where the conflist's dir and the plugin dir are
# bind-mounted over those paths: the host's files there (e.g. podman's 87-podman-bridge.conflist)
# are neither used nor modified, and the mounts vanish with the ctr process.
#
# Env: WEFT_RT_TRACE=0 runs the plugins untraced; WEFT_RT_KEEP=1 keeps the temp dir;
# WEFT_RT_SKIP_SETUP=1 skips setup.sh (packages + rootfs).
set -euo pipefail
RT=containerd
# shellcheck source=lib.sh disable=SC2034,SC2153
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
start=$SECONDS

preflight "$@"
TMP=$(mktemp -d /tmp/weft-rt-ctd.XXXXXX)
NS=weft-rt-$SUFFIX # containerd namespace; also the cgroup parent ctr uses (/<ns>/<id>)
IPAM_DIRS=$(ipam_dirs)
SOCK=$TMP/containerd.sock
CTR=(ctr --address "$SOCK" --namespace "$NS")
CTD_PID=
declare -A RUN_PID=() TASK_PID=()

cleanup() {
	local rc=$? p id
	trap - EXIT INT TERM
	set +e
	if [ -n "$CTD_PID" ] && kill -0 "$CTD_PID" 2>/dev/null; then
		for id in $(with_timeout 10 "${CTR[@]}" tasks ls -q 2>/dev/null); do
			with_timeout 10 "${CTR[@]}" tasks kill -s SIGKILL "$id" >/dev/null 2>&1
		done
		# The ctr run processes delete their task, call CNI DEL and remove their container.
		for p in "${RUN_PID[@]}"; do
			wait_for 15 eval "! kill -0 $p 2>/dev/null" || kill -KILL "$p" 2>/dev/null
		done
		for id in $(with_timeout 10 "${CTR[@]}" tasks ls -q 2>/dev/null); do
			with_timeout 10 "${CTR[@]}" tasks rm -f "$id" >/dev/null 2>&1
		done
		for id in $(with_timeout 10 "${CTR[@]}" containers ls -q 2>/dev/null); do
			with_timeout 10 "${CTR[@]}" containers rm "$id" >/dev/null 2>&1
		done
		kill -TERM "$CTD_PID"
		wait_for 15 eval "! kill -0 $CTD_PID 2>/dev/null" || kill -KILL "$CTD_PID"
	fi
	# Container processes (by the pid ctr reported), then shims still serving our socket.
	for p in "${TASK_PID[@]}"; do
		[ "$(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline")" = "/bin/sleep 3600 " ] && kill -KILL "$p"
	done
	for p in $(our_pids "$TMP"); do kill -KILL "$p" 2>/dev/null; done
	rm_cgroup_tree "$NS"
	purge_net_leftovers
	purge_cni_state "$NS-a" "$NS-b"
	finish_cleanup "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The shim's socket dir (/run/containerd/s) is fixed in containerd 1.6; /etc/cni/net.d and a
# plugin dir are needed as mount points. Those this run creates are removed at exit.
remember_dirs /run/containerd /etc/cni /opt/cni /var/lib/cni
snapshot "$TMP/before"
mkdir -p "$TMP/root" "$TMP/state" "$TMP/net.d" "$TMP/runc" "$TMP/fifo" "$TMP/real-bin"
cp "$CONFLIST" "$TMP/net.d/$(basename "$CONFLIST")"
if [ "${WEFT_RT_TRACE:-1}" = 1 ]; then
	make_trace_bin "$TMP/cni-bin" "$TMP/real-bin" # real-bin: $BIN, bind-mounted in the namespace
	PLUGIN_DIR=$TMP/cni-bin
else
	PLUGIN_DIR=$BIN
fi
mkdir -p /etc/cni/net.d
PLUGIN_MOUNTS=()
for d in /opt/cni/bin /usr/lib/cni; do [ -d "$d" ] && PLUGIN_MOUNTS+=("$d"); done
if [ ${#PLUGIN_MOUNTS[@]} -eq 0 ]; then
	mkdir -p /opt/cni/bin
	PLUGIN_MOUNTS=(/opt/cni/bin)
fi

cat >"$TMP/config.toml" <<EOF
version = 2
root = "$TMP/root"
state = "$TMP/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing"]

[grpc]
  address = "$SOCK"

[ttrpc]
  address = "$SOCK.ttrpc"

[debug]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$TMP/opt"
EOF
containerd --config "$TMP/config.toml" >"$TMP/containerd.log" 2>&1 &
CTD_PID=$!
ctd_up() { "${CTR[@]}" version >/dev/null 2>&1; }
wait_for 20 ctd_up || fail "containerd did not come up: $(tail -n5 "$TMP/containerd.log")"
say "containerd $(containerd --version | awk '{print $3}') up (pid $CTD_PID, socket $SOCK); plugin dir $BIN, network $NETNAME ($(jq -r '.cniVersion' "$CONFLIST"), $(jq -r '[.plugins[].type] | join("+")' "$CONFLIST"))"

ctr_exec() { # ctr_exec <container> <cmd...>
	local id=$1
	shift
	with_timeout 30 "${CTR[@]}" tasks exec --fifo-dir "$TMP/fifo" --exec-id "x$RANDOM$RANDOM" "$id" "$@"
}

run_ctr() { # run_ctr <label> <container id>
	local label=$1 id=$2 script d pid
	cp -a "$ROOTFS" "$TMP/rootfs-$label"
	script="set -e
mount --bind '$BIN' '$TMP/real-bin'
mount --bind '$TMP/net.d' /etc/cni/net.d"
	for d in "${PLUGIN_MOUNTS[@]}"; do script+=$'\n'"mount --bind '$PLUGIN_DIR' '$d'"; done
	# Not detached: only this ctr process calls CNI DEL, when the task exits.
	script+=$'\n'"exec ${CTR[*]} run --rm --cni --runc-root '$TMP/runc' --fifo-dir '$TMP/fifo' \
--env PATH=/bin:/sbin:/usr/bin:/usr/sbin --rootfs '$TMP/rootfs-$label' '$id' /bin/sleep 3600"
	unshare --mount --propagation private sh -c "$script" </dev/null >"$TMP/run-$label.log" 2>&1 &
	RUN_PID[$label]=$!
	running() {
		"${CTR[@]}" tasks ls 2>/dev/null | awk -v id="$1" '$1 == id && $3 == "RUNNING" {f = 1} END {exit !f}' && return 0
		kill -0 "$2" 2>/dev/null || fail "ctr run of container $label exited: $(tr '\n' ' ' <"$TMP/run-$label.log")"
		return 1
	}
	wait_for 60 running "$id" "${RUN_PID[$label]}" || fail "container $label not running after 60 s: $(tr '\n' ' ' <"$TMP/run-$label.log")"
	pid=$("${CTR[@]}" tasks ls | awk -v id="$id" '$1 == id {print $2}')
	TASK_PID[$label]=$pid
	container_net "$label" ctr_exec "$id"
	local ipv="IP_$label" peer="PEERNAME_$label"
	say "container $label ip=${!ipv} (ctr container $id, netns /proc/$pid/ns/net${!peer:+, host veth ${!peer}})"
}

stop_ctr() { # stop_ctr <label> <container id> — SIGKILL (busybox sleep as pid 1 ignores TERM)
	local label=$1 id=$2 p=${RUN_PID[$1]} out rc=0
	out=$(with_timeout 20 "${CTR[@]}" tasks kill -s SIGKILL "$id" 2>&1) || fail "ctr tasks kill $id: $out"
	gone() { ! kill -0 "$1" 2>/dev/null; }
	wait_for 30 gone "$p" || fail "ctr run of container $label did not exit 30 s after its task was killed"
	wait "$p" || rc=$?
	# 137 = the task's SIGKILL; ctr logs a failed CNI DEL as 'network review' and carries on.
	if grep -q 'level=error' "$TMP/run-$label.log"; then
		fail "ctr run of container $label (exit $rc) logged an error: $(grep 'level=error' "$TMP/run-$label.log" | tr '\n' ' ')"
	fi
	[ "$rc" = 137 ] || [ "$rc" = 0 ] || fail "ctr run of container $label exited $rc: $(tr '\n' ' ' <"$TMP/run-$label.log")"
	unset "RUN_PID[$label]"
}

t0=$SECONDS
ID_A=$NS-a ID_B=$NS-b # container names; CNI_CONTAINERID is "<namespace>-<name>"
run_ctr A a
run_ctr B b
[ "$IP_A" != "$IP_B" ] || fail "both containers got the same address $IP_A"
ping_check A B ctr_exec a
ping_check B A ctr_exec b

stop_ctr A a
stop_ctr B b
left=$("${CTR[@]}" containers ls -q 2>&1)$("${CTR[@]}" tasks ls -q 2>&1)
[ -z "$left" ] || fail "containers/tasks remain after removal: $left"
say "removed both containers"
no_shims() { [ -z "$(our_pids "$SOCK ")" ]; } # shims carry '-address <sock>'
wait_for 15 no_shims || fail "shims still running: $(our_pids "$SOCK " | xargs -r ps -o pid=,args= -p)"
check_trace "$ID_A" A
check_trace "$ID_B" B
check_leftovers "$ID_A" "$ID_B"
say "cleanup ok"
say "passed in $((SECONDS - start))s (containers up to removed: $((SECONDS - t0))s)"
