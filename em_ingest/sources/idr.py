"""Image Data Resource: OMERO.web metadata, voxels from IDR's OME-Zarr copy or the original file."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from em_ingest.archives.omero import (
    PAGE_LIMIT,
    Answer,
    Container,
    OmeroClient,
    container_in_paths,
    img_data_parent,
    img_data_voxel_size_nm,
    map_values,
    study_of,
)
from em_ingest.errors import FormatError, SelectionError, SourceResponseError, TransferError, UnsupportedDataError
from em_ingest.formats import tiff
from em_ingest.formats.mirrored_zarr import MirroredZarrVolume, chunk_keys, open_mirrored_array
from em_ingest.formats.ome_ngff import Multiscale, multiscale_of
from em_ingest.formats.volume import Geometry, Volume
from em_ingest.raw import Manifest, ManifestEntry, RawStore, Wanted, safe_relative_path
from em_ingest.selection import DatasetOptions, DatasetRequest, load_selection
from em_ingest.settings import Setting, Settings
from em_ingest.sources.base import Description, InventoryItem, Source
from em_ingest.transfer.base import is_absent
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
# The bucket of OME-Zarr copies answers 403 for a missing key when listing is not public, 404 otherwise:
# either means IDR has no copy of this image, so its original file is read instead.
NO_ZARR_COPY_STATUSES = (403, 404)
# U2OS_chromatin (idr0086 experimentD): what discovery lists when the selection names no IDR image.
DEFAULT_DISCOVERY_DATASET = 10740
_TIFF_SUFFIXES = (".tif", ".tiff")
# How far the file's own calibration may differ from OMERO's before it is worth a note.
_VOXEL_SIZE_RELATIVE_TOLERANCE = 1e-3


class IdrOptions(DatasetOptions):
    """The dataset key is the IDR image id; nothing else to choose."""


def bare_doi(value: str | None) -> str | None:
    """`https://doi.org/10.x/y` -> `10.x/y`; the catalog keeps DOIs without a resolver."""
    if not value:
        return None
    match = re.search(r"10\.\d{4,9}/\S+", value)
    return match.group(0).rstrip(".") if match else None


class IdrSource(Source):
    name = "idr"
    title = "Image Data Resource (OMERO.web, IDR file mirror and OME-Zarr copies)"
    Options = IdrOptions
    configuration = (
        Setting("idr_url", "EM_INGEST_IDR_URL", "https://idr.openmicroscopy.org", "OMERO.web base"),
        Setting("idr_files_url", "EM_INGEST_IDR_FILES_URL", "https://ftp.ebi.ac.uk/pub/databases/IDR",
                "IDR file mirror"),
        Setting("idr_zarr_url", "EM_INGEST_IDR_ZARR_URL", "https://uk1s3.embassy.ebi.ac.uk/idr/zarr/v0.4",
                "IDR OME-Zarr copies"),
    )

    def __init__(self, settings: Settings, http: HttpClient | None = None):
        super().__init__(settings, http)
        self.omero = OmeroClient(settings.idr_url, self.http)

    # ---- URLs -------------------------------------------------------------------------------
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
            img_data = self._img_data(int(key)).document
            project_id, _ = img_data_parent(img_data, "project")
            dataset_id, _ = img_data_parent(img_data, "dataset")
            if project_id is not None:
                seeds.append(("project", project_id))
            elif dataset_id is not None:
                seeds.append(("dataset", dataset_id))
        return list(dict.fromkeys(seeds)) or [("dataset", DEFAULT_DISCOVERY_DATASET)]

    def images_of_dataset(self, dataset_id: int, dataset_name: str | None = None,
                          limit: int = PAGE_LIMIT) -> Iterator[InventoryItem]:
        for image in self.omero.images_of_dataset(dataset_id, limit):
            pixels = image.get("Pixels") or {}
            image_id = image["@id"]
            shape = {axis: pixels.get(f"Size{axis}") for axis in "TCZYX"}
            yield InventoryItem(self.name, str(image_id), image.get("Name"),
                                {"image_id": image_id, "dataset_id": dataset_id, "dataset": dataset_name,
                                 "size_tczyx": [shape[a] for a in "TCZYX"],
                                 "pixels_type": (pixels.get("Type") or {}).get("value"),
                                 "url": self.omero.viewer_url(image_id)})

    def images_of_project(self, project_id: int, limit: int = PAGE_LIMIT) -> Iterator[InventoryItem]:
        for dataset in self.omero.datasets_of_project(project_id, limit):
            yield from self.images_of_dataset(dataset["@id"], dataset.get("Name"), limit)

    # ---- fetch ------------------------------------------------------------------------------
    def fetch_raw(self, request: DatasetRequest, raw: RawStore) -> Manifest:
        image_id = image_id_of(request)
        answer = self._img_data(image_id)
        img_data: dict[str, Any] = answer.document
        entries: list[ManifestEntry | None] = [raw.store_document(IMG_DATA, answer.url, img_data)]
        check_single_channel(img_data, image_id)
        for relpath, kept in ((IMAGE, self.omero.image(image_id)),
                              (IMAGE_ANNOTATIONS, self.omero.map_annotations("image", image_id))):
            entries.append(raw.store_document(relpath, kept.url, kept.document))
        container = self._container(raw, image_id, img_data, entries)
        if container is not None:
            annotations = self.omero.map_annotations(container.kind, container.id)
            entries.append(raw.store_document(CONTAINER_ANNOTATIONS, annotations.url, annotations.document))

        study = study_of(container.name if container else None)
        zattrs = self._probe_zarr(raw, study, image_id, entries)
        version: str | None
        if zattrs is not None and study is not None:  # a copy is only probed for under a study
            version = self._mirror_zarr(raw, self.zarr_url(study, image_id), image_id, zattrs, entries)
        else:
            version = self._fetch_original(raw, image_id, entries)
        return raw.commit(entries, request.options_dict(), source_version=version)

    def _img_data(self, image_id: int) -> Answer:
        try:
            return self.omero.img_data(image_id)
        except TransferError as exc:
            if is_absent(exc):
                raise SelectionError(f"idr.{image_id}: IDR has no image {image_id} ({exc.url} answered 404)") from None
            raise

    def _container(self, raw: RawStore, image_id: int, img_data: dict[str, Any],
                   entries: list[ManifestEntry | None]) -> Container | None:
        """The image's project (named in imgData) or, for plate images, its screen (via paths_to_object)."""
        project_id, project_name = img_data_parent(img_data, "project")
        if project_id is not None:
            return Container("project", project_id, project_name)
        paths = self.omero.paths_to_object(image_id)
        entries.append(raw.store_document(PATHS_TO_OBJECT, paths.url, paths.document))
        found = container_in_paths(paths.document)
        if found is None:
            return None
        detail = self.omero.container(*found)
        entries.append(raw.store_document(CONTAINER, detail.url, detail.document))
        return Container(*found, (detail.document.get("data") or {}).get("Name"))

    def _probe_zarr(self, raw: RawStore, study: str | None, image_id: int,
                    entries: list[ManifestEntry | None]) -> ManifestEntry | None:
        """Mirror the `.zattrs` of IDR's OME-Zarr copy if there is one; the probe's outcome is kept for provenance."""
        if study is None:
            entries.append(raw.store_document(ZARR_PROBE, self.settings.idr_zarr_url,
                                              {"found": False, "reason": "no idrNNNN study name"}))
            return None
        url = f"{self.zarr_url(study, image_id)}/.zattrs"
        try:
            found = raw.fetch(url, f"{zarr_root(image_id)}/.zattrs")
        except TransferError as exc:
            if exc.status not in NO_ZARR_COPY_STATUSES:
                raise
            entries.append(raw.store_document(ZARR_PROBE, url, {"found": False, "status": exc.status}))
            return None
        entries.append(raw.store_document(ZARR_PROBE, url, {"found": True}))
        return found

    def _mirror_zarr(self, raw: RawStore, zarr_url: str, image_id: int, zattrs: ManifestEntry,
                     entries: list[ManifestEntry | None]) -> str:
        """Mirror the copy under its own object names: `.zattrs`, `.zgroup`, the full-resolution level's `.zarray`
        and chunks, so zarr-python opens raw/ as it would open the bucket. A 404 chunk is recorded as absent.
        Returns the source version: the digest of the image's and the level's metadata."""
        root = zarr_root(image_id)
        multiscale = read_multiscale(raw, root, url=f"{zarr_url}/.zattrs")
        level = multiscale.level_path
        zarray = raw.fetch(f"{zarr_url}/{level}/.zarray", f"{root}/{level}/.zarray")
        assert zarray is not None  # not optional: an absent .zarray raised
        # Opening reads only `.zarray`: an unreadable array is refused before any chunk is fetched.
        array = open_mirrored_array(raw.path(root), level, where=f"{zarr_url}/{level}")
        multiscale.for_rank(array.ndim, where=zarr_url).check_axes(array.shape, where=zarr_url)

        keys = chunk_keys(array)
        # bioformats2raw writes a `.zgroup`, other writers may not; a chunk never written is simply not there.
        wanted = [Wanted(f"{zarr_url}/.zgroup", f"{root}/.zgroup", optional=True)] + [
            Wanted(f"{zarr_url}/{level}/{key}", f"{root}/{level}/{key}", optional=True) for key in keys]
        zgroup, *chunks = raw.mirror(wanted, max_in_flight=MAX_IN_FLIGHT)
        entries += [zattrs, zgroup, zarray, *chunks]
        absent = sorted(key for key, entry in zip(keys, chunks) if entry is None)
        entries.append(raw.store_document(
            ZARR_ABSENT, f"{zarr_url}/{level}/",
            {"level": level, "absent": absent, "meaning": "HTTP 404: never written, read as fill_value"}))
        version = hashlib.sha256(f"{zattrs.sha256}:{zarray.sha256}".encode()).hexdigest()[:16]
        return f"ome-zarr:{version}"

    def _fetch_original(self, raw: RawStore, image_id: int, entries: list[ManifestEntry | None]) -> str | None:
        """Mirror the single TIFF the image was imported from, from the IDR file mirror."""
        paths = self.omero.original_file_paths(image_id)
        entries.append(raw.store_document(ORIGINAL_FILE_PATHS, paths.url, paths.document))
        client: list[str] = paths.document["client"]
        urls = [url for url in map(self.file_url, client) if url is not None]
        if len(urls) != len(client):
            raise UnsupportedDataError(f"IDR image {image_id}: original file paths {client} are not under "
                                       "'filesets/', so they are not on the IDR file mirror")
        if len(urls) != 1:
            raise UnsupportedDataError(f"IDR image {image_id}: its fileset has {len(urls)} files ({client}); only "
                                       "single-file originals are ingested (and no OME-Zarr copy was found)")
        name = client[0].rstrip("/").rsplit("/", 1)[-1]
        if not name.lower().endswith(_TIFF_SUFFIXES):
            raise UnsupportedDataError(f"IDR image {image_id}: original file {name!r} is not a TIFF; only TIFF "
                                       "originals are read (and no OME-Zarr copy was found)")
        entry = raw.fetch(urls[0], f"original/{safe_relative_path(name)}")
        assert entry is not None  # not optional: an absent file raised
        entries.append(entry)
        return entry.etag or entry.last_modified

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

        def first(*keys: str, sources: tuple[dict[str, list[str]], ...] = (image_values, study_values)) -> str | None:
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
        omero_nm = img_data_voxel_size_nm(img_data)
        file_nm = self._file_voxel_size_nm(raw, image_id, voxels)
        # imgData names the image's project and dataset; a plate image has neither ("Multiple": unknown).
        project_id, project_name = img_data_parent(img_data, "project")
        dataset_id, dataset_name = img_data_parent(img_data, "dataset")
        container_name = project_name if project_id is not None else self._container_name(raw)
        extra: dict[str, Any] = {
            "image_id": image_id, "image_name": image_name, "voxels_from": voxels, "voxels_url": voxel_url,
            "project_or_screen": container_name, "study": study_of(container_name),
            "dataset": dataset_name, "dataset_id": dataset_id,
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
            sample=first("Cell Line", sources=(image_values,)) or dataset_name,
            imaging_method=first("Imaging Method", sources=(study_values, image_values)),
            source_url=self.omero.viewer_url(image_id),
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
        zattrs = raw.previous_entry(f"{zarr_root(image_id)}/.zattrs")
        if zattrs is not None:
            return VOXELS_ZARR, zattrs.url.removesuffix("/.zattrs")
        for entry in manifest.entries:
            if entry.path.startswith("original/"):
                return VOXELS_ORIGINAL, entry.url
        raise FormatError(f"{raw.manifest_path}: neither an OME-Zarr copy nor an original file was fetched")

    def _file_voxel_size_nm(self, raw: RawStore, image_id: int, voxels: str) -> tuple[float, float, float] | None:
        if voxels == VOXELS_ZARR:
            where = str(raw.path(f"{zarr_root(image_id)}/.zattrs"))
            return read_multiscale(raw, zarr_root(image_id), url=where).voxel_size_nm(where=where)
        calibration = tiff.read_calibration(self._original_path(raw))
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
        omero_nm = img_data_voxel_size_nm(img_data)
        voxels, _ = self._voxel_origin(raw, image_id)
        if voxels == VOXELS_ZARR:
            return self._open_zarr(raw, image_id, omero_nm)
        # The file's own calibration (ImageJ, FEI) axis by axis, OMERO's physical sizes where it states none.
        return tiff.TiffStack(self._original_path(raw), fallback_pixel_size_nm=omero_nm[1:] if omero_nm else None,
                              fallback_z_spacing_nm=omero_nm[0] if omero_nm else None)

    def _open_zarr(self, raw: RawStore, image_id: int, omero_nm: tuple[float, float, float] | None) -> Volume:
        root = zarr_root(image_id)
        where = str(raw.path(f"{root}/.zattrs"))
        multiscale = read_multiscale(raw, root, url=where)
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


def _close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(math.isclose(x, y, rel_tol=_VOXEL_SIZE_RELATIVE_TOLERANCE) for x, y in zip(a, b))


def zarr_root(image_id: int) -> str:
    """Where an image's OME-Zarr copy is mirrored inside its raw folder: under its own object name."""
    return f"{image_id}.zarr"


def read_multiscale(raw: RawStore, root: str, *, url: str) -> Multiscale:
    """The multiscale image of the mirrored `<root>/.zattrs`; `url` names where it came from in errors.

    Its full-resolution level becomes a local path, so the level name is checked like any remote name.
    """
    try:
        zattrs = json.loads(raw.path(f"{root}/.zattrs").read_bytes())
    except ValueError as exc:
        raise SourceResponseError(f"{url}: expected JSON ({exc})") from None
    multiscale = multiscale_of(zattrs, where=url)
    safe_relative_path(multiscale.level_path)
    return multiscale


SOURCE = IdrSource
