"""Image Data Resource: OMERO.web metadata, voxels from IDR's OME-Zarr copy or the original file."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import numcodecs.errors
import numpy as np
import zarr
import zarr.errors
import zarr.storage

from em_ingest.errors import (
    FormatError, SelectionError, SourceResponseError, TransferError, UnsupportedDataError,
)
from em_ingest.formats import imagej
from em_ingest.formats.tiff import TiffStack
from em_ingest.formats.volume import Geometry, Region, Volume
from em_ingest.raw import Manifest, ManifestEntry, RawStore, TransferStats, safe_relative_path
from em_ingest.selection import DatasetOptions, DatasetRequest, load_selection
from em_ingest.settings import Settings
from em_ingest.sources.base import Description, InventoryItem, Source
from em_ingest.transfer.http import HttpClient

# Raw layout: the OMERO answers as served, then either the Zarr copy's objects or the original file.
IMG_DATA = "omero/imgData.json"
IMAGE = "omero/image.json"
IMAGE_ANNOTATIONS = "omero/image_map_annotations.json"
PATHS_TO_OBJECT = "omero/paths_to_object.json"
CONTAINER = "omero/container.json"
CONTAINER_ANNOTATIONS = "omero/container_map_annotations.json"
ZARR_PROBE = "zarr_probe.json"
# Which chunks of the mirrored level the bucket does not hold (404): zarr reads them as the fill value.
ZARR_ABSENT = "zarr_absent_chunks.json"
ORIGINAL_FILE_PATHS = "omero/original_file_paths.json"

VOXELS_ZARR = "ome-zarr"
VOXELS_ORIGINAL = "original-file"
# IDR is a shared public service: a few requests at a time (SOURCES.md 3.7).
MAX_IN_FLIGHT = 4
PAGE_LIMIT = 200
# U2OS_chromatin (idr0086 experimentD): what discovery lists when the selection names no IDR image.
DEFAULT_DISCOVERY_DATASET = 10740
# "idr0086-miron-micrographs/experimentD" -> ("idr0086", "D"); screens end in "/screenA".
_CONTAINER_NAME = re.compile(r"^(idr\d{4})-[^/]*/(?:experiment|screen)([A-Za-z0-9]+)$")
_TIFF_SUFFIXES = (".tif", ".tiff")
# How far the file's own calibration may differ from OMERO's before it is worth a note.
_VOXEL_SIZE_RELATIVE_TOLERANCE = 1e-3


class IdrOptions(DatasetOptions):
    """The dataset key is the IDR image id; nothing else to choose."""


def study_of(container_name: str | None) -> str | None:
    """The OME-Zarr study folder of an OMERO project or screen name: `idrNNNN-…/experimentX` -> `idrNNNNX`."""
    if not container_name:
        return None
    match = _CONTAINER_NAME.match(container_name.strip())
    return f"{match.group(1)}{match.group(2)}" if match else None


def map_values(document: Any, *, where: str) -> dict[str, list[str]]:
    """Key -> values of every map annotation in a `/webclient/api/annotations/` answer (keys may repeat)."""
    if not isinstance(document, dict) or not isinstance(document.get("annotations"), list):
        raise SourceResponseError(f"{where}: expected {{'annotations': [...]}} from OMERO.web")
    values: dict[str, list[str]] = {}
    for annotation in document["annotations"]:
        for pair in annotation.get("values") or []:
            if isinstance(pair, (list, tuple)) and len(pair) == 2 and pair[1] not in (None, ""):
                values.setdefault(str(pair[0]).strip(), []).append(str(pair[1]).strip())
    return values


def bare_doi(value: str | None) -> str | None:
    """`https://doi.org/10.x/y` -> `10.x/y`; the catalog keeps DOIs without a resolver."""
    if not value:
        return None
    match = re.search(r"10\.\d{4,9}/\S+", value)
    return match.group(0).rstrip(".") if match else None


@dataclass(frozen=True)
class Container:
    """The project or screen an image belongs to."""

    kind: str  # "project" or "screen"
    id: int
    name: str | None


class IdrSource(Source):
    name = "idr"
    title = "Image Data Resource (OMERO.web, IDR file mirror and OME-Zarr copies)"
    Options = IdrOptions
    max_concurrent_runs = 2

    def __init__(self, settings: Settings, http: HttpClient | None = None):
        super().__init__(settings, http)
        self._json_cache: dict[str, Any] = {}  # one run never asks OMERO.web the same question twice

    # ---- URLs -------------------------------------------------------------------------------
    def omero_url(self, path: str, params: dict[str, Any] | None = None) -> str:
        url = f"{self.settings.idr_url.rstrip('/')}/{path.lstrip('/')}"
        return f"{url}?{urlencode(params)}" if params else url

    def zarr_url(self, study: str, image_id: int) -> str:
        return f"{self.settings.idr_zarr_url.rstrip('/')}/{study}/{image_id}.zarr"

    def file_url(self, client_path: str) -> str | None:
        """The IDR file-mirror URL of an OMERO client path, if it lies under `filesets/`."""
        marker = "filesets/"
        index = client_path.find(marker)
        if index < 0 or (index > 0 and client_path[index - 1] != "/"):
            return None
        relative = client_path[index + len(marker):].strip("/")
        return f"{self.settings.idr_files_url.rstrip('/')}/{quote(relative)}"

    def viewer_url(self, image_id: int) -> str:
        return self.omero_url(f"/webclient/img_detail/{image_id}/")

    # ---- JSON with a per-run cache ------------------------------------------------------------
    def get_json(self, url: str) -> Any:
        if url not in self._json_cache:
            self._json_cache[url] = self.http.get_json(url)
        return self._json_cache[url]

    # ---- discovery --------------------------------------------------------------------------
    def discover(self) -> Iterable[InventoryItem]:
        """Images of the projects (or datasets) that hold the selected images; U2OS_chromatin by default."""
        seen: set[int] = set()
        for kind, container_id in self._discovery_seeds():
            images = (self.images_of_project(container_id) if kind == "project"
                      else self.images_of_dataset(container_id))
            for item in images:
                image_id = item.detail["image_id"]
                if image_id not in seen:
                    seen.add(image_id)
                    yield item

    def _discovery_seeds(self) -> list[tuple[str, int]]:
        from em_ingest.sources import option_models  # the registry imports this module: resolve at call time

        selected = {}
        if Path(self.settings.datasets_file).exists():
            selected = load_selection(self.settings.datasets_file, option_models()).get(self.name, {})
        seeds: list[tuple[str, int]] = []
        for key in selected:
            if not key.isdigit():
                continue
            meta = self._img_data(int(key)).get("meta") or {}
            if isinstance(meta.get("projectId"), int):
                seeds.append(("project", meta["projectId"]))
            elif isinstance(meta.get("datasetId"), int):
                seeds.append(("dataset", meta["datasetId"]))
        return list(dict.fromkeys(seeds)) or [("dataset", DEFAULT_DISCOVERY_DATASET)]

    def paged(self, path: str, limit: int = PAGE_LIMIT) -> Iterator[dict[str, Any]]:
        """Every object of a JSON-API list, page by page with `offset`/`limit` until `meta.totalCount`."""
        offset = 0
        while True:
            url = self.omero_url(path, {"offset": offset, "limit": limit})
            page = self.get_json(url)
            data, meta = page.get("data"), page.get("meta") or {}
            if not isinstance(data, list):
                raise SourceResponseError(f"{url}: expected {{'data': [...], 'meta': {{...}}}}")
            yield from data
            offset += len(data)
            total = meta.get("totalCount")
            if not data or (isinstance(total, int) and offset >= total) or (total is None and len(data) < limit):
                return

    def images_of_dataset(self, dataset_id: int, dataset_name: str | None = None,
                          limit: int = PAGE_LIMIT) -> Iterator[InventoryItem]:
        for image in self.paged(f"/api/v0/m/datasets/{dataset_id}/images/", limit):
            pixels = image.get("Pixels") or {}
            image_id = image.get("@id")
            if not isinstance(image_id, int):
                raise SourceResponseError(f"IDR dataset {dataset_id}: image without an integer '@id': {image}")
            shape = {axis: pixels.get(f"Size{axis}") for axis in "TCZYX"}
            yield InventoryItem(self.name, str(image_id), image.get("Name"),
                                {"image_id": image_id, "dataset_id": dataset_id, "dataset": dataset_name,
                                 "size_tczyx": [shape[a] for a in "TCZYX"],
                                 "pixels_type": (pixels.get("Type") or {}).get("value"),
                                 "url": self.viewer_url(image_id)})

    def images_of_project(self, project_id: int, limit: int = PAGE_LIMIT) -> Iterator[InventoryItem]:
        for dataset in self.paged(f"/api/v0/m/projects/{project_id}/datasets/", limit):
            yield from self.images_of_dataset(dataset["@id"], dataset.get("Name"), limit)

    # ---- fetch ------------------------------------------------------------------------------
    def fetch_raw(self, request: DatasetRequest, raw: RawStore) -> Manifest:
        image_id = image_id_of(request)
        docs = _Documents(raw)
        img_data = self._img_data(image_id)
        docs.add(IMG_DATA, self.omero_url(f"/webgateway/imgData/{image_id}/"), img_data)
        check_single_channel(img_data, image_id)
        docs.add(IMAGE, self.omero_url(f"/api/v0/m/images/{image_id}/"),
                 self.get_json(self.omero_url(f"/api/v0/m/images/{image_id}/")))
        url = self.omero_url("/webclient/api/annotations/", {"type": "map", "image": image_id})
        docs.add(IMAGE_ANNOTATIONS, url, self.get_json(url))
        container = self._container(image_id, img_data, docs)
        if container is not None:
            url = self.omero_url("/webclient/api/annotations/", {"type": "map", container.kind: container.id})
            docs.add(CONTAINER_ANNOTATIONS, url, self.get_json(url))

        study = study_of(container.name if container else None)
        zattrs = self._probe_zarr(raw, study, image_id, docs)
        if zattrs is not None:
            zarr_url = self.zarr_url(study, image_id)  # type: ignore[arg-type]  # found, so there is a study
            entries, stats, version = self._mirror_zarr(raw, zarr_url, image_id, zattrs, docs)
        else:
            entries, stats, version = self._fetch_original(raw, image_id, docs)
        return raw.commit(docs.entries + entries, request.options_dict(), docs.stats + stats, source_version=version)

    def _img_data(self, image_id: int) -> dict[str, Any]:
        url = self.omero_url(f"/webgateway/imgData/{image_id}/")
        try:
            document = self.get_json(url)
        except TransferError as exc:
            if exc.status == 404:
                raise SelectionError(f"idr.{image_id}: IDR has no image {image_id} ({url} answered 404)") from None
            raise
        if not isinstance(document, dict) or not isinstance(document.get("size"), dict):
            raise SourceResponseError(f"{url}: expected imgData JSON with 'size' and 'meta'")
        return document

    def _container(self, image_id: int, img_data: dict[str, Any], docs: _Documents) -> Container | None:
        """The image's project (named in imgData) or, for plate images, its screen (via paths_to_object)."""
        meta = img_data.get("meta") or {}
        if isinstance(meta.get("projectId"), int):
            return Container("project", meta["projectId"], meta.get("projectName"))
        url = self.omero_url("/webclient/api/paths_to_object/", {"image": image_id})
        paths = self.get_json(url)
        docs.add(PATHS_TO_OBJECT, url, paths)
        for path in paths.get("paths") or []:
            for node in path:
                if node.get("type") in ("screen", "project") and isinstance(node.get("id"), int):
                    kind, container_id = node["type"], node["id"]
                    detail_url = self.omero_url(f"/api/v0/m/{kind}s/{container_id}/")
                    detail = self.get_json(detail_url)
                    docs.add(CONTAINER, detail_url, detail)
                    return Container(kind, container_id, (detail.get("data") or {}).get("Name"))
        return None

    def _probe_zarr(self, raw: RawStore, study: str | None, image_id: int,
                    docs: _Documents) -> tuple[ManifestEntry, TransferStats] | None:
        """Mirror the `.zattrs` of IDR's OME-Zarr copy if there is one; the probe's outcome is kept for provenance."""
        if study is None:
            docs.add(ZARR_PROBE, self.settings.idr_zarr_url, {"found": False, "reason": "no idrNNNN study name"})
            return None
        url = f"{self.zarr_url(study, image_id)}/.zattrs"
        try:
            fetched = raw.fetch_http(url, f"{zarr_root(image_id)}/.zattrs")
        except TransferError as exc:
            # S3 answers 403 for a missing key when listing is not public, 404 otherwise.
            if exc.status in (403, 404):
                docs.add(ZARR_PROBE, url, {"found": False, "status": exc.status})
                return None
            raise
        docs.add(ZARR_PROBE, url, {"found": True})
        return fetched

    def _mirror_zarr(self, raw: RawStore, zarr_url: str, image_id: int, zattrs: tuple[ManifestEntry, TransferStats],
                     docs: _Documents) -> tuple[list[ManifestEntry], TransferStats, str]:
        """Mirror the copy under its own object names: `.zattrs`, `.zgroup`, the full-resolution level's `.zarray`
        and chunks, so zarr-python opens raw/ as it would open the bucket. A 404 chunk is recorded as absent."""
        root = zarr_root(image_id)
        entries, stats = [zattrs[0]], zattrs[1]
        multiscale = multiscale_of(read_json(raw.path(f"{root}/.zattrs"), url=f"{zarr_url}/.zattrs"),
                                   where=f"{zarr_url}/.zattrs")
        level = multiscale.level_path
        zgroup = _fetch_if_present(raw, f"{zarr_url}/.zgroup", f"{root}/.zgroup")  # bioformats2raw writes one
        zarray = raw.fetch_http(f"{zarr_url}/{level}/.zarray", f"{root}/{level}/.zarray")
        for entry, s in (zgroup, zarray):
            if entry is not None:
                entries.append(entry)
            stats = stats + s
        array = open_mirrored_array(raw.path(root), level, where=f"{zarr_url}/{level}")
        multiscale = multiscale.for_rank(array.ndim, where=zarr_url)
        multiscale.check_axes(array.shape, where=zarr_url)

        keys = [array.metadata.encode_chunk_key(index) for index in product(*map(range, array.cdata_shape))]
        items = [(f"{zarr_url}/{level}/{key}", f"{root}/{level}/{key}") for key in keys]
        with ThreadPoolExecutor(max_workers=max(1, min(MAX_IN_FLIGHT, self.settings.transfer.max_in_flight))) as pool:
            results = list(pool.map(lambda item: _fetch_if_present(raw, *item), items))
        for entry, s in results:
            if entry is not None:
                entries.append(entry)
            stats = stats + s
        absent = sorted(key for key, (entry, _) in zip(keys, results) if entry is None)
        docs.add(ZARR_ABSENT, f"{zarr_url}/{level}/",
                 {"level": level, "absent": absent, "meaning": "HTTP 404: never written, read as fill_value"})
        version = hashlib.sha256(f"{zattrs[0].sha256}:{zarray[0].sha256}".encode()).hexdigest()[:16]
        return entries, stats, f"ome-zarr:{version}"

    def _fetch_original(self, raw: RawStore, image_id: int,
                        docs: _Documents) -> tuple[list[ManifestEntry], TransferStats, str | None]:
        url = self.omero_url(f"/webgateway/original_file_paths/{image_id}/")
        paths = self.get_json(url)
        docs.add(ORIGINAL_FILE_PATHS, url, paths)
        client = paths.get("client") if isinstance(paths, dict) else None
        if not isinstance(client, list) or not client:
            raise SourceResponseError(f"{url}: expected {{'client': [paths...]}} naming the original file(s)")
        urls = [self.file_url(p) for p in client]
        if any(u is None for u in urls):
            raise UnsupportedDataError(f"IDR image {image_id}: original file paths {client} are not under "
                                       "'filesets/', so they are not on the IDR file mirror")
        if len(urls) != 1:
            raise UnsupportedDataError(f"IDR image {image_id}: its fileset has {len(urls)} files ({client}); only "
                                       "single-file originals are ingested (and no OME-Zarr copy was found)")
        file_url = urls[0]
        name = client[0].rstrip("/").rsplit("/", 1)[-1]
        if not name.lower().endswith(_TIFF_SUFFIXES):
            raise UnsupportedDataError(f"IDR image {image_id}: original file {name!r} is not a TIFF; only TIFF "
                                       "originals are read (and no OME-Zarr copy was found)")
        entry, stats = raw.fetch_http(file_url, f"original/{safe_relative_path(name)}")  # type: ignore[arg-type]
        return [entry], stats, entry.etag or entry.last_modified

    # ---- describe ---------------------------------------------------------------------------
    def describe(self, request: DatasetRequest, raw: RawStore) -> Description:
        image_id = image_id_of(request)
        img_data = raw.read_document(IMG_DATA)
        meta = img_data.get("meta") or {}
        image_values = map_values(raw.read_document(IMAGE_ANNOTATIONS), where=str(raw.path(IMAGE_ANNOTATIONS)))
        study_values: dict[str, list[str]] = {}
        if raw.path(CONTAINER_ANNOTATIONS).exists():
            study_values = map_values(raw.read_document(CONTAINER_ANNOTATIONS),
                                      where=str(raw.path(CONTAINER_ANNOTATIONS)))

        def first(*keys: str, sources=(image_values, study_values)) -> str | None:
            for values in sources:
                for key in keys:
                    if values.get(key):
                        return values[key][0]
            return None

        image_name = meta.get("imageName") or None
        study_title = first("Study Title", "Publication Title", sources=(study_values,))
        title = f"{image_name} — {study_title}" if image_name and study_title else (image_name or study_title)
        authors = first("Publication Authors", sources=(study_values,))
        voxels, voxel_url = self._voxel_origin(raw, image_id)
        omero_nm = omero_voxel_size_nm(img_data)
        file_nm = self._file_voxel_size_nm(raw, image_id, voxels)
        container_name = meta.get("projectName") if isinstance(meta.get("projectId"), int) else \
            self._container_name(raw)
        extra: dict[str, Any] = {
            "image_id": image_id, "image_name": image_name, "voxels_from": voxels, "voxels_url": voxel_url,
            "project_or_screen": container_name, "study": study_of(container_name),
            "dataset": meta.get("datasetName"), "dataset_id": meta.get("datasetId"),
            "publication_doi": bare_doi(first("Publication DOI", sources=(study_values,))),
            "publication_title": first("Publication Title", sources=(study_values,)),
            "copyright": first("Copyright", sources=(study_values,)),
            "cell_line": first("Cell Line", sources=(image_values,)),
            "voxel_size_nm_omero": list(omero_nm) if omero_nm else None,
            "voxel_size_nm_file": list(file_nm) if file_nm else None,
        }
        if omero_nm and file_nm and not _close(omero_nm, file_nm):
            extra["voxel_size_note"] = "the file's calibration and OMERO's physical sizes differ; the file's is used"
        return Description(
            title=title,
            description=first("Image Description", "Assay Description", sources=(image_values,))
            or meta.get("imageDescription") or meta.get("projectDescription") or None,
            organism=first("Organism"),
            sample=first("Cell Line", sources=(image_values,)) or meta.get("datasetName") or None,
            imaging_method=first("Imaging Method", sources=(study_values, image_values)),
            source_url=self.viewer_url(image_id),
            doi=bare_doi(first("Data DOI", sources=(study_values,))),
            license=first("License", sources=(study_values, image_values)),
            authors=tuple(a.strip() for a in re.split(r",\s*", authors) if a.strip()) if authors else (),
            source_version=raw.previous.source_version if raw.previous else None,
            extra={k: v for k, v in extra.items() if v is not None},
        )

    def _container_name(self, raw: RawStore) -> str | None:
        if raw.path(CONTAINER).exists():
            return (raw.read_document(CONTAINER).get("data") or {}).get("Name")
        return None

    def _voxel_origin(self, raw: RawStore, image_id: int) -> tuple[str, str | None]:
        manifest = raw.previous
        if manifest is None:
            raise FormatError(f"{raw.dir}: no raw manifest; fetch the raw download first")
        for entry in manifest.entries:
            if entry.path == f"{zarr_root(image_id)}/.zattrs":
                return VOXELS_ZARR, entry.url.removesuffix("/.zattrs")
        for entry in manifest.entries:
            if entry.path.startswith("original/"):
                return VOXELS_ORIGINAL, entry.url
        raise FormatError(f"{raw.manifest_path}: neither an OME-Zarr copy nor an original file was fetched")

    def _file_voxel_size_nm(self, raw: RawStore, image_id: int, voxels: str) -> tuple[float, float, float] | None:
        if voxels == VOXELS_ZARR:
            path = raw.path(f"{zarr_root(image_id)}/.zattrs")
            return multiscale_of(read_json(path, url=str(path)), where=str(path)).voxel_size_nm(where=str(path))
        calibration = imagej.read_calibration(self._original_path(raw))
        return calibration.voxel_size_nm if calibration else None

    def _original_path(self, raw: RawStore) -> Path:
        manifest = raw.previous
        entries = [e for e in (manifest.entries if manifest else ()) if e.path.startswith("original/")]
        if len(entries) != 1:
            raise FormatError(f"{raw.dir}: expected one original file in the raw manifest, found {len(entries)}")
        return raw.path(entries[0].path)

    # ---- open -------------------------------------------------------------------------------
    def open_volume(self, request: DatasetRequest, raw: RawStore) -> Volume:
        image_id = image_id_of(request)
        img_data = raw.read_document(IMG_DATA)
        check_single_channel(img_data, image_id)
        omero_nm = omero_voxel_size_nm(img_data)
        voxels, _ = self._voxel_origin(raw, image_id)
        if voxels == VOXELS_ZARR:
            return self._open_zarr(raw, image_id, omero_nm)
        path = self._original_path(raw)
        calibration = imagej.read_calibration(path)
        file_nm = calibration.voxel_size_nm if calibration else None
        voxel_size_nm = file_nm or omero_nm
        geometry = Geometry(voxel_size_nm, "source-metadata") if voxel_size_nm else None
        return TiffStack(path, geometry)

    def _open_zarr(self, raw: RawStore, image_id: int, omero_nm: tuple[float, float, float] | None) -> Volume:
        root = zarr_root(image_id)
        where = str(raw.path(f"{root}/.zattrs"))
        multiscale = multiscale_of(read_json(raw.path(f"{root}/.zattrs"), url=where), where=where)
        level = multiscale.level_path
        array = open_mirrored_array(raw.path(root), level, where=str(raw.path(f"{root}/{level}")))
        multiscale = multiscale.for_rank(array.ndim, where=where)
        multiscale.check_axes(array.shape, where=where)
        absent = raw.read_document(ZARR_ABSENT)
        if absent.get("level") != level:
            raise FormatError(f"{raw.path(ZARR_ABSENT)}: lists absent chunks of level {absent.get('level')!r}, "
                              f"not of {level!r}; re-run the raw download")
        voxel_size_nm = multiscale.voxel_size_nm(where=where) or omero_nm
        geometry = None
        if voxel_size_nm:
            geometry = Geometry(voxel_size_nm, "source-metadata", multiscale.translation_nm(where=where))
        return MirroredZarrVolume(array, raw.path(f"{root}/{level}"), multiscale.axes, frozenset(absent["absent"]),
                                  geometry, name=str(raw.path(f"{root}/{level}")))


