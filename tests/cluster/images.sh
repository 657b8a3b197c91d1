#!/usr/bin/env bash
# Builds the images a real lab cluster runs, with no container registry: podman 4.3 (private
# storage, vfs) from Debian packages only. Each image is saved as a docker-archive that a node
# loads with `ctr -n k8s.io images import`:
#
#   weft.tar   weft.dev/weft:v0.1.0 and weft.dev/weft:v0.1.0-roll (one image, two tags): the
#              repo's Dockerfile, its `build` stage replaced by the binaries given here
#   tools.tar  weft.test/tools:latest: static busybox and its applet links, FROM scratch,
#              entrypoint /bin/sh
#   pause.tar  registry.k8s.io/pause:3.10.2: kubernetes' build/pause/linux/pause.c, static
#
#   bash tests/cluster/images.sh target/release      # as root, Debian 12
#
# The Dockerfile's base (debian:bookworm-slim) is made here with mmdebstrap (minbase, the slim
# image's dpkg excludes) from Debian's mirror, and its final stage's apt-get reaches the same
# mirror: the first run needs it, later runs only when the Dockerfile changes.
#
# Cache: ${WEFT_CACHE:-$HOME/.cache/weft}/images/
#   base-<recipe>.tar/.info    the Debian base (rebuilt when the recipe here changes, or with
#                              WEFT_BASE_REFRESH=1 to take newer Debian packages)
#   podman/                    podman's storage (not the host's, nor tests/runtimes/podman.sh's)
#   out/{weft,tools,pause}.tar the archives; weft.tar is rebuilt when the binaries, the
#                              Dockerfile or the base change (out/weft.tar.stamp), tools.tar and
#                              pause.tar only when missing.
# WEFT_IMAGES_REBUILD=1 rebuilds all three archives. The last stdout line is the out directory;
# the lines before it give each image's size.
set -euo pipefail

die() { echo "images.sh: $*" >&2; exit 1; }
log() { echo "images.sh: $*" >&2; }

