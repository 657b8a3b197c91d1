# shellcheck shell=bash disable=SC2034,SC2317,SC2010
# Shared by podman.sh and containerd.sh: argument checks, the CNI call tracer, the host snapshot
# and the leftover checks. Sourced, not run. The caller sets RT (the prefix of every printed line)
# before sourcing.
#
# Leftover checks fail only on what can be pinned on this run's containers (their CNI container
# IDs, IPs, host-side veth peers, netns paths), so other tests creating namespaces and veths on the
# same machine at the same time cannot make a run fail; anything else that appeared is a "note".

say() { printf '%s: %s\n' "$RT" "$*"; }
note() { printf '%s: note: %s\n' "$RT" "$*"; }
fail() { # fail <message> — prints, dumps the CNI trace, exits 1 (the EXIT trap cleans up)
	printf '%s: FAIL: %s\n' "$RT" "$*" >&2
	if [ -n "${TRACE_LOG:-}" ] && [ -s "$TRACE_LOG" ]; then
		printf '%s: CNI calls so far (%s):\n' "$RT" "$TRACE_LOG" >&2
		sed 's/^/    /' "$TRACE_LOG" >&2
	fi
	exit 1
}

# with_timeout <seconds> <cmd...> — a runtime command that hangs fails the run instead of the CI job.
# Shell functions (which carry their own timeouts) are run as they are.
with_timeout() {
	local t=$1
	shift
	if declare -F "$1" >/dev/null; then "$@"; else timeout -k 5 "$t" "$@"; fi
}

# wait_for <seconds> <cmd...> — polls the command every 0.2 s until it succeeds.
wait_for() {
	local deadline=$((SECONDS + $1))
	shift
	until "$@"; do
		[ $SECONDS -lt $deadline ] || return 1
		sleep 0.2
	done
}

preflight() { # preflight <cni_bin_dir> <conflist> — sets BIN, CONFLIST, NETNAME, ROOTFS, SUFFIX
	[ $# -eq 2 ] || {
		echo "usage: $0 <cni_bin_dir> <conflist_path>" >&2
		exit 2
	}
	[ "$(id -u)" = 0 ] || fail "must run as root"
	BIN=$(realpath -e "$1") || fail "cni bin dir $1 does not exist"
	CONFLIST=$(realpath -e "$2") || fail "conflist $2 does not exist"
	[ -d "$BIN" ] || fail "$BIN is not a directory"
	jq -e . "$CONFLIST" >/dev/null 2>&1 || fail "$CONFLIST is not valid JSON"
	NETNAME=$(jq -r '.name // empty' "$CONFLIST")
	[ -n "$NETNAME" ] || fail "$CONFLIST has no .name"
	jq -e '.plugins | type == "array" and length > 0' "$CONFLIST" >/dev/null ||
		fail "$CONFLIST is not a conflist (no .plugins array)"
	local t
	for t in $(jq -r '.plugins[].type, (.plugins[].ipam.type // empty)' "$CONFLIST"); do
		[ -x "$BIN/$t" ] || fail "plugin '$t' named in $CONFLIST is not an executable in $BIN"
	done
	if [ "${WEFT_RT_SKIP_SETUP:-0}" = 1 ]; then
		ROOTFS=${WEFT_CACHE:-${HOME:-/root}/.cache/weft}/rootfs-busybox
	else
		ROOTFS=$(bash "$(dirname "${BASH_SOURCE[0]}")/setup.sh" | tail -n1)
	fi
	[ -x "$ROOTFS/bin/busybox" ] || fail "no busybox rootfs at $ROOTFS (run tests/runtimes/setup.sh)"
	SUFFIX=$(head -c4 /dev/urandom | od -An -tx1 | tr -d ' \n')
}

