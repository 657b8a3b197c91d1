#!/usr/bin/env bash
# Builds the images the sig-network conformance tests run (and the lab's cluster DNS), offline,
# with the private podman setup of tests/cluster/images.sh (tests/cluster/images-lib.sh), under
# exactly the names test/utils/image/manifest.go (k8s v1.36.3) pins, so no KUBE_TEST_REPO_LIST
# remapping is needed. Each is saved as a docker-archive in <out dir>:
#
#   agnhost.tar            registry.k8s.io/e2e-test-images/agnhost:2.63.0: Debian bookworm-slim
#                          + dnsutils curl netcat-openbsd iproute2 (upstream's alpine packages'
#                          Debian names), /agnhost (+ agnhost-2), /coredns, porter's cert,
#                          /uploads, user 1000 in group 50000; ENTRYPOINT /agnhost, CMD pause
#   glibc-dns-testing.tar  registry.k8s.io/e2e-test-images/glibc-dns-testing:2.0.0: bookworm-slim
#                          + dnsutils, /coredns (upstream's recipe)
#   busybox.tar            registry.k8s.io/e2e-test-images/busybox:1.37.0-1: Debian's static
#                          busybox, FROM scratch, CMD sh
#   nginx.tar              registry.k8s.io/e2e-test-images/nginx:1.15-4: bookworm-slim +
#                          nginx-light on :80 in the foreground
#   coredns.tar            registry.k8s.io/coredns/coredns:v1.14.2 (kubeadm's name): the CoreDNS
#                          built by tests/e2e/build.sh, FROM scratch
#
#   bash tests/e2e/images.sh <bin dir with agnhost, coredns> <out dir>   # as root
#
# Usually run by tests/e2e/build.sh, which keys <out dir> on the binaries. The apt-get steps
# reach Debian's mirror (first build only). An archive is rebuilt when missing or when its
# stamp (recipe + binaries + base) changes. Progress -> stderr; the last stdout line is <out dir>.
set -euo pipefail

die() { echo "e2e/images.sh: $*" >&2; exit 1; }
log() { echo "e2e/images.sh: $*" >&2; }

