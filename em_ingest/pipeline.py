"""The ingest steps as plain functions over Settings: fetch raw, convert to OME-Zarr, build the catalog.

The Dagster assets, the CLI and the benchmarks all call these; nothing here imports Dagster.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from em_ingest import catalog, limits, objectstore, remote, storage, view
from em_ingest.errors import EmIngestError, SelectionError, StorageError, ValidationError
from em_ingest.formats.volume import Geometry, Volume, triple
from em_ingest.omezarr import integrity
from em_ingest.omezarr.labels import WrittenLabel, write_labels
from em_ingest.omezarr.pyramid import Level
from em_ingest.omezarr.regions import RegionPlan, blocks_in, plan_regions, voxels_in
from em_ingest.omezarr.thumbnail import thumbnail_level
from em_ingest.omezarr.validate import validate_ome_zarr
from em_ingest.omezarr.writer import (
    Intensity,
    StoredLevel,
    WriteResult,
    ZarrLayout,
    create_image,
    finish_image,
    write_levels,
)
from em_ingest.progress import Progress, Sink
from em_ingest.raw import Manifest, RawBacking, RawStore, fetch_progress
from em_ingest.selection import DatasetRequest, Selection, load_selection
from em_ingest.settings import Settings, parse_bytes, parse_duration, parse_zstd_level
from em_ingest.sources import Description, Source, option_models, source_classes

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)
# Bump when the conversion's output for the same input changes, so existing Zarrs are rewritten.
CONVERTER_VERSION = "1"
# How often a run polls while another run on this machine writes the same image.
WAIT_FOR_OTHER_WRITER_S = 1.0


@dataclass(frozen=True)
class Verification:
    """An independent re-read of a published image, compared with its source."""

    ngff_version: str | None
    levels: int
    problem: str | None  # why the image is not valid OME-NGFF, if it is not
    expected: dict[str, Any]
    found: dict[str, Any]
    mismatched: tuple[str, ...]

    @property
    def ngff_valid(self) -> bool:
        return self.problem is None

    @property
    def matches_source(self) -> bool:
        return self.ngff_valid and not self.mismatched


@dataclass(frozen=True)
class Conversion:
    """What `convert` produced (or found already up to date)."""

    row: dict[str, Any]
    levels: list[dict[str, Any]]
    zarr_path: Path | str  # a local path, or the URL of the version in the bucket
    thumbnail_path: Path | str | None
    skipped: bool
    inputs_digest: str


@dataclass(frozen=True)
class ConversionPlan:
    """How one image is written (see `Pipeline.plan_conversion`); passed between the conversion's steps as JSON.

    `staging` is None when the published image already matches its inputs: nothing is written.
    """

    source: str
    key: str
    inputs_digest: str
    staging: str | None
    regions: RegionPlan | None
    levels: tuple[Level, ...]
    replaces: str | None = None  # the version published when the plan was made
    geometry: Geometry | None = None  # the source's, override applied (as the multiscales say)
    dtype: str | None = None  # the source volume's

    @property
    def region_count(self) -> int:
        return self.regions.count if self.regions is not None else 0

    def to_json(self) -> str:
        return json.dumps({"source": self.source, "key": self.key, "inputs_digest": self.inputs_digest,
                           "staging": self.staging, "regions": self.regions.as_dict() if self.regions else None,
                           "levels": [asdict(level) for level in self.levels], "replaces": self.replaces,
                           "geometry": asdict(self.geometry) if self.geometry else None, "dtype": self.dtype})

    @classmethod
    def from_json(cls, text: str) -> ConversionPlan:
        record = json.loads(text)
        regions = RegionPlan.from_dict(record["regions"]) if record["regions"] else None
        levels = tuple(Level(lv["path"], triple(lv["shape"]), triple(lv["scale_nm"]), triple(lv["translation_nm"]),
                             triple(lv["factors"])) for lv in record["levels"])
        geometry = record.get("geometry")
        return cls(record["source"], record["key"], record["inputs_digest"], record["staging"], regions, levels,
                   record.get("replaces"),
                   Geometry(triple(geometry["voxel_size_nm"]), geometry["voxel_size_origin"],
                            triple(geometry["translation_nm"]) if geometry["translation_nm"] else None)
                   if geometry else None, record.get("dtype"))


@dataclass(frozen=True)
class RegionWritten:
    """What one region step reports: which region, and the intensity statistics of its s0 voxels."""

    index: int
    intensity: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RegionWritten:
        record = json.loads(text)
        return cls(int(record["index"]), dict(record["intensity"]))


def resolve_geometry(volume: Volume, request: DatasetRequest) -> Geometry:
    """The volume's geometry with the curator override applied; fails if neither says the voxel size."""
    override = request.options.voxel_size_nm
    translation = volume.geometry.translation_nm if volume.geometry else None
    if override is not None:
        return Geometry(triple(float(v) for v in override), "override", translation)
    if volume.geometry is None:
        raise SelectionError(
            f"{request.source}.{request.key}: the source does not state the voxel size; "
            "set voxel_size_nm: [z, y, x] (nanometres) for this dataset in the selection file"
        )
    return volume.geometry


