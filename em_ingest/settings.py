"""Runtime settings: where the archives are, where data goes, and how hard to try."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from em_ingest.limits import Limits


@dataclass(frozen=True)
class Setting:
    """One configurable value: a Settings attribute, a field of the `em_ingest` resource and an
    environment variable at once. Core settings are declared here; each source declares its own
    beside its code (`Source.configuration`), so adding an archive touches nothing shared."""

    field: str
    env: str
    default: str | None
    description: str
    secret: bool = False


CORE_SETTINGS = (
    Setting("data_root", "EM_INGEST_DATA_ROOT", "./data",
            "root of raw/, zarr/ and catalog/: a local path or file:// URL, or s3://bucket/prefix (endpoint and "
            "credentials from the AWS SDK's chain) or gs://bucket/prefix"),
    Setting("work_dir", "EM_INGEST_WORK_DIR", None,
            "with a data root in a bucket: the local folder where steps keep what they read and write before it "
            "goes up (the raw files of a dataset being converted, one region); default: under the system's "
            "temporary folder"),
    Setting("replaced_grace", "EM_INGEST_REPLACED_GRACE", "24h",
            "with a data root in a bucket: how long a replaced image version stays readable for readers of an "
            "older catalog before it is removed (seconds, or with s/m/h/d)"),
    Setting("datasets_file", "EM_INGEST_DATASETS", "./datasets.yaml", "the selection file"),
    Setting("region_bytes", "EM_INGEST_REGION_BYTES", "16GiB",
            "an image whose s0 is larger is converted by several region steps of about this size, which the "
            "run's executor can spread over processes, containers or pods (bytes, or with KiB/MiB/GiB/TiB)"),
    Setting("zstd_level", "EM_INGEST_ZSTD_LEVEL", "1",
            "zstd level of the images' chunks: 1 (the default), or a negative level (zstd's fast mode), which "
            "stores EM noise about a tenth larger and compresses it about five times faster, or up to 22 for "
            "smaller and slower; a changed level converts each image again on its next run"),
    Setting("public_url", "EM_INGEST_PUBLIC_URL", None,
            "where browsers reach the data root (https://, http://, s3:// or gs://); when set, each image's "
            "materialization and catalog row carry a Neuroglancer link"),
)


def core_setting(field: str, environ: Mapping[str, str] | None = None) -> str | None:
    """One core setting's value from the environment (or its default), without loading the sources:
    for commands that need only the data root or the public URL and should start fast."""
    setting = next((s for s in CORE_SETTINGS if s.field == field), None)
    if setting is None:
        raise KeyError(f"no core setting {field!r}; core settings: {', '.join(s.field for s in CORE_SETTINGS)}")
    environ = os.environ if environ is None else environ
    return environ.get(setting.env) or setting.default


_BYTE_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
               "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_bytes(text: str, what: str) -> int:
    """A positive byte count written as `17179869184`, `16GiB` or `500 MB`."""
    import re

    from em_ingest.errors import ConfigurationError

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text or "")
    unit = match[2].lower() if match else ""
    if match is None or unit not in _BYTE_UNITS or int(float(match[1]) * _BYTE_UNITS[unit]) < 1:
        raise ConfigurationError(f"{what}={text!r}: expected a positive number of bytes, e.g. 17179869184 or 16GiB")
    return int(float(match[1]) * _BYTE_UNITS[unit])


# zstd's own range: ZSTD_minCLevel() (-2^17) .. ZSTD_maxCLevel(); 0 means zstd's default (3), so it is refused.
ZSTD_LEVELS = range(-(1 << 17), 23)


def parse_zstd_level(text: str, what: str) -> int:
    """A zstd compression level: a non-zero integer from -131072 to 22."""
    from em_ingest.errors import ConfigurationError

    try:
        level = int(str(text).strip())
    except ValueError:
        level = 0
    if level == 0 or level not in ZSTD_LEVELS:
        raise ConfigurationError(f"{what}={text!r}: expected a zstd level, a non-zero integer from "
                                 f"{ZSTD_LEVELS.start} to {ZSTD_LEVELS.stop - 1} (1 is the default; negative is faster)")
    return level


_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, what: str) -> float:
    """A duration of zero or more seconds written as `90`, `15m`, `24h` or `7d`."""
    import re

    from em_ingest.errors import ConfigurationError

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", (text or "").lower())
    if match is None:
        raise ConfigurationError(f"{what}={text!r}: expected a duration such as 3600, 90m, 24h or 7d")
    return float(match[1]) * _SECONDS[match[2]]


def declared_settings() -> tuple[Setting, ...]:
    """Every setting: the core's, then each source's in source order."""
    from em_ingest.sources import source_classes  # here, not at import: sources import this module

    declared = list(CORE_SETTINGS)
    for cls in source_classes().values():
        declared += cls.configuration
    return tuple(declared)



def _by_field() -> dict[str, Setting]:
    return {s.field: s for s in declared_settings()}


def __getattr__(name: str) -> Any:
    # Derived views kept for callers that want a mapping (PEP 562: computed on use, after sources load).
    if name == "ENVIRONMENT":  # environment variable -> (field, default)
        return {s.env: (s.field, s.default) for s in declared_settings()}
    if name == "SECRET_FIELDS":
        return frozenset(s.field for s in declared_settings() if s.secret)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


class Settings:
    """Everything a source or the pipeline needs to know about the outside world.

    The core fields are attributes; every declared setting (see `Setting`) is an attribute too, its
    value or its declared default. Immutable and comparable.
    """

    _CORE = ("data_root", "datasets_file", "transfer", "limits", "ngff_version")

    def __init__(self, *, data_root: str = "./data", datasets_file: str = "./datasets.yaml",
                 transfer: TransferSettings | None = None, limits: Limits | None = None,
                 ngff_version: str = "0.5", **values: str | None):
        declared = _by_field()
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise TypeError(f"unknown settings {unknown}; declared: {sorted(declared)}")
        object.__setattr__(self, "data_root", data_root)
        object.__setattr__(self, "datasets_file", datasets_file)
        object.__setattr__(self, "transfer", transfer or TransferSettings())
        object.__setattr__(self, "limits", limits or Limits())
        # OME-Zarr output: "0.5" (Zarr v3, sharded) or "0.4" (Zarr v2).
        object.__setattr__(self, "ngff_version", ngff_version)
        object.__setattr__(self, "_values", {k: v for k, v in values.items() if k not in self._CORE})

    data_root: str
    datasets_file: str
    transfer: TransferSettings
    limits: Limits
    ngff_version: str

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not core attributes: a source's declared setting.
        if name.startswith("_"):
            raise AttributeError(name)
        setting = _by_field().get(name)
        if setting is None:
            raise AttributeError(f"no setting {name!r}")
        return self._values.get(name, setting.default)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Settings are immutable; use with_overrides()")

    def _key(self) -> tuple[Any, ...]:
        return (self.data_root, self.datasets_file, self.transfer, self.limits, self.ngff_version,
                tuple(sorted(self._values.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Settings) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Settings({self.public_dict()!r})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from the declared environment variables; unset ones keep their defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {s.field: environ[s.env] for s in declared_settings() if environ.get(s.env)}
        values.update(overrides)
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> Settings:
        current = {"data_root": self.data_root, "datasets_file": self.datasets_file, "transfer": self.transfer,
                   "limits": self.limits, "ngff_version": self.ngff_version, **self._values}
        return Settings(**{**current, **overrides})

    def public_dict(self) -> dict[str, Any]:
        """The settings safe to show: secrets are reported only as set / not set."""
        out: dict[str, Any] = {}
        for setting in declared_settings():
            value = getattr(self, setting.field)
            out[setting.field] = ("(set)" if value else "(not set)") if setting.secret else value
        out.update(transfer=vars(self.transfer), limits=vars(self.limits), ngff_version=self.ngff_version)
        return out
