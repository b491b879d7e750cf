"""The ingest steps as plain functions over Settings: fetch raw, convert to OME-Zarr, build the catalog.

The Dagster assets, the CLI and the benchmarks all call these; nothing here imports Dagster.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from em_ingest import catalog, limits, storage, view
from em_ingest.errors import EmIngestError, SelectionError, ValidationError
from em_ingest.formats.volume import Geometry, Volume, triple
from em_ingest.omezarr.labels import WrittenLabel, write_labels
from em_ingest.omezarr.pyramid import Level
from em_ingest.omezarr.regions import RegionPlan, blocks_in, plan_regions, voxels_in
from em_ingest.omezarr.validate import validate_ome_zarr
from em_ingest.omezarr.writer import Intensity, StoredLevel, WriteResult, ZarrLayout, create_image, finish_image, write_levels
from em_ingest.progress import Progress, Sink
from em_ingest.raw import Manifest, RawStore, fetch_progress
from em_ingest.selection import DatasetRequest, Selection, load_selection
from em_ingest.settings import Settings, parse_bytes
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
    zarr_path: Path
    thumbnail_path: Path | None
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


class Pipeline:
    """One configured em-ingest: settings, the selection file and the data root."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = storage.local_root(settings.data_root)
        self.layout = ZarrLayout(ngff_version=settings.ngff_version)

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

    def neuroglancer_url(self, row: dict[str, Any], zarr_dir: Path) -> str | None:
        """A Neuroglancer link to one published image (labels included), or None without a public URL."""
        base = self.public_url()
        if base is None:
            return None
        return view.neuroglancer_link(row, base, view.label_names(zarr_dir))

    def raw_store(self, request: DatasetRequest, source: Source, *, progress: Progress | None = None) -> RawStore:
        return RawStore(self.root, request.source, request.key, source.transports,
                        max_in_flight=self.settings.transfer.max_in_flight, progress=progress)

    # ---- steps ------------------------------------------------------------------------------
    def fetch_raw(self, request: DatasetRequest, *, progress_sink: Sink | None = None) -> Manifest:
        """Bring raw/<source>/<key> up to date; returns the new manifest (with transfer stats).

        How far the fetch has come goes to `progress_sink` as one-line messages (see `Progress`; default:
        the `em_ingest.progress` logger), ending with a final line.
        """
        source = self.source(request.source)
        with storage.partition_lock(self.root, request.source, request.key), \
                fetch_progress(request.source, request.key, progress_sink) as progress:
            raw = self.raw_store(request, source, progress=progress)
            raw.begin()  # sources may also write into the folder directly; commit clears the mark
            return source.fetch_raw(request, raw)

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
            with storage.partition_lock(self.root, request.source, request.key):
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
        raw = self.raw_store(request, source)
        manifest = raw.previous
        if manifest is None:
            raise EmIngestError(f"{request.source}/{request.key}: no raw download yet; materialize "
                                f"{request.source}/raw for this partition first")
        digest = self.inputs_digest(request, manifest)
        if not force and self._up_to_date(request, final, digest):
            return ConversionPlan(request.source, request.key, digest, None, None, ())
        if raw.interrupted:
            raise EmIngestError(f"{raw.dir}: the last fetch of {request.source}/{request.key} did not finish, so "
                                f"its files may not match {raw.manifest_path.name}; materialize {request.source}/raw "
                                "for this partition again before converting")
        with source.open_volume(request, raw) as volume:
            limits.check_volume(volume.shape, np.dtype(volume.dtype).itemsize, self.settings.limits,
                                f"{request.source}/{request.key} ({volume.name})", raw_bytes=manifest.total_bytes)
            geometry = resolve_geometry(volume, request)
            staging = storage.new_version(final, run_id)
            try:
                levels = create_image(staging, volume.shape, volume.dtype, geometry,
                                      name=f"{request.source}/{request.key}", layout=self.layout)
            except BaseException:
                storage.discard_version(staging)
                raise
            blocks = [self.layout.block_for(level.shape) for level in levels]
            regions = plan_regions(levels, blocks, np.dtype(volume.dtype).itemsize, self.region_bytes)
        if regions.count > 1:
            log.info("%s/%s: %s converted in %d regions of up to %s (levels s0..s%d; s%d.. by the last step)",
                     request.source, request.key, "x".join(map(str, volume.shape)), regions.count,
                     self.settings.region_bytes, regions.top, regions.top + 1)
        published = storage.current_target(final)
        return ConversionPlan(request.source, request.key, digest, str(staging), regions, tuple(levels),
                              str(published) if published else None, geometry, np.dtype(volume.dtype).str)

    @property
    def region_bytes(self) -> int:
        return parse_bytes(self.settings.region_bytes, "EM_INGEST_REGION_BYTES / region_bytes")

    def _up_to_date(self, request: DatasetRequest, final: Path, digest: str) -> bool:
        """The published image was written from these inputs and still holds exactly what was written."""
        if not final.exists():
            return False
        try:
            sidecar = catalog.read_sidecar(final)
        except (OSError, ValueError):
            return False
        if sidecar.get("inputs_digest") != digest:
            return False
        damage = catalog.image_damage(final, sidecar)
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
        storage.claim_version(staging, run_id)
        source = self.source(request.source)
        levels = list(plan.levels)
        boxes = plan.regions.boxes(index)
        what = f"convert {request.source}/{request.key}" + (
            f" region {index + 1} of {plan.regions.count} (levels s0..s{plan.regions.top})"
            if plan.regions.count > 1 else "")
        try:
            with source.open_volume(request, self.raw_store(request, source)) as volume, \
                    Progress(what, unit="blocks", sink=progress_sink,
                             total_units=blocks_in(boxes, self.layout.block_for(levels[0].shape)),
                             total_bytes=voxels_in(boxes) * np.dtype(volume.dtype).itemsize) as progress:
                intensity = write_levels(volume, staging, levels, layout=self.layout, last=plan.regions.top,
                                         within=boxes, on_block=lambda nbytes: progress.advance(1, nbytes))
        except BaseException:
            if plan.regions.count == 1:  # no other step writes into it: nothing worth keeping
                storage.discard_version(staging)
            raise
        return RegionWritten(index, intensity.as_dict())

    def _staging(self, request: DatasetRequest, plan: ConversionPlan) -> Path:
        """The plan's version folder, proven to be one of this image's before a step writes into it or removes it:
        the plan comes back from a record under the data root, which anyone who can write there could edit."""
        final = storage.zarr_path(self.root, request.source, request.key)
        staging = Path(plan.staging or "")
        if (plan.source, plan.key) != (request.source, request.key) or not storage.is_version_name(final, staging):
            raise EmIngestError(f"{request.source}/{request.key}: the conversion plan names {staging}, which is not a "
                                f"version folder of {final}; refused")
        if not staging.is_dir():
            raise EmIngestError(f"{request.source}/{request.key}: the version folder {staging} this conversion was "
                                "writing is gone (removed after a failure, or as abandoned); materialize the "
                                "partition again")
        return staging

    def publish_conversion(self, request: DatasetRequest, plan: ConversionPlan, parts: Sequence[RegionWritten], *,
                           run_id: str | None = None, finished_run: Callable[[str], bool] | None = None,
                           progress_sink: Sink | None = None) -> Conversion:
        """After every region: the levels above them, labels, thumbnail, sidecar, then the atomic publish.
        `finished_run` tells whether an orchestrator run is over (its abandoned version folders then go);
        `progress_sink` is told how far the levels above the regions have come."""
        final = storage.zarr_path(self.root, request.source, request.key)
        if plan.staging is None or plan.regions is None:
            sidecar = catalog.read_sidecar(final)
            return Conversion(sidecar["catalog_row"], sidecar["levels"], final, final / "thumbnail.png", True,
                              plan.inputs_digest)
        staging = self._staging(request, plan)
        missing = sorted(set(range(plan.regions.count)) - {part.index for part in parts})
        if missing:
            raise EmIngestError(f"{request.source}/{request.key}: regions {missing} were not written")
        with storage.partition_lock(self.root, request.source, request.key):
            published = storage.current_target(final)
            if str(published) != str(plan.replaces) and self._up_to_date(request, final, plan.inputs_digest):
                # Another run published the same inputs meanwhile (on another machine: runs on this one wait
                # for each other in `plan_conversion`); its image is the one this run would publish.
                log.info("%s/%s: another run published this image meanwhile; this run's copy is discarded",
                         request.source, request.key)
                storage.discard_version(staging)
                sidecar = catalog.read_sidecar(final)
                return Conversion(sidecar["catalog_row"], sidecar["levels"], final, final / "thumbnail.png", True,
                                  plan.inputs_digest)
            storage.claim_version(staging, run_id)
            try:
                conversion = self._finish(request, plan, parts, staging, final, progress_sink)
            except BaseException:
                storage.discard_version(staging)
                raise
            storage.publish_version(final, staging, finished_run)
        return conversion

    def _finish(self, request: DatasetRequest, plan: ConversionPlan, parts: Sequence[RegionWritten],
                staging: Path, final: Path, progress_sink: Sink | None) -> Conversion:
        assert plan.regions is not None
        source = self.source(request.source)
        raw = self.raw_store(request, source)
        manifest = raw.previous
        if manifest is None or self.inputs_digest(request, manifest) != plan.inputs_digest:
            raise EmIngestError(f"{request.source}/{request.key}: the raw download changed while it was converted; "
                                "materialize the partition again")
        levels = list(plan.levels)
        if plan.regions.top + 1 < len(levels):
            top = StoredLevel(staging, levels[plan.regions.top], self.layout)
            whole = [triple(slice(0, n) for n in top.shape)]
            with Progress(f"convert {request.source}/{request.key} levels s{plan.regions.top + 1}..s{len(levels) - 1} "
                          f"from s{plan.regions.top}", unit="blocks", sink=progress_sink,
                          total_units=blocks_in(whole, self.layout.block_for(top.shape)),
                          total_bytes=voxels_in(whole) * top.dtype.itemsize) as progress:
                write_levels(top, staging, levels, layout=self.layout, first=plan.regions.top, stored=True,
                             on_block=lambda nbytes: progress.advance(1, nbytes))
        intensity = Intensity()
        for part in sorted(parts, key=lambda p: p.index):
            intensity = intensity.merge(Intensity.from_dict(part.intensity))
        assert plan.geometry is not None and plan.dtype is not None, "a plan that writes records both"
        geometry = plan.geometry
        description = source.describe(request, raw)
        result = finish_image(staging, levels, np.dtype(plan.dtype), intensity, layout=self.layout)
        labels = self._write_labels(request, source, raw, staging, result, geometry)
        row = self._row(request, description, geometry, manifest, result, final, labels)
        levels_record = [{"path": lv.path, "shape": list(lv.shape), "scale_nm": list(lv.scale_nm),
                          "translation_nm": list(lv.translation_nm)} for lv in result.levels]
        sidecar = {"inputs_digest": plan.inputs_digest, "catalog_row": row, "levels": levels_record,
                   "request": request.options_dict(), "raw_manifest_sha256": manifest.digest,
                   "written": catalog.record_image(staging)}
        # Synced like the image, since the next step publishes it.
        storage.write_atomic(staging / catalog.SIDECAR_NAME, json.dumps(sidecar, indent=1, default=str).encode())
        return Conversion(row, levels_record, final, final / "thumbnail.png", False, plan.inputs_digest)

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
             result: WriteResult, final: Path, labels: list[WrittenLabel]) -> dict[str, Any]:
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
            zarr_path=str(final), thumbnail_path=str(final / "thumbnail.png") if result.thumbnail else None,
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
            summary = validate_ome_zarr(conversion.zarr_path)
        except ValidationError as exc:
            return Verification(ngff_version=None, levels=0, problem=str(exc), expected={}, found={}, mismatched=())
        source = self.source(request.source)
        with source.open_volume(request, self.raw_store(request, source)) as volume:
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
        for zarr_dir in sorted((self.root / "zarr").glob("*/*.ome.zarr")):
            key = f"{zarr_dir.parent.name}/{zarr_dir.name.removesuffix('.ome.zarr')}"
            if not zarr_dir.is_symlink() and not (zarr_dir / catalog.SIDECAR_NAME).exists():
                continue  # a folder em-ingest did not publish (ours are links into .versions/)
            try:
                row = dict(catalog.read_sidecar(zarr_dir)["catalog_row"])
                row["ingested_at"] = datetime.fromisoformat(row["ingested_at"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                problems.append(catalog.CatalogProblem(
                    "unreadable_sidecar", f"{key}: {zarr_dir / catalog.SIDECAR_NAME} cannot be read ({exc}); "
                    "materialize its ome_zarr partition again", key))
                continue
            row["status"] = "ok" if row["dataset_key"] in selection.get(row["source"], {}) else "unselected"
            self._add_link(row, zarr_dir)
            rows.append(row)
        return rows, problems

    def _add_link(self, row: dict[str, Any], zarr_dir: Path) -> None:
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

    def build_catalog(self) -> tuple[pa.Table, Path, list[catalog.CatalogProblem]]:
        """One row per published OME-Zarr under the data root, written to catalog/metadata_catalog.parquet;
        also returns the published images that could not be listed."""
        rows, problems = self.catalog_rows()
        table = catalog.rows_to_table(rows)
        path = storage.catalog_path(self.root)
        with storage.partition_lock(self.root, "catalog", path.stem):
            catalog.write_catalog(table, path)
        return table, path, problems
