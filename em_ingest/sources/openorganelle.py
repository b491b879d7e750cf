"""Janelia OpenOrganelle (CellMap): anonymous S3, Zarr + OME-NGFF 0.4 or COSEM N5 multiscales, regions of a level."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from em_ingest import limits
from em_ingest.errors import FormatError, SelectionError, SourceResponseError, UnsafePathError
from em_ingest.formats import cosem
from em_ingest.formats.label import LabelImage, check_label_name
from em_ingest.formats.n5 import N5Array
from em_ingest.formats.volume import Geometry, Volume
from em_ingest.formats.window import Window, WindowVolume
from em_ingest.raw import Manifest, ManifestEntry, RawStore, Wanted, safe_relative_path
from em_ingest.selection import DatasetOptions, DatasetRequest
from em_ingest.settings import Setting, Settings
from em_ingest.sources.base import Description, InventoryItem, Source, options_as
from em_ingest.transfer.base import RemoteObject
from em_ingest.transfer.http import HttpClient

if TYPE_CHECKING:
    from em_ingest.transfer.s3 import S3Client, S3Object

log = logging.getLogger(__name__)

WEB_PAGE = "https://openorganelle.janelia.org/datasets/{dataset}"
# AWS Open Data registry entry for the bucket (janelia-cosem): every dataset is CC-BY-4.0.
LICENSE = "CC-BY-4.0"
# Descriptive metadata is not in the bucket (only spatial metadata is); a curated record for the
# datasets this project ships a default for. Everything else stays unknown (null) in the catalog.
CURATED = {
    "jrc_mus-nacc-2": {"title": "Mouse nucleus accumbens (jrc_mus-nacc-2)", "organism": "Mus musculus",
                       "sample": "nucleus accumbens"},
}
# Image group names start with the modality (e.g. fibsem-int16, tem-uint8).
MODALITIES = {"fibsem": "FIB-SEM", "sem": "SEM", "tem": "TEM", "sbem": "SBF-SEM", "sbfsem": "SBF-SEM"}
_RECON = re.compile(r"^recon-(\d+)$")
_DTYPE_SUFFIX = re.compile(r"(u?int|float)(8|16|32|64)")
# Zarr v2 metadata object names start with a dot; the raw store's path check refuses dot-names,
# so these (and only these) are let through by mapping them to a plain name for the check.
_ZARR_DOTNAMES = {".zgroup", ".zattrs", ".zarray", ".zmetadata"}
_RAW_INFO = "openorganelle.json"  # not an object of the bucket: how the request was resolved


class Roi(BaseModel):
    """A region of a level in voxels of that level, [start, stop) per axis; a missing axis means all of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    z: tuple[int, int] | None = None
    y: tuple[int, int] | None = None
    x: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Roi:
        for axis in "zyx":
            bounds = getattr(self, axis)
            if bounds is not None and not 0 <= bounds[0] < bounds[1]:
                raise ValueError(f"roi.{axis} must be [start, stop] with 0 <= start < stop, got {list(bounds)}")
        return self

    def bounds(self, shape: tuple[int, int, int], where: str) -> tuple[tuple[int, int], ...]:
        """(start, stop) per axis, checked against the level's shape."""
        out = []
        for axis, n in zip("zyx", shape):
            start, stop = getattr(self, axis) or (0, n)
            if stop > n:
                raise SelectionError(f"{where}: roi.{axis} = [{start}, {stop}] reaches past the level's "
                                     f"{n} voxels along {axis}")
            out.append((start, stop))
        return tuple(out)