# make_trace_bin <dir> <real_dir> — fills <dir> with one wrapper per executable in $BIN. Each wrapper
# runs <real_dir>/<name> with the same stdin and environment, passes its stdout and exit code
# through, and appends one line per call to $TRACE_LOG (and the full stdin/stdout to
# $TRACE_DIR). Delegated plugins (IPAM) are traced too, since CNI_PATH points at <dir>.
make_trace_bin() {
	local dir=$1 real=$2 f name
	TRACE_DIR=$TMP/cni-trace
	TRACE_LOG=$TMP/cni-trace.log
	mkdir -p "$dir" "$TRACE_DIR"
	: >"$TRACE_LOG"
	for f in "$BIN"/*; do
		[ -f "$f" ] && [ -x "$f" ] || continue
		name=$(basename "$f")
		cat >"$dir/$name" <<EOF
#!/bin/sh
# weft runtime harness: traces one CNI call, then runs the real plugin.
n=\$(date +%s%N)-$name-\$CNI_COMMAND-\$\$
cat >"$TRACE_DIR/\$n.in"
"$real/$name" <"$TRACE_DIR/\$n.in" >"$TRACE_DIR/\$n.out"
rc=\$?
cat "$TRACE_DIR/\$n.out"
printf '%s plugin=%s cmd=%s id=%s netns=%s ifname=%s call=%s rc=%s\n' "\$(date +%T.%N | cut -c1-12)" \\
	"$name" "\$CNI_COMMAND" "\$CNI_CONTAINERID" "\${CNI_NETNS:-<empty>}" "\$CNI_IFNAME" "\$n" "\$rc" >>"$TRACE_LOG"
exit \$rc
EOF
		chmod 755 "$dir/$name"
	done
}

# check_trace <cni_container_id> <label> — every ADD and DEL of the conflist's top plugin for this
# container succeeded, and there was at least one DEL. Prints the netns the first DEL carried.
check_trace() {
	local id=$1 label=$2 top adds dels bad delns
	[ -n "${TRACE_LOG:-}" ] || return 0
	top=$(jq -r '.plugins[0].type' "$CONFLIST")
	adds=$(grep -c " plugin=$top cmd=ADD id=$id " "$TRACE_LOG" || true)
	dels=$(grep -c " plugin=$top cmd=DEL id=$id " "$TRACE_LOG" || true)
	bad=$(grep " id=$id " "$TRACE_LOG" | grep -E ' cmd=(ADD|DEL) ' | grep -v ' rc=0$' || true)
	if [ -n "$bad" ]; then
		local call
		call=$(head -n1 <<<"$bad" | sed 's/.* call=\([^ ]*\) .*/\1/')
		fail "container $label: a CNI call failed: $(head -n1 <<<"$bad") -> $(tr '\n' ' ' <"$TRACE_DIR/$call.out" 2>/dev/null)"
	fi
	[ "$adds" -ge 1 ] || fail "container $label: no CNI ADD of '$top' seen for id $id"
	[ "$dels" -ge 1 ] || fail "container $label: the runtime never called CNI DEL of '$top' for id $id"
	delns=$(grep " plugin=$top cmd=DEL id=$id " "$TRACE_LOG" | head -n1 | sed 's/.* netns=\([^ ]*\) .*/\1/')
	say "container $label: CNI ADD x$adds, DEL x$dels (DEL CNI_NETNS=$delns)"
}

# snapshot <file> — the host state the leftover checks compare against.
snapshot() {
	(
		set +eo pipefail
		echo "## netns"
		ip netns list 2>/dev/null | awk '{print $1}' | sort
		echo "## links"
		ip -o link show | awk -F': ' '{sub(/@.*/, "", $2); print $1 " " $2}' | sort
		echo "## veths"
		ip -o link show type veth | awk -F': ' '{sub(/@.*/, "", $2); print $2}' | sort
		echo "## cni-results"
		ls /var/lib/cni/results 2>/dev/null | sort
		echo "## rules"
		{ iptables-save 2>/dev/null; ip6tables-save 2>/dev/null; } | grep '^-A' | sort
		echo "## ip_forward"
		cat /proc/sys/net/ipv4/ip_forward
	) >"$1"
}
section() { sed -n "/^## $2\$/,/^## /p" "$1" | grep -v '^## ' || true; }
new_in() { comm -13 <(section "$1" "$3") <(section "$2" "$3"); } # new_in <before> <after> <section>

# host_peer <ifindex> — the name of the host link with that index, if it was created by this run.
host_peer() {
	local name
	name=$(ip -o link show 2>/dev/null | awk -F': ' -v i="$1" '$1 == i {sub(/@.*/, "", $2); print $2}')
	[ -n "$name" ] || return 0
	grep -qx "$1 $name" <(section "$TMP/before" links) && return 0
	echo "$name"
}

# container_net <label> <exec-prefix...> — reads eth0's IPv4 address and its peer's ifindex from
# inside the container; sets IP_<label>, PEER_<label>, PEERNAME_<label>.
container_net() {
	local label=$1 out ip idx
	shift
	out=$(with_timeout 20 "$@" /sbin/ip -o -4 addr show dev eth0 2>&1) || fail "container $label: 'ip addr' failed: $out"
	ip=$(awk '{for (i = 1; i < NF; i++) if ($i == "inet") {sub(/\/.*/, "", $(i + 1)); print $(i + 1); exit}}' <<<"$out")
	[ -n "$ip" ] || fail "container $label has no IPv4 address on eth0: $out"
	out=$(with_timeout 20 "$@" /sbin/ip -o link show dev eth0 2>&1) || fail "container $label: 'ip link' failed: $out"
	idx=$(sed -n 's/^[0-9]*: eth0@if\([0-9]*\):.*/\1/p' <<<"$out")
	printf -v "IP_$label" %s "$ip"
	printf -v "PEER_$label" %s "$idx"
	printf -v "PEERNAME_$label" %s "$( [ -n "$idx" ] && host_peer "$idx")"
}

