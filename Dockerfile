# syntax=docker/dockerfile:1
# The two images the Helm chart runs, from this repository:
#
#   docker build --target operator  -t ghcr.io/portcullis-dev/portcullis-operator:0.1.0 .
#   docker build --target dataplane -t ghcr.io/portcullis-dev/portcullis-dataplane:0.1.0 .
#
# Both build in one stage, then each binary goes alone into a distroless image with glibc and CA
# roots, no shell, run as a numeric non-root user (the chart's `runAsNonRoot` can only verify a
# numeric one).

FROM docker.io/library/rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p portcullis-operator \
 && install -D -m 0755 target/release/portcullis-operator /out/portcullis-operator
# The data plane as bench/run.sh measures it: built with the committed profile (pgo/, made by
# scripts/pgo-build.sh under the benchmark's loads). Its own build of the dependencies: the
# profile's flags differ from the operator's.
RUN scripts/release-dataplane.sh /out/portcullis-dataplane

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /out/portcullis-operator /usr/local/bin/portcullis-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/portcullis-operator"]

FROM gcr.io/distroless/cc-debian12:nonroot AS dataplane
COPY --from=build /out/portcullis-dataplane /usr/local/bin/portcullis-dataplane
# glibc's malloc raises its mmap threshold after each large free, so a reloaded snapshot's old
# tables stay in the heap: RSS after reloads of 10k keys settles near 72 MB, against 47 MB with
# fixed thresholds (blocks of 256 KiB and more mapped on their own, so returned when freed; the
# heap trimmed past 8 MiB free). The request path is unchanged: the same instructions per
# request under callgrind, no memory syscalls under load (bench/PROFILE.md).
ENV GLIBC_TUNABLES=glibc.malloc.mmap_threshold=262144:glibc.malloc.trim_threshold=8388608
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/portcullis-dataplane"]