class LabelPlace(BaseModel):
    """Where a label lives in the dataset's container: a multiscale group, and the level to take."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group: str  # e.g. recon-1/labels/inference/segmentations/mito
    level: str | None = None  # None: the finest level whose voxel is at least the image level's

    @field_validator("group")
    @classmethod
    def _group(cls, value: str) -> str:
        return _group_path(value)

    @field_validator("level")
    @classmethod
    def _level(cls, value: str | None) -> str | None:
        return None if value is None else _one_name(value)


class OpenOrganelleOptions(DatasetOptions):
    dataset: str | None = None
    image: str | None = None
    level: str = "s0"
    roi: Roi | None = None
    # Label name -> its multiscale group in the same container (a path, or {group, level}).
    labels: dict[str, str | LabelPlace] | None = None

    @field_validator("labels")
    @classmethod
    def _label_places(cls, value: dict[str, str | LabelPlace] | None) -> dict[str, str | LabelPlace] | None:
        if value is None:
            return None
        for name in value:
            check_label_name(name, "labels")
        return {name: place if isinstance(place, LabelPlace) else LabelPlace(group=place)
                for name, place in value.items()}

    def label_places(self) -> dict[str, LabelPlace]:
        return {name: place for name, place in (self.labels or {}).items() if isinstance(place, LabelPlace)}

    @field_validator("dataset", "level")
    @classmethod
    def _one_name(cls, value: str | None) -> str | None:
        return None if value is None else _one_name(value)

    @field_validator("image")
    @classmethod
    def _group_path(cls, value: str | None) -> str | None:
        return None if value is None else _group_path(value)


def _one_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", value) or value.startswith("."):
        raise ValueError(f"expected a single name (letters, digits, '.', '_', '-'), got {value!r}")
    return value


def _group_path(value: str) -> str:
    value = value.strip("/")
    try:
        safe_relative_path(value)
    except UnsafePathError as exc:
        raise ValueError(str(exc)) from None
    return value


@dataclass(frozen=True)
class ResolvedImage:
    """Where the requested image lives in the bucket."""

    dataset: str
    layout: str  # "zarr" or "n5"
    container: str  # key prefix of the .zarr/.n5 root, without trailing '/'
    image: str  # group path inside the container

    @property
    def prefix(self) -> str:
        return f"{self.container}/{self.image}"


def raw_relpath(key: str) -> str:
    """A bucket key as a path in the raw store (same layout); refuses anything that could escape it."""
    parts = key.split("/")
    checked = "/".join(p[1:] if p in _ZARR_DOTNAMES else p for p in parts)
    if safe_relative_path(checked) != checked:  # e.g. "a/./b" or "a//b": not a plain relative key
        raise UnsafePathError(f"refusing unsafe remote name {key!r} (not a normalized relative path)")
    return key


def _dtype_rank(image_name: str) -> int:
    match = _DTYPE_SUFFIX.search(image_name)
    return int(match.group(2)) if match else 0


def imaging_method(image: str) -> str | None:
    name = image.rstrip("/").rsplit("/", 1)[-1].lower()
    return MODALITIES.get(name.split("-", 1)[0].split("_", 1)[0])


class OpenOrganelleSource(Source):
    name = "openorganelle"
    title = "Janelia OpenOrganelle / CellMap (janelia-cosem-datasets on S3)"
    Options = OpenOrganelleOptions
    configuration = (
        Setting("openorganelle_endpoint", "EM_INGEST_OPENORGANELLE_ENDPOINT", "https://s3.us-east-1.amazonaws.com",
                "S3 endpoint URL (anonymous access)"),
        Setting("openorganelle_bucket", "EM_INGEST_OPENORGANELLE_BUCKET", "janelia-cosem-datasets", "bucket"),
    )

    def __init__(self, settings: Settings, http: HttpClient | None = None):
        super().__init__(settings, http)
        self._s3: S3Client | None = None
        # The raw store fetches the bucket's s3:// URLs through the same (lazily made) client that lists it.
        self.transports.add(lambda: self.s3, schemes=("s3",))

    @property
    def s3(self) -> S3Client:
        if self._s3 is None:
            # Here, not at import: s3fs, aiobotocore and aiohttp load only when the bucket is used.
            from em_ingest.transfer.s3 import S3Client

            self._s3 = S3Client(self.settings.openorganelle_endpoint, self.settings.openorganelle_bucket,
                                self.settings.transfer)
        return self._s3

    # ---- discovery ----------------------------------------------------------------------------
    def discover(self) -> Iterable[InventoryItem]:
        datasets = [p.rstrip("/") for p in self.s3.list_level("").prefixes]
        found = self.s3.map_bounded(self._images_of, datasets)
        for dataset, images in zip(datasets, found):
            if not images:
                continue  # no Zarr/N5 EM image (e.g. only a Neuroglancer copy): nothing to ingest
            default = self._default_image(images)
            curated = CURATED.get(dataset, {})
            yield InventoryItem(self.name, dataset, curated.get("title"), {
                "dataset": dataset,
                "images": [f"{r.container.rsplit('/', 1)[-1]}/{r.image}" for r in images],
                "default_image": default.image, "default_layout": default.layout,
                "web_page": WEB_PAGE.format(dataset=dataset),
            })

    def _images_of(self, dataset: str) -> list[ResolvedImage]:
        """Every EM image of a dataset: `recon-*/em/*` or `em/*` inside its .zarr and .n5 roots."""
        images: list[ResolvedImage] = []
        containers = [p.rstrip("/") for p in self.s3.list_level(f"{dataset}/").prefixes]
        for layout in cosem.LAYOUTS:
            container = f"{dataset}/{dataset}.{layout}"
            if container not in containers:
                continue
            children = [p[len(container) + 1:].rstrip("/") for p in self.s3.list_level(f"{container}/").prefixes]
            em_groups = [f"{c}/em" for c in children if _RECON.match(c)] + (["em"] if "em" in children else [])
            for group in em_groups:
                for prefix in self.s3.list_level(f"{container}/{group}/").prefixes:
                    images.append(ResolvedImage(dataset, layout, container, prefix[len(container) + 1:].rstrip("/")))
        return images

    @staticmethod
    def _default_image(images: list[ResolvedImage]) -> ResolvedImage:
        """Zarr before N5 (newer), then the latest alignment (recon-N), then the deepest dtype."""
        def rank(r: ResolvedImage) -> tuple[bool, int, int, str]:
            recon = _RECON.match(r.image.split("/", 1)[0])
            return (r.layout == "zarr", int(recon.group(1)) if recon else -1, _dtype_rank(r.image), r.image)

        return max(images, key=rank)

    def resolve(self, request: DatasetRequest) -> ResolvedImage:
        options = options_as(request, OpenOrganelleOptions)
        dataset = options.dataset or request.key
        where = f"{self.name}.{request.key}"
        if options.image is None:
            images = self._images_of(dataset)
            if not images:
                raise SelectionError(f"{where}: no EM image under {self.s3.url(dataset + '/')} (looked for "
                                     f"{dataset}.zarr/recon-*/em/* and {dataset}.n5/em/*); check `dataset`")
            chosen = self._default_image(images)
            if len(images) > 1:
                log.info("%s: %d EM images, using %s/%s", where, len(images), chosen.container, chosen.image)
            return chosen
        marker = {"zarr": ".zattrs", "n5": "attributes.json"}
        for layout in cosem.LAYOUTS:
            candidate = ResolvedImage(dataset, layout, f"{dataset}/{dataset}.{layout}", options.image)
            names = {o.key.rsplit("/", 1)[-1] for o in self.s3.list_level(f"{candidate.prefix}/").objects}
            if marker[layout] in names:
                return candidate
        raise SelectionError(f"{where}: image {options.image!r} not found as a multiscale group in "
                             f"{self.s3.url(dataset + '/' + dataset + '.zarr/')} or {dataset}.n5/")

    # ---- raw ----------------------------------------------------------------------------------
    def fetch_raw(self, request: DatasetRequest, raw: RawStore) -> Manifest:
        options = options_as(request, OpenOrganelleOptions)
        where = f"{self.name}.{request.key}"
        resolved = self.resolve(request)
        fetched = _Fetched()
        image = self._mirror_level(raw, resolved.layout, resolved.container, resolved.image, options.level, where, fetched)
        region = (options.roi or Roi()).bounds(image.grid.shape, where)
        chunk_objects = self._mirror_region(raw, image, region, where, fetched)
        labels = {name: self._fetch_label(raw, resolved, image, region, name, place, where, fetched)
                  for name, place in options.label_places().items()}
        info = {"dataset": resolved.dataset, "layout": resolved.layout, "container": resolved.container,
                "image": resolved.image, "level": options.level, "region": [list(r) for r in region],
                "chunk_objects": chunk_objects, **({"labels": labels} if labels else {})}
        info_entry = raw.store_document(_RAW_INFO, self.s3.url(resolved.prefix), info)
        versions = sorted(o.last_modified for o in fetched.objects if o.last_modified)
        return raw.commit([*fetched.entries.values(), info_entry], {**request.options_dict(), "resolved": info},
                          source_version=versions[-1] if versions else None)

    def _mirror_level(self, raw: RawStore, layout: str, container: str, group: str, level: str | None, where: str,
                      fetched: _Fetched, *, at_least_nm: tuple[float, float, float] | None = None) -> _Level:
        """Mirror the metadata of every group from the container root down to array `level` of `group` (None:
        the finest level whose voxel is at least `at_least_nm`), and read what it says of that level."""
        names = cosem.METADATA_NAMES[layout]
        parts = group.split("/")
        groups = [container] + [f"{container}/{'/'.join(parts[:i])}" for i in range(1, len(parts) + 1)]
        listings = self.s3.map_bounded(lambda g: self.s3.list_level(f"{g}/").objects, groups)
        documents = self._mirror_metadata(raw, [o for objects in listings for o in objects], names, fetched)
        group_prefix = f"{container}/{group}"
        group_attrs = documents.get(f"{group_prefix}/{'.zattrs' if layout == 'zarr' else 'attributes.json'}") or {}
        if not isinstance(group_attrs, dict):
            raise SourceResponseError(f"{self.s3.url(group_prefix)}: group attributes must be a JSON object")
        if level is None:
            level = cosem.finest_level_at_least(layout, group_attrs, at_least_nm, f"{where} ({self.s3.url(group_prefix)})")
        level_prefix = f"{group_prefix}/{level}/"
        documents.update(self._mirror_metadata(raw, self.s3.list_level(level_prefix).objects, names, fetched))
        array_doc = documents.get(level_prefix + ("attributes.json" if layout == "n5" else ".zarray"))
        if array_doc is None:
            levels = cosem.level_paths(layout, group_attrs, where)
            raise SelectionError(f"{where}: level {level!r} is not an array of "
                                 f"{self.s3.url(group_prefix)} (levels: {', '.join(levels) or 'none'})")
        array_attrs = array_doc if layout == "n5" else (documents.get(level_prefix + ".zattrs") or {})
        return _Level(layout, container, group, level, cosem.grid(layout, array_doc, self.s3.url(level_prefix)),
                      cosem.level_geometry(layout, group_attrs, level, array_attrs, self.s3.url(group_prefix)))

    def _mirror_metadata(self, raw: RawStore, objects: Sequence[S3Object], names: tuple[str, ...],
                         fetched: _Fetched) -> dict[str, Any]:
        metadata = [o for o in objects if o.key.rsplit("/", 1)[-1] in names]
        fetched.add(metadata, raw.mirror(self._wanted(o) for o in metadata))
        return {o.key: self._json(raw, o.key) for o in metadata}

    def _mirror_region(self, raw: RawStore, level: _Level, region: tuple[tuple[int, int], ...], where: str,
                       fetched: _Fetched) -> int:
        """Mirror the chunks of `level` that `region` touches; returns how many objects the bucket holds for it."""
        region_shape = [b - a for a, b in region]
        where_level = f"{where} ({self.s3.url(level.prefix)})"
        # Before listing: a declared shape can ask for more chunk listings than memory or time allow.
        limits.check_volume(region_shape, level.grid.dtype.itemsize, self.settings.limits, where_level)
        chunks = self._chunk_objects(level.grid, level.prefix + "/", region)
        # Before downloading: the bytes the bucket holds for the region must be plausible for its size.
        limits.check_volume(region_shape, level.grid.dtype.itemsize, self.settings.limits, where_level,
                            raw_bytes=sum(o.size for o in chunks))
        fetched.add(chunks, raw.mirror(self._wanted(o) for o in chunks))
        return len(chunks)

    def _fetch_label(self, raw: RawStore, resolved: ResolvedImage, image: _Level, region: tuple[tuple[int, int], ...],
                     name: str, place: LabelPlace, where: str, fetched: _Fetched) -> dict[str, Any]:
        """Mirror the part of a label group that covers the image region in physical space; returns its record."""
        where_label = f"{where}: label {name!r}"
        label = self._mirror_level(raw, resolved.layout, resolved.container, place.group, place.level, where_label,
                                   fetched, at_least_nm=image.geometry.scale_nm if image.geometry else None)
        where_placed = f"{where_label} ({self.s3.url(label.prefix)})"
        if image.geometry is None or label.geometry is None:
            raise SelectionError(f"{where_placed}: {'the image' if image.geometry is None else 'the label'} states "
                                 "no voxel size, so the label cannot be placed on the image")
        label_region = cosem.overlapping_region(image.geometry, region, label.geometry, label.grid.shape, where_placed)
        self._mirror_region(raw, label, label_region, where_label, fetched)
        return {"group": place.group, "level": label.level, "region": [list(r) for r in label_region]}

    def _chunk_objects(self, grid: cosem.ChunkGrid, level_prefix: str,
                       region: tuple[tuple[int, int], ...]) -> list[S3Object]:
        """The chunk objects of the level that the region touches, from listings (absent = fill value)."""
        ranges = grid.index_ranges(region)
        # One listing per value of the first component of chunk names keeps listings to the region;
        # membership is tested per listed object, never by enumerating the region's whole chunk grid.
        prefixes = [level_prefix + grid.prefix_for_first_index(i) for i in ranges[grid.first_axis]]
        listed = self.s3.map_bounded(self.s3.list_objects, prefixes)
        chunks = []
        for objects in listed:
            for obj in objects:
                index = grid.parse_key(obj.key[len(level_prefix):])
                if index is not None and all(i in r for i, r in zip(index, ranges)):
                    chunks.append(obj)
        return chunks

    def _wanted(self, obj: S3Object) -> Wanted:
        """A listed object for the mirror: the listing's size and ETag pin the read and decide the skip."""
        url = self.s3.url(obj.key)
        return Wanted(url, raw_relpath(obj.key), remote=RemoteObject(url, obj.size, obj.etag, obj.last_modified))

    def _json(self, raw: RawStore, key: str) -> Any:
        path = raw.path(raw_relpath(key))
        try:
            return json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise SourceResponseError(f"{self.s3.url(key)}: expected a JSON metadata document ({exc})") from None

    # ---- offline, from the raw store ----------------------------------------------------------
    def _raw_info(self, raw: RawStore, request: DatasetRequest) -> dict[str, Any]:
        try:
            info: dict[str, Any] = raw.read_document(_RAW_INFO)  # written by fetch_raw: a JSON object
        except (FileNotFoundError, ValueError):
            raise FormatError(f"{raw.dir}: no {_RAW_INFO}; materialize {self.name}/raw for "
                              f"{request.key} first") from None
        return info

    def _local_document(self, raw: RawStore, key: str) -> dict[str, Any]:
        path = raw.path(raw_relpath(key))
        if not path.is_file():
            return {}
        try:
            document = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise FormatError(f"{path}: not JSON ({exc})") from None
        return document if isinstance(document, dict) else {}

    def describe(self, request: DatasetRequest, raw: RawStore) -> Description:
        info = self._raw_info(raw, request)
        dataset, image = info["dataset"], info["image"]
        curated = CURATED.get(dataset, {})
        prefix = f"{info['container']}/{image}"
        group_attrs = self._local_document(raw, f"{prefix}/{'.zattrs' if info['layout'] == 'zarr' else 'attributes.json'}")
        return Description(
            title=curated.get("title"),
            organism=curated.get("organism"),
            sample=curated.get("sample"),
            imaging_method=imaging_method(image),
            source_url=self.s3.url(f"{prefix}/{info['level']}"),
            license=LICENSE,
            source_version=raw.previous.source_version if raw.previous else None,
            extra={"dataset": dataset, "layout": info["layout"], "image": image, "level": info["level"],
                   "region_voxels_zyx": info["region"], "web_page": WEB_PAGE.format(dataset=dataset),
                   "bucket": self.settings.openorganelle_bucket, "source_attributes": group_attrs},
        )

    def open_volume(self, request: DatasetRequest, raw: RawStore) -> Volume:
        info = self._raw_info(raw, request)
        return self._open_level(raw, info["layout"], info["container"], info["image"], info["level"], info["region"])

    def open_labels(self, request: DatasetRequest, raw: RawStore) -> list[LabelImage]:
        info = self._raw_info(raw, request)
        labels = []
        for name, label in (info.get("labels") or {}).items():
            volume = self._open_level(raw, info["layout"], info["container"], label["group"], label["level"],
                                      label["region"])
            if volume.geometry is None:  # fetch_raw refuses such a label; a hand-edited raw store could still hold one
                volume.close()
                raise FormatError(f"{volume.name}: the label states no voxel size, so it cannot be placed on the image")
            labels.append(LabelImage(name, volume, f"{label['group']}/{label['level']}", volume.geometry))
        return labels

    def _open_level(self, raw: RawStore, layout: str, container: str, group: str, level: str,
                    region: list[list[int]]) -> WindowVolume:
        """`region` ([start, stop) per axis) of array `level` of `group`, from the raw store, placed in space."""
        prefix = f"{container}/{group}"
        where = str(raw.dir / prefix)
        if layout == "zarr":
            array_doc = self._local_document(raw, f"{prefix}/{level}/.zarray")
            group_attrs = self._local_document(raw, f"{prefix}/.zattrs")
            array_attrs = self._local_document(raw, f"{prefix}/{level}/.zattrs")
            array = self._open_zarr(raw.dir / container, f"{group}/{level}")
        else:
            array_doc = self._local_document(raw, f"{prefix}/{level}/attributes.json")
            group_attrs = self._local_document(raw, f"{prefix}/attributes.json")
            array_attrs = array_doc
            array = N5Array(raw.dir / prefix / level)
        grid = cosem.grid(layout, array_doc, f"{where}/{level}")
        if tuple(array.shape) != grid.shape:
            raise FormatError(f"{where}/{level}: array shape {tuple(array.shape)} differs from its metadata {grid.shape}")
        (z0, z1), (y0, y1), (x0, x1) = region  # [start, stop) per axis, as fetch_raw recorded it
        window: Window = ((z0, z1), (y0, y1), (x0, x1))
        geometry = None
        level_geometry = cosem.level_geometry(layout, group_attrs, level, array_attrs, where)
        if level_geometry is not None:
            translation = None
            if level_geometry.translation_nm is not None:
                # The output starts at the region's first voxel.
                (tz, ty, tx), (sz, sy, sx) = level_geometry.translation_nm, level_geometry.scale_nm
                translation = (tz + z0 * sz, ty + y0 * sy, tx + x0 * sx)
            geometry = Geometry(level_geometry.scale_nm, "source-metadata", translation)
        return WindowVolume(array, window, geometry, name=f"{where}/{level}")

    @staticmethod
    def _open_zarr(root: Path, path: str) -> Any:
        import zarr  # here, not at import: the code location loads every source

        try:
            return zarr.open_array(store=zarr.storage.LocalStore(str(root), read_only=True), path=path,
                                   mode="r", zarr_format=2)
        except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"{root}/{path}: not a readable Zarr v2 array ({exc})") from None


@dataclass
class _Fetched:
    """What one fetch mirrored: manifest entries by path (a document reached twice counts once), and the
    listed objects whose versions make the source version."""

    entries: dict[str, ManifestEntry] = field(default_factory=dict)
    objects: list[S3Object] = field(default_factory=list)

    def add(self, objects: Sequence[S3Object], entries: list[ManifestEntry | None]) -> None:
        self.objects.extend(objects)
        self.entries.update((e.path, e) for e in entries if e is not None)


@dataclass(frozen=True)
class _Level:
    """One array of a multiscale group in the bucket, with what its metadata says of it."""

    layout: str
    container: str
    group: str
    level: str
    grid: cosem.ChunkGrid
    geometry: cosem.LevelGeometry | None

    @property
    def prefix(self) -> str:
        return f"{self.container}/{self.group}/{self.level}"


SOURCE = OpenOrganelleSource
