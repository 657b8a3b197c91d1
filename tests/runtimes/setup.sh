#!/usr/bin/env bash
# Installs what the container-runtime harness (podman.sh, containerd.sh) needs and builds the
# busybox rootfs the containers run from (no images are pulled anywhere). Idempotent: a second
# run installs nothing and reuses the cached rootfs.
#
#   bash tests/runtimes/setup.sh          # as root, Debian 12
#
# Prints the rootfs path on its last line. The rootfs lives in
# ${WEFT_CACHE:-$HOME/.cache/weft}/rootfs-busybox and is rebuilt only when /bin/busybox changes.
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "setup.sh: must run as root" >&2; exit 1; }

# podman 4.3 (CNI backend, runc, conmon), containerd 1.6 + ctr, the reference CNI plugins,
# iproute2 for the leftover checks, iptables for plugins that masquerade, jq to read conflists.
packages=(podman conmon runc containerd busybox-static containernetworking-plugins
	iproute2 iptables jq util-linux procps)

missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "setup.sh: installing ${missing[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's podman package starts nothing here (no systemd), and the harness starts its own
# containerd; a system containerd, if any, is left alone.

cache=${WEFT_CACHE:-${HOME:-/root}/.cache/weft}
rootfs=$cache/rootfs-busybox
stamp="busybox $(sha256sum /bin/busybox | cut -d' ' -f1) layout 1"
if [ -f "$rootfs/.weft-rootfs" ] && [ "$(cat "$rootfs/.weft-rootfs")" = "$stamp" ]; then
	echo "$rootfs"
	exit 0
fi

mkdir -p "$cache"
tmp=$(mktemp -d "$cache/rootfs-busybox.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
(
	cd "$tmp"
	chmod 755 .
	mkdir -p bin sbin usr/bin usr/sbin etc proc sys dev tmp run var/tmp root
	chmod 1777 tmp var/tmp
	cp /bin/busybox bin/busybox
	# --list-full prints paths like "sbin/ip"; every applet becomes a symlink to /bin/busybox.
	/bin/busybox --list-full | while read -r applet; do
		[ "$applet" = bin/busybox ] || ln -sf /bin/busybox "$applet"
	done
	printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >etc/passwd
	printf 'root:x:0:\nnogroup:x:65534:\n' >etc/group
	# Mount targets the runtimes bind files onto (podman creates them itself; ctr does not).
	: >etc/hosts
	: >etc/resolv.conf
	: >etc/hostname
	echo "$stamp" >.weft-rootfs
)
rm -rf "$rootfs"
mv "$tmp" "$rootfs"
trap - EXIT
echo "setup.sh: built $rootfs ($(find "$rootfs" -type l | wc -l) applet links)" >&2
echo "$rootfs"
