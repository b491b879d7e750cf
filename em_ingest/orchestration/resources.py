"""The one resource: em-ingest's settings, filled from the contract's environment variables via EnvVar."""

from __future__ import annotations


import os
from collections.abc import Mapping

import dagster as dg
from pydantic import Field

from em_ingest.limits import Limits

from em_ingest.pipeline import Pipeline
from em_ingest.settings import ENVIRONMENT, Settings, TransferSettings


class EmIngestResource(dg.ConfigurableResource):
    """Where the archives are, where data goes, and how hard transfers try."""

    data_root: str = "./data"
    datasets_file: str = "./datasets.yaml"
    openorganelle_endpoint: str = Settings.openorganelle_endpoint
    openorganelle_bucket: str = Settings.openorganelle_bucket
    neuprint_server: str = Settings.neuprint_server
    neuprint_token: str | None = None
    flyem_precomputed_url: str = Settings.flyem_precomputed_url
    flyem_dvid_url: str = Settings.flyem_dvid_url
    flyem_dvid_uuid: str = Settings.flyem_dvid_uuid
    idr_url: str = Settings.idr_url
    idr_files_url: str = Settings.idr_files_url
    idr_zarr_url: str = Settings.idr_zarr_url
    empiar_api_url: str = Settings.empiar_api_url
    empiar_files_url: str = Settings.empiar_files_url
    epfl_url: str = Settings.epfl_url
    ngff_version: str = "0.5"
    max_in_flight: int = 8
    max_attempts: int = 6
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_volume_bytes: int = Field(default=Limits.max_volume_bytes, description=(
        "Largest volume (uncompressed bytes) a dataset may declare; larger ones fail before any work."))
    max_expansion: float = Field(default=Limits.max_expansion, description=(
        "Largest ratio of a volume's uncompressed bytes to its raw download; guards against corrupt "
        "or hostile metadata. Raise it for very sparse data."))

    def settings(self) -> Settings:
        transfer = TransferSettings(
            max_in_flight=self.max_in_flight, max_attempts=self.max_attempts,
            connect_timeout_s=self.connect_timeout_s, read_timeout_s=self.read_timeout_s,
        )
        limits = Limits(max_volume_bytes=self.max_volume_bytes, max_expansion=self.max_expansion)
        names = {name for name, _ in ENVIRONMENT.values()}
        values = {name: getattr(self, name) for name in names}
        return Settings(**values, transfer=transfer, limits=limits, ngff_version=self.ngff_version)

    def pipeline(self) -> Pipeline:
        return Pipeline(self.settings())

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> EmIngestResource:
        """Bind every contract variable that is set as an EnvVar (resolved at run time, and shown
        by name, never by value, in the UI); unset ones keep the real public services' defaults."""
        environ = os.environ if environ is None else environ
        bound = {name: dg.EnvVar(var) for var, (name, _) in ENVIRONMENT.items() if environ.get(var)}
        return cls(**bound)

    @classmethod
    def from_settings(cls, settings: Settings) -> EmIngestResource:
        """For tests and the CLI: explicit values instead of environment variables."""
        names = {name for name, _ in ENVIRONMENT.values()}
        t = settings.transfer
        return cls(**{n: getattr(settings, n) for n in names}, ngff_version=settings.ngff_version,
                   max_in_flight=t.max_in_flight, max_attempts=t.max_attempts,
                   connect_timeout_s=t.connect_timeout_s, read_timeout_s=t.read_timeout_s,
                   max_volume_bytes=settings.limits.max_volume_bytes,
                   max_expansion=settings.limits.max_expansion)
