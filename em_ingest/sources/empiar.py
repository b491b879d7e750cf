"""EMPIAR (EMBL-EBI): entry metadata from the REST API, image files from the HTTPS or FTP file tree."""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from pydantic import field_validator

from em_ingest.errors import SelectionError, SourceResponseError, UnsafePathError
from em_ingest.formats.dm import read_dm
from em_ingest.formats.mrc import MRC_SUFFIXES, MrcVolume, read_mrc_header
from em_ingest.formats.stack import DM_SUFFIXES, IMAGE_SUFFIXES, TIFF_SUFFIXES, PlaneStack, natural_order
from em_ingest.formats.tiff import TiffStack
from em_ingest.formats.units import to_nm
from em_ingest.formats.volume import ArrayVolume, Geometry, Volume, triple
from em_ingest.raw import Manifest, RawStore, Wanted, safe_relative_path
from em_ingest.selection import DatasetOptions, DatasetRequest
from em_ingest.settings import Setting, Settings
from em_ingest.sources.base import Description, InventoryItem, Source, options_as
from em_ingest.transfer.autoindex import ListingEntry, parse_autoindex
from em_ingest.transfer.base import RemoteObject
from em_ingest.transfer.ftp import FtpClient
from em_ingest.transfer.http import HttpClient

log = logging.getLogger(__name__)
# A wanted file: relative path, URL, and its version as the listing gives it (None: not given exactly).
ListedFile = tuple[str, str, RemoteObject | None]

ACCESSION = re.compile(r"^EMPIAR-(\d+)$")
ENTRY_DOCUMENT = "entry.json"
FILES_DIR = "files"  # raw/<key>/files/<path inside the imageset directory>
# EMPIAR's data policy: "All data in EMPIAR is freely and publicly available ... under the CC0 license".
LICENSE = "CC0"
# Words in an imageset's data/header format that mean "files we can read as images".
_IMAGE_FORMATS = ("DM3", "DM4", "DM", "MRC", "MRCS", "TIFF", "TIF", "REC", "ST", "ALI")
# experiment_type values that name a related archive rather than how the data were imaged.
_NOT_IMAGING_METHODS = {"", "EMDB", "PDB", "OTHER"}
# How deep a `files` glob with "**" may descend.
_MAX_DEPTH = 8


class EmpiarOptions(DatasetOptions):
    imageset: str | None = None  # imageset name; default the first whose files are images
    files: str | None = None  # glob inside the imageset directory; default all image files in it

    @field_validator("files")
    @classmethod
    def _relative_glob(cls, value: str | None) -> str | None:
        if value is not None and (value.startswith("/") or ".." in PurePosixPath(value).parts or not value.strip()):
            raise ValueError(f"files must be a glob relative to the imageset directory, got {value!r}")
        return value


def accession_number(key: str) -> str:
    """'EMPIAR-11759' -> '11759'; the dataset key is the accession."""
    match = ACCESSION.match(key)
    if not match:
        raise SelectionError(f"empiar.{key}: the dataset key must be an EMPIAR accession such as EMPIAR-11759")
    return match.group(1)


def entry_record(document: Any, accession: str, url: str) -> dict[str, Any]:
    """The entry inside the API's answer, which has exactly one top-level key: the accession."""
    if not isinstance(document, dict) or len(document) != 1:
        keys = list(document)[:5] if isinstance(document, dict) else type(document).__name__
        raise SourceResponseError(f"{url}: expected one top-level key {accession!r}, got {keys}")
    key, record = next(iter(document.items()))
    if key != accession or not isinstance(record, dict):
        raise SourceResponseError(f"{url}: expected the entry under {accession!r}, got key {key!r}")
    return record


def _is_image_imageset(imageset: dict[str, Any]) -> bool:
    formats = f"{imageset.get('data_format') or ''} {imageset.get('header_format') or ''}".upper()
    return any(word in re.split(r"[^A-Z0-9]+", formats) for word in _IMAGE_FORMATS)


def choose_imageset(record: dict[str, Any], name: str | None, where: str) -> dict[str, Any]:
    listed = record.get("imagesets")
    if not isinstance(listed, list) or not listed or not all(isinstance(i, dict) for i in listed):
        raise SourceResponseError(f"{where}: the entry has no imagesets")
    imagesets: list[dict[str, Any]] = listed
    names = [str(i.get("name")) for i in imagesets]
    if name is not None:
        for imageset in imagesets:
            if imageset.get("name") == name:
                return imageset
        raise SelectionError(f"{where}: no imageset named {name!r}; the entry has {names}")
    # Prefer an imageset declared as images; else the first (its listing is filtered by suffix anyway).
    return next((i for i in imagesets if _is_image_imageset(i)), imagesets[0])


