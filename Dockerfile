# Build:  docker build -t REGISTRY/turnout:TAG .   (BuildKit, the default since Docker 23, for the cache mounts)
# Deploy: in an overlay, kustomize edit set image turnout=REGISTRY/turnout:TAG

FROM rust:1-bookworm AS builder
WORKDIR /src
# The whole context (see .dockerignore), so every workspace member is present for `cargo --locked`.
COPY . .
# Cache mounts keep the registry and build artifacts between builds; the binary is copied out of the cache
# in the same step because the cache is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin turnout \
 && install -D -m 0755 target/release/turnout /out/turnout

# glibc and libgcc only, no shell; the nonroot variant runs as 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="turnout" \
      org.opencontainers.image.description="Zero-downtime canary releases for plain Kubernetes Deployments on Istio" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/turnout /usr/local/bin/turnout
USER 65532:65532
# 8443: admission webhook (HTTPS, /mutate); 8080: /live, /ready, /metrics.
EXPOSE 8443 8080
ENTRYPOINT ["/usr/local/bin/turnout"]
CMD ["webhook"]
