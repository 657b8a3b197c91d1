#!/usr/bin/env bash
# Smoke test of `weft-lab up --cluster` with no CNI at all: nodes register (NotReady), and on
# every node a hostNetwork pod (which needs no CNI) runs from an imported image, `kubectl logs`
# and `kubectl exec` reach it through the node's kubelet, kube-proxy takes it to the API server
# through the `kubernetes` Service, and its hostPath /run/weft is that node's own folder.
# Then `down` must leave no namespace, cgroup or lab folder behind.
#
#   bash tests/cluster/smoke.sh [nodes]      # as root, after `cargo build --release --bins`
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
nodes=${1:-2}
export WEFT_LAB_DIR=${WEFT_LAB_DIR:-/run/weft-cluster-smoke} WEFT_LAB_PREFIX=${WEFT_LAB_PREFIX:-wcs}
lab=target/release/weft-lab
kubectl=$(bash tests/kube/build.sh 2>/dev/null | tail -n1)/kubectl
passed=0 failed=0
check() { # check <what> <command...>
	if "${@:2}"; then echo "ok   $1"; passed=$((passed + 1)); else echo "FAIL $1"; failed=$((failed + 1)); fi
}
trap '"$lab" down >/dev/null 2>&1 || true' EXIT

start=$SECONDS
eval "$("$lab" up --cluster --nodes "$nodes" | tail -n1)" # export KUBECONFIG=...
echo "up: $((SECONDS - start)) s"
check "$nodes nodes registered" test "$("$kubectl" get nodes -o name | wc -l)" = "$nodes"
check "status -o json names every containerd socket" \
	test "$("$lab" status -o json | grep -c '"containerd_socket"')" = "$nodes"

for i in $(seq 1 "$nodes"); do
	cat <<-YAML | "$kubectl" apply -f - >/dev/null
	apiVersion: v1
	kind: Pod
	metadata: {name: host$i}
	spec:
	  hostNetwork: true
	  nodeName: node$i
	  tolerations: [{operator: Exists}]
	  containers:
	  - name: c
	    image: weft.test/tools:latest
	    imagePullPolicy: Never
	    command: ["sh", "-c", "echo node=\$(hostname) > /w/who; echo up on \$(hostname); exec sleep 3600"]
	    volumeMounts: [{name: w, mountPath: /w}]
	  volumes: [{name: w, hostPath: {path: /run/weft, type: DirectoryOrCreate}}]
	YAML
done
"$kubectl" wait --for=condition=Ready pod --all --timeout=90s >/dev/null
for i in $(seq 1 "$nodes"); do
	check "node$i: kubectl logs" grep -qx "up on node$i" <("$kubectl" logs "host$i")
	# An HTTP request to the HTTPS port: the API server's 400 proves the path.
	check "node$i: kubectl exec, Service 10.96.0.1 reaches the API server" \
		grep -q '400 Bad Request' <("$kubectl" exec "host$i" -- wget -q -O- http://10.96.0.1:443/ 2>&1)
	check "node$i: hostPath /run/weft is the node's own folder" \
		grep -qx "node=node$i" "$WEFT_LAB_DIR/lab/node$i/run-weft/who"
done

"$lab" down >/dev/null
check "down: no namespace left" test -z "$(ls /run/netns | grep "^$WEFT_LAB_PREFIX-" || true)"
check "down: no cgroup left" test -z "$(ls -d /sys/fs/cgroup/*/"$WEFT_LAB_PREFIX"-* 2>/dev/null || true)"
check "down: no lab folder left" test ! -e "$WEFT_LAB_DIR/lab"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
