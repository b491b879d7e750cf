# Stand-in for python:3.11-slim-bookworm, built from Debian's own packages where no image registry can
# be reached (deploy/stand-ins/build). Like the official image: Debian bookworm, Python 3.11, and
# `python` / `pip` first on PATH (a venv here, /usr/local there).
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3 python3-venv ca-certificates passwd \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/python
# The CA bundle of the machine that builds the stand-in: where packages are fetched through an
# intercepting proxy, pip inside the image must trust the proxy's certificate too.
COPY host-ca-certificates.crt /etc/ssl/certs/host-ca-certificates.crt
ENV PATH=/opt/python/bin:$PATH \
    LANG=C.UTF-8 \
    PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt
CMD ["python3"]
