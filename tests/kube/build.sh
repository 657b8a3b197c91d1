#!/usr/bin/env bash
# Build (once, cached outside the tree) a real kube-apiserver, kubectl and etcd
# from Go modules, for weft's integration tests (and humans poking at the lab).
#
#   bin=$(tests/kube/build.sh | tail -n1)
#   "$bin/etcd" ...; "$bin/kube-apiserver" ...; "$bin/kubectl" version
#
# Cache: ${WEFT_CACHE:-$HOME/.cache/weft}/kube/k8s-<K8S_VERSION>-etcd-<ETCD_VERSION>/
#   bin/{kube-apiserver,kubectl,etcd}, stamp (written last, marks a complete
#   build), build-stats.txt (cold build wall time / memory per binary).
# If the stamp and all binaries exist this only prints the bin dir. Otherwise
# it builds all of them into a temp dir next to it and renames it into place,
# under a lock (Go's build cache makes rebuilding the unchanged ones quick).
# kubectl is built from the apiserver/ wrapper module (`tool` directive there).
#
# Only the last line of stdout is meaningful (the bin dir); progress -> stderr.
#
# Env knobs:
#   WEFT_CACHE          cache root (default $HOME/.cache/weft)
#   WEFT_KUBE_REBUILD=1 rebuild even if the cache is complete
#   WEFT_KUBE_REGEN=1   regenerate apiserver/ and etcd/ go.mod+go.sum first
#   WEFT_KUBE_NICE      nice level for the compile (default 10; "" disables)
#
# Requires: Go >= the `go` line of k8s.io/kubernetes (1.26.0 for v1.36.x),
# network access to the Go module proxy on a cold build. GOTOOLCHAIN=local:
# no toolchain download. GOMODCACHE/GOCACHE stay at Go's defaults.
set -euo pipefail

K8S_VERSION=v1.36.3
ETCD_VERSION=v3.6.16

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${WEFT_CACHE:-$HOME/.cache/weft}
key=k8s-$K8S_VERSION-etcd-$ETCD_VERSION
final=$cache_root/kube/$key

# Keep stdout clean for the result; everything else goes to stderr.
exec 3>&1 1>&2

log() { echo "kube/build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

is_complete() {
	[[ -f $1/stamp && -x $1/bin/kube-apiserver && -x $1/bin/kubectl && -x $1/bin/etcd ]]
}

# ---- warm path: no go invocation at all -------------------------------------
if [[ ${WEFT_KUBE_REBUILD:-0} != 1 ]] && is_complete "$final"; then
	log "cached: $final/bin"
	echo "$final/bin" >&3
	exit 0
fi

# ---- cold path --------------------------------------------------------------
export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0
command -v go >/dev/null || die "go not found in PATH"

mkdir -p "$cache_root/kube"
exec 9>"$cache_root/kube/.lock-$key"
if ! flock -n 9; then
	log "another build of $key is running; waiting for its lock"
	flock 9
fi
if [[ ${WEFT_KUBE_REBUILD:-0} != 1 ]] && is_complete "$final"; then
	log "built concurrently by another process: $final/bin"
	echo "$final/bin" >&3
	exit 0
fi

tmp=$(mktemp -d "$cache_root/kube/.tmp-$key.XXXXXX")
chmod 755 "$tmp"
sampler_pid=
cleanup() {
	[[ -n $sampler_pid ]] && kill "$sampler_pid" 2>/dev/null || true
	rm -rf "$tmp"
}
trap cleanup EXIT
mkdir -p "$tmp/bin"

# GNU time gives the max RSS of the largest single process (compile/link).
timebin=/usr/bin/time
if ! "$timebin" -v true >/dev/null 2>&1; then
	if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
		log "installing GNU time (apt-get install time)"
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time; } >&2 ||
			log "warning: could not install GNU time"
	fi
	"$timebin" -v true >/dev/null 2>&1 || { timebin=; log "warning: no GNU time; only sampled memory stats"; }
fi

nice_cmd=()
[[ -n ${WEFT_KUBE_NICE-10} ]] && command -v nice >/dev/null && nice_cmd=(nice -n "${WEFT_KUBE_NICE-10}")

