#!/usr/bin/env bash
# Kubernetes' own sig-network conformance tests on weft: a fresh 3-node lab cluster
# (`weft-lab up --cluster`), deploy/weft.yaml applied unchanged, then `weft-lab e2e` (which builds
# e2e.test, agnhost, CoreDNS and their images the first time, imports them, applies the cluster
# DNS). By default a fast subset (the test command's tier): the 4 "Networking Granular Checks:
# Pods" tests (pod to pod, node to pod, HTTP and UDP, across nodes), two Services tests
# (ClusterIP to one and to several ports) and DNS for Services (CoreDNS reached through a
# ClusterIP from pods on every node). --all runs every [sig-network] [Conformance] test (47);
# --focus REGEX any other selection (e.g. 'NetworkPolicy|\[sig-network\].*\[Feature:').
# Ends with `N passed, N failed, N skipped`; exits non-zero on any failure.
#
#   bash tests/e2e/conformance.sh [--all | --focus REGEX] [--skip REGEX]   # as root, after `cargo build --release --bins`
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export WEFT_LAB_DIR=${WEFT_LAB_DIR:-/run/weft-e2e-ci} WEFT_LAB_PREFIX=${WEFT_LAB_PREFIX:-wce}
lab=target/release/weft-lab
FAST='\[sig-network\] (Networking Granular Checks: Pods .*|Services should serve (a basic endpoint|multiport endpoints) from pods|DNS should provide DNS for services) +\[Conformance\]'
focus=$FAST
skip=()
while [ $# -gt 0 ]; do
	case "$1" in
	--all) focus='\[sig-network\].*\[Conformance\]' ;;
	--focus) focus=${2:?--focus needs a regular expression}; shift ;;
	--skip) skip=(--skip "${2:?--skip needs a regular expression}"); shift ;;
	*) echo "usage: $0 [--all | --focus REGEX] [--skip REGEX]" >&2; exit 2 ;;
	esac
	shift
done
kubectl=$(bash tests/kube/build.sh 2>/dev/null | tail -n1)/kubectl
trap '[ "${WEFT_LAB_KEEP:-0}" = 1 ] || "$lab" down >/dev/null 2>&1 || true' EXIT

start=$SECONDS
eval "$("$lab" up --cluster --nodes 3 | tail -n1)" # export KUBECONFIG=...
"$kubectl" apply -f deploy/weft.yaml >/dev/null
"$kubectl" wait --for=condition=Ready node --all --timeout=120s >/dev/null
echo "cluster up, weft installed, nodes Ready: $((SECONDS - start)) s"
log=$WEFT_LAB_DIR.e2e.log # outside the lab dir: `down` removes that
rc=0
"$lab" e2e --focus "$focus" "${skip[@]}" --report-dir "$WEFT_LAB_DIR/e2e-report" >"$log" 2>&1 || rc=$?
# Ginkgo's own summary of each failure, then weft-lab's closing lines.
sed -n '/^Summarizing [0-9]* Failure/,/^Ran [0-9]* of/p' "$log"
echo "e2e: $((SECONDS - start)) s in all; full output in $log"
grep -E '^(FAILED|SKIPPED) |^[0-9]+ passed, [0-9]+ failed' "$log" || tail -n 30 "$log"
[ "$rc" = 0 ]
