# Shared by tests/cluster/images.sh and tests/e2e/images.sh (source it, as root, after defining
# die and log): installs what the builds need, takes the image cache's lock, sets up a private
# podman (its own config, storage, lock files and events log under the cache) and makes sure the
# Debian base is built and imported. Defines:
#
#   CACHE OUT STATE WORK   the image cache, its out/ dir, podman's state, a temp dir (removed on
#                          exit)
#   PODMAN BUILD           podman with that setup; `podman build` offline (--pull=never), RUN
#                          steps chrooted on the host's network (apt-get reaches Debian's mirror)
#   BASE_NAMES BASE_SHA    the base's names (docker.io/library/debian:bookworm-slim, plus the
#                          final FROM of $DOCKERFILE if the caller set it) and its tar's hash
#   step normalize image_id label save rebuild busybox_rootfs
#
# Set before sourcing: DOCKERFILE (optional).

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
# A Dockerfile's final FROM, if the caller builds one, names the base too.
if [ -n "${DOCKERFILE:-}" ]; then
	final_from=$(awk 'toupper($1) == "FROM" { i = 2; while ($i ~ /^--/) i++; img = $i } END { print img }' "$DOCKERFILE")
	[ -n "$final_from" ] || die "no FROM in $DOCKERFILE"
	final_from=$(normalize "$final_from")
	[ "$final_from" = "${BASE_NAMES[0]}" ] || BASE_NAMES+=("$final_from")
fi

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

# busybox_rootfs <dir>: a root file system of static busybox (Debian's busybox-static) with every
# applet linked, /etc/passwd and /etc/group with root and nobody, empty hosts/resolv.conf/hostname.
busybox_rootfs() {
	local root=$1
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
}
