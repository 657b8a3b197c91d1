#!/usr/bin/env bash
# Builds the images a real lab cluster runs, with no container registry: podman 4.3 (private
# storage, vfs) from Debian packages only. Each image is saved as a docker-archive that a node
# loads with `ctr -n k8s.io images import`:
#
#   weft.tar   weft.dev/weft:v0.1.0 and weft.dev/weft:v0.1.0-roll (one image, two tags): the
#              repo's Dockerfile, its `build` stage replaced by the binaries given here and its
#              `wireguard-go` stage by tests/wireguard-go.sh's build of the same pin
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

# Packages, lock, private podman, the Debian base (a.): shared with tests/e2e/images.sh.
# shellcheck source=tests/cluster/images-lib.sh
. "$(dirname "$0")/images-lib.sh"

# --- b. weft, from the repo's Dockerfile ----------------------------------------------------
WIREGUARD_GO=$(bash "$REPO/tests/wireguard-go.sh")
stamp=$(
	echo "weft image 3"
	echo "wireguard-go $(sha256sum <"$WIREGUARD_GO" | cut -d' ' -f1)"
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
	mkdir -p "$WORK/wireguard-go/out"
	cp "$WIREGUARD_GO" "$WORK/wireguard-go/out/wireguard-go"
	"${BUILD[@]}" -f "$DOCKERFILE" --build-context "build=$WORK/build" \
		--build-context "wireguard-go=$WORK/wireguard-go" \
		-t "$WEFT_IMAGE" -t "$WEFT_ROLL" "$WORK/context" >/dev/null
	"${PODMAN[@]}" image prune -f >/dev/null # earlier builds' weft images, now untagged
	save "$OUT/weft.tar" "$WEFT_IMAGE" "$WEFT_ROLL"
	echo "$stamp" >"$OUT/weft.tar.stamp"
fi

# --- c. tools: busybox ------------------------------------------------------------------------
if rebuild "$OUT/tools.tar"; then
	step "building $TOOLS_IMAGE"
	root=$WORK/tools/rootfs
	busybox_rootfs "$root"
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
