#!/usr/bin/env bash
# Build (once, cached outside the tree) what `weft-lab e2e` needs to run Kubernetes' own
# sig-network conformance tests on a lab cluster, all from Go modules, and the images they run:
#
#   bin/e2e.test  network-only e2e suite (k8s.io/kubernetes v1.36.3 test/e2e/network and
#                 test/e2e/common/network; `go test -c` of tests/e2e/suite)
#   bin/agnhost   k8s.io/kubernetes/test/images/agnhost (VERSION 2.63.0 at v1.36.3)
#   bin/coredns   github.com/coredns/coredns v1.14.2 (kubeadm's for v1.36), the plugins of
#                 tests/e2e/coredns/main.go
#   images/{agnhost,glibc-dns-testing,busybox,nginx,coredns}.tar  (tests/e2e/images.sh)
#
#   dir=$(bash tests/e2e/build.sh | tail -n1)     # as root (podman builds the images)
#   "$dir/bin/e2e.test" --version
#
# Cache: ${WEFT_CACHE:-$HOME/.cache/weft}/e2e/k8s-<K8S>-coredns-<COREDNS>/, with
# build-stats.txt (cold build wall time / memory / size per binary) and stamp (written last;
# records a hash of every input here: the wrapper modules, their code, the image recipes; a
# complete cache must match it). If the cache is complete this only prints its directory: no go
# invocation. Otherwise it builds into a temp dir next to it and renames it into place, under a
# lock. Only the last line of stdout is meaningful (the cache dir); progress -> stderr.
#
# Sources: tests/e2e/suite (go.mod from tests/kube/gen-gomod.sh e2e: k8s.io/kubernetes with the
# staging replaces, like tests/kube/apiserver, plus a `tool` line for agnhost) and
# tests/e2e/coredns (go.mod from tests/e2e/gen-gomod.sh). CGO_ENABLED=0 throughout.
#
# Env knobs:
#   WEFT_CACHE          cache root (default $HOME/.cache/weft)
#   WEFT_E2E_REBUILD=1  rebuild even if the cache is complete
#   WEFT_E2E_REGEN=1    regenerate the wrapper go.mod+go.sum files first
#   WEFT_E2E_NICE       nice level for the compile (default 10; "" disables)
#
# Requires: root, Go >= 1.26.0 (/usr/local/go/bin is added to PATH when go is not found), the Go
# module proxy and Debian's mirror on a cold build. GOTOOLCHAIN=local.
set -euo pipefail

K8S_VERSION=v1.36.3
COREDNS_VERSION=v1.14.2
AGNHOST_VERSION=2.63.0 # test/images/agnhost/VERSION at $K8S_VERSION (checked)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
kube_dir=$(cd "$here/../kube" && pwd)
cluster_dir=$(cd "$here/../cluster" && pwd)
cache_root=${WEFT_CACHE:-$HOME/.cache/weft}
key=k8s-$K8S_VERSION-coredns-$COREDNS_VERSION
final=$cache_root/e2e/$key
IMAGES=(agnhost glibc-dns-testing busybox nginx coredns)

