"""The one resource: em-ingest's settings, its fields made from the declared settings and bound to their
environment variables through EnvVar."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

import dagster as dg
from pydantic import Field

from em_ingest.limits import Limits
from em_ingest.pipeline import Pipeline
from em_ingest.settings import Settings, TransferSettings, declared_settings


class _EmIngestResourceBase(dg.ConfigurableResource):
    """Where data goes, how hard transfers try, and what a dataset may ask for; the archives' own
    settings are added as fields by `_resource_class` from what each source declares."""

    data_root: str = "./data"
    datasets_file: str = "./datasets.yaml"
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
        values = {s.field: getattr(self, s.field) for s in declared_settings()}
        return Settings(**values, transfer=transfer, limits=limits, ngff_version=self.ngff_version)

    def pipeline(self) -> Pipeline:
        return Pipeline(self.settings())

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Any:
        """Bind every declared variable that is set as an EnvVar (resolved at run time, and shown
        by name, never by value, in the UI); unset ones keep the real public services' defaults."""
        environ = os.environ if environ is None else environ
        return cls(**{s.field: dg.EnvVar(s.env) for s in declared_settings() if environ.get(s.env)})

    @classmethod
    def from_settings(cls, settings: Settings) -> Any:
        """For tests and the CLI: explicit values instead of environment variables."""
        t = settings.transfer
        return cls(**{s.field: getattr(settings, s.field) for s in declared_settings()},
                   ngff_version=settings.ngff_version, max_in_flight=t.max_in_flight, max_attempts=t.max_attempts,
                   connect_timeout_s=t.connect_timeout_s, read_timeout_s=t.read_timeout_s,
                   max_volume_bytes=settings.limits.max_volume_bytes, max_expansion=settings.limits.max_expansion)


def _resource_class() -> type[_EmIngestResourceBase]:
    """The resource class with one optional string field per declared setting the base class does not
    define itself (each source's, and core ones such as `public_url`), its default and description
    shown in the UI's launchpad."""
    defined = set(_EmIngestResourceBase.model_fields)
    added = [s for s in declared_settings() if s.field not in defined]
    namespace: dict[str, Any] = {
        "__module__": __name__, "__qualname__": "EmIngestResource",
        "__doc__": "Where the archives are, where data goes, how hard transfers try, and what a dataset may ask for.",
        "__annotations__": {s.field: Optional[str] for s in added},  # noqa: UP045 - evaluated by pydantic
        **{s.field: Field(default=s.default, description=f"{s.description} (${s.env})") for s in added},
    }
    return type("EmIngestResource", (_EmIngestResourceBase,), namespace)


EmIngestResource = _resource_class()
