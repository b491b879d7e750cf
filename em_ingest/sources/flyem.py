"""Janelia FlyEM: neuPrint dataset metadata (bearer token) and grayscale crops from precomputed or DVID."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any, Literal

import numpy as np
from pydantic import field_validator

from em_ingest.archives.dvid import DVID_MAX_IN_FLIGHT, DVID_TILE_EDGE, DvidNode, dvid_tiles, extents, voxel_size_nm
from em_ingest.archives.neuprint import (
    KNOWN_DATASETS,
    META_QUERY,
    NeuprintClient,
    dataset_version,
    meta_row,
    meta_voxel_size_nm,
    normalize_token,
)
from em_ingest.errors import FormatError, SelectionError, SourceResponseError, TransferError, UnsupportedDataError
from em_ingest.formats.dvid import DvidTileVolume, Tile
from em_ingest.formats.precomputed import XYZ, PrecomputedCrop, PrecomputedInfo, Scale, ShardingSpec, iter_shard_groups
from em_ingest.formats.volume import Geometry, Volume
from em_ingest.raw import Manifest, ManifestEntry, RawStore, TransferStats, Wanted, byte_range_of
from em_ingest.selection import DatasetOptions, DatasetRequest
from em_ingest.settings import Setting
from em_ingest.sources.base import Description, InventoryItem, Source, options_as
from em_ingest.transfer.base import RemoteObject, is_absent

__all__ = [
    "DVID_TILE_EDGE",
    "PRECOMPUTED_URL",
    "SOURCE",
    "FlyemOptions",
    "FlyemSource",
    "dvid_tiles",
    "normalize_token",
]

log = logging.getLogger(__name__)

DEFAULT_DATASET = "hemibrain:v1.2.1"
DVID_INSTANCE = "grayscale"  # raw uint8 full resolution in the hemibrain grayscale repo
# The grayscale endpoints default to the hemibrain's (SOURCES.md §2).
PRECOMPUTED_URL = Setting("flyem_precomputed_url", "EM_INGEST_FLYEM_PRECOMPUTED_URL",
                          "https://storage.googleapis.com/neuroglancer-janelia-flyem-hemibrain/emdata/clahe_yz/jpeg",
                          "hemibrain grayscale (Neuroglancer precomputed)")
DVID_UUID = Setting("flyem_dvid_uuid", "EM_INGEST_FLYEM_DVID_UUID", "a89eb3af216a46cdba81204d8f954786", "DVID node")

# raw/ layout
DATASETS_DOC = "neuprint/datasets.json"
META_DOC = "neuprint/meta.json"
INFO_FILE = "precomputed/info"
CHUNKS_DOC = "precomputed/chunks.json"
DVID_COMMIT_DOC = "dvid/commit.json"
DVID_INFO_DOC = "dvid/info.json"

# The manifest version of a chunk cut from a shard: its byte range, inclusive end.


class FlyemOptions(DatasetOptions):
    dataset: str = DEFAULT_DATASET
    grayscale: Literal["precomputed", "dvid"] = "precomputed"
    offset_zyx: tuple[int, int, int]
    shape_zyx: tuple[int, int, int]

    @field_validator("offset_zyx")
    @classmethod
    def _non_negative(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(value) < 0:
            raise ValueError(f"offset_zyx must be voxel coordinates >= 0, got {list(value)}")
        return value

    @field_validator("shape_zyx")
    @classmethod
    def _positive(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(value) <= 0:
            raise ValueError(f"shape_zyx must be positive, got {list(value)}")
        return value

    @property
    def start_xyz(self) -> tuple[int, int, int]:
        return self.offset_zyx[::-1]

    @property
    def stop_xyz(self) -> tuple[int, int, int]:
        (z, y, x), (dz, dy, dx) = self.offset_zyx, self.shape_zyx
        return (x + dx, y + dy, z + dz)


class FlyemSource(Source):
    name = "flyem"
    title = "Janelia FlyEM (neuPrint metadata; hemibrain grayscale from precomputed or DVID)"
    Options = FlyemOptions
    configuration = (
        Setting("neuprint_server", "NEUPRINT_SERVER", "https://neuprint.janelia.org", "neuPrint base URL"),
        Setting("neuprint_token", "NEUPRINT_TOKEN", None, "neuPrint bearer token", secret=True),
        Setting("neuprint_ca_bundle", "NEUPRINT_CA_BUNDLE", None,
                "PEM file of the authorities trusted for neuPrint's HTTPS certificate (default: the system's)"),
        PRECOMPUTED_URL,
        Setting("flyem_dvid_url", "EM_INGEST_FLYEM_DVID_URL", "https://hemibrain-dvid.janelia.org", "DVID server"),
        DVID_UUID,
    )

    @property
    def neuprint_url(self) -> str:
        server: str = self.settings.neuprint_server  # a declared setting (Settings gives those as Any)
        return server.rstrip("/")

    @property
    def precomputed_url(self) -> str:
        url: str = self.settings.flyem_precomputed_url  # a declared setting (Settings gives those as Any)
        return url.rstrip("/")

    def _neuprint(self) -> NeuprintClient:
        # Made per call, so a missing token fails only what needs neuPrint (not describe / open_volume).
        return NeuprintClient(self.settings.neuprint_server, self.settings.neuprint_token, self.settings.transfer,
                              ca_bundle=self.settings.neuprint_ca_bundle)

    def _dvid_node(self) -> DvidNode:
        return DvidNode(self.http, self.settings.flyem_dvid_url, self.settings.flyem_dvid_uuid)

    # ---- Source interface ----------------------------------------------------------------------
    def discover(self) -> Iterable[InventoryItem]:
        listing = self._neuprint().datasets()
        for dataset, info in sorted(listing.items()):
            info = info if isinstance(info, dict) else {}
            if info.get("hidden"):
                continue
            yield InventoryItem(self.name, dataset.replace(":", "-"), info.get("description") or dataset,
                                {"dataset": dataset, "uuid": info.get("uuid"), "last-mod": info.get("last-mod"),
                                 "neuprint": self.neuprint_url})

    def fetch_raw(self, request: DatasetRequest, raw: RawStore) -> Manifest:
        options = options_as(request, FlyemOptions)
        self._check_grayscale_matches(request, options)
        entries, version = self._fetch_neuprint(options, raw)
        fetch_grayscale = self._fetch_precomputed if options.grayscale == "precomputed" else self._fetch_dvid
        entries += fetch_grayscale(request, raw)
        return raw.commit(entries, request.options_dict(), source_version=version)

    def describe(self, request: DatasetRequest, raw: RawStore) -> Description:
        options = options_as(request, FlyemOptions)
        entry = raw.read_document(DATASETS_DOC).get(options.dataset, {})
        meta = self._meta(raw)
        known = KNOWN_DATASETS.get(str(meta.get("dataset") or options.dataset.split(":")[0]), {})
        z, y, x = options.offset_zyx
        dz, dy, dx = options.shape_zyx
        grayscale_url = self.settings.flyem_precomputed_url if options.grayscale == "precomputed" else \
            f"{self._dvid_node().url}/{DVID_INSTANCE}"
        return Description(
            title=f"{options.dataset} grayscale, z {z}-{z + dz}, y {y}-{y + dy}, x {x}-{x + dx}",
            description=entry.get("description") or (entry.get("info") if entry.get("info") != "N/A" else None),
            organism=known.get("organism"),
            sample=known.get("sample"),
            imaging_method=known.get("imaging_method"),
            source_url=grayscale_url,
            doi=known.get("doi"),
            license=known.get("license"),
            source_version=dataset_version(entry, meta),
            extra={"neuprint_server": self.neuprint_url, "neuprint_dataset": options.dataset,
                   "grayscale": options.grayscale, "offset_zyx": list(options.offset_zyx),
                   "shape_zyx": list(options.shape_zyx), "citation": known.get("citation"),
                   "neuprint_uuid": entry.get("uuid"), "neuprint_last_mod": entry.get("last-mod")},
        )

    def open_volume(self, request: DatasetRequest, raw: RawStore) -> Volume:
        options = options_as(request, FlyemOptions)
        name = f"{self.name}/{request.key}"
        if options.grayscale == "precomputed":
            info = PrecomputedInfo.from_json(json.loads(raw.path(INFO_FILE).read_bytes()), str(raw.path(INFO_FILE)))
            scale = info.full_resolution()
            geometry = self._geometry(options, raw, scale.resolution_nm, "precomputed info resolution")
            return PrecomputedCrop(info, scale, options.start_xyz, options.shape_zyx,
                                   self._chunk_loader(raw, scale), geometry, name=name)
        voxel_xyz = voxel_size_nm(raw.read_document(DVID_INFO_DOC), str(raw.path(DVID_INFO_DOC)))
        geometry = self._geometry(options, raw, voxel_xyz, "DVID VoxelSize")
        tiles = dvid_tiles(options.start_xyz, options.stop_xyz)
        return DvidTileVolume(tiles, lambda tile: raw.path(_tile_relpath(tile)), options.start_xyz,
                              options.shape_zyx, geometry, name=name)

    def _check_grayscale_matches(self, request: DatasetRequest, options: FlyemOptions) -> None:
        """The default grayscale endpoints hold the hemibrain; another dataset needs its own."""
        if options.dataset.split(":")[0] == "hemibrain":
            return
        setting = PRECOMPUTED_URL if options.grayscale == "precomputed" else DVID_UUID
        if getattr(self.settings, setting.field) == setting.default:
            raise SelectionError(
                f"{request.source}.{request.key}: dataset {options.dataset!r} is not the hemibrain, but {setting.env} "
                f"still points at the hemibrain grayscale; set it to {options.dataset}'s grayscale")

    # ---- neuPrint metadata ---------------------------------------------------------------------
    def _fetch_neuprint(self, options: FlyemOptions, raw: RawStore) -> tuple[list[ManifestEntry | None], str | None]:
        client = self._neuprint()
        listing = client.datasets()
        if options.dataset not in listing:
            known = ", ".join(sorted(listing)) or "none"
            raise SelectionError(f"neuPrint at {client.url} has no dataset {options.dataset!r} "
                                 f"(it lists: {known})")
        meta = client.query(options.dataset, META_QUERY)
        # Only this dataset's entry: other datasets' edits must not look like a change of this one.
        entries: list[ManifestEntry | None] = [
            raw.store_document(DATASETS_DOC, client.datasets_url, {options.dataset: listing[options.dataset]}),
            raw.store_document(META_DOC, client.query_url, meta)]
        return entries, dataset_version(listing[options.dataset], meta_row(meta, client.query_url))

    def _meta(self, raw: RawStore) -> dict[str, Any]:
        return meta_row(raw.read_document(META_DOC), str(raw.path(META_DOC)))

    def _geometry(self, options: FlyemOptions, raw: RawStore, grayscale_xyz: tuple[float, float, float],
                  grayscale_what: str) -> Geometry:
        """Voxel size from the neuPrint Meta node, checked against the grayscale's own metadata."""
        meta_xyz = meta_voxel_size_nm(self._meta(raw), str(raw.path(META_DOC)))
        if options.voxel_size_nm is not None:
            zyx, origin = _floats(options.voxel_size_nm), "override"
        elif meta_xyz is None:
            zyx, origin = _floats(grayscale_xyz[::-1]), "source-metadata"
        else:
            if not np.allclose(meta_xyz, grayscale_xyz, rtol=1e-6):
                raise SourceResponseError(
                    f"{options.dataset}: neuPrint Meta voxelSize {list(meta_xyz)} nm (x, y, z) disagrees with the "
                    f"{grayscale_what} {list(grayscale_xyz)} nm; set voxel_size_nm: [z, y, x] to decide")
            zyx, origin = _floats(meta_xyz[::-1]), "source-metadata"
        (oz, oy, ox), (vz, vy, vx) = options.offset_zyx, zyx
        return Geometry(zyx, origin, _floats((oz * vz, oy * vy, ox * vx)))

    # ---- precomputed -----------------------------------------------------------------------------
    def _fetch_precomputed(self, request: DatasetRequest, raw: RawStore) -> list[ManifestEntry | None]:
        options = options_as(request, FlyemOptions)
        info_url = f"{self.precomputed_url}/info"
        info_entry = raw.fetch(info_url, INFO_FILE)
        info = PrecomputedInfo.from_json(json.loads(raw.path(INFO_FILE).read_bytes()), info_url)
        if info.num_channels != 1:
            raise UnsupportedDataError(f"{info_url}: {info.num_channels} channels; "
                                       "only single-channel grayscale is ingested")
        scale = info.full_resolution()
        _check_bounds(request, options, scale.voxel_offset, scale.voxel_stop,
                      f"{self.precomputed_url} scale {scale.key}")
        grids = scale.chunks_in_box(options.start_xyz, options.stop_xyz)
        shard_versions: dict[str, str | None] = {}
        if scale.sharding is None:
            # A chunk that was never written answers 404: the fill value, as neuroglancer reads it.
            wanted = {_grid_key(g): Wanted(f"{self.precomputed_url}/{scale.key}/{scale.chunk_name(g)}",
                                           f"precomputed/{scale.key}/{scale.chunk_name(g)}", optional=True)
                      for g in grids}
        else:
            wanted = self._wanted_from_shards(raw, scale, scale.sharding, grids, shard_versions)
        entries = raw.mirror(wanted.values())
        # chunk key -> its file in the raw store, or None for a chunk absent at the source (zeros).
        located: dict[str, str | None] = {_grid_key(g): None for g in grids}
        located.update((key, entry.path if entry else None) for key, entry in zip(wanted, entries))
        absent = sum(v is None for v in located.values())
        if absent:
            log.warning("%s: %d of %d chunks are absent at the source and read as zeros", request.key, absent,
                        len(located))
        document = {"scale": scale.key, "chunks": located, "shard_versions": shard_versions}
        chunks_doc = raw.store_document(CHUNKS_DOC, f"{self.precomputed_url}/{scale.key}", document)
        return [info_entry, chunks_doc, *entries]

    def _wanted_from_shards(self, raw: RawStore, scale: Scale, spec: ShardingSpec, grids: list[XYZ],
                      shard_versions: dict[str, str | None]) -> dict[str, Wanted]:
        """Each wanted chunk a shard holds, as a byte range of that shard (chunk key -> Wanted); records
        each shard's version in `shard_versions` (None: never written, so all its chunks are absent)."""
        was_absent, previous_versions = self._previous_chunk_list(raw, scale)
        wanted: dict[str, Wanted] = {}
        for shard, minishards in iter_shard_groups(scale, grids):
            name = spec.shard_name(shard)
            url = f"{self.precomputed_url}/{scale.key}/{name}"
            try:
                remote = self.http.stat(url)
            except TransferError as exc:
                if not is_absent(exc):
                    raise
                shard_versions[name] = None
                continue
            version = remote.etag or remote.last_modified
            shard_versions[name] = version
            chunks = {_grid_key(grid): chunk_id for chunk_list in minishards.values() for grid, chunk_id in chunk_list}
            relpaths = {chunk_id: f"precomputed/{scale.key}/{name}/{chunk_id}" for chunk_id in chunks.values()}
            # Chunks found absent before are still absent while the shard is that same version.
            absent_before = was_absent if version is not None and previous_versions.get(name) == version else set()
            ranges = _known_ranges(raw, remote, chunks, relpaths, absent_before)
            if ranges is None:  # some chunk is new to us, or the shard changed: read where they lie now
                ranges = self._read_shard_index(raw, remote, spec, minishards)
            wanted.update((key, Wanted(url, relpaths[chunk_id], remote=remote, byte_range=ranges[chunk_id]))
                          for key, chunk_id in chunks.items() if chunk_id in ranges)
        return wanted

    def _read_shard_index(self, raw: RawStore, remote: RemoteObject, spec: ShardingSpec,
                          minishards: dict[int, list[tuple[XYZ, int]]]) -> dict[int, tuple[int, int]]:
        """chunk id -> [start, stop) in the shard, for the wanted chunks it holds (shard and minishard indexes)."""
        url = remote.url
        index = self.http.read_range(url, 0, spec.shard_index_bytes, expected=remote)
        raw.count(TransferStats(fetched_bytes=len(index)))
        ranges: dict[int, tuple[int, int]] = {}
        for minishard, chunk_list in sorted(minishards.items()):
            start, end = spec.minishard_range(index, minishard, f"{url} shard index")
            if end <= start:
                continue  # an empty minishard: none of its chunks were written
            data = self.http.read_range(url, start, end, expected=remote)
            raw.count(TransferStats(fetched_bytes=len(data)))
            table = spec.parse_minishard_index(data, f"{url} minishard {minishard}")
            ranges.update((chunk_id, (table[chunk_id][0], sum(table[chunk_id])))
                          for _, chunk_id in chunk_list if chunk_id in table)
        return ranges

    @staticmethod
    def _previous_chunk_list(raw: RawStore, scale: Scale) -> tuple[set[str], dict[str, str | None]]:
        """The chunks the last download found absent, and the shard versions it found them in."""
        if raw.previous_entry(CHUNKS_DOC) is None or not raw.path(CHUNKS_DOC).exists():
            return set(), {}
        document = raw.read_document(CHUNKS_DOC)
        if document.get("scale") != scale.key:
            return set(), {}
        absent = {key for key, relpath in document.get("chunks", {}).items() if relpath is None}
        return absent, dict(document.get("shard_versions", {}))

    def _chunk_loader(self, raw: RawStore, scale: Scale) -> Callable[[tuple[int, int, int]], bytes | None]:
        document = raw.read_document(CHUNKS_DOC)
        if document.get("scale") != scale.key:
            raise FormatError(f"{raw.path(CHUNKS_DOC)}: lists chunks of scale {document.get('scale')!r}, "
                              f"expected {scale.key!r}; re-materialize the raw asset")
        located: dict[str, str | None] = document["chunks"]
        spec = scale.sharding

        def load(grid: tuple[int, int, int]) -> bytes | None:
            key = _grid_key(grid)
            if key not in located:
                raise FormatError(f"{raw.path(CHUNKS_DOC)}: chunk {key} of the crop was not fetched")
            relpath = located[key]
            if relpath is None:
                return None
            data = raw.path(relpath).read_bytes()
            return spec.decode_data(data, str(raw.path(relpath))) if spec else data

        return load

    # ---- DVID ----------------------------------------------------------------------------------
    def _fetch_dvid(self, request: DatasetRequest, raw: RawStore) -> list[ManifestEntry | None]:
        options = options_as(request, FlyemOptions)
        node = self._dvid_node()
        commit, info = node.commit(), node.grayscale_info(DVID_INSTANCE)
        documents = [raw.store_document(DVID_COMMIT_DOC, node.commit_url, commit),
                     raw.store_document(DVID_INFO_DOC, node.info_url(DVID_INSTANCE), info)]
        low, high = extents(info, node.info_url(DVID_INSTANCE))
        _check_bounds(request, options, low, high, f"DVID {node.url}/{DVID_INSTANCE}")
        # A locked (committed) node never changes: its version stands for every tile's, so an unchanged
        # tile is skipped by the store's rule. An open node has no version: every tile is fetched again.
        version = node.locked_version if node.is_locked(commit) else None
        if version is None:
            log.warning("%s: DVID node %s is not locked; fetching every tile again", request.key, node.uuid)

        def wanted(tile: Tile) -> Wanted:
            url = node.raw_url(DVID_INSTANCE, tile)
            # The size is known from the request: the transport refuses a tile of any other size.
            return Wanted(url, _tile_relpath(tile), remote=RemoteObject(url, tile.nbytes, etag=version),
                          version=f"node {node.uuid}")

        tiles = dvid_tiles(options.start_xyz, options.stop_xyz)
        return documents + raw.mirror(map(wanted, tiles), max_in_flight=DVID_MAX_IN_FLIGHT)