def imageset_directory(imageset: dict[str, Any], where: str) -> str:
    directory = imageset.get("directory")
    if not isinstance(directory, str) or not directory.strip("/ "):
        raise SourceResponseError(f"{where}: imageset {imageset.get('name')!r} has no directory")
    try:
        return safe_relative_path(directory.strip().strip("/"))
    except UnsafePathError as exc:
        raise UnsafePathError(f"{where}: imageset directory {directory!r}: {exc}") from None


def api_pixel_size_nm(imageset: dict[str, Any]) -> tuple[float, float] | None:
    """(y, x) pixel size from the API's pixel_height/pixel_width, which are in Ångström."""
    try:
        width = float(imageset.get("pixel_width") or 0)
        height = float(imageset.get("pixel_height") or imageset.get("pixel_width") or 0)
    except (TypeError, ValueError):
        return None
    if width <= 0 or height <= 0:
        return None
    return (to_nm(height, "Å", where="EMPIAR pixel_height"), to_nm(width, "Å", where="EMPIAR pixel_width"))


def _wanted(relpath: str, pattern: str | None) -> bool:
    if not relpath.lower().endswith(IMAGE_SUFFIXES):
        return False
    return fnmatch.fnmatchcase(relpath, pattern) if pattern else "/" not in relpath


def _max_depth(pattern: str | None) -> int:
    if pattern is None:
        return 0
    return _MAX_DEPTH if "**" in pattern else pattern.count("/")