def work_folder(work_dir: str | None, url: str) -> Path:
    """The local folder where steps work for the data root in the bucket at `url`: `work_dir` if set, else one
    per data root under the system's temporary folder (so two data roots never share local copies)."""
    if work_dir:
        folder = Path(work_dir).expanduser().resolve()
    else:
        folder = Path(tempfile.gettempdir()) / "em-ingest-work" / hashlib.sha256(url.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Pipeline:
    """One configured em-ingest: settings, the selection file and the data root."""

    def __init__(self, settings: Settings):
        self.settings = settings
        # With a data root in a bucket, `root` is the local work folder, laid out like the bucket (see `remote`).
        self.remote: objectstore.ObjectRoot | None = None
        if objectstore.is_object_url(settings.data_root):
            t = settings.transfer
            self.remote = objectstore.ObjectRoot(settings.data_root, max_attempts=t.max_attempts,
                                                 connect_timeout_s=t.connect_timeout_s, read_timeout_s=t.read_timeout_s)
            self.root = work_folder(settings.work_dir, self.remote.url)
        else:
            self.root = storage.local_root(settings.data_root)

    # ---- the data root: local, or a bucket with a local work folder -----------------------------------------
    @property
    def data_root(self) -> str:
        """The data root as users name it: a local path or the bucket's URL."""
        return self.remote.url if self.remote else str(self.root)

    def _name(self, path: Path) -> str:
        """A path under the local root as the object name it has in the bucket."""
        return path.relative_to(self.root).as_posix()

    def location(self, path: Path) -> Path | str:
        """Where a file under the data root is for readers: the local path, or the object's URL."""
        return self.remote.url_of(self._name(path)) if self.remote else path

    @contextmanager
    def partition_lock(self, source: str, key: str) -> Iterator[None]:
        """The partition's lock: a local one between runs on this machine and, with a bucket, a lease object in it
        (a conditional write) between machines."""
        with storage.partition_lock(self.root, source, key):
            if self.remote is None:
                yield
                return
            with self.remote.lease(f"{storage.LOCKS_DIR}/{source}/{key}.lock"):
                yield

    def read_file(self, location: Path | str) -> bytes | None:
        """A small file under the data root (a thumbnail, a document) by the location `location` gives."""
        if isinstance(location, str) and self.remote is not None:
            if not location.startswith(self.remote.url + "/"):
                return None
            return self.remote.read(location[len(self.remote.url) + 1:])
        try:
            return Path(location).read_bytes()
        except OSError:
            return None

    def write_document(self, name: str, data: bytes) -> Path | str:
        """Write a small file at `name` under the data root whole (atomically); returns where it is."""
        if self.remote is not None:
            self.remote.write(name, data)
            return self.remote.url_of(name)
        storage.write_atomic(self.root / name, data)
        return self.root / name

    def read_document(self, name: str) -> bytes | None:
        if self.remote is not None:
            return self.remote.read(name)
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def remove_documents(self, folder: str, *, older_than_s: float | None = None) -> None:
        """Remove the folder `folder` under the data root, or (with `older_than_s`) each of its sub-folders whose
        newest file is older than that."""
        now = time.time()
        if self.remote is not None:
            if older_than_s is None:
                self.remote.delete_tree(folder)
                return
            newest: dict[str, float] = {}
            for relpath, info in self.remote.listing(folder).items():
                top = relpath.split("/", 1)[0]
                newest[top] = max(newest.get(top, 0.0), info.modified or now)
            for top, when in newest.items():
                if now - when > older_than_s:
                    self.remote.delete_tree(f"{folder}/{top}")
            return
        path = self.root / folder
        if older_than_s is None:
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_dir():
            for entry in path.iterdir():
                if entry.is_dir() and not entry.is_symlink() and now - entry.stat().st_mtime > older_than_s:
                    shutil.rmtree(entry, ignore_errors=True)

    def image_files(self, zarr_path: str) -> integrity.ImageFiles:
        """The files of the image a catalog row's `zarr_path` names."""
        if self.remote is not None and zarr_path.startswith(self.remote.url + "/"):
            return remote.RemoteImage(self.remote, zarr_path[len(self.remote.url) + 1:])
        return integrity.LocalImage(Path(zarr_path))

    def _raw_dir(self, request: DatasetRequest) -> Path:
        return storage.raw_dir(self.root, request.source, request.key)

    def _raw(self, request: DatasetRequest, source: Source, *, progress: Progress | None = None,
             to_read: bool = True) -> tuple[RawStore, bytes | None]:
        """The partition's raw store, and with a bucket the bucket's manifest as found: the local copy then holds the
        bucket's manifest, and (`to_read`, for a conversion) every file it lists; a fetch brings down only the files a
        source reads while fetching (`remote.BucketRaw`), and what the bucket holds unchanged stays there."""
        if self.remote is None:
            return self.raw_store(request, source, progress=progress), None
        raw_dir = self._raw_dir(request)
        before = remote.pull_raw(self.remote, raw_dir, self._name(raw_dir))
        backing = remote.BucketRaw(self.remote, self._name(raw_dir))
        raw = self.raw_store(request, source, progress=progress, backing=backing)
        if to_read:  # some readers open the folder as a whole (a mirrored Zarr or N5), not file by file
            raw.bring_all()
        return raw, before

    # ---- configuration ----------------------------------------------------------------------
    def selection(self) -> Selection:
        return load_selection(self.settings.datasets_file, option_models())

    def source(self, name: str) -> Source:
        try:
            return source_classes()[name](self.settings)
        except KeyError:
            raise SelectionError(f"unknown source {name!r}") from None

    def request(self, source: str, key: str) -> DatasetRequest:
        datasets = self.selection().get(source, {})
        if key not in datasets:
            raise SelectionError(f"{self.settings.datasets_file}: no dataset {key!r} under {source!r}")
        return datasets[key]

    def public_url(self) -> str | None:
        """Where browsers reach the data root (checked), or None when it is not published."""
        return view.public_base(self.settings.public_url)

    def neuroglancer_url(self, row: dict[str, Any], zarr_dir: Path | str) -> str | None:
        """A Neuroglancer link to one published image (labels included), or None without a public URL."""
        base = self.public_url()
        if base is None:
            return None
        labels = view.label_names(zarr_dir) if isinstance(zarr_dir, Path) else tuple(row.get("labels") or ())
        return view.neuroglancer_link(row, base, labels)

    def raw_store(self, request: DatasetRequest, source: Source, *, progress: Progress | None = None,
                  backing: RawBacking | None = None) -> RawStore:
        return RawStore(self.root, request.source, request.key, source.transports,
                        max_in_flight=self.settings.transfer.max_in_flight, progress=progress, backing=backing)

    # ---- steps ------------------------------------------------------------------------------
    def fetch_raw(self, request: DatasetRequest, *, progress_sink: Sink | None = None) -> Manifest:
        """Bring raw/<source>/<key> up to date; returns the new manifest (with transfer stats).

        How far the fetch has come goes to `progress_sink` as one-line messages (see `Progress`; default:
        the `em_ingest.progress` logger), ending with a final line.
        """
        source = self.source(request.source)
        with self.partition_lock(request.source, request.key), \
                fetch_progress(request.source, request.key, progress_sink) as progress:
            # With a bucket, what it holds unchanged stays there: only what changed comes down and goes up.
            raw, before = self._raw(request, source, progress=progress, to_read=False)
            raw.begin()  # sources may also write into the folder directly; commit clears the mark
            manifest = source.fetch_raw(request, raw)
            if self.remote is not None:
                remote.push_raw(self.remote, raw.dir, self._name(raw.dir), before)
            return manifest

    def inputs_digest(self, request: DatasetRequest, manifest: Manifest) -> str:
        body = {"manifest": manifest.digest, "options": request.options_dict(), "layout": asdict(self.layout),
                "converter": CONVERTER_VERSION}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def convert(self, request: DatasetRequest, *, force: bool = False) -> Conversion:
        """Write zarr/<source>/<key>.ome.zarr from the raw store, unless it already matches its inputs: the
        plan, every region and the publish in this process (the Dagster asset runs them as separate steps)."""
        plan = self.plan_conversion(request, force=force)
        parts = [self.convert_region(request, plan, i) for i in range(plan.region_count)]
        return self.publish_conversion(request, plan, parts)

    def plan_conversion(self, request: DatasetRequest, *, force: bool = False, run_id: str | None = None) -> ConversionPlan:
        """Decide how the image is written: not at all when it already matches its inputs, else in
        `region_count` regions (see `omezarr.regions`) into a new version folder made here, with the image's
        metadata and empty levels."""
        final = storage.zarr_path(self.root, request.source, request.key)
        while True:
            with self.partition_lock(request.source, request.key):
                busy = storage.writers_elsewhere(final)
                if not busy:
                    return self._plan(request, final, force=force, run_id=run_id)
            # Another run on this machine is converting this image now: wait for it, then see whether
            # it left anything to do (usually not: the same inputs give the same image).
            log.info("%s/%s: another run is writing %s; waiting for it", request.source, request.key, busy[0])
            time.sleep(WAIT_FOR_OTHER_WRITER_S)

    def _plan(self, request: DatasetRequest, final: Path, *, force: bool, run_id: str | None) -> ConversionPlan:
        """`plan_conversion`'s work, under the partition lock."""
        source = self.source(request.source)
        raw, _ = self._raw(request, source, to_read=False)  # the files only once there is something to convert
        manifest = raw.previous
        if manifest is None:
            raise EmIngestError(f"{request.source}/{request.key}: no raw download yet; materialize "
                                f"{request.source}/raw for this partition first")
        digest = self.inputs_digest(request, manifest)
        pointer = remote.read_pointer(self.remote, self._name(final)) if self.remote else None
        if not force and self._up_to_date(request, final, digest, pointer):
            return ConversionPlan(request.source, request.key, digest, None, None, ())
        if raw.interrupted:
            raise EmIngestError(f"{raw.dir}: the last fetch of {request.source}/{request.key} did not finish, so "
                                f"its files may not match {raw.manifest_path.name}; materialize {request.source}/raw "
                                "for this partition again before converting")
        raw.bring_all()
        with source.open_volume(request, raw) as volume:
            limits.check_volume(volume.shape, np.dtype(volume.dtype).itemsize, self.settings.limits,
                                f"{request.source}/{request.key} ({volume.name})", raw_bytes=manifest.total_bytes)
            geometry = resolve_geometry(volume, request)
            staging = storage.new_version(final, run_id)
            try:
                levels = create_image(staging, volume.shape, volume.dtype, geometry,
                                      name=f"{request.source}/{request.key}", layout=self.layout)
                if self.remote is not None:  # the version's metadata and writer record, for every later step
                    self._claim_remote(staging, run_id)
                    remote.push_tree(self.remote, staging, self._name(staging))
            except BaseException:
                self._discard(staging)
                raise
            blocks = [self.layout.block_for(level.shape) for level in levels]
            regions = plan_regions(levels, blocks, np.dtype(volume.dtype).itemsize, self.region_bytes)
        if regions.count > 1:
            log.info("%s/%s: %s converted in %d regions of up to %s (levels s0..s%d; s%d.. by the last step)",
                     request.source, request.key, "x".join(map(str, volume.shape)), regions.count,
                     self.settings.region_bytes, regions.top, regions.top + 1)
        if self.remote is not None:
            replaces = pointer.version if pointer else None
        else:
            published = storage.current_target(final)
            replaces = str(published) if published else None
        return ConversionPlan(request.source, request.key, digest, self._name(staging), regions, tuple(levels),
                              replaces, geometry, np.dtype(volume.dtype).str)

    @cached_property
    def layout(self) -> ZarrLayout:
        """How images are written; its zstd level is checked when first needed (a conversion), so a bad one
        fails the conversion naming the variable, never a command that only reads."""
        return ZarrLayout(ngff_version=self.settings.ngff_version,
                          zstd_level=parse_zstd_level(self.settings.zstd_level, "EM_INGEST_ZSTD_LEVEL / zstd_level"))

    @property
    def region_bytes(self) -> int:
        return parse_bytes(self.settings.region_bytes, "EM_INGEST_REGION_BYTES / region_bytes")

    def _published(self, final: Path, pointer: remote.Pointer | None) -> integrity.ImageFiles | None:
        """The files of the image published as `final` (`pointer`: its pointer, with a bucket), if any."""
        if self.remote is not None:
            return remote.RemoteImage(self.remote, pointer.version) if pointer else None
        return integrity.LocalImage(final) if final.exists() else None

    def _up_to_date(self, request: DatasetRequest, final: Path, digest: str, pointer: remote.Pointer | None) -> bool:
        """The published image was written from these inputs and still holds exactly what was written."""
        image = self._published(final, pointer)
        if image is None:
            return False
        try:
            sidecar = catalog.read_sidecar(image)
        except (OSError, ValueError):
            return False
        if sidecar.get("inputs_digest") != digest:
            return False
        damage = catalog.image_damage(image, sidecar)
        if damage:
            log.warning("%s/%s: the published image differs from what was written, so it is written again: %s",
                        request.source, request.key, "; ".join(damage[:5]))
        return not damage

    def convert_region(self, request: DatasetRequest, plan: ConversionPlan, index: int, *,
                       run_id: str | None = None, progress_sink: Sink | None = None) -> RegionWritten:
        """Write levels s0..s`top` of one region of a planned conversion (see `plan_conversion`). How far it has
        come (s0 blocks and bytes) goes to `progress_sink` as one-line messages (see `Progress`)."""
        assert plan.regions is not None, "a skipped conversion has no regions"
        staging = self._staging(request, plan)
        self._claim(staging, run_id)
        source = self.source(request.source)
        levels = list(plan.levels)
        boxes = plan.regions.boxes(index)
        what = f"convert {request.source}/{request.key}" + (
            f" region {index + 1} of {plan.regions.count} (levels s0..s{plan.regions.top})"
            if plan.regions.count > 1 else "")
        try:
            with source.open_volume(request, self._raw(request, source)[0]) as volume, \
                    self._working_copy(staging) as (folder, pulled), \
                    Progress(what, unit="blocks", sink=progress_sink,
                             total_units=blocks_in(boxes, self.layout.block_for(levels[0].shape)),
                             total_bytes=voxels_in(boxes) * np.dtype(volume.dtype).itemsize) as progress:
                intensity = write_levels(volume, folder, levels, layout=self.layout, last=plan.regions.top,
                                         within=boxes, on_block=lambda nbytes: progress.advance(1, nbytes))
                if self.remote is not None:  # this region's shards, each written whole by this step alone
                    remote.push_tree(self.remote, folder, self._name(staging), skip=pulled)
        except BaseException:
            if plan.regions.count == 1:  # no other step writes into it: nothing worth keeping
                self._discard(staging)
            raise
        return RegionWritten(index, intensity.as_dict())

    @contextmanager
    def _working_copy(self, staging: Path, data: Callable[[str], bool] = lambda relpath: False
                      ) -> Iterator[tuple[Path, set[str]]]:
        """The folder a step writes the version into, and the files it was given. On a local data root, the version
        folder itself. With a bucket, a fresh private folder holding the version's metadata and the data files
        `data` accepts, removed afterwards: steps on one machine never share one, and the disk a step needs is
        what it reads and writes."""
        if self.remote is None:
            yield staging, set()
            return
        folder = Path(tempfile.mkdtemp(prefix=f"{staging.name}.", dir=self._scratch_dir()))
        try:
            pulled = remote.pull_tree(self.remote, self._name(staging), folder,
                                      lambda relpath: relpath.rsplit("/", 1)[-1] in integrity.METADATA_NAMES
                                      or data(relpath))
            yield folder, pulled
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _scratch_dir(self) -> Path:
        path = self.root / ".scratch"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _claim(self, staging: Path, run_id: str | None) -> None:
        """Record that this step writes the version now (see `storage.claim_version`)."""
        if self.remote is not None:
            self._claim_remote(staging, run_id)
        else:
            storage.claim_version(staging, run_id)

    def _claim_remote(self, staging: Path, run_id: str | None) -> None:
        assert self.remote is not None
        self.remote.write(f"{self._name(staging)}{storage.WRITER_SUFFIX}",
                          json.dumps(storage.writer_record(run_id)).encode())

    def _discard(self, staging: Path) -> None:
        """Remove a version that will not be published, locally and in the bucket."""
        storage.discard_version(staging)
        if self.remote is not None:
            remote.discard(self.remote, self._name(staging))

    def _staging(self, request: DatasetRequest, plan: ConversionPlan) -> Path:
        """The plan's version folder, proven to be one of this image's before a step writes into it or removes it:
        the plan comes back from a record under the data root, which anyone who can write there could edit."""
        final = storage.zarr_path(self.root, request.source, request.key)
        staging = self.root / (plan.staging or "")
        if (plan.source, plan.key) != (request.source, request.key) or not storage.is_version_name(final, staging):
            raise EmIngestError(f"{request.source}/{request.key}: the conversion plan names {plan.staging}, which is "
                                f"not a version folder of {self.location(final)}; refused")
        present = (self.remote.info(f"{plan.staging}{storage.WRITER_SUFFIX}") is not None if self.remote
                   else staging.is_dir())
        if not present:
            raise EmIngestError(f"{request.source}/{request.key}: the version folder {self.location(staging)} this "
                                "conversion was writing is gone (removed after a failure, or as abandoned); "
                                "materialize the partition again")
        return staging

    def publish_conversion(self, request: DatasetRequest, plan: ConversionPlan, parts: Sequence[RegionWritten], *,
                           run_id: str | None = None, finished_run: Callable[[str], bool] | None = None,
                           progress_sink: Sink | None = None) -> Conversion:
        """After every region: the levels above them, labels, thumbnail, sidecar, then the atomic publish.
        `finished_run` tells whether an orchestrator run is over (its abandoned version folders then go);
        `progress_sink` is told how far the levels above the regions have come."""
        final = storage.zarr_path(self.root, request.source, request.key)
        if plan.staging is None or plan.regions is None:
            return self._published_conversion(final, plan.inputs_digest)
        staging = self._staging(request, plan)
        missing = sorted(set(range(plan.regions.count)) - {part.index for part in parts})
        if missing:
            raise EmIngestError(f"{request.source}/{request.key}: regions {missing} were not written")
        with self.partition_lock(request.source, request.key):
            pointer = remote.read_pointer(self.remote, self._name(final)) if self.remote else None
            if self.remote is not None:
                published: Path | str | None = pointer.version if pointer else None
            else:
                published = storage.current_target(final)
            if str(published) != str(plan.replaces) and self._up_to_date(request, final, plan.inputs_digest, pointer):
                # Another run published the same inputs meanwhile (on another machine: runs on this one wait
                # for each other in `plan_conversion`); its image is the one this run would publish.
                log.info("%s/%s: another run published this image meanwhile; this run's copy is discarded",
                         request.source, request.key)
                self._discard(staging)
                return self._published_conversion(final, plan.inputs_digest)
            self._claim(staging, run_id)
            try:
                conversion = self._finish(request, plan, parts, staging, final, progress_sink)
                if self.remote is None:
                    storage.publish_version(final, staging, finished_run)
                else:
                    self._publish_remote(final, staging, plan, pointer, finished_run)
            except BaseException:
                self._discard(staging)
                raise
        return conversion

    def _publish_remote(self, final: Path, staging: Path, plan: ConversionPlan, pointer: remote.Pointer | None,
                        finished_run: Callable[[str], bool] | None) -> None:
        """Make the version current by rewriting the image's pointer object, then remove versions no one needs.
        Raises only before the pointer is written: after that the version is published and must not be discarded."""
        assert self.remote is not None
        version = self._name(staging)
        grace = parse_duration(self.settings.replaced_grace, "EM_INGEST_REPLACED_GRACE / replaced_grace")
        new = remote.publish(self.remote, self._name(final), version, plan.inputs_digest, pointer)
        storage.discard_version(staging)  # the local copy of its metadata
        try:
            self.remote.delete(f"{version}{storage.WRITER_SUFFIX}")
            remote.collect(self.remote, self._name(final),
                           self._name(final.parent / storage.VERSIONS_DIR / final.name), new, grace_s=grace,
                           is_version=storage.is_version_folder_name,
                           abandoned=lambda record, modified: storage.record_abandoned(
                               storage.checked_record(record), modified, finished_run))
        except StorageError as exc:  # published; tidying up is retried by the next publish of this image
            log.warning("%s: published, but removing versions no one needs failed: %s", self.location(final), exc)

    def _published_conversion(self, final: Path, inputs_digest: str) -> Conversion:
        """The image already published as `final`, as a conversion that wrote nothing."""
        pointer = remote.read_pointer(self.remote, self._name(final)) if self.remote else None
        image = self._published(final, pointer)
        if image is None:
            raise EmIngestError(f"{self.location(final)}: not published")
        sidecar = catalog.read_sidecar(image)
        where: Path | str = final if self.remote is None else image.where
        thumbnail = final / "thumbnail.png" if isinstance(where, Path) else f"{where}/thumbnail.png"
        return Conversion(sidecar["catalog_row"], sidecar["levels"], where, thumbnail, True, inputs_digest)

    def _finish(self, request: DatasetRequest, plan: ConversionPlan, parts: Sequence[RegionWritten],
                staging: Path, final: Path, progress_sink: Sink | None) -> Conversion:
        assert plan.regions is not None
        source = self.source(request.source)
        raw, _ = self._raw(request, source)
        manifest = raw.previous
        if manifest is None or self.inputs_digest(request, manifest) != plan.inputs_digest:
            raise EmIngestError(f"{request.source}/{request.key}: the raw download changed while it was converted; "
                                "materialize the partition again")
        levels = list(plan.levels)
        # The levels this step reads back: the regions' last one (to build those above it) and the thumbnail's.
        read_back = {levels[plan.regions.top].path, levels[thumbnail_level([lv.shape for lv in levels])].path}
        with self._working_copy(staging, lambda relpath: relpath.split("/", 1)[0] in read_back) as (folder, pulled):
            result, labels = self._complete(request, plan, parts, folder, source, raw, progress_sink)
            assert plan.geometry is not None
            image_at: Path | str = final if self.remote is None else self.remote.url_of(self._name(staging))
            row = self._row(request, source.describe(request, raw), plan.geometry, manifest, result, image_at, labels)
            levels_record = [{"path": lv.path, "shape": list(lv.shape), "scale_nm": list(lv.scale_nm),
                              "translation_nm": list(lv.translation_nm)} for lv in result.levels]
            image: integrity.ImageFiles = integrity.LocalImage(staging)
            if self.remote is not None:
                remote.push_tree(self.remote, folder, self._name(staging), skip=pulled)
                image = remote.RemoteImage(self.remote, self._name(staging))
            sidecar = {"inputs_digest": plan.inputs_digest, "catalog_row": row, "levels": levels_record,
                       "request": request.options_dict(), "raw_manifest_sha256": manifest.digest,
                       "written": catalog.record_image(image)}
            data = json.dumps(sidecar, indent=1, default=str).encode()
            if self.remote is not None:
                self.remote.write(f"{self._name(staging)}/{catalog.SIDECAR_NAME}", data)
            else:  # synced like the image, since the next step publishes it
                storage.write_atomic(staging / catalog.SIDECAR_NAME, data)
        thumbnail = (image_at / "thumbnail.png" if isinstance(image_at, Path) else f"{image_at}/thumbnail.png") \
            if result.thumbnail else None
        return Conversion(row, levels_record, image_at, thumbnail, False, plan.inputs_digest)

    def _complete(self, request: DatasetRequest, plan: ConversionPlan, parts: Sequence[RegionWritten], folder: Path,
                  source: Source, raw: RawStore, progress_sink: Sink | None) -> tuple[WriteResult, list[WrittenLabel]]:
        """Write what the regions left into `folder`: the levels above them, the thumbnail, the labels."""
        assert plan.regions is not None and plan.geometry is not None and plan.dtype is not None
        levels = list(plan.levels)
        if plan.regions.top + 1 < len(levels):
            top = StoredLevel(folder, levels[plan.regions.top], self.layout)
            whole = [triple(slice(0, n) for n in top.shape)]
            with Progress(f"convert {request.source}/{request.key} levels s{plan.regions.top + 1}..s{len(levels) - 1} "
                          f"from s{plan.regions.top}", unit="blocks", sink=progress_sink,
                          total_units=blocks_in(whole, self.layout.block_for(top.shape)),
                          total_bytes=voxels_in(whole) * top.dtype.itemsize) as progress:
                write_levels(top, folder, levels, layout=self.layout, first=plan.regions.top, stored=True,
                             on_block=lambda nbytes: progress.advance(1, nbytes))
        intensity = Intensity()
        for part in sorted(parts, key=lambda p: p.index):
            intensity = intensity.merge(Intensity.from_dict(part.intensity))
        result = finish_image(folder, levels, np.dtype(plan.dtype), intensity, layout=self.layout)
        labels = self._write_labels(request, source, raw, folder, result, plan.geometry)
        return result, labels

    def _write_labels(self, request: DatasetRequest, source: Source, raw: RawStore, staging: Path,
                      image: WriteResult, geometry: Geometry) -> list[WrittenLabel]:
        """The labels the selection asks for, written under the image's `labels/` group."""
        with ExitStack() as opened:
            labels = source.open_labels(request, raw)
            for label in labels:
                opened.enter_context(label.volume)
                limits.check_volume(label.volume.shape, np.dtype(label.volume.dtype).itemsize, self.settings.limits,
                                    f"{request.source}/{request.key} label {label.name} ({label.volume.name})")
            return write_labels(staging, labels, image, geometry, image_name=f"{request.source}/{request.key}",
                                layout=self.layout)

    def _row(self, request: DatasetRequest, d: Description, geometry: Geometry, manifest: Manifest,
             result: WriteResult, final: Path | str, labels: list[WrittenLabel]) -> dict[str, Any]:
        shape = result.levels[0].shape
        translation = geometry.translation_nm or (None, None, None)
        row = catalog.CatalogRow(
            source=request.source, dataset_key=request.key,
            title=d.title, description=d.description, organism=d.organism, sample=d.sample,
            imaging_method=d.imaging_method,
            shape_z=shape[0], shape_y=shape[1], shape_x=shape[2], dtype=result.dtype,
            voxel_size_z_nm=geometry.voxel_size_nm[0], voxel_size_y_nm=geometry.voxel_size_nm[1],
            voxel_size_x_nm=geometry.voxel_size_nm[2], voxel_size_origin=geometry.voxel_size_origin,
            translation_z_nm=translation[0], translation_y_nm=translation[1], translation_x_nm=translation[2],
            n_scales=len(result.levels), chunk_shape=list(result.chunks), compression=result.compression,
            raw_bytes=manifest.total_bytes, stored_bytes=result.stored_bytes,
            source_url=d.source_url or (manifest.entries[0].url if manifest.entries else None),
            doi=d.doi, license=d.license, authors="; ".join(d.authors) or None,
            source_version=d.source_version or manifest.source_version,
            raw_manifest_sha256=manifest.digest,
            zarr_path=str(final), thumbnail_path=f"{final}/thumbnail.png" if result.thumbnail else None,
            intensity_min=result.intensity_min, intensity_max=result.intensity_max,
            intensity_mean=result.intensity_mean,
            extra_json=json.dumps({"ngff_version": result.ngff_version, "shards": result.shards, **d.extra,
                                   **({"labels": {lb.name: lb.catalog_entry() for lb in labels}} if labels else {})},
                                  sort_keys=True, default=str),
            labels=[label.name for label in labels] or None,
        )
        # The sidecar keeps the row as JSON: the timestamp as ISO text, the status set when the catalog is built.
        return {**row.as_dict(), "ingested_at": datetime.now(UTC).isoformat()}

    def verify_conversion(self, request: DatasetRequest, conversion: Conversion) -> Verification:
        """Re-read the published image independently of the writer (OME-NGFF spec models) and compare
        s0 with the source volume as the raw store presents it: shape, dtype, voxel size."""
        try:
            summary = validate_ome_zarr(conversion.zarr_path, self.remote.storage_options if self.remote else None)
        except ValidationError as exc:
            return Verification(ngff_version=None, levels=0, problem=str(exc), expected={}, found={}, mismatched=())
        source = self.source(request.source)
        with source.open_volume(request, self._raw(request, source)[0]) as volume:
            geometry = resolve_geometry(volume, request)
            expected = {"shape": list(volume.shape), "dtype": str(np.dtype(volume.dtype).newbyteorder("=")),
                        "voxel_size_nm": [float(v) for v in geometry.voxel_size_nm],
                        "labels": sorted(getattr(request.options, "labels", None) or {})}
        found = {"shape": list(summary.shapes[0]), "dtype": summary.dtype,
                 "voxel_size_nm": [float(v) for v in summary.scales_nm[0]], "labels": sorted(summary.labels)}
        mismatched = tuple(k for k in expected if expected[k] != found[k])
        return Verification(summary.ngff_version, len(summary.paths), None, expected, found, mismatched)

    def catalog_rows(self) -> tuple[list[dict[str, Any]], list[catalog.CatalogProblem]]:
        """A row for every image em-ingest published under the data root, and the images whose sidecar
        cannot be read (reported, never silently left out)."""
        selection = self.selection()
        self.public_url()  # a malformed public URL fails here, before any row is made
        rows, problems = [], []
        for key, zarr_dir in self._published_images():
            try:
                row = dict(catalog.read_sidecar(zarr_dir)["catalog_row"])
                row["ingested_at"] = datetime.fromisoformat(row["ingested_at"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                where = zarr_dir if isinstance(zarr_dir, Path) else zarr_dir.where
                problems.append(catalog.CatalogProblem(
                    "unreadable_sidecar", f"{key}: {where}/{catalog.SIDECAR_NAME} cannot be read ({exc}); "
                    "materialize its ome_zarr partition again", key))
                continue
            row["status"] = "ok" if row["dataset_key"] in selection.get(row["source"], {}) else "unselected"
            self._add_link(row, zarr_dir if isinstance(zarr_dir, Path) else zarr_dir.where)
            rows.append(row)
        return rows, problems

    def _published_images(self) -> list[tuple[str, Path | remote.RemoteImage]]:
        """Every image em-ingest published under zarr/, as `source/key` and where its files are."""
        found: list[tuple[str, Path | remote.RemoteImage]] = []
        if self.remote is None:
            for zarr_dir in sorted((self.root / "zarr").glob("*/*.ome.zarr")):
                if not zarr_dir.is_symlink() and not (zarr_dir / catalog.SIDECAR_NAME).exists():
                    continue  # a folder em-ingest did not publish (ours are links into .versions/)
                found.append((f"{zarr_dir.parent.name}/{zarr_dir.name.removesuffix('.ome.zarr')}", zarr_dir))
            return found
        for source in self.remote.children("zarr"):
            for name in self.remote.children(f"zarr/{source}"):
                if not name.endswith(".ome.zarr"):
                    continue
                pointer = remote.read_pointer(self.remote, f"zarr/{source}/{name}")
                if pointer is not None:  # a prefix of that name is not one of ours (ours are pointer objects)
                    found.append((f"{source}/{name.removesuffix('.ome.zarr')}",
                                  remote.RemoteImage(self.remote, pointer.version)))
        return found

    def _add_link(self, row: dict[str, Any], zarr_dir: Path | str) -> None:
        # Made when the catalog is built, not kept in the sidecar, so a changed public URL needs no
        # reconversion: extra_json's `neuroglancer_url` always points at the current one.
        try:
            link = self.neuroglancer_url(row, zarr_dir)
        except view.ViewError as exc:
            log.warning("%s/%s: no Neuroglancer link: %s", row["source"], row["dataset_key"], exc)
            return
        if link is None:
            return
        try:
            extra = json.loads(row["extra_json"]) if row.get("extra_json") else {}
        except ValueError:
            extra = {}
        if not isinstance(extra, dict):
            extra = {"source_extra": extra}
        extra["neuroglancer_url"] = link
        row["extra_json"] = json.dumps(extra, sort_keys=True, default=str)

    def build_catalog(self) -> tuple[pa.Table, Path | str, list[catalog.CatalogProblem]]:
        """One row per published OME-Zarr under the data root, written to catalog/metadata_catalog.parquet;
        also returns the published images that could not be listed."""
        rows, problems = self.catalog_rows()
        table = catalog.rows_to_table(rows)
        path = storage.catalog_path(self.root)
        with self.partition_lock("catalog", path.stem):
            catalog.write_catalog(table, path)
            if self.remote is not None:
                name = self._name(path)
                data = path.read_bytes()
                if self.remote.read(name) != data:  # one PUT: readers get the old catalog or the new one
                    self.remote.write(name, data)
        return table, self.location(path), problems

    def read_catalog(self) -> pa.Table:
        """The catalog as last built (a ValidationError naming where it should be, if it is not readable)."""
        path = storage.catalog_path(self.root)
        if self.remote is None:
            return catalog.read_catalog(path)
        return catalog.read_catalog_bytes(self.remote.read(self._name(path)), str(self.location(path)))

    def catalog_problems(self, table: pa.Table) -> list[catalog.CatalogProblem]:
        return catalog.catalog_problems(table, self.image_files)