# ping_check <from> <to> <exec-prefix...>
ping_check() {
	local from=$1 to=$2 ipvar="IP_$2" out
	shift 2
	if out=$(with_timeout 30 "$@" /bin/ping -c 2 -W 2 "${!ipvar}" 2>&1); then
		say "ping $from->$to ok ($(grep -o '[0-9]* packets received' <<<"$out"))"
	else
		fail "ping $from->$to (${!ipvar}) failed: $(tr '\n' ' ' <<<"$out")"
	fi
}

# check_leftovers <cni ids...> — after both containers are gone: nothing attributable to them is
# left on the host. Uses IP_A/IP_B, PEER*_A/B, NETNS_A/B when set. Waits up to 10 s for the kernel
# to finish tearing down namespaces and veths.
check_leftovers() {
	local ids=("$@") problems=() l id ipre
	_leftovers() {
		problems=()
		local x n ip idx name ns
		for x in A B; do
			ns="NETNS_$x"
			if [ -n "${!ns:-}" ] && [ -e "${!ns}" ]; then problems+=("netns ${!ns} of container $x still exists"); fi
			idx="PEER_$x" name="PEERNAME_$x"
			if [ -n "${!name:-}" ] && ip -o link show 2>/dev/null | grep -q "^${!idx}: ${!name}[@:]"; then
				problems+=("host veth ${!name} (ifindex ${!idx}) of container $x still exists")
			fi
			ip="IP_$x"
			if [ -n "${!ip:-}" ]; then
				ipre=${!ip//./\\.}
				n=$(ip -4 route show table all 2>/dev/null | grep -Ew "$ipre(/32)?" || true)
				[ -z "$n" ] || problems+=("host route for container $x's ${!ip} still exists: $n")
				n=$(ip -4 -o addr show 2>/dev/null | grep -Ew "inet $ipre" || true)
				[ -z "$n" ] || problems+=("container $x's ${!ip} is still on a host link: $n")
				n=$({ iptables-save 2>/dev/null; } | grep '^-A' | grep -Ew "$ipre(/32)?" || true)
				[ -z "$n" ] || problems+=("iptables rules for container $x's ${!ip} remain: $n")
			fi
		done
		for id in "${ids[@]}"; do
			n=$(ls /var/lib/cni/results 2>/dev/null | grep -F -- "-$id-" || true)
			[ -z "$n" ] || problems+=("CNI cache entries remain in /var/lib/cni/results: $n")
			n=$(grep -rlsF -- "$id" /var/lib/cni/networks $IPAM_DIRS 2>/dev/null || true)
			[ -z "$n" ] || problems+=("IPAM reservations for $id remain: $n")
			n=$({ iptables-save 2>/dev/null; ip6tables-save 2>/dev/null; } | grep '^-A' | grep -F -- "$id" || true)
			[ -z "$n" ] || problems+=("iptables rules naming $id remain: $n")
		done
		[ ${#problems[@]} -eq 0 ]
	}
	if ! wait_for 10 _leftovers; then
		for l in "${problems[@]}"; do printf '%s: FAIL: leftover: %s\n' "$RT" "$l" >&2; done
		fail "$((${#problems[@]})) leftover(s) after removing both containers"
	fi
	# Not attributable to this run, so only reported: another test may have made them.
	snapshot "$TMP/after"
	for l in $(new_in "$TMP/before" "$TMP/after" veths); do note "new veth $l appeared during the run (not ours?)"; done
	for l in $(new_in "$TMP/before" "$TMP/after" netns); do note "new netns $l appeared during the run (not ours?)"; done
	new_in "$TMP/before" "$TMP/after" links | while read -r _ l; do
		ip -o link show type veth | grep -q ": ${l}[@:]" || note "link $l was created during the run and remains (e.g. the plugin's bridge)"
	done
	new_in "$TMP/before" "$TMP/after" rules | while read -r l; do note "new iptables rule remains: $l"; done
	if [ "$(section "$TMP/before" ip_forward)" != "$(section "$TMP/after" ip_forward)" ]; then
		note "net.ipv4.ip_forward changed to $(section "$TMP/after" ip_forward) during the run; restored at exit"
	fi
}

restore_ip_forward() {
	local want
	[ -f "$TMP/before" ] || return 0
	want=$(section "$TMP/before" ip_forward)
	[ "$(cat /proc/sys/net/ipv4/ip_forward)" = "$want" ] || echo "$want" >/proc/sys/net/ipv4/ip_forward
}

# ipam_dirs — host-local dataDir values named in the conflist (searched for reservations).
ipam_dirs() { jq -r '.. | objects | .dataDir? // empty' "$CONFLIST" | sort -u | tr '\n' ' '; }

# our_pids <pattern> — pids (other than this shell and its children) whose command line contains
# <pattern>, a path unique to this run: the runtime helpers it started (conmon, shims, ctr).
our_pids() {
	local p
	for p in /proc/[0-9]*; do
		p=${p#/proc/}
		[ "$p" = $$ ] && continue
		tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline" | grep -qF -- "$1" && echo "$p"
	done
	return 0
}

# rm_cgroup_tree <relative path> — removes this run's (empty) cgroup directories in every hierarchy.
rm_cgroup_tree() {
	local d deadline=$((SECONDS + 10))
	[ -n "$1" ] || return 0
	for d in /sys/fs/cgroup/"$1" /sys/fs/cgroup/*/"$1"; do
		[ -d "$d" ] || continue
		until find "$d" -depth -type d -exec rmdir {} + 2>/dev/null; [ ! -d "$d" ]; do
			[ $SECONDS -lt $deadline ] || {
				note "could not remove cgroup $d (still has tasks?)"
				break
			}
			sleep 0.2
		done
	done
}

# remember_dirs <dir>... — notes which of these directories do not exist yet; remove_created_dirs
# later removes those of them that this run created, if they are empty and not mount points.
CREATED_CANDIDATES=()
remember_dirs() {
	local d
	for d in "$@"; do [ -e "$d" ] || CREATED_CANDIDATES+=("$d"); done
}
remove_created_dirs() {
	local d
	for d in "${CREATED_CANDIDATES[@]}"; do
		[ -d "$d" ] || continue
		mountpoint -q "$d" && continue
		find "$d" -depth -type d -empty -delete 2>/dev/null || true
	done
}

# ids_from_trace — every CNI_CONTAINERID the plugins saw (podman's ID of a container whose run
# failed is known only from there).
ids_from_trace() {
	[ -n "${TRACE_LOG:-}" ] && [ -f "$TRACE_LOG" ] || return 0
	sed -n 's/.* id=\([^ ]\+\) netns=.*/\1/p' "$TRACE_LOG" | sort -u
}

# purge_net_leftovers — at exit: removes a netns or host veth of this run's containers that is
# still there (recorded while they ran, so nothing else is touched). Each removal is reported.
purge_net_leftovers() {
	local x ns idx name
	for x in A B; do
		ns="NETNS_$x" idx="PEER_$x" name="PEERNAME_$x"
		if [ -n "${!ns:-}" ] && [ -e "${!ns}" ] && [ "$(dirname "${!ns}")" = /run/netns ]; then
			ip netns delete "$(basename "${!ns}")" && note "removed leftover netns ${!ns}"
		fi
		if [ -n "${!name:-}" ] && ip -o link show 2>/dev/null | grep -q "^${!idx}: ${!name}[@:]"; then
			ip link del "${!name}" && note "removed leftover host veth ${!name}"
		fi
	done
	return 0
}

# purge_cni_state <cni ids...> — at exit, after a failure: drops what a failed or missing DEL left
# for this run's containers (libcni cache entries, IPAM reservation files naming them), so a
# failed run does not leave state behind. Each removal is reported.
purge_cni_state() {
	local id f
	for id in "$@"; do
		[ -n "$id" ] || continue
		for f in /var/lib/cni/results/*-"$id"-*; do
			[ -f "$f" ] && rm -f "$f" && note "removed stale CNI cache entry $f"
		done
		# shellcheck disable=SC2086
		for f in $(grep -rlsF -- "$id" /var/lib/cni/networks $IPAM_DIRS 2>/dev/null); do
			rm -f "$f" && note "removed stale IPAM reservation $f"
		done
	done
	return 0
}

# The common end of every script's cleanup: undo global changes, unmount and remove the run's
# temp dir (unless WEFT_RT_KEEP=1), and exit with the run's status.
finish_cleanup() {
	restore_ip_forward
	remove_created_dirs
	awk -v t="$TMP/" 'index($2, t) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l
	if [ "${WEFT_RT_KEEP:-0}" = 1 ]; then
		say "kept $TMP"
	else
		rm -rf "$TMP"
	fi
	exit "$1"
}
