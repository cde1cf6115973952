# The comsat image: the one binary, run as a non-root user.
#
#   docker build -t comsat .
#   docker run --rm comsat --version
#
# Stages, in the order the classic builder runs them:
#   runtime   the base image (BASE) with the `comsat` user, its data dir
#             (/var/lib/comsat) and a directory for links' local sockets
#             (/run/comsat), for volumes to share with applications;
#   prebuilt  runtime + a binary built elsewhere, from a context holding
#             just `comsat` (`docker build --target prebuilt CONTEXT`), for
#             machines that build on the host or cannot pull a Rust image;
#   build     compiles the binary (BUILDER: a Rust toolchain image);
#   image     runtime + the compiled binary: the default.
#
# BASE and BUILDER are build arguments: a machine with no registry gives a
# base image it made itself (for example `debootstrap --variant=minbase
# bookworm DIR`, then `tar -C DIR -c . | docker import - NAME`).

ARG BASE=debian:bookworm-slim
ARG BUILDER=rust:1.95-slim-bookworm

FROM ${BASE} AS runtime
RUN groupadd --system --gid 10001 comsat \
 && useradd --system --uid 10001 --gid comsat --home-dir /var/lib/comsat --no-create-home comsat \
 && mkdir -p /var/lib/comsat /run/comsat \
 && chown comsat:comsat /var/lib/comsat /run/comsat \
 && chmod 0750 /var/lib/comsat \
 && chmod 0755 /run/comsat
# The admin address's /healthz (relays and agents run with
# `--admin 127.0.0.1:$COMSAT_ADMIN_PORT`; the controller's health is on
# its HTTPS port: disable this check for it, or probe /healthz there).
ENV COMSAT_ADMIN_PORT=9101
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${COMSAT_ADMIN_PORT} && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
USER comsat:comsat
WORKDIR /var/lib/comsat
ENTRYPOINT ["/usr/local/bin/comsat"]
CMD ["--help"]

FROM runtime AS prebuilt
COPY comsat /usr/local/bin/comsat

FROM ${BUILDER} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p comsat \
 && install -m 0755 target/release/comsat /comsat

FROM runtime AS image
COPY --from=build /comsat /usr/local/bin/comsat