# ---- helpers ----------------------------------------------------------------------------------

def image_id_of(request: DatasetRequest) -> int:
    if not request.key.isdigit():
        raise SelectionError(f"idr.{request.key}: the dataset key must be an IDR image id (digits only)")
    return int(request.key)


def check_single_channel(img_data: dict[str, Any], image_id: int) -> None:
    """Refuse multi-channel images and time series up front, before any voxel is downloaded."""
    size = img_data.get("size") or {}
    channels, timepoints = size.get("c", 1), size.get("t", 1)
    if channels != 1 or timepoints != 1:
        raise UnsupportedDataError(
            f"IDR image {image_id} has {channels} channels and {timepoints} timepoints "
            f"(size {size}); only single-channel, single-timepoint volumes are ingested for now")


def omero_voxel_size_nm(img_data: dict[str, Any]) -> tuple[float, float, float] | None:
    """imgData's `pixel_size` (micrometres, null when unknown) as (z, y, x) nanometres."""
    pixel_size = img_data.get("pixel_size") or {}
    x, y, z = (pixel_size.get(axis) for axis in "xyz")
    if z is None and (img_data.get("size") or {}).get("z") == 1:
        z = x  # a single plane has no z spacing; give it the pixel width
    sizes = (z, y, x)
    if any(not isinstance(v, (int, float)) or v <= 0 for v in sizes):
        return None
    return tuple(float(v) * 1000.0 for v in sizes)  # type: ignore[return-value]