class EmpiarSource(Source):
    name = "empiar"
    title = "EMPIAR, the Electron Microscopy Public Image Archive (EMBL-EBI)"
    Options = EmpiarOptions
    configuration = (
        Setting("empiar_api_url", "EM_INGEST_EMPIAR_API_URL", "https://www.ebi.ac.uk/empiar/api", "EMPIAR REST API"),
        Setting("empiar_files_url", "EM_INGEST_EMPIAR_FILES_URL", "https://ftp.ebi.ac.uk/empiar/world_availability",
                "EMPIAR file tree (https:// or ftp://)"),
    )
    # A shared public service: a couple of runs at a time, each with bounded parallel transfers.

    def __init__(self, settings: Settings, http: HttpClient | None = None):
        super().__init__(settings, http)
        # One FTP client for listings and downloads alike, so both share its settings and byte count.
        self.ftp = FtpClient(settings.transfer)
        self.transports.add(self.ftp)

    # ---- addresses ---------------------------------------------------------------------------
    def entry_url(self, accession: str) -> str:
        return f"{self.settings.empiar_api_url.rstrip('/')}/entry/{accession}/"

    def files_root(self) -> str:
        url: str = self.settings.empiar_files_url  # a declared setting (Settings gives those as Any)
        return url.rstrip("/")

    @property
    def over_ftp(self) -> bool:
        return self.files_root().lower().startswith("ftp://")

    def directory_url(self, number: str, directory: str) -> str:
        return f"{self.files_root()}/{number}/{quote(directory)}/"

    # ---- listing -----------------------------------------------------------------------------
    def list_directory(self, url: str) -> list[ListingEntry]:
        if self.over_ftp:
            return self.ftp.list_dir(url)
        page = self.http.get_bytes(url, headers={"Accept": "text/html"})
        return parse_autoindex(page.decode("utf-8", errors="replace"))

    def list_files(self, directory_url: str, pattern: str | None) -> list[ListedFile]:
        """(relative path, URL, what the listing says of it) of the wanted image files below `directory_url`,
        in natural order."""
        found: dict[str, tuple[str, RemoteObject | None]] = {}
        pending = [("", directory_url, 0)]
        while pending:
            prefix, url, depth = pending.pop()
            for entry in self.list_directory(url):
                relpath = f"{prefix}{entry.name}"
                # Every image-like name is checked, wanted or not: a hostile listing fails loudly.
                candidate = depth < _max_depth(pattern) if entry.is_dir else entry.name.lower().endswith(IMAGE_SUFFIXES)
                if not candidate:
                    continue
                if "/" in entry.name or "\\" in entry.name:
                    raise UnsafePathError(f"{url}: listing entry {entry.name!r} is not a single file name")
                try:
                    safe_relative_path(relpath)
                except UnsafePathError as exc:
                    raise UnsafePathError(f"{url}: refusing listing entry {entry.name!r}: {exc}") from None
                if not entry.is_dir and not _wanted(relpath, pattern):
                    continue
                child = url + quote(entry.name) + ("/" if entry.is_dir else "")
                if entry.is_dir:
                    pending.append((relpath + "/", child, depth + 1))
                else:
                    found[relpath] = (child, _listed_version(child, entry))
        return [(relpath, *found[relpath]) for relpath in map(str, natural_order(found))]

    # ---- Source interface ---------------------------------------------------------------------
    def discover(self) -> Iterable[InventoryItem]:
        # The file tree's top level names every public entry by number.
        root = self.files_root() + "/"
        for entry in self.list_directory(root):
            if entry.is_dir and entry.name.isdigit():
                yield InventoryItem(self.name, f"EMPIAR-{entry.name}", None,
                                    {"files_url": f"{root}{entry.name}/",
                                     "entry_url": self.entry_url(f"EMPIAR-{entry.name}")})

    def fetch_raw(self, request: DatasetRequest, raw: RawStore) -> Manifest:
        options = options_as(request, EmpiarOptions)
        number = accession_number(request.key)
        entry_url = self.entry_url(request.key)
        document = self.http.get_json(entry_url)
        record = entry_record(document, request.key, entry_url)
        imageset = choose_imageset(record, options.imageset, entry_url)
        directory_url = self.directory_url(number, imageset_directory(imageset, entry_url))
        files = self.imageset_files(directory_url, imageset, options.files)
        # The store picks HTTP or FTP by each URL's scheme: one path for both file trees. What an FTP listing
        # says of a file decides its refresh; for a file an autoindex page lists, the transport is asked.
        entries = raw.mirror([Wanted(url, f"{FILES_DIR}/{relpath}", remote=remote) for relpath, url, remote in files])
        entries.append(raw.store_document(ENTRY_DOCUMENT, entry_url, document))
        version = record.get("update_date") or record.get("release_date")
        return raw.commit(entries, request.options_dict(), source_version=str(version) if version else None)

    def imageset_files(self, directory_url: str, imageset: dict[str, Any],
                       pattern: str | None) -> list[ListedFile]:
        """(relative path, URL) of the imageset's wanted image files; refuses an imageset with none."""
        files = self.list_files(directory_url, pattern)
        announced = imageset.get("num_images_or_tilt_series")
        if pattern is None and isinstance(announced, int) and 0 < len(files) < announced:
            # The HTTPS front end is load-balanced and one backend was seen to omit files from its
            # listing: ask again and take the union before settling for fewer files than announced.
            files = _union(files, self.list_files(directory_url, pattern))
            if len(files) < announced:
                log.warning("%s: the API announces %d images for imageset %r but the listing has %d image files",
                            directory_url, announced, imageset.get("name"), len(files))
        if not files:
            raise SourceResponseError(
                f"{directory_url}: no image files ({', '.join(IMAGE_SUFFIXES)})"
                + (f" matching {pattern!r}" if pattern else "")
                + f" in imageset {imageset.get('name')!r}; choose another with `imageset` or `files`")
        return files

    def describe(self, request: DatasetRequest, raw: RawStore) -> Description:
        options = options_as(request, EmpiarOptions)
        number = accession_number(request.key)
        entry_url = self.entry_url(request.key)
        record = entry_record(raw.read_document(ENTRY_DOCUMENT), request.key, entry_url)
        imageset = choose_imageset(record, options.imageset, entry_url)
        citations = [c for c in record.get("citation") or [] if isinstance(c, dict)]
        experiment = str(record.get("experiment_type") or "").strip()
        files = self._raw_files(raw)
        with self.open_volume(request, raw) as volume:
            voxel_size_from = _voxel_size_sources(volume)
        return Description(
            title=record.get("title"),
            description=imageset.get("details") or imageset.get("name"),
            imaging_method=None if experiment.upper() in _NOT_IMAGING_METHODS else experiment,
            source_url=self.directory_url(number, imageset_directory(imageset, entry_url)),
            doi=record.get("entry_doi"),
            license=LICENSE,
            authors=_authors(record),
            source_version=str(record.get("update_date") or record.get("release_date") or "") or None,
            extra={
                "accession": request.key,
                "entry_url": entry_url,
                "citation_doi": next((c.get("doi") for c in citations if c.get("doi")), None),
                "citations": [{k: c.get(k) for k in ("title", "journal", "year", "doi", "pubmedid")} for c in citations],
                "imageset": {k: imageset.get(k) for k in ("name", "directory", "category", "data_format",
                                                          "header_format", "num_images_or_tilt_series",
                                                          "voxel_type", "pixel_width", "pixel_height",
                                                          "image_width", "image_height")},
                "files": len(files),
                "voxel_size_from": voxel_size_from,
            },
        )

    def open_volume(self, request: DatasetRequest, raw: RawStore) -> Volume:
        options = options_as(request, EmpiarOptions)
        record = entry_record(raw.read_document(ENTRY_DOCUMENT), request.key, self.entry_url(request.key))
        imageset = choose_imageset(record, options.imageset, self.entry_url(request.key))
        files = [raw.path(p) for p in self._raw_files(raw)]
        return open_files(files, api_pixel_size_nm(imageset), name=f"empiar/{request.key}")

    # ---- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _raw_files(raw: RawStore) -> list[str]:
        manifest = raw.previous
        if manifest is None:
            return []
        return [str(p) for p in natural_order(e.path for e in manifest.entries if e.path.startswith(FILES_DIR + "/"))]