exec 3>&1 1>&2
log() { echo "e2e/build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

inputs_hash() {
	(
		cd "$here"
		cat suite/go.mod suite/go.sum suite/*.go coredns/go.mod coredns/go.sum coredns/*.go \
			images.sh "$cluster_dir/images-lib.sh"
	) | sha256sum | cut -c1-16
}
is_complete() {
	local d=$1 b
	[[ -f $d/stamp ]] && grep -qx "inputs=$(inputs_hash)" "$d/stamp" || return 1
	for b in e2e.test agnhost coredns; do [[ -x $d/bin/$b ]] || return 1; done
	for b in "${IMAGES[@]}"; do [[ -s $d/images/$b.tar ]] || return 1; done
}

if [[ ${WEFT_E2E_REBUILD:-0} != 1 && ${WEFT_E2E_REGEN:-0} != 1 ]] && is_complete "$final"; then
	log "cached: $final"
	echo "$final" >&3
	exit 0
fi

[[ $(id -u) == 0 ]] || die "must run as root (the images are built with podman)"
export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0
if ! command -v go >/dev/null && [[ -x /usr/local/go/bin/go ]]; then
	export PATH=$PATH:/usr/local/go/bin
fi
command -v go >/dev/null || die "go not found in PATH (nor /usr/local/go/bin)"

mkdir -p "$cache_root/e2e"
exec 9>"$cache_root/e2e/.lock-$key"
if ! flock -n 9; then
	log "another build of $key is running; waiting for its lock"
	flock 9
fi

# Wrapper modules: regenerate when they do not pin the wanted version.
ensure_gomod() { # <dir> <module> <version> <generator> <target>
	local dir=$1 mod=$2 ver=$3 gen=$4 target=$5 have
	have=$(sed -n "s#^\(require \)\{0,1\}[[:space:]]*$mod \(v[^ ]*\).*#\2#p" "$dir/go.mod" 2>/dev/null | head -n1)
	if [[ ${WEFT_E2E_REGEN:-0} == 1 || $have != "$ver" || ! -s $dir/go.sum ]] ||
		! grep -q "^// Regenerate: .*gen-gomod.sh $target $ver\$" "$dir/go.mod"; then
		log "${dir#"$here"/}/go.mod out of date (pins $mod '${have:-none}', want $ver): regenerating"
		"$gen" "$target" "$ver"
	fi
}
ensure_gomod "$here/suite" k8s.io/kubernetes "$K8S_VERSION" "$kube_dir/gen-gomod.sh" e2e
ensure_gomod "$here/coredns" github.com/coredns/coredns "$COREDNS_VERSION" "$here/gen-gomod.sh" coredns

if [[ ${WEFT_E2E_REBUILD:-0} != 1 ]] && is_complete "$final"; then
	log "built concurrently by another process: $final"
	echo "$final" >&3
	exit 0
fi

tmp=$(mktemp -d "$cache_root/e2e/.tmp-$key.XXXXXX")
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/bin" "$tmp/images"

nice_cmd=()
[[ -n ${WEFT_E2E_NICE-10} ]] && command -v nice >/dev/null && nice_cmd=(nice -n "${WEFT_E2E_NICE-10}")
timebin=/usr/bin/time
"$timebin" -v true >/dev/null 2>&1 || timebin=

stats=$tmp/build-stats.txt
{
	echo "# weft tests/e2e/build.sh cold build stats"
	echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
	echo "host=$(uname -nrm)"
	echo "cpus=$(nproc)"
	echo "go=$(go env GOVERSION)"
	echo "k8s_version=$K8S_VERSION"
	echo "coredns_version=$COREDNS_VERSION"
	echo "nice=${WEFT_E2E_NICE-10}"
	# ~0 => truly cold compile; large => GOCACHE already warm (tests/cluster/build.sh's k8s packages)
	echo "gocache_kb_before=$(du -sk "$(go env GOCACHE)" 2>/dev/null | cut -f1)"
} >"$stats"

# measure <label> <cmd...>: run, record wall time and (GNU time) max RSS into $stats.
measure() {
	local label=$1 rc=0 start end
	shift
	start=$(date +%s.%N)
	if [[ -n $timebin ]]; then
		"$timebin" -v -o "$tmp/time-$label.txt" "$@" || rc=$?
	else
		"$@" || rc=$?
	fi
	end=$(date +%s.%N)
	{
		echo "$label.exit=$rc"
		echo "$label.wall_s=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')"
		[[ -f $tmp/time-$label.txt ]] && awk -v l="$label" -F': ' '
			/User time \(seconds\)/ { print l ".user_s=" $2 }
			/Maximum resident set size/ { print l ".max_rss_kb=" $2 }' "$tmp/time-$label.txt"
	} >>"$stats"
	rm -f "$tmp/time-$label.txt"
	log "$label: exit=$rc $(grep "^$label.wall_s=" "$stats" | cut -d= -f2)s"
	return "$rc"
}

# Version info as tests/kube/build.sh injects it (e2e.test --version; the suite logs it).
k8s_minor=${K8S_VERSION#v1.}; k8s_minor=${k8s_minor%%.*}
k8s_ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
	k8s_ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor -X $pkg.gitCommit="
done

log "e2e.test: go test -c (cold: several minutes on $(nproc) cores)"
(cd "$here/suite" && measure e2e.download go mod download) || die "go mod download failed (suite)"
(cd "$here/suite" && measure e2e.test "${nice_cmd[@]}" go test -c -mod=readonly -trimpath -buildvcs=false \
	-ldflags="$k8s_ldflags" -o "$tmp/bin/e2e.test" .) ||
	die "building e2e.test failed (if it mentions go.sum/go.mod, rerun with WEFT_E2E_REGEN=1)"
# agnhost's Makefile: -X main.Version=$(cat VERSION).
agnhost_src=$(cd "$here/suite" && go list -mod=readonly -f '{{.Dir}}' k8s.io/kubernetes/test/images/agnhost)
agnhost_ver=$(cat "$agnhost_src/VERSION")
[[ $agnhost_ver == "$AGNHOST_VERSION" ]] || die "agnhost's VERSION says '$agnhost_ver', want $AGNHOST_VERSION"
log "agnhost: go build"
(cd "$here/suite" && measure agnhost "${nice_cmd[@]}" go build -mod=readonly -trimpath -buildvcs=false \
	-ldflags="-s -w -X main.Version=$AGNHOST_VERSION" -o "$tmp/bin/agnhost" k8s.io/kubernetes/test/images/agnhost) ||
	die "building agnhost failed"
log "coredns: go build"
(cd "$here/coredns" && measure coredns.download go mod download) || die "go mod download failed (coredns)"
(cd "$here/coredns" && measure coredns "${nice_cmd[@]}" go build -mod=readonly -trimpath -buildvcs=false \
	-tags=grpcnotrace -ldflags="-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" \
	-o "$tmp/bin/coredns" .) || die "building coredns failed"
for b in e2e.test agnhost coredns; do echo "$b.binary_bytes=$(stat -c %s "$tmp/bin/$b")" >>"$stats"; done

log "checking versions"
"$tmp/bin/e2e.test" --version | grep -q "$K8S_VERSION" || die "e2e.test --version does not say $K8S_VERSION"
"$tmp/bin/agnhost" --version 2>&1 | grep -q "$AGNHOST_VERSION" || die "agnhost --version does not say $AGNHOST_VERSION"
"$tmp/bin/coredns" -version | grep -q "CoreDNS-${COREDNS_VERSION#v}" || die "coredns -version does not say ${COREDNS_VERSION#v}"
"$tmp/bin/coredns" -plugins | grep -qx kubernetes || die "coredns lacks the kubernetes plugin"

log "images (tests/e2e/images.sh)"
measure images bash "$here/images.sh" "$tmp/bin" "$tmp/images" | sed 's/^/  /' >&2 ||
	die "building the images failed"
for b in "${IMAGES[@]}"; do echo "image.$b.tar_bytes=$(stat -c %s "$tmp/images/$b.tar")" >>"$stats"; done

{
	echo "k8s_version=$K8S_VERSION"
	echo "coredns_version=$COREDNS_VERSION"
	echo "agnhost_version=$AGNHOST_VERSION"
	echo "go=$(go env GOVERSION)"
	echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
	echo "inputs=$(inputs_hash)"
} >"$tmp/stamp"
[[ -f $final/build-stats.txt ]] && cp "$final/build-stats.txt" "$tmp/build-stats.prev.txt"
[[ -e $final ]] && rm -rf "$final"
mv -T "$tmp" "$final"
trap - EXIT
log "build stats ($final/build-stats.txt):"
sed 's/^/  /' "$final/build-stats.txt" >&2
log "done: $final"
echo "$final" >&3