def _close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(math.isclose(x, y, rel_tol=_VOXEL_SIZE_RELATIVE_TOLERANCE) for x, y in zip(a, b))


class _Documents:
    """OMERO.web answers kept in raw/ for provenance; unchanged ones count as skipped, not fetched."""

    def __init__(self, raw: RawStore):
        self.raw = raw
        self.entries: list[ManifestEntry] = []
        self.stats = TransferStats()

    def add(self, relpath: str, url: str, document: Any) -> None:
        previous = self.raw.previous_entry(relpath)
        entry = self.raw.store_document(relpath, url, document)
        self.entries.append(entry)
        if previous is not None and previous.sha256 == entry.sha256:
            self.stats = self.stats + TransferStats(skipped_objects=1, skipped_bytes=entry.size)
        else:
            self.stats = self.stats + TransferStats(fetched_objects=1, fetched_bytes=entry.size)


def zarr_root(image_id: int) -> str:
    """Where an image's OME-Zarr copy is mirrored inside its raw folder: under its own object name."""
    return f"{image_id}.zarr"


def read_json(path: Path, *, url: str) -> Any:
    """A mirrored JSON object; `url` names where it came from when it is not JSON."""
    try:
        return json.loads(path.read_bytes())
    except ValueError as exc:
        raise SourceResponseError(f"{url}: expected JSON ({exc})") from None