# ---- helpers -------------------------------------------------------------------------------------

def _floats(values: tuple[float, float, float]) -> tuple[float, float, float]:
    a, b, c = values
    return (float(a), float(b), float(c))


def _grid_key(grid: tuple[int, ...]) -> str:
    return "_".join(map(str, grid))


def _tile_relpath(tile: Tile) -> str:
    return f"dvid/{DVID_INSTANCE}/{'_'.join(map(str, tile.start))}+{'_'.join(map(str, tile.size))}.zyx.u8"


def _known_ranges(raw: RawStore, remote: RemoteObject, chunks: dict[str, int], relpaths: dict[int, str],
                  absent_before: set[str]) -> dict[int, tuple[int, int]] | None:
    """Where the chunks lie in the shard, from the last download, when the shard is still the version they
    were cut from and every chunk is accounted for (cut, or found absent); None: the index must be read."""
    ranges: dict[int, tuple[int, int]] = {}
    for key, chunk_id in chunks.items():
        entry = raw.previous_entry(relpaths[chunk_id])
        cut = byte_range_of(entry) if entry is not None else None
        if (entry is not None and cut is not None and entry.url == remote.url
                and remote.describes(entry.size, entry.etag, entry.last_modified, compare_size=False)):
            ranges[chunk_id] = cut
        elif key not in absent_before:
            return None
    return ranges


def _check_bounds(request: DatasetRequest, options: FlyemOptions, low_xyz: tuple[int, int, int],
                  high_xyz: tuple[int, int, int], what: str) -> None:
    start, stop = options.start_xyz, options.stop_xyz
    if any(a < lo or b > hi for a, b, lo, hi in zip(start, stop, low_xyz, high_xyz)):
        raise SelectionError(
            f"{request.source}.{request.key}: crop offset_zyx {list(options.offset_zyx)} shape_zyx "
            f"{list(options.shape_zyx)} reaches outside {what}, whose voxels span z {low_xyz[2]}-{high_xyz[2]}, "
            f"y {low_xyz[1]}-{high_xyz[1]}, x {low_xyz[0]}-{high_xyz[0]} (end exclusive)")


SOURCE = FlyemSource
