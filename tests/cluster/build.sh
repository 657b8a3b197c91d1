#!/usr/bin/env bash
# Build (once, cached outside the tree) what a real Kubernetes node and the
# rest of the control plane need besides kube-apiserver/etcd/kubectl (those
# come from tests/kube/build.sh), all from Go modules:
#
#   kubelet, kube-proxy, kube-controller-manager, kube-scheduler (k8s.io/kubernetes)
#   containerd, containerd-shim-runc-v2, ctr (github.com/containerd/containerd/v2)
#   CNI plugins loopback, portmap, bridge, host-local (containernetworking/plugins)
#   crictl (sigs.k8s.io/cri-tools)
#
# Usage:
#   dir=$(tests/cluster/build.sh | tail -n1)
#   "$dir/bin/kubelet" --version; "$dir/bin/containerd" --version
#   PATH=$dir/bin:$PATH containerd ...   # containerd looks the shim up on PATH
#   CNI bin dir for containerd: $dir/cni
#
# Cache: ${WEFT_CACHE:-$HOME/.cache/weft}/cluster/k8s-<K8S>-containerd-<CTRD>-cni-<CNI>/
#   bin/{kubelet,kube-proxy,kube-controller-manager,kube-scheduler,
#        containerd,containerd-shim-runc-v2,ctr,crictl}
#   cni/{loopback,portmap,bridge,host-local}
#   build-stats.txt (cold build wall time / memory / size per binary),
#   stamp (written last, marks a complete build; also records the crictl
#   version, which a complete cache must match).
# If the cache is complete this only prints its directory: no go invocation.
# Otherwise it builds everything into a temp dir next to it and renames it
# into place, under a lock (Go's build cache makes unchanged binaries quick).
#
# Only the last line of stdout is meaningful (the cache dir, not bin/);
# progress -> stderr.
#
# Where the sources come from:
#   - the four k8s commands are `tool` directives of tests/kube/apiserver, the
#     wrapper module tests/kube/build.sh builds kube-apiserver from (same
#     go.mod/go.sum, same version ldflags, so `kubelet --version` says
#     Kubernetes <K8S>); tests/kube/gen-gomod.sh writes those lines.
#   - containerd/, cni/, crictl/ here are wrapper modules with no code, only
#     `require` + `tool` lines, written by ./gen-gomod.sh.
# Everything is built with CGO_ENABLED=0 (upstream builds kubelet with cgo,
# but nothing we use needs it; containerd's btrfs snapshotter drops out) and
# upstream's build tags for containerd (urfave_cli_no_docs; the shim also
# no_grpc). The k8s binaries use no tags, like tests/kube/build.sh.
#
# Env knobs:
#   WEFT_CACHE             cache root (default $HOME/.cache/weft)
#   WEFT_CLUSTER_REBUILD=1 rebuild even if the cache is complete
#   WEFT_CLUSTER_REGEN=1   regenerate the wrapper go.mod+go.sum files first
#                          (including tests/kube/apiserver)
#   WEFT_CLUSTER_NICE      nice level for the compile (default 10; "" disables)
#
# Requires: Go >= 1.26.8 (containerd v2.3.7's and plugins v1.10.0's `go`
# line; /usr/local/go/bin is added to PATH when go is not found), network
# access to the Go module proxy on a cold build. GOTOOLCHAIN=local: no
# toolchain download. GOMODCACHE/GOCACHE stay at Go's defaults, shared with
# tests/kube/build.sh (run that first and the k8s binaries reuse its cache).
set -euo pipefail

K8S_VERSION=v1.36.3
CONTAINERD_VERSION=v2.3.7
CNI_VERSION=v1.10.0
CRICTL_VERSION=v1.37.0

