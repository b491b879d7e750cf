# The user-code image: em-ingest and its dependencies. The webserver, the daemon and every run
# container use it (runs are launched from it by DockerRunLauncher).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DAGSTER_HOME=/opt/dagster/home
WORKDIR /opt/em-ingest

COPY pyproject.toml README.md ./
COPY em_ingest ./em_ingest
RUN pip install --no-cache-dir . && mkdir -p "$DAGSTER_HOME" /data

COPY dagster.yaml workspace.yaml "$DAGSTER_HOME/"
COPY datasets.yaml ./

EXPOSE 4000
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "em_ingest.definitions"]
