# Stand-in for prom/prometheus where no image registry can be reached: Debian 12's prometheus package with the
# official image's entrypoint shape, so docker-compose.yml's `command:` flags apply unchanged.
ARG DEBIAN_IMAGE=local/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends prometheus && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER nobody
ENTRYPOINT ["/usr/bin/prometheus"]
