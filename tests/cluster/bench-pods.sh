#!/usr/bin/env bash
# Pod start-up with weft against a reference CNI on the same lab cluster: time from creating
# 30 pods to each one Running and answering a ping from its node, with weft (the DaemonSet from
# deploy/weft.yaml) and with Debian's reference plugins (bridge + host-local, one /24 per node),
# in alternating rounds. Also prints the cluster parts' cold build times (from the build caches'
# stats) and the warm `up` to all nodes Ready with weft. Last line:
#   ratio pod_ready_p50=<weft p50 / reference p50>
#
#   bash tests/cluster/bench-pods.sh [rounds] [pods]   # as root, after cargo build --release --bins
# (`weft-lab bench pods` runs this.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
rounds=${1:-3} pods=${2:-30}
export WEFT_LAB_DIR=${WEFT_LAB_DIR:-/run/weft-bench-pods} WEFT_LAB_PREFIX=${WEFT_LAB_PREFIX:-wbp}
lab=$PWD/target/release/weft-lab
kubectl=$(bash tests/kube/build.sh 2>/dev/null | tail -n1)/kubectl
cluster_cache=$(bash tests/cluster/build.sh 2>/dev/null | tail -n1)
k() { "$kubectl" "$@"; }
trap '"$lab" down >/dev/null 2>&1 || true' EXIT

t0=$(date +%s.%N)
eval "$("$lab" up --cluster --nodes 3 2>/dev/null | tail -n1)"
k apply -f deploy/weft.yaml >/dev/null
k wait --for=condition=Ready node --all --timeout=120s >/dev/null
k -n weft rollout status ds/weft --timeout=60s >/dev/null
up_s=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
status=$("$lab" status -o json)
field() { python3 -c "import json,sys; print([n for n in json.load(sys.stdin)['nodes'] if n['name']=='$1'][0]['$2'])" <<<"$status"; }

# The reference: bridge + host-local, a /24 per node outside weft's universe, as 00-*.conflist
# (runtimes take the first config by name, so it wins over weft's 10-weft.conflist while present).
reference() { # reference on|off
	for i in 1 2 3; do
		local conf bin
		conf=$(field "node$i" cni_conf_dir) bin=$(field "node$i" cni_bin_dir)
		if [ "$1" = on ]; then
			cp "$cluster_cache/cni/bridge" "$cluster_cache/cni/host-local" "$bin/"
			cat >"$conf/.00-reference.tmp" <<-JSON
			{"cniVersion": "1.0.0", "name": "reference", "plugins": [
			  {"type": "bridge", "bridge": "wbpref0", "isGateway": true,
			   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.250.$i.0/24"}]]}}]}
			JSON
			mv "$conf/.00-reference.tmp" "$conf/00-reference.conflist"
		else
			rm -f "$conf/00-reference.conflist"
		fi
	done
	sleep 2 # containerd reloads the CNI config dir on change
}

# One round: prints each pod's seconds from create to answering a ping from its node. Every pod
# address must match $1 (a regex), so a round never measures the other CNI by mistake.
round() {
	local want=$1 start now name ip node
	declare -A done=()
	{
		for i in $(seq 1 "$pods"); do
			cat <<-YAML
			---
			apiVersion: v1
			kind: Pod
			metadata: {name: bench-$i, labels: {app: bench}}
			spec:
			  nodeName: node$(((i - 1) % 3 + 1))
			  terminationGracePeriodSeconds: 0
			  containers:
			  - {name: c, image: weft.test/tools:latest, imagePullPolicy: Never, command: ["sleep", "100000"]}
			YAML
		done
	} >"$WEFT_LAB_DIR/bench-pods.yaml"
	start=$(date +%s.%N)
	k apply -f "$WEFT_LAB_DIR/bench-pods.yaml" >/dev/null
	while [ "${#done[@]}" -lt "$pods" ]; do
		now=$(date +%s.%N)
		if awk -v a="$start" -v b="$now" 'BEGIN { exit !(b - a > 180) }'; then
			echo "bench pods: only ${#done[@]} of $pods pods reachable after 180 s" >&2
			return 1
		fi
		while IFS='|' read -r name ip node; do
			[ -n "$ip" ] && [ -z "${done[$name]:-}" ] || continue
			if ! [[ $ip =~ $want ]]; then
				echo "bench pods: $name got $ip, not from the CNI under test ($want)" >&2
				return 1
			fi
			if nsenter --net="/run/netns/$WEFT_LAB_PREFIX-$node" ping -c1 -W1 "$ip" >/dev/null 2>&1; then
				done[$name]=1
				awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f\n", b - a }'
			fi
		done < <(k get pods -l app=bench -o jsonpath='{range .items[*]}{.metadata.name}|{.status.podIP}|{.spec.nodeName}{"\n"}{end}')
		sleep 0.2
	done
	k delete pods -l app=bench --wait=true >/dev/null
}

p50() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

: >"$WEFT_LAB_DIR/weft.times"
: >"$WEFT_LAB_DIR/reference.times"
for r in $(seq 1 "$rounds"); do
	reference off
	round '^10\.(3[2-9]|4[0-7])\.' >>"$WEFT_LAB_DIR/weft.times"
	echo "round $r weft:      p50 $(tail -n "$pods" "$WEFT_LAB_DIR/weft.times" | p50) s, last $(tail -n1 "$WEFT_LAB_DIR/weft.times") s"
	reference on
	round '^10\.250\.' >>"$WEFT_LAB_DIR/reference.times"
	echo "round $r reference: p50 $(tail -n "$pods" "$WEFT_LAB_DIR/reference.times" | p50) s, last $(tail -n1 "$WEFT_LAB_DIR/reference.times") s"
done
reference off

for f in "${WEFT_CACHE:-$HOME/.cache/weft}"/kube/*/build-stats.txt "$cluster_cache/build-stats.txt"; do
	[ -f "$f" ] && echo "cold build ($(basename "$(dirname "$f")")): $(grep -E '^[a-z0-9.-]+\.wall_s=' "$f" | grep -v download | tr '\n' ' ')"
done
w=$(p50 <"$WEFT_LAB_DIR/weft.times") ref=$(p50 <"$WEFT_LAB_DIR/reference.times")
echo "warm up --cluster + apply to all nodes Ready with weft: ${up_s} s"
echo "pods=$pods rounds=$rounds weft_p50=${w}s reference_p50=${ref}s"
awk -v w="$w" -v r="$ref" 'BEGIN { printf "ratio pod_ready_p50=%.2f\n", w / r }'
