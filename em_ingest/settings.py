"""Runtime settings: where the archives are, where data goes, and how hard to try."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from em_ingest.limits import Limits

# Contract: environment variable -> Settings field, with the real public services as defaults.
ENVIRONMENT: dict[str, tuple[str, str | None]] = {
    "EM_INGEST_DATA_ROOT": ("data_root", "./data"),
    "EM_INGEST_DATASETS": ("datasets_file", "./datasets.yaml"),
    "EM_INGEST_OPENORGANELLE_ENDPOINT": ("openorganelle_endpoint", "https://s3.us-east-1.amazonaws.com"),
    "EM_INGEST_OPENORGANELLE_BUCKET": ("openorganelle_bucket", "janelia-cosem-datasets"),
    "NEUPRINT_SERVER": ("neuprint_server", "https://neuprint.janelia.org"),
    "NEUPRINT_TOKEN": ("neuprint_token", None),
    "EM_INGEST_FLYEM_PRECOMPUTED_URL": (
        "flyem_precomputed_url",
        "https://storage.googleapis.com/neuroglancer-janelia-flyem-hemibrain/emdata/clahe_yz/jpeg",
    ),
    "EM_INGEST_FLYEM_DVID_URL": ("flyem_dvid_url", "https://hemibrain-dvid.janelia.org"),
    "EM_INGEST_FLYEM_DVID_UUID": ("flyem_dvid_uuid", "a89eb3af216a46cdba81204d8f954786"),
    "EM_INGEST_IDR_URL": ("idr_url", "https://idr.openmicroscopy.org"),
    "EM_INGEST_IDR_FILES_URL": ("idr_files_url", "https://ftp.ebi.ac.uk/pub/databases/IDR"),
    "EM_INGEST_IDR_ZARR_URL": ("idr_zarr_url", "https://uk1s3.embassy.ebi.ac.uk/idr/zarr/v0.4"),
    "EM_INGEST_EMPIAR_API_URL": ("empiar_api_url", "https://www.ebi.ac.uk/empiar/api"),
    "EM_INGEST_EMPIAR_FILES_URL": ("empiar_files_url", "https://ftp.ebi.ac.uk/empiar/world_availability"),
    "EM_INGEST_EPFL_URL": (
        "epfl_url",
        "https://documents.epfl.ch/groups/c/cv/cvlab-unit/www/data/%20ElectronMicroscopy_Hippocampus",
    ),
}
SECRET_FIELDS = frozenset({"neuprint_token"})


@dataclass(frozen=True)
class TransferSettings:
    """How every transport talks to the network."""

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_attempts: int = 6
    max_retry_time_s: float = 300.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    # Concurrent requests inside one run (per dataset); a Dagster pool bounds runs per archive.
    max_in_flight: int = 8
    user_agent: str = "em-ingest/0.1 (+https://github.com/em-ingest)"
    # A download whose size nobody announced (no HEAD/SIZE, no Content-Length or Content-Range) stops
    # here, so a body that never ends cannot fill the disk; above any file the archives serve unsized.
    max_unannounced_bytes: int = 64 << 30
    # Whole-body reads (JSON documents, chunks, listings) are held in memory: a hostile or broken
    # server must not be able to exhaust it.
    max_body_bytes: int = 512 << 20


@dataclass(frozen=True)
class Settings:
    """Everything a source or the pipeline needs to know about the outside world."""

    data_root: str = "./data"
    datasets_file: str = "./datasets.yaml"
    openorganelle_endpoint: str = "https://s3.us-east-1.amazonaws.com"
    openorganelle_bucket: str = "janelia-cosem-datasets"
    neuprint_server: str = "https://neuprint.janelia.org"
    neuprint_token: str | None = field(default=None, repr=False)
    flyem_precomputed_url: str = ENVIRONMENT["EM_INGEST_FLYEM_PRECOMPUTED_URL"][1]  # type: ignore[assignment]
    flyem_dvid_url: str = "https://hemibrain-dvid.janelia.org"
    flyem_dvid_uuid: str = "a89eb3af216a46cdba81204d8f954786"
    idr_url: str = "https://idr.openmicroscopy.org"
    idr_files_url: str = "https://ftp.ebi.ac.uk/pub/databases/IDR"
    idr_zarr_url: str = "https://uk1s3.embassy.ebi.ac.uk/idr/zarr/v0.4"
    empiar_api_url: str = "https://www.ebi.ac.uk/empiar/api"
    empiar_files_url: str = "https://ftp.ebi.ac.uk/empiar/world_availability"
    epfl_url: str = ENVIRONMENT["EM_INGEST_EPFL_URL"][1]  # type: ignore[assignment]
    transfer: TransferSettings = field(default_factory=TransferSettings)
    limits: Limits = field(default_factory=Limits)
    # OME-Zarr output: "0.5" (Zarr v3, sharded) or "0.4" (Zarr v2).
    ngff_version: str = "0.5"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from the contract's environment variables; unset ones keep their defaults."""
        environ = os.environ if environ is None else environ
        values = {name: environ[var] for var, (name, _) in ENVIRONMENT.items() if environ.get(var)}
        values.update(overrides)
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **overrides)

    def public_dict(self) -> dict[str, Any]:
        """The settings safe to show: secrets are reported only as set / not set."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS:
                value = "(set)" if value else "(not set)"
            elif f.name in ("transfer", "limits"):
                value = vars(value)
            out[f.name] = value
        return out
