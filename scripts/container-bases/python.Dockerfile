# Stand-in for python:3.11-slim-bookworm: Debian's Python 3.11 on bookworm, with what the project's
# Dockerfiles use of the upstream image (python, venv with pip, useradd).
ARG ROOTFS
FROM ${ROOTFS}
ARG DEBIAN_FRONTEND=noninteractive
# Copied before ca-certificates installs, so its postinst trusts them too.
COPY host-ca/ /usr/local/share/ca-certificates/
RUN apt-get update \
 && apt-get install -y -qq python3 python3-venv python-is-python3 ca-certificates >/dev/null \
 && rm -rf /var/lib/apt/lists/*
# pip keeps its own CA bundle unless told otherwise: builds here go through the host's extra CAs.
ENV LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