# Sum of RSS (KiB) over the process tree rooted at pid $1.
tree_rss_kb() {
	ps -e -o pid=,ppid=,rss= 2>/dev/null | awk -v root="$1" '
		{ ppid[$1] = $2; rss[$1] = $3 }
		END {
			for (p in ppid) {
				q = p; n = 0
				while (q != "" && q != root && q != 0 && q != 1 && n++ < 64) q = ppid[q]
				if (q == root) s += rss[p]
			}
			print s + 0
		}'
}

stats=$tmp/build-stats.txt
{
	echo "# weft tests/kube/build.sh cold build stats"
	echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
	echo "host=$(uname -nrm)"
	echo "cpus=$(nproc)"
	echo "mem_total_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
	echo "go=$(go env GOVERSION)"
	echo "k8s_version=$K8S_VERSION"
	echo "etcd_version=$ETCD_VERSION"
	echo "nice=${WEFT_KUBE_NICE-10}"
	# ~0 => truly cold compile; large => GOCACHE already warm (e.g. a rebuild)
	echo "gocache_kb_before=$(du -sk "$(go env GOCACHE)" 2>/dev/null | cut -f1)"
	echo "# wall_s: elapsed; max_rss_kb: largest single process (GNU time);"
	echo "# tree_peak_rss_kb: peak of summed RSS over the whole go build tree (sampled 1/s)"
} >"$stats"

# measure <label> <cmd...>: run, record wall/cpu time and memory into $stats.
measure() {
	local label=$1; shift
	local tfile=$tmp/time-$label.txt start end rc=0 peak=0 cur
	start=$(date +%s.%N)
	if [[ -n $timebin ]]; then
		"$timebin" -v -o "$tfile" "$@" &
	else
		"$@" &
	fi
	local pid=$!
	(
		p=0
		while kill -0 "$pid" 2>/dev/null; do
			cur=$(tree_rss_kb "$pid")
			((cur > p)) && { p=$cur; echo "$p" >"$tmp/peak-$label"; }
			sleep 1
		done
	) &
	sampler_pid=$!
	wait "$pid" || rc=$?
	end=$(date +%s.%N)
	kill "$sampler_pid" 2>/dev/null || true
	wait "$sampler_pid" 2>/dev/null || true
	sampler_pid=
	[[ -f $tmp/peak-$label ]] && peak=$(<"$tmp/peak-$label")
	local wall
	wall=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
	{
		echo "$label.exit=$rc"
		echo "$label.wall_s=$wall"
		if [[ -f $tfile ]]; then
			awk -v l="$label" -F': ' '
				/User time \(seconds\)/ { print l ".user_s=" $2 }
				/System time \(seconds\)/ { print l ".sys_s=" $2 }
				/Maximum resident set size/ { print l ".max_rss_kb=" $2 }' "$tfile"
		fi
		echo "$label.tree_peak_rss_kb=$peak"
	} >>"$stats"
	log "$label: exit=$rc wall=${wall}s max_rss_kb=$(sed -n "s/^$label\.max_rss_kb=//p" "$stats") tree_peak_rss_kb=$peak"
	return "$rc"
}

# Regenerate a wrapper go.mod if it does not pin the wanted version (or lacks
# an exact line the current gen-gomod.sh writes, e.g. a `tool` directive).
ensure_gomod() { # <dir> <module> <version> <gen-target> [required go.mod line]
	local dir=$here/$1 have
	have=$(sed -n "s#^\(require \)\{0,1\}[[:space:]]*$2 \(v[^ ]*\).*#\2#p" "$dir/go.mod" 2>/dev/null | head -n1)
	if [[ ${WEFT_KUBE_REGEN:-0} == 1 || $have != "$3" || ! -s $dir/go.sum ]] ||
		! grep -q "^// Regenerate: tests/kube/gen-gomod.sh $4 $3\$" "$dir/go.mod" ||
		{ [[ -n ${5-} ]] && ! grep -qxF "$5" "$dir/go.mod"; }; then
		log "$1/go.mod out of date (pins $2 '${have:-none}', want $3${5:+, with '$5'}): regenerating"
		"$here/gen-gomod.sh" "$4" "$3"
	fi
}