def _fetch_if_present(raw: RawStore, url: str, relpath: str) -> tuple[ManifestEntry | None, TransferStats]:
    """fetch_http, with 404 meaning "not there": in Zarr v2 an unwritten chunk or optional `.zgroup`."""
    try:
        return raw.fetch_http(url, relpath)
    except TransferError as exc:
        if exc.status == 404:
            return None, TransferStats()
        raise


# ---- OME-Zarr (NGFF 0.1-0.4, Zarr v2) ------------------------------------------------------------

_DEFAULT_AXES = {5: ["t", "c", "z", "y", "x"], 4: ["c", "z", "y", "x"], 3: ["z", "y", "x"], 2: ["y", "x"]}


@dataclass(frozen=True)
class Multiscale:
    """The first `multiscales` entry of an OME-Zarr image group, reduced to its full-resolution level."""

    document: dict[str, Any]
    axes: list[str]  # names in array order, e.g. t, c, z, y, x
    units: dict[str, str | None]
    level_path: str

    def for_rank(self, rank: int, *, where: str) -> Multiscale:
        """Itself, with the axes NGFF 0.1-0.3 left implicit (t, c, z, y, x by rank) filled in."""
        if self.axes:
            return self
        if rank not in _DEFAULT_AXES:
            raise FormatError(f"{where}: no axes given and rank {rank} has no default axis order")
        return Multiscale(self.document, _DEFAULT_AXES[rank], {}, self.level_path)

    def check_axes(self, shape: tuple[int, ...], *, where: str) -> None:
        if len(shape) != len(self.axes):
            raise FormatError(f"{where}: multiscales names axes {self.axes} but the array has shape {shape}")
        extra = {a: n for a, n in zip(self.axes, shape) if a not in ("z", "y", "x") and n != 1}
        if extra:
            raise UnsupportedDataError(f"{where}: axes {dict(zip(self.axes, shape))} have {extra} beyond one; "
                                       "only single-channel, single-timepoint volumes are ingested for now")
        if "y" not in self.axes or "x" not in self.axes:
            raise UnsupportedDataError(f"{where}: expected spatial axes y and x, got {self.axes}")

    def _transforms(self, *, where: str) -> tuple[list[float] | None, list[float] | None]:
        """(scale, translation) of the full-resolution level, composed with the multiscale-wide ones.

        NGFF applies the level's transforms first, then the multiscale's: x -> g_s * (s * x + t) + g_t.
        """
        def read(transforms: Any) -> tuple[list[float] | None, list[float] | None]:
            found: dict[str, list[float]] = {}
            for transform in transforms or []:
                kind = transform.get("type")
                if kind in ("scale", "translation") and kind in transform:
                    values = [float(v) for v in transform[kind]]
                    if len(values) != len(self.axes):
                        raise FormatError(f"{where}: {kind} {values} does not match axes {self.axes}")
                    found[kind] = values
            return found.get("scale"), found.get("translation")

        scale, translation = read(self.document["datasets"][0].get("coordinateTransformations"))
        outer_scale, outer_translation = read(self.document.get("coordinateTransformations"))
        if outer_scale is not None:
            scale = [a * b for a, b in zip(scale, outer_scale)] if scale else outer_scale
            translation = [a * b for a, b in zip(translation, outer_scale)] if translation else None
        if outer_translation is not None:
            translation = [a + b for a, b in zip(translation, outer_translation)] if translation else outer_translation
        return scale, translation

    def _spatial_nm(self, values: list[float], *, where: str) -> tuple[float, float, float] | None:
        """(z, y, x) nanometres of a per-axis transform; None when a spatial axis has no unit.

        bioformats2raw writes scale 1.0 without a unit when the original had no physical size, so a
        missing unit means "unknown", not "pixels are 1 long".
        """
        out: list[float | None] = []
        for axis in ("z", "y", "x"):
            if axis not in self.axes:
                out.append(None)
                continue
            unit = self.units.get(axis)
            if not unit:
                return None
            out.append(values[self.axes.index(axis)] * imagej.nm_per_unit(unit, where=where))
        if out[0] is None:
            out[0] = out[2]  # a single plane: give z the pixel width
        return tuple(out)  # type: ignore[return-value]

    def voxel_size_nm(self, *, where: str) -> tuple[float, float, float] | None:
        scale, _ = self._transforms(where=where)
        return self._spatial_nm(scale, where=where) if scale else None

    def translation_nm(self, *, where: str) -> tuple[float, float, float] | None:
        _, translation = self._transforms(where=where)
        nm = self._spatial_nm(translation, where=where) if translation else None
        if nm is None:
            return None
        return (0.0 if "z" not in self.axes else nm[0], nm[1], nm[2])