[ "$(id -u)" = 0 ] || die "must run as root"
[ $# = 2 ] || die "usage: images.sh <bin dir with agnhost, coredns> <out dir>"
BIN=$(cd "$1" && pwd) || die "no directory $1"
for b in agnhost coredns; do [ -x "$BIN/$b" ] || die "$BIN/$b missing"; done
mkdir -p "$2"
DEST=$(cd "$2" && pwd)
K8S_MODULE=k8s.io/kubernetes@v1.36.3 # agnhost's porter certificate comes from here

E2E=registry.k8s.io/e2e-test-images
AGNHOST_IMAGE=$E2E/agnhost:2.63.0
GLIBC_IMAGE=$E2E/glibc-dns-testing:2.0.0
BUSYBOX_IMAGE=$E2E/busybox:1.37.0-1
NGINX_IMAGE=$E2E/nginx:1.15-4
COREDNS_IMAGE=registry.k8s.io/coredns/coredns:v1.14.2

# shellcheck source=tests/cluster/images-lib.sh
. "$(dirname "$0")/../cluster/images-lib.sh"

# build_if <name> <image> <stamp> <context dir>: podman build + save unless the archive's stamp
# matches (the Containerfile is <context>/Containerfile).
build_if() {
	local name=$1 image=$2 stamp=$3 ctx=$4 tar=$DEST/$1.tar
	if ! rebuild "$tar" && [ "$(cat "$tar.stamp" 2>/dev/null)" = "$stamp" ]; then
		return
	fi
	step "building $image"
	"${BUILD[@]}" -t "$image" "$ctx" >/dev/null
	save "$tar" "$image"
	echo "$stamp" >"$tar.stamp"
}
sha() { sha256sum <"$1" | cut -d' ' -f1; }

# --- agnhost --------------------------------------------------------------------------------
ctx=$WORK/agnhost
mkdir -p "$ctx"
cp "$BIN/agnhost" "$BIN/coredns" "$ctx/"
porter=${WEFT_AGNHOST_PORTER:-}
if [ -z "$porter" ]; then
	command -v go >/dev/null || export PATH=$PATH:/usr/local/go/bin
	porter=$(go env GOMODCACHE)/$K8S_MODULE/test/images/agnhost/porter
	if [ ! -f "$porter/localhost.crt" ]; then
		dir=$(cd "$WORK" && GO111MODULE=on GOFLAGS=-mod=mod go mod download -json "$K8S_MODULE" |
			sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
		porter=$dir/test/images/agnhost/porter
	fi
fi
cp "$porter/localhost.crt" "$porter/localhost.key" "$ctx/"
cat >"$ctx/Containerfile" <<'EOF2'
FROM debian:bookworm-slim
# upstream (alpine): bind-tools curl netcat-openbsd iproute2 iperf bash util-linux-misc
RUN apt-get update -qq && \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        dnsutils curl netcat-openbsd iproute2 ca-certificates >/dev/null && \
    apt-get clean && rm -rf /var/lib/apt/lists/*
COPY coredns /coredns
RUN mkdir /uploads
COPY localhost.crt localhost.key /
COPY agnhost /agnhost
RUN ln -s agnhost /agnhost-2 && \
    groupadd -g 50000 group-defined-in-image && \
    useradd -u 1000 -M -N -s /bin/sh user-defined-in-image && \
    usermod -a -G group-defined-in-image user-defined-in-image
EXPOSE 80 8080 8081 9376 5000
ENTRYPOINT ["/agnhost"]
CMD ["pause"]
EOF2
build_if agnhost "$AGNHOST_IMAGE" "agnhost 1 $BASE_SHA $(sha "$ctx/Containerfile") $(sha "$BIN/agnhost") $(sha "$BIN/coredns")" "$ctx"

# --- glibc-dns-testing ----------------------------------------------------------------------
ctx=$WORK/glibc
mkdir -p "$ctx"
cp "$BIN/coredns" "$ctx/"
cat >"$ctx/Containerfile" <<'EOF2'
FROM debian:bookworm-slim
RUN apt-get update -qq && \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dnsutils >/dev/null && \
    apt-get clean && rm -rf /var/lib/apt/lists/*
COPY coredns /coredns
EOF2
build_if glibc-dns-testing "$GLIBC_IMAGE" "glibc 1 $BASE_SHA $(sha "$ctx/Containerfile") $(sha "$BIN/coredns")" "$ctx"

# --- busybox ----------------------------------------------------------------------------------
ctx=$WORK/busybox
busybox_rootfs "$ctx/rootfs"
cat >"$ctx/Containerfile" <<'EOF2'
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin
CMD ["sh"]
EOF2
build_if busybox "$BUSYBOX_IMAGE" "busybox 1 $(sha /bin/busybox) $(sha "$ctx/Containerfile")" "$ctx"

# --- nginx ------------------------------------------------------------------------------------
ctx=$WORK/nginx
mkdir -p "$ctx"
cat >"$ctx/Containerfile" <<'EOF2'
FROM debian:bookworm-slim
RUN apt-get update -qq && \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light >/dev/null && \
    apt-get clean && rm -rf /var/lib/apt/lists/* && \
    ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 80
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
EOF2
build_if nginx "$NGINX_IMAGE" "nginx 1 $BASE_SHA $(sha "$ctx/Containerfile")" "$ctx"

# --- coredns ----------------------------------------------------------------------------------
ctx=$WORK/coredns
mkdir -p "$ctx"
cp "$BIN/coredns" "$ctx/"
cat >"$ctx/Containerfile" <<'EOF2'
FROM scratch
COPY coredns /coredns
USER 65532:65532
EXPOSE 53 53/udp
ENTRYPOINT ["/coredns"]
EOF2
build_if coredns "$COREDNS_IMAGE" "coredns 1 $(sha "$ctx/Containerfile") $(sha "$BIN/coredns")" "$ctx"

step "done"
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
for entry in "agnhost $AGNHOST_IMAGE" "glibc-dns-testing $GLIBC_IMAGE" "busybox $BUSYBOX_IMAGE" \
	"nginx $NGINX_IMAGE" "coredns $COREDNS_IMAGE"; do
	read -r file image <<<"$entry"
	size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$image" 2>/dev/null || echo)
	echo "$image: image $([ -n "$size" ] && mib "$size" || echo '?'), $file.tar $(mib "$(stat -c %s "$DEST/$file.tar")")"
done
echo "$DEST"