ensure_gomod apiserver k8s.io/kubernetes "$K8S_VERSION" apiserver "tool k8s.io/kubernetes/cmd/kubectl"
ensure_gomod etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" etcd

# Version info normally injected by k8s's hack/lib/version.sh. buildDate is
# the module's publish time, so rebuilds are reproducible.
k8s_info=$(cd / && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"Info": "\(.*\)",\{0,1\}$/\1/p')
build_date=$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$k8s_info" 2>/dev/null || true)
[[ -n $build_date ]] || build_date=1970-01-01T00:00:00Z
k8s_minor=${K8S_VERSION#v1.}; k8s_minor=${k8s_minor%%.*}
k8s_ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
	k8s_ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor"
	k8s_ldflags+=" -X $pkg.buildDate=$build_date -X $pkg.gitCommit=" # commit unknown: empty, not "$Format:%H$"
done
etcd_ldflags="-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=gomodule-$ETCD_VERSION"

download_mods() { # <label> <dir>
	log "$1: downloading modules (go mod download)"
	(cd "$here/$2" && measure "$1.download" go mod download) ||
		die "$1: go mod download failed"
}

build_one() { # <label> <dir> <out> <ldflags> [package, default: the dir's main]
	local label=$1 dir=$here/$2 out=$3 ldflags=$4 pkg=${5:-.}
	log "$label: go build $pkg (cold builds take a while; ~$(nproc) cores)"
	(cd "$dir" && measure "$label" "${nice_cmd[@]}" go build -mod=readonly -trimpath -buildvcs=false \
		-ldflags="$ldflags" -o "$out" "$pkg") ||
		die "$label: go build failed (if it mentions go.sum/go.mod, rerun with WEFT_KUBE_REGEN=1)"
	echo "$label.binary_bytes=$(stat -c %s "$out")" >>"$stats"
}

download_mods etcd etcd
build_one etcd etcd "$tmp/bin/etcd" "$etcd_ldflags"
download_mods kube-apiserver apiserver # also covers kubectl (same module)
build_one kube-apiserver apiserver "$tmp/bin/kube-apiserver" "$k8s_ldflags"
build_one kubectl apiserver "$tmp/bin/kubectl" "$k8s_ldflags" k8s.io/kubernetes/cmd/kubectl

"$tmp/bin/etcd" --version >&2 || die "built etcd does not run"
"$tmp/bin/kube-apiserver" --version >&2 || die "built kube-apiserver does not run"
kubectl_version=$("$tmp/bin/kubectl" version --client 2>&1) || die "built kubectl does not run: $kubectl_version"
echo "$kubectl_version" >&2
grep -qx "Client Version: $K8S_VERSION" <<<"$kubectl_version" ||
	die "built kubectl does not report Client Version $K8S_VERSION"

rm -f "$tmp"/time-*.txt "$tmp"/peak-*
{
	echo "k8s_version=$K8S_VERSION"
	echo "etcd_version=$ETCD_VERSION"
	echo "go=$(go env GOVERSION)"
	echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
	echo "apiserver_go_sum_sha256=$(sha256sum <"$here/apiserver/go.sum" | cut -d' ' -f1)"
	echo "etcd_go_sum_sha256=$(sha256sum <"$here/etcd/go.sum" | cut -d' ' -f1)"
} >"$tmp/stamp"

# Keep the previous build's stats (e.g. the cold numbers across a rebuild).
[[ -f $final/build-stats.txt ]] && cp "$final/build-stats.txt" "$tmp/build-stats.prev.txt"
# Atomic publish: anything at $final without a stamp is an incomplete leftover.
[[ -e $final ]] && rm -rf "$final"
mv -T "$tmp" "$final"
trap - EXIT

log "build stats ($final/build-stats.txt):"
sed 's/^/  /' "$final/build-stats.txt" >&2
log "done: $final/bin"
echo "$final/bin" >&3