def multiscale_of(zattrs: Any, *, where: str) -> Multiscale:
    try:
        document = zattrs["multiscales"][0]
        datasets = document["datasets"]
        level_path = safe_relative_path(str(datasets[0]["path"]))
    except (KeyError, IndexError, TypeError) as exc:
        raise FormatError(f"{where}: not an OME-Zarr image group (no multiscales[0].datasets[0].path: {exc})") from None
    raw_axes = document.get("axes")
    if raw_axes is None:
        return Multiscale(document, [], {}, level_path)  # filled in from the array's rank below
    names, units = [], {}
    for axis in raw_axes:
        name = axis.get("name") if isinstance(axis, dict) else str(axis)
        names.append(str(name).lower())
        units[str(name).lower()] = axis.get("unit") if isinstance(axis, dict) else None
    return Multiscale(document, names, units, level_path)


def open_mirrored_array(root: Path, level: str, *, where: str) -> zarr.Array:
    """The mirrored Zarr v2 array `level` of the image group at `root`, opened read-only by zarr-python.

    Opening reads only `.zarray`, so this also checks a fresh `.zarray` before any chunk is fetched.
    """
    try:
        array = zarr.open_array(zarr.storage.LocalStore(root, read_only=True), path=level, mode="r", zarr_format=2)
    except (zarr.errors.UnknownCodecError, numcodecs.errors.UnknownCodecError) as exc:  # v3 and v2 codecs
        raise UnsupportedDataError(f"{where}: unsupported Zarr codec ({exc})") from None
    except zarr.errors.NodeNotFoundError:
        raise FormatError(f"{where}: no Zarr v2 array there (expected {level}/.zarray)") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise FormatError(f"{where}: not a Zarr v2 array description ({type(exc).__name__}: {exc})") from None
    if not isinstance(array.dtype, np.dtype) or array.dtype.kind not in "biuf":
        raise UnsupportedDataError(f"{where}: dtype {array.dtype} is not a numeric voxel type")
    return array


