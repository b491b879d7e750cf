"""The Source interface: what every archive plugin implements, and the records it returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from em_ingest.errors import SelectionError
from em_ingest.formats.label import LabelImage
from em_ingest.formats.volume import Volume
from em_ingest.raw import Manifest, RawStore
from em_ingest.selection import DatasetOptions, DatasetRequest
from em_ingest.settings import Setting, Settings
from em_ingest.transfer.base import Transports
from em_ingest.transfer.ftp import FtpClient
from em_ingest.transfer.http import HttpClient

OptionsT = TypeVar("OptionsT", bound=DatasetOptions)


@dataclass(frozen=True)
class InventoryItem:
    """One dataset an archive offers (discovery)."""

    source: str
    dataset_key: str
    title: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Description:
    """A dataset's descriptive metadata mapped onto catalog fields (unknown = None, never invented)."""

    title: str | None = None
    description: str | None = None
    organism: str | None = None
    sample: str | None = None
    imaging_method: str | None = None
    source_url: str | None = None
    doi: str | None = None
    license: str | None = None
    authors: tuple[str, ...] = ()
    source_version: str | None = None
    # Anything else worth keeping that has no column (goes to the catalog's extra_json).
    extra: dict[str, Any] = field(default_factory=dict)


class Source(ABC):
    """One public archive. Plain Python: no Dagster here.

    Lifecycle of one dataset (a partition): `fetch_raw` mirrors what the dataset needs into the
    raw store and returns its manifest; `describe` and `open_volume` then work offline from the
    raw store alone, so a raw download is the complete, reproducible input of the conversion.
    """

    name: ClassVar[str]
    #: Pydantic model of this source's per-dataset options in the selection file.
    Options: ClassVar[type[DatasetOptions]] = DatasetOptions
    #: One line for the UI.
    title: ClassVar[str] = ""
    #: The settings this archive needs (endpoints, tokens): each is a Settings attribute, a field of the
    #: `em_ingest` resource and an environment variable, and is listed in the deployment files.
    configuration: ClassVar[tuple[Setting, ...]] = ()

    def __init__(self, settings: Settings, http: HttpClient | None = None):
        self.settings = settings
        self.http = http or HttpClient(settings.transfer)
        # What the raw store may fetch through, by URL scheme; a source adds its own (e.g. its bucket).
        self.transports = Transports(self.http)
        self.transports.add(lambda: FtpClient(settings.transfer), schemes=("ftp",))

    @abstractmethod
    def discover(self) -> Iterable[InventoryItem]:
        """What the archive offers, so a user can pick what to add to the selection file."""

    @abstractmethod
    def fetch_raw(self, request: DatasetRequest, raw: RawStore) -> Manifest:
        """Download what `request` needs into `raw`, skipping objects the last manifest shows unchanged."""

    @abstractmethod
    def describe(self, request: DatasetRequest, raw: RawStore) -> Description:
        """Catalog fields for the dataset, from the metadata documents kept in `raw`."""

    @abstractmethod
    def open_volume(self, request: DatasetRequest, raw: RawStore) -> Volume:
        """The raw bytes as a lazy (z, y, x) volume, with geometry where the data gives it."""

    def open_labels(self, request: DatasetRequest, raw: RawStore) -> list[LabelImage]:
        """The label volumes the selection asks for (option `labels`), from the raw store; none by default."""
        return []


def options_as(request: DatasetRequest, model: type[OptionsT]) -> OptionsT:
    """`request.options` as the source's own `Options` model, which the selection file was validated against."""
    options = request.options
    if not isinstance(options, model):
        raise SelectionError(f"{request.source}.{request.key}: options are {type(options).__name__}, "
                             f"expected {model.__name__}")
    return options