def _authors(record: dict[str, Any]) -> tuple[str, ...]:
    authors = [a for a in record.get("authors") or [] if isinstance(a, dict) and a.get("name")]
    if authors:
        return tuple(str(a["name"]) for a in sorted(authors, key=lambda a: a.get("order_id", 0)))
    people = [p for p in record.get("principal_investigator") or [] if isinstance(p, dict)]
    return tuple(" ".join(filter(None, (p.get("first_name"), p.get("last_name")))) for p in people)


def _union(first: list[ListedFile], second: list[ListedFile]) -> list[ListedFile]:
    """Two listings of one directory as one, in natural order (a file either names counts)."""
    merged = {file[0]: file for file in first} | {file[0]: file for file in second}
    return [merged[relpath] for relpath in map(str, natural_order(merged))]


def _listed_version(url: str, entry: ListingEntry) -> RemoteObject | None:
    """The file's version as its listing gives it, when that is enough to decide a refresh (exact size and
    modification time: an FTP MLSD listing); None: the transport is asked (SIZE and MDTM, or a HEAD)."""
    if entry.size is None or entry.modified is None:
        return None
    return RemoteObject(url, entry.size, last_modified=entry.modified)


def _voxel_size_sources(volume: Volume) -> dict[str, str | None]:
    """Where each part of the voxel size came from ("file", "archive" API, or None: override needed)."""
    if isinstance(volume, (PlaneStack, TiffStack)):
        return {"xy": volume.pixel_size_from, "z": volume.z_spacing_from}
    origin = "file" if volume.geometry is not None else None
    return {"xy": origin, "z": origin}


def open_files(files: list[Path], fallback_pixel_size_nm: tuple[float, float] | None, *, name: str) -> Volume:
    """The volume of an imageset's downloaded files, in natural order: one file that is a volume by itself, else
    a series of 2-D files as z. `fallback_pixel_size_nm` (y, x) is the API's, used where the files state none."""
    if len(files) == 1:
        single = _single_file_volume(files[0], fallback_pixel_size_nm)
        if single is not None:
            return single
    # The API states no slice spacing, so z comes from the files or from the curator override.
    return PlaneStack(files, fallback_pixel_size_nm=fallback_pixel_size_nm, name=name)


def _single_file_volume(path: Path, fallback_xy: tuple[float, float] | None) -> Volume | None:
    """A file that is a whole volume by itself (MRC tomogram, multipage TIFF, 3-D DM), else None."""
    suffix = path.suffix.lower()
    if suffix in MRC_SUFFIXES and read_mrc_header(path).shape[0] > 1:
        return MrcVolume(path)
    if suffix in TIFF_SUFFIXES:
        # The TIFF's own calibration (ImageJ, FEI) first, the API's pixel size where it states none.
        stack = TiffStack(path, fallback_pixel_size_nm=fallback_xy)
        if stack.shape[0] > 1:
            return stack
        stack.close()
    if suffix in DM_SUFFIXES:
        image = read_dm(path)
        if len(image.shape) == 3:
            pixel = image.pixel_size_nm or fallback_xy
            # The file's own placement only with its own calibration: an origin in pixels means nothing at
            # the archive's pixel size.
            translation = triple(image.translation_nm) if image.translation_nm and image.pixel_size_nm else None
            geometry = Geometry((image.slice_spacing_nm, *pixel), "source-metadata", translation) \
                if pixel and image.slice_spacing_nm else None
            return ArrayVolume(image.array(), geometry, name=str(path))
    return None


SOURCE = EmpiarSource