class MirroredZarrVolume(Volume):
    """A mirrored OME-Zarr level read lazily by zarr-python; (t, c, z, y, x) with t = c = 1 seen as (z, y, x).

    Chunks absent at the source (404) read as the fill value, as Zarr specifies; a chunk neither
    mirrored nor recorded as absent means the raw download is incomplete, which is an error rather
    than silently the fill value.
    """

    def __init__(self, array: zarr.Array, array_dir: Path, axes: list[str], absent: frozenset[str],
                 geometry: Geometry | None, *, name: str):
        if len(axes) != array.ndim:
            raise FormatError(f"{name}: axes {axes} do not match an array of shape {array.shape}")
        self._array = array
        self._array_dir = array_dir
        self._axes = axes
        self._absent = absent
        self._spatial = {axis: axes.index(axis) for axis in ("z", "y", "x") if axis in axes}
        self.shape = tuple(  # type: ignore[assignment]
            array.shape[self._spatial[a]] if a in self._spatial else 1 for a in "zyx")
        self.dtype = array.dtype.newbyteorder("=")  # bioformats2raw writes big-endian; the writer wants native
        self.geometry = geometry
        self.name = name
        # zarr returns the spatial axes in array order; NGFF puts them z, y, x, but do not rely on it.
        in_array_order = [a for a in axes if a in self._spatial]
        self._to_zyx = [in_array_order.index(a) for a in "zyx" if a in self._spatial]

    def read(self, region: Region) -> np.ndarray:
        self._check_mirrored(region)
        selection = tuple(region["zyx".index(a)] if a in self._spatial else 0 for a in self._axes)
        try:
            block = np.asarray(self._array[selection])
        except (RuntimeError, ValueError, TypeError) as exc:  # what numcodecs raises for bytes that do not decode
            raise FormatError(f"{self.name}: a chunk of region {_show(region)} does not decode "
                              f"({type(exc).__name__}: {exc})") from None
        if not block.dtype.isnative:  # the block is ours: swap in place rather than copy a slab
            block = block.byteswap(inplace=True).view(self.dtype)
        block = block.transpose(self._to_zyx)
        if "z" not in self._spatial:
            block = block[np.newaxis]
        return np.ascontiguousarray(block)

    def _check_mirrored(self, region: Region) -> None:
        """Refuse a region touching a chunk that is neither in raw/ nor recorded as absent at the source."""
        ranges = []
        for axis, chunk in zip(self._axes, self._array.chunks):
            if axis in self._spatial:
                span = region["zyx".index(axis)]
                ranges.append(range(span.start // chunk, (span.stop - 1) // chunk + 1))
            else:
                ranges.append(range(1))
        for index in product(*ranges):
            key = self._array.metadata.encode_chunk_key(index)
            if key not in self._absent and not (self._array_dir / key).is_file():
                raise FormatError(f"{self._array_dir / key}: chunk {key} is missing from the raw download (and was "
                                  "not absent at the source); re-run the raw download")


def _show(region: Region) -> str:
    return "(z, y, x) " + ", ".join(f"{s.start}:{s.stop}" for s in region)


SOURCE = IdrSource
