# Stand-in for python:3.11-slim where no image registry can be reached: Debian 12's Python 3.11 as a venv at
# /usr/local, so python, pip and console scripts are in /usr/local/bin as in the official image. Built by
# verify.sh on a Debian image it makes with debootstrap. ca.crt: the CA bundle pip must trust (a TLS-inspecting
# proxy's included, where the machine reaches PyPI through one).
ARG DEBIAN_IMAGE=local/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /usr/local
COPY ca.crt /etc/ssl/certs/build-ca.crt
ENV PATH=/usr/local/bin:$PATH PIP_CERT=/etc/ssl/certs/build-ca.crt
