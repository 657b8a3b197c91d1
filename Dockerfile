# weft's node image: weft-router (the DaemonSet's process), weftctl, and the CNI plugin `weft`
# (which the DaemonSet copies onto the host's CNI bin dir).
#
#   docker build -t weft.dev/weft:v0.1.0 .          # a machine that reaches a registry
#   bash tests/cluster/images.sh target/release      # offline: podman, a debootstrapped base,
#                                                    # and this stage replaced by built binaries
#
# tests/cluster/images.sh swaps the `build` stage for a folder (podman build --build-context
# build=DIR) holding src/target/release/{weft-router,weftctl,weft}, and the `wireguard-go` stage
# for one holding out/wireguard-go: keep the stages' names and the paths the final stage copies
# from in step with it.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The release profile keeps line tables (backtraces with file:line): 110 MB for weft-router
# alone. The image gets the binaries without debug info, symbols kept (images.sh does the same
# with objcopy --strip-debug).
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN cargo build --release --locked -p weft-router -p weft-cni

# The external WireGuard for nodes without the kernel module (`--wireguard auto` picks it
# there, before in-process boringtun): wireguard-go from its Go module, not Debian 12's 2022
# package, which predates its TUN offloads and batched UDP (1.0 vs 3.2 Gbit/s here: README,
# "Throughput"). tests/wireguard-go.sh builds this same pin for the tests and images.sh (which
# swaps this stage for a folder holding out/wireguard-go, like the `build` stage).
FROM golang:1-bookworm AS wireguard-go
ARG WIREGUARD_GO_VERSION=v0.0.0-20260522210424-ecfc5a8d5446
RUN GOBIN=/out CGO_ENABLED=0 go install -trimpath golang.zx2c4.com/wireguard@${WIREGUARD_GO_VERSION} \
	&& mv /out/wireguard /out/wireguard-go

# Runtime needs: weft-router runs `nft -f -` for its SNAT table (nftables); WireGuard, links and
# routes go through netlink in-process; `weftctl reset` runs `ip` and `nft`; `wg show` (both
# kernel and userspace WireGuard) and `ip` are for whoever debugs a node with kubectl exec. The
# install-cni init container uses sh, install and mv from the base. No ca-certificates: kube-rs
# (rustls) checks the API server against the CA of the service account or kubeconfig, and reads
# the OS roots only when neither names one.
FROM debian:bookworm-slim
RUN apt-get update \
	&& apt-get install -y --no-install-recommends iproute2 nftables wireguard-tools \
	&& rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log
COPY --from=build /src/target/release/weft-router /src/target/release/weftctl /src/target/release/weft /usr/local/bin/
COPY --from=wireguard-go /out/wireguard-go /usr/local/bin/
ENTRYPOINT ["weft-router"]