[ "$(id -u)" = 0 ] || die "must run as root"
[ $# = 1 ] || die "usage: images.sh <dir with weft-router, weftctl, weft>"
BIN=$(cd "$1" && pwd) || die "no directory $1"
BINS=(weft-router weftctl weft)
for b in "${BINS[@]}"; do
	[ -x "$BIN/$b" ] || die "$BIN/$b missing (cargo build --release -p weft-router -p weft-cni)"
done
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DOCKERFILE=$REPO/Dockerfile
[ -f "$DOCKERFILE" ] || die "no $DOCKERFILE"

WEFT_IMAGE=weft.dev/weft:v0.1.0
WEFT_ROLL=weft.dev/weft:v0.1.0-roll
TOOLS_IMAGE=weft.test/tools:latest
PAUSE_VERSION=3.10.2
PAUSE_IMAGE=registry.k8s.io/pause:$PAUSE_VERSION
K8S_MODULE=k8s.io/kubernetes@v1.36.3 # where pause.c comes from

packages=(podman conmon runc mmdebstrap busybox-static gcc libc6-dev binutils util-linux coreutils)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

CACHE=${WEFT_CACHE:-${HOME:-/root}/.cache/weft}/images
OUT=$CACHE/out
STATE=$CACHE/podman
mkdir -p "$OUT" "$STATE/storage" "$STATE/run" "$STATE/tmp"
exec 9>"$CACHE/.lock"
flock -w 1800 9 || die "another images.sh holds $CACHE/.lock"

WORK=$(mktemp -d "$CACHE/work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
T0=$SECONDS
step() { log "$1 ($((SECONDS - T0))s)"; }

# --- podman, private to this script -------------------------------------------------------
# Its own config, storage, lock files and events log: nothing of the host's podman setup, and
# no collision with tests/runtimes/podman.sh (also podman, in a temp dir of its own).
export CONTAINERS_CONF=$STATE/containers.conf
export CONTAINERS_STORAGE_CONF=$STATE/storage.conf
export CONTAINERS_REGISTRIES_CONF=$STATE/registries.conf
# RLIMIT_NPROC/NOFILE: podman's defaults are above what the runtime may set in some VMs.
nproc=$(ulimit -Hu)
[ "$nproc" = unlimited ] || [ "$nproc" -gt 4096 ] && nproc=4096
cat >"$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=$nproc:$nproc"]
log_driver = "k8s-file"

[network]
network_backend = "cni"
network_config_dir = "$STATE/net.d"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$STATE/events.log"
tmp_dir = "$STATE/tmp"
lock_type = "file"
EOF
cat >"$CONTAINERS_STORAGE_CONF" <<EOF
[storage]
driver = "vfs"
graphroot = "$STATE/storage"
runroot = "$STATE/run"
EOF
# Short names (FROM debian:...) resolve as Docker's do; nothing is ever pulled (--pull=never).
cat >"$CONTAINERS_REGISTRIES_CONF" <<'EOF'
unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"
EOF
mkdir -p "$STATE/net.d"
PODMAN=(podman --root "$STATE/storage" --runroot "$STATE/run" --tmpdir "$STATE/tmp"
	--storage-driver vfs --cgroup-manager cgroupfs --events-backend file)
# RUN steps chroot into the image (no OCI runtime, no cgroups) on the host's network: the
# Dockerfile's apt-get reaches Debian's mirror.
BUILD=("${PODMAN[@]}" build --pull=never --layers --isolation chroot --network host --quiet)

# A reference as Docker normalizes it: debian:x -> docker.io/library/debian:x.
normalize() {
	local ref=$1 first=${1%%/*}
	if [[ $ref != */* ]]; then
		ref=docker.io/library/$ref
	elif [[ $first != *.* && $first != *:* && $first != localhost ]]; then
		ref=docker.io/$ref
	fi
	[[ ${ref##*/} == *[:@]* ]] || ref=$ref:latest
	echo "$ref"
}
image_id() { "${PODMAN[@]}" image inspect --format '{{.Id}}' "$1" 2>/dev/null; }
label() { "${PODMAN[@]}" image inspect --format "{{index .Config.Labels \"$2\"}}" "$1" 2>/dev/null; }
save() { # save <file> <image> [more tags of it]
	local file=$1
	shift
	rm -f "$file.tmp"
	"${PODMAN[@]}" save --quiet --format docker-archive -o "$file.tmp" "$@"
	mv "$file.tmp" "$file"
}
rebuild() { [ "${WEFT_IMAGES_REBUILD:-0}" = 1 ] || [ ! -s "$1" ]; }

# --- a. the Debian base ---------------------------------------------------------------------
# Everything that decides its content is in the recipe; the cache key is the recipe's hash.
SUITE=bookworm
MIRROR=${WEFT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${WEFT_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
SOURCES=("deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main"
	"deb $SECURITY $SUITE-security main")
# What debian:*-slim leaves out; the file stays in the image, so later apt-gets obey it too.
DPKGOPTS=(path-exclude=/usr/share/doc/* path-include=/usr/share/doc/*/copyright
	path-exclude=/usr/share/man/* path-exclude=/usr/share/info/* path-exclude=/usr/share/groff/*
	path-exclude=/usr/share/lintian/* path-exclude=/usr/share/linda/*
	path-exclude=/usr/share/locale/* path-include=/usr/share/locale/locale.alias)
# merged-usr: /bin etc. as links into /usr made by the hook, with usr-is-merged, as debootstrap
# does (mmdebstrap alone would install usrmerge, which pulls in perl: 50 MB).
HOOKS=/usr/share/mmdebstrap/hooks/merged-usr
recipe="base 2 mmdebstrap --variant=minbase --hook-dir=$HOOKS $SUITE | ${SOURCES[*]} | ${DPKGOPTS[*]}"
BASE_KEY=$(printf '%s' "$recipe" | sha256sum | cut -c1-16)
BASE_TAR=$CACHE/base-$SUITE-minbase-$BASE_KEY.tar
BASE_NAMES=(docker.io/library/debian:bookworm-slim)
final_from=$(awk 'toupper($1) == "FROM" { i = 2; while ($i ~ /^--/) i++; img = $i } END { print img }' "$DOCKERFILE")
[ -n "$final_from" ] || die "no FROM in $DOCKERFILE"
final_from=$(normalize "$final_from")
[ "$final_from" = "${BASE_NAMES[0]}" ] || BASE_NAMES+=("$final_from")

if [ "${WEFT_BASE_REFRESH:-0}" = 1 ] || [ ! -s "$BASE_TAR" ]; then
	step "debootstrapping $SUITE (minbase) into $(basename "$BASE_TAR")"
	opts=()
	for o in "${DPKGOPTS[@]}"; do opts+=(--dpkgopt="$o"); done
	mmdebstrap --quiet --mode=root --variant=minbase --format=tar --hook-dir="$HOOKS" "${opts[@]}" \
		--aptopt='Acquire::Languages "none"' \
		"$SUITE" "$WORK/base.tar" "${SOURCES[@]}" >"$WORK/mmdebstrap.log" 2>&1 ||
		{ tail -n 40 "$WORK/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
	# What the base holds, for whoever wonders which Debian point release an image came from.
	{
		echo "recipe: $recipe"
		echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
		echo "packages:"
		tar -xOf "$WORK/base.tar" ./var/lib/dpkg/status |
			awk '/^Package:/ { p = $2 } /^Version:/ { print "  " p " " $2 }'
	} >"$WORK/base.info"
	mv "$WORK/base.tar" "$BASE_TAR"
	mv "$WORK/base.info" "${BASE_TAR%.tar}.info"
fi
BASE_SHA=$(sha256sum "$BASE_TAR" | cut -d' ' -f1)
base_built=$(sed -n 's/^built: //p' "${BASE_TAR%.tar}.info" 2>/dev/null || true)
if [ "$(label "${BASE_NAMES[0]}" weft.base.sha256)" != "$BASE_SHA" ]; then
	step "importing the base as ${BASE_NAMES[*]}"
	"${PODMAN[@]}" import --quiet \
		--change 'CMD ["bash"]' \
		--change "LABEL weft.base.sha256=$BASE_SHA" --change "LABEL weft.base.built=$base_built" \
		"$BASE_TAR" "${BASE_NAMES[0]}" >/dev/null
fi
base_id=$(image_id "${BASE_NAMES[0]}")
for n in "${BASE_NAMES[@]:1}"; do
	[ "$(image_id "$n")" = "$base_id" ] || "${PODMAN[@]}" tag "$base_id" "$n"
done

# --- b. weft, from the repo's Dockerfile ----------------------------------------------------
stamp=$(
	echo "weft image 2"
	echo "dockerfile $(sha256sum <"$DOCKERFILE" | cut -d' ' -f1)"
	echo "base $BASE_SHA"
	for b in "${BINS[@]}"; do echo "$b $(sha256sum <"$BIN/$b" | cut -d' ' -f1)"; done
)
if rebuild "$OUT/weft.tar" || [ "$(cat "$OUT/weft.tar.stamp" 2>/dev/null)" != "$stamp" ] ||
	[ -z "$(image_id "$WEFT_IMAGE")" ]; then
	step "building $WEFT_IMAGE from $DOCKERFILE"
	# The `build` stage becomes a folder with the binaries where the stage would have put them.
	mkdir -p "$WORK/build/src/target/release" "$WORK/context"
	# Without debug info, symbols kept: the Dockerfile's CARGO_PROFILE_RELEASE_STRIP=debuginfo.
	for b in "${BINS[@]}"; do
		objcopy --strip-debug "$BIN/$b" "$WORK/build/src/target/release/$b"
	done
	"${BUILD[@]}" -f "$DOCKERFILE" --build-context "build=$WORK/build" \
		-t "$WEFT_IMAGE" -t "$WEFT_ROLL" "$WORK/context" >/dev/null
	"${PODMAN[@]}" image prune -f >/dev/null # earlier builds' weft images, now untagged
	save "$OUT/weft.tar" "$WEFT_IMAGE" "$WEFT_ROLL"
	echo "$stamp" >"$OUT/weft.tar.stamp"
fi

# --- c. tools: busybox ------------------------------------------------------------------------
if rebuild "$OUT/tools.tar"; then
	step "building $TOOLS_IMAGE"
	root=$WORK/tools/rootfs
	mkdir -p "$root"
	(
		cd "$root"
		mkdir -p bin sbin usr/bin usr/sbin etc proc sys dev tmp run var/tmp root
		chmod 1777 tmp var/tmp
		cp /bin/busybox bin/busybox
		# --list-full prints paths like "sbin/ip"; every applet is a symlink to /bin/busybox.
		/bin/busybox --list-full | while read -r applet; do
			[ "$applet" = bin/busybox ] || ln -sf /bin/busybox "$applet"
		done
		printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >etc/passwd
		printf 'root:x:0:\nnogroup:x:65534:\n' >etc/group
		: >etc/hosts
		: >etc/resolv.conf
		: >etc/hostname
	)
	for a in sh ping nc wget httpd ip sleep; do
		found=
		for d in bin sbin usr/bin usr/sbin; do [ -L "$root/$d/$a" ] && found=1; done
		[ -n "$found" ] || die "busybox has no applet $a"
	done
	cat >"$WORK/tools/Containerfile" <<EOF
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin
ENTRYPOINT ["/bin/sh"]
EOF
	"${BUILD[@]}" -t "$TOOLS_IMAGE" "$WORK/tools" >/dev/null
	save "$OUT/tools.tar" "$TOOLS_IMAGE"
fi

# --- d. pause ---------------------------------------------------------------------------------
if rebuild "$OUT/pause.tar"; then
	step "building $PAUSE_IMAGE"
	src=${WEFT_PAUSE_C:-}
	if [ -z "$src" ]; then
		command -v go >/dev/null || die "no go to find $K8S_MODULE's pause.c (set WEFT_PAUSE_C)"
		modcache=$(go env GOMODCACHE)
		src=$modcache/$K8S_MODULE/build/pause/linux/pause.c
		if [ ! -f "$src" ]; then
			log "fetching $K8S_MODULE (for build/pause/linux/pause.c)"
			dir=$(cd "$WORK" && GO111MODULE=on GOFLAGS=-mod=mod go mod download -json "$K8S_MODULE" |
				sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
			src=$dir/build/pause/linux/pause.c
		fi
	fi
	[ -f "$src" ] || die "no pause.c at $src"
	mkdir -p "$WORK/pause"
	gcc -Os -Wall -Werror -static -DVERSION="$PAUSE_VERSION" -o "$WORK/pause/pause" "$src"
	strip "$WORK/pause/pause"
	"$WORK/pause/pause" -v | grep -qx "pause.c $PAUSE_VERSION" || die "pause -v does not say $PAUSE_VERSION"
	cat >"$WORK/pause/Containerfile" <<'EOF'
FROM scratch
COPY pause /pause
USER 65535:65535
ENTRYPOINT ["/pause"]
EOF
	"${BUILD[@]}" -t "$PAUSE_IMAGE" "$WORK/pause" >/dev/null
	save "$OUT/pause.tar" "$PAUSE_IMAGE"
fi

step "done"
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
for entry in "weft.tar $WEFT_IMAGE $WEFT_ROLL" "tools.tar $TOOLS_IMAGE" "pause.tar $PAUSE_IMAGE"; do
	read -r file image extra <<<"$entry"
	size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$image" 2>/dev/null || echo)
	echo "$image${extra:+ (also $extra)}: image $( [ -n "$size" ] && mib "$size" || echo '?'), $file $(mib "$(stat -c %s "$OUT/$file")")"
done
echo "$OUT"