K8S_CMDS=(kubelet kube-proxy kube-controller-manager kube-scheduler)
CONTAINERD_CMDS=(containerd containerd-shim-runc-v2 ctr)
CNI_PLUGINS=(loopback:main portmap:meta bridge:main host-local:ipam)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
kube_dir=$(cd "$here/../kube" && pwd)
cache_root=${WEFT_CACHE:-$HOME/.cache/weft}
key=k8s-$K8S_VERSION-containerd-$CONTAINERD_VERSION-cni-$CNI_VERSION
final=$cache_root/cluster/$key

# Keep stdout clean for the result; everything else goes to stderr.
exec 3>&1 1>&2

log() { echo "cluster/build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

is_complete() {
	local d=$1 b
	[[ -f $d/stamp ]] && grep -qx "crictl_version=$CRICTL_VERSION" "$d/stamp" || return 1
	for b in "${K8S_CMDS[@]}" "${CONTAINERD_CMDS[@]}" crictl; do [[ -x $d/bin/$b ]] || return 1; done
	for b in "${CNI_PLUGINS[@]}"; do [[ -x $d/cni/${b%%:*} ]] || return 1; done
}

# ---- warm path: no go invocation at all -------------------------------------
if [[ ${WEFT_CLUSTER_REBUILD:-0} != 1 ]] && is_complete "$final"; then
	log "cached: $final"
	echo "$final" >&3
	exit 0
fi

# ---- cold path --------------------------------------------------------------
export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0
if ! command -v go >/dev/null && [[ -x /usr/local/go/bin/go ]]; then
	export PATH=$PATH:/usr/local/go/bin
fi
command -v go >/dev/null || die "go not found in PATH (nor /usr/local/go/bin)"

mkdir -p "$cache_root/cluster"
exec 9>"$cache_root/cluster/.lock-$key"
if ! flock -n 9; then
	log "another build of $key is running; waiting for its lock"
	flock 9
fi
if [[ ${WEFT_CLUSTER_REBUILD:-0} != 1 ]] && is_complete "$final"; then
	log "built concurrently by another process: $final"
	echo "$final" >&3
	exit 0
fi

tmp=$(mktemp -d "$cache_root/cluster/.tmp-$key.XXXXXX")
chmod 755 "$tmp"
sampler_pid=
cleanup() {
	[[ -n $sampler_pid ]] && kill "$sampler_pid" 2>/dev/null || true
	rm -rf "$tmp"
}
trap cleanup EXIT
mkdir -p "$tmp/bin" "$tmp/cni"

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
[[ -n ${WEFT_CLUSTER_NICE-10} ]] && command -v nice >/dev/null && nice_cmd=(nice -n "${WEFT_CLUSTER_NICE-10}")

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
	echo "# weft tests/cluster/build.sh cold build stats"
	echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
	echo "host=$(uname -nrm)"
	echo "cpus=$(nproc)"
	echo "mem_total_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
	echo "go=$(go env GOVERSION)"
	echo "k8s_version=$K8S_VERSION"
	echo "containerd_version=$CONTAINERD_VERSION"
	echo "cni_version=$CNI_VERSION"
	echo "crictl_version=$CRICTL_VERSION"
	echo "nice=${WEFT_CLUSTER_NICE-10}"
	# ~0 => truly cold compile; large => GOCACHE already warm (e.g. after
	# tests/kube/build.sh, whose k8s packages the kubelet etc. reuse)
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

# ensure_gomod <dir> <module> <version> <generator> <gen-target> [required go.mod line...]
# Regenerate a wrapper go.mod if it does not pin the wanted version, lacks its
# generator's header for that version or lacks an exact line (a `tool` line).
ensure_gomod() {
	local dir=$1 mod=$2 ver=$3 gen=$4 target=$5 have line stale=
	shift 5
	have=$(sed -n "s#^\(require \)\{0,1\}[[:space:]]*$mod \(v[^ ]*\).*#\2#p" "$dir/go.mod" 2>/dev/null | head -n1)
	if [[ ${WEFT_CLUSTER_REGEN:-0} == 1 || $have != "$ver" || ! -s $dir/go.sum ]] ||
		! grep -q "^// Regenerate: .*gen-gomod.sh $target $ver\$" "$dir/go.mod"; then
		stale=1
	fi
	for line; do grep -qxF "$line" "$dir/go.mod" 2>/dev/null || stale=1; done
	if [[ -n $stale ]]; then
		log "${dir#"$here"/}/go.mod out of date (pins $mod '${have:-none}', want $ver and its tool lines): regenerating"
		"$gen" "$target" "$ver"
	fi
}

k8s_tools=()
for c in "${K8S_CMDS[@]}"; do k8s_tools+=("tool k8s.io/kubernetes/cmd/$c"); done
ensure_gomod "$kube_dir/apiserver" k8s.io/kubernetes "$K8S_VERSION" "$kube_dir/gen-gomod.sh" apiserver \
	"tool k8s.io/kubernetes/cmd/kubectl" "${k8s_tools[@]}"
ensure_gomod "$here/containerd" github.com/containerd/containerd/v2 "$CONTAINERD_VERSION" "$here/gen-gomod.sh" containerd \
	"tool github.com/containerd/containerd/v2/cmd/containerd" \
	"tool github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2" \
	"tool github.com/containerd/containerd/v2/cmd/ctr"
cni_tools=()
for p in "${CNI_PLUGINS[@]}"; do cni_tools+=("tool github.com/containernetworking/plugins/plugins/${p#*:}/${p%%:*}"); done
ensure_gomod "$here/cni" github.com/containernetworking/plugins "$CNI_VERSION" "$here/gen-gomod.sh" cni "${cni_tools[@]}"
ensure_gomod "$here/crictl" sigs.k8s.io/cri-tools "$CRICTL_VERSION" "$here/gen-gomod.sh" crictl \
	"tool sigs.k8s.io/cri-tools/cmd/crictl"

# k8s version info, exactly as tests/kube/build.sh injects it (what
# hack/lib/version.sh would). buildDate is the module's publish time.
k8s_info=$(cd / && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"Info": "\(.*\)",\{0,1\}$/\1/p')
build_date=$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$k8s_info" 2>/dev/null || true)
[[ -n $build_date ]] || build_date=1970-01-01T00:00:00Z
k8s_minor=${K8S_VERSION#v1.}; k8s_minor=${k8s_minor%%.*}
k8s_ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
	k8s_ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor"
	k8s_ldflags+=" -X $pkg.buildDate=$build_date -X $pkg.gitCommit=" # commit unknown: empty, not "$Format:%H$"
done
# containerd's Makefile: version.Version is `git describe` (vX.Y.Z); the
# revision (a git commit) is unknown from a module: left empty.
ctrd_pkg=github.com/containerd/containerd/v2
ctrd_ldflags="-s -w -X $ctrd_pkg/version.Version=$CONTAINERD_VERSION -X $ctrd_pkg/version.Revision= -X $ctrd_pkg/version.Package=$ctrd_pkg"
# plugins' release workflow sets BuildVersion to the tag.
cni_ldflags="-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$CNI_VERSION"
# cri-tools' Makefile: Version is `git describe` without the leading v.
crictl_ldflags="-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=${CRICTL_VERSION#v}"

download_mods() { # <label> <dir>
	log "$1: downloading modules (go mod download)"
	(cd "$2" && measure "$1.download" go mod download) ||
		die "$1: go mod download failed"
}

build_one() { # <label> <dir> <out> <ldflags> <package> [build tags]
	local label=$1 dir=$2 out=$3 ldflags=$4 pkg=$5 tags=${6-}
	log "$label: go build $pkg (cold builds take a while; ~$(nproc) cores)"
	(cd "$dir" && measure "$label" "${nice_cmd[@]}" go build -mod=readonly -trimpath -buildvcs=false \
		-tags="$tags" -ldflags="$ldflags" -o "$out" "$pkg") ||
		die "$label: go build failed (if it mentions go.sum/go.mod, rerun with WEFT_CLUSTER_REGEN=1)"
	echo "$label.binary_bytes=$(stat -c %s "$out")" >>"$stats"
}

# k8s first: with tests/kube/build.sh's Go cache most of it is already compiled.
download_mods k8s "$kube_dir/apiserver"
for c in "${K8S_CMDS[@]}"; do
	build_one "$c" "$kube_dir/apiserver" "$tmp/bin/$c" "$k8s_ldflags" "k8s.io/kubernetes/cmd/$c"
done

download_mods containerd "$here/containerd"
for c in "${CONTAINERD_CMDS[@]}"; do
	tags=urfave_cli_no_docs
	[[ $c == containerd-shim-runc-v2 ]] && tags+=,no_grpc
	build_one "$c" "$here/containerd" "$tmp/bin/$c" "$ctrd_ldflags" "$ctrd_pkg/cmd/$c" "$tags"
done

download_mods cni "$here/cni"
for p in "${CNI_PLUGINS[@]}"; do
	build_one "cni-${p%%:*}" "$here/cni" "$tmp/cni/${p%%:*}" "$cni_ldflags" \
		"github.com/containernetworking/plugins/plugins/${p#*:}/${p%%:*}"
done

download_mods crictl "$here/crictl"
build_one crictl "$here/crictl" "$tmp/bin/crictl" "$crictl_ldflags" sigs.k8s.io/cri-tools/cmd/crictl

# ---- smoke test: every binary runs and reports the wanted version -----------
check_version() { # <name> <want substring> <cmd...>
	local name=$1 want=$2 out; shift 2
	out=$("$@" 2>&1) || die "$name does not run: $out"
	echo "  $name: $(grep -m1 -F -- "$want" <<<"$out" || head -n1 <<<"$out")" >&2
	grep -qF -- "$want" <<<"$out" || die "$name does not report '$want': $out"
}
log "checking versions"
for c in "${K8S_CMDS[@]}"; do check_version "$c" "Kubernetes $K8S_VERSION" "$tmp/bin/$c" --version; done
check_version containerd "containerd $ctrd_pkg $CONTAINERD_VERSION" "$tmp/bin/containerd" --version
check_version containerd-shim-runc-v2 "Version:  $CONTAINERD_VERSION" "$tmp/bin/containerd-shim-runc-v2" -v
check_version ctr "ctr $ctrd_pkg $CONTAINERD_VERSION" "$tmp/bin/ctr" --version
# A CNI plugin run without CNI_COMMAND prints "CNI <name> plugin <version>".
for p in "${CNI_PLUGINS[@]}"; do
	check_version "${p%%:*}" "CNI ${p%%:*} plugin $CNI_VERSION" env -u CNI_COMMAND "$tmp/cni/${p%%:*}"
done
check_version crictl "crictl version ${CRICTL_VERSION#v}" "$tmp/bin/crictl" --version

rm -f "$tmp"/time-*.txt "$tmp"/peak-*
{
	echo "k8s_version=$K8S_VERSION"
	echo "containerd_version=$CONTAINERD_VERSION"
	echo "cni_version=$CNI_VERSION"
	echo "crictl_version=$CRICTL_VERSION"
	echo "go=$(go env GOVERSION)"
	echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
	echo "apiserver_go_sum_sha256=$(sha256sum <"$kube_dir/apiserver/go.sum" | cut -d' ' -f1)"
	for w in containerd cni crictl; do
		echo "${w}_go_sum_sha256=$(sha256sum <"$here/$w/go.sum" | cut -d' ' -f1)"
	done
} >"$tmp/stamp"

# Keep the previous build's stats (e.g. the cold numbers across a rebuild).
[[ -f $final/build-stats.txt ]] && cp "$final/build-stats.txt" "$tmp/build-stats.prev.txt"
# Atomic publish: anything at $final without a stamp is an incomplete leftover.
[[ -e $final ]] && rm -rf "$final"
mv -T "$tmp" "$final"
trap - EXIT

log "build stats ($final/build-stats.txt):"
sed 's/^/  /' "$final/build-stats.txt" >&2
log "done: $final"
echo "$final" >&3
