# The code image: em-ingest and its dependencies (pyproject.toml). The user-code server, the
# webserver, the daemon and every run container use it; DockerRunLauncher starts runs from it.
# Python matches pyproject's requires-python; the Dagster family is pinned there.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/home
WORKDIR /opt/em-ingest

# Dependencies first, from the project metadata alone, so editing code does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir em_ingest && touch em_ingest/__init__.py \
    && pip install . \
    && pip uninstall -y em-ingest && rm -rf em_ingest build

COPY em_ingest ./em_ingest
RUN pip install --no-deps . && rm -rf build

# An unprivileged user owns the data and log mount points, so named volumes start out writable by it.
RUN useradd --system --uid 10001 --home-dir /opt/em-ingest em-ingest \
    && mkdir -p "$DAGSTER_HOME" /data /var/log/em-ingest \
    && chown em-ingest /data /var/log/em-ingest "$DAGSTER_HOME"
COPY dagster.yaml workspace.yaml "$DAGSTER_HOME/"
COPY datasets.yaml ./
USER em-ingest

EXPOSE 4000 3000
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "em_ingest.definitions"]
