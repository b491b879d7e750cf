# The code image: em-ingest and its dependencies (pyproject.toml). The user-code server, the webserver,
# the daemon and every run container use it; DockerRunLauncher starts runs from it.
# Python matches pyproject's requires-python; the Dagster family is pinned there.
# PYTHON_IMAGE is the official image unless a machine without a registry builds a local stand-in
# (deploy/stand-ins/build); compose passes EM_INGEST_PYTHON_IMAGE here.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# The package as a wheel, with its compiled window kernel (setup.py): the compiler stays in this stage,
# out of the image. EM_INGEST_REQUIRE_NATIVE makes a failed compile fail the build, never a slower image.
FROM ${PYTHON_IMAGE} AS wheel
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
    && { python -c 'import pathlib, sys, sysconfig; sys.exit(not pathlib.Path(sysconfig.get_paths()["include"], "Python.h").exists())' \
         || DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libpython3-dev; } \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY pyproject.toml setup.py README.md ./
COPY em_ingest ./em_ingest
RUN EM_INGEST_REQUIRE_NATIVE=1 PIP_NO_CACHE_DIR=1 pip wheel --no-deps --wheel-dir /wheels . \
    && python -c 'import sys, zipfile; names = zipfile.ZipFile(sys.argv[1]).namelist(); \
sys.exit(not any(n.startswith("em_ingest/omezarr/_windows.") and n.endswith(".so") for n in names))' /wheels/*.whl

FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/home
WORKDIR /opt/em-ingest

# Dependencies first, from the project metadata alone, so editing code (or the README, which the
# package's long description reads) does not reinstall them.
COPY pyproject.toml ./
RUN mkdir em_ingest && touch em_ingest/__init__.py README.md \
    && pip install . \
    && pip uninstall -y em-ingest && rm -rf em_ingest build README.md

# Optional extras, in a layer of their own so that both images share the one above: none for the image
# users run; `replicas` (moto, pyftpdlib) for the offline demo's replicas service (docker-compose.yml).
ARG EM_INGEST_EXTRAS=
RUN if [ -n "$EM_INGEST_EXTRAS" ]; then \
        mkdir em_ingest && touch em_ingest/__init__.py README.md \
        && pip install ".[$EM_INGEST_EXTRAS]" \
        && pip uninstall -y em-ingest && rm -rf em_ingest build README.md; \
    fi

# Installed from the wheel alone: no source tree beside it, so `python -m` in this folder imports the
# installed package, kernel included.
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels

# An unprivileged user owns the data and log mount points, so named volumes start out writable by it.
RUN useradd --system --uid 10001 --home-dir /opt/em-ingest em-ingest \
    && mkdir -p "$DAGSTER_HOME" /data /var/log/em-ingest \
    && chown em-ingest /data /var/log/em-ingest "$DAGSTER_HOME"
COPY dagster.yaml workspace.yaml "$DAGSTER_HOME/"
COPY datasets.yaml ./
# The replicas' own small selection, which the offline demo (deploy/demo-env) points the pipeline at.
COPY deploy/datasets.demo.yaml ./
USER em-ingest

EXPOSE 4000 3000
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "em_ingest.definitions"]
