"""Janelia FlyEM: neuPrint dataset metadata (bearer token) and grayscale crops from precomputed or DVID."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import field_validator

from em_ingest.errors import (ConfigurationError, FormatError, IntegrityError, SelectionError,
                              SourceResponseError, TransferError, UnsupportedDataError)
from em_ingest.formats.precomputed import PrecomputedCrop, PrecomputedInfo, Scale, iter_shard_groups
from em_ingest.formats.volume import Geometry, Region, Volume
from em_ingest.raw import Manifest, ManifestEntry, RawStore, TransferStats, write_atomic
from em_ingest.selection import DatasetOptions, DatasetRequest
from em_ingest.settings import Settings
from em_ingest.sources.base import Description, InventoryItem, Source
from em_ingest.transfer.http import HttpClient, RemoteObject

log = logging.getLogger(__name__)

DEFAULT_DATASET = "hemibrain:v1.2.1"
DVID_INSTANCE = "grayscale"  # raw uint8 full resolution in the hemibrain grayscale repo
# DVID answers a raw request in one response; keep each below a size a busy server serves
# comfortably (2 MiB of uint8). Tiles are cut from the crop's corner: the fewest requests, and the
# same tiles on every re-run of the same crop.
DVID_TILE_EDGE = 128
DVID_MAX_IN_FLIGHT = 4  # throttle=true asks DVID to shed load; do not hammer it in parallel
META_FIELDS = ("dataset", "tag", "uuid", "lastDatabaseEdit", "voxelSize", "voxelUnits")
META_QUERY = "MATCH (m:Meta) RETURN " + ", ".join(f"m.{f}" for f in META_FIELDS)
NM_PER_UNIT = {"nanometers": 1.0, "nanometer": 1.0, "nm": 1.0, "micrometers": 1000.0, "micrometer": 1000.0,
               "microns": 1000.0, "um": 1000.0, "µm": 1000.0}

# Facts about neuPrint datasets that neuPrint itself does not serve (SOURCES.md §2.4).
KNOWN_DATASETS: dict[str, dict[str, Any]] = {
    "hemibrain": {
        "organism": "Drosophila melanogaster",
        "sample": "adult female central brain (hemibrain)",
        "imaging_method": "FIB-SEM",
        "doi": "10.7554/eLife.57443",
        # Commonly stated for the hemibrain release; not verified against a primary source.
        "license": "CC-BY-4.0",
        "citation": "Scheffer et al. (2020) A connectome and analysis of the adult Drosophila central brain. "
                    "eLife 9:e57443",
    },
}

# raw/ layout
DATASETS_DOC = "neuprint/datasets.json"
META_DOC = "neuprint/meta.json"
INFO_FILE = "precomputed/info"
CHUNKS_DOC = "precomputed/chunks.json"
DVID_COMMIT_DOC = "dvid/commit.json"
DVID_INFO_DOC = "dvid/info.json"


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
        return self.offset_zyx[::-1]  # type: ignore[return-value]

    @property
    def stop_xyz(self) -> tuple[int, int, int]:
        return tuple(o + n for o, n in zip(self.offset_zyx[::-1], self.shape_zyx[::-1]))  # type: ignore[return-value]


def normalize_token(value: str | None) -> str | None:
    """The bare token from NEUPRINT_TOKEN, which may also hold the `{"token": "..."}` document."""
    if not value or not value.strip():
        return None
    value = value.strip()
    if value.startswith("{"):
        try:
            value = str(json.loads(value)["token"])
        except (ValueError, KeyError, TypeError):
            raise ConfigurationError("NEUPRINT_TOKEN looks like a JSON document but has no \"token\" field") from None
    value = value.replace('"', "").strip()
    bad = next((i for i, c in enumerate(value) if not (33 <= ord(c) < 127)), None)
    if bad is not None:
        # Never echo the value: a header library would print it whole in its own error.
        raise ConfigurationError(f"NEUPRINT_TOKEN has a character a bearer token cannot contain (whitespace, a "
                                 f"control or non-ASCII character) at position {bad}; copy the token again")
    return value or None


@dataclass(frozen=True)
class Tile:
    """One DVID raw request: absolute start and size, both (x, y, z) as in DVID URLs."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]

    @property
    def relpath(self) -> str:
        return f"dvid/{DVID_INSTANCE}/{'_'.join(map(str, self.start))}+{'_'.join(map(str, self.size))}.zyx.u8"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.size))


def dvid_tiles(start: tuple[int, int, int], stop: tuple[int, int, int], edge: int = DVID_TILE_EDGE) -> list[Tile]:
    """The box [start, stop) (x, y, z) cut into tiles of at most `edge` voxels a side, from `start`."""
    axes = [[(a, min(a + edge, b)) for a in range(lo, b, edge)] for lo, b in zip(start, stop)]
    return [Tile((x0, y0, z0), (x1 - x0, y1 - y0, z1 - z0))
            for z0, z1 in axes[2] for y0, y1 in axes[1] for x0, x1 in axes[0]]


class DvidTiles(Volume):
    """A crop assembled from DVID raw tiles in the raw store (each ZYX C-order uint8, memory-mapped)."""

    def __init__(self, raw: RawStore, start: tuple[int, int, int], shape_zyx: tuple[int, int, int],
                 geometry: Geometry | None, *, name: str):
        self.raw, self.start = raw, start
        self.shape = tuple(shape_zyx)  # type: ignore[assignment]
        self.dtype = np.dtype("uint8")
        self.geometry = geometry
        self.name = name
        stop = tuple(a + n for a, n in zip(start, shape_zyx[::-1]))
        self.tiles = dvid_tiles(start, stop)  # type: ignore[arg-type]

    def read(self, region: Region) -> np.ndarray:
        out = np.empty(tuple(s.stop - s.start for s in region), dtype=self.dtype)
        lo = [self.start[a] + region[2 - a].start for a in range(3)]
        hi = [self.start[a] + region[2 - a].stop for a in range(3)]
        for tile in self.tiles:
            t_hi = [s + n for s, n in zip(tile.start, tile.size)]
            a = [max(l, t) for l, t in zip(lo, tile.start)]
            b = [min(h, t) for h, t in zip(hi, t_hi)]
            if any(x >= y for x, y in zip(a, b)):
                continue
            path = self.raw.path(tile.relpath)
            if not path.exists() or path.stat().st_size != tile.nbytes:
                raise FormatError(f"{self.name}: tile {path} is missing or not {tile.nbytes} bytes; "
                                  "re-materialize the raw asset")
            data = np.memmap(path, dtype=self.dtype, mode="r", shape=tile.size[::-1])
            src = tuple(slice(a[i] - tile.start[i], b[i] - tile.start[i]) for i in (2, 1, 0))
            dst = tuple(slice(a[i] - lo[i], b[i] - lo[i]) for i in (2, 1, 0))
            out[dst] = data[src]
            del data
        return out


class FlyemSource(Source):
    name = "flyem"
    title = "Janelia FlyEM (neuPrint metadata; hemibrain grayscale from precomputed or DVID)"
    Options = FlyemOptions
    max_concurrent_runs = 2

    # ---- neuPrint ------------------------------------------------------------------------------
    @property
    def neuprint_url(self) -> str:
        return self.settings.neuprint_server.rstrip("/")

    def _neuprint_client(self) -> HttpClient:
        token = normalize_token(self.settings.neuprint_token)
        if token is None:
            raise ConfigurationError(
                f"NEUPRINT_TOKEN is not set: neuPrint at {self.neuprint_url} needs a bearer token for dataset "
                "metadata (copy it from your account page on the neuPrint web site and export NEUPRINT_TOKEN)")
        return HttpClient(self.settings.transfer, headers={"Authorization": f"Bearer {token}",
                                                            "Content-Type": "application/json"})

    def _rejected(self, exc: TransferError, statuses: tuple[int, ...] = (401, 403)) -> Exception:
        """A clear token error for an authentication status; other failures pass through unchanged."""
        if exc.status in statuses:
            return ConfigurationError(
                f"neuPrint at {self.neuprint_url} rejected NEUPRINT_TOKEN (HTTP {exc.status} from {exc.url}); "
                "check that it is a current token for this server")
        return exc

    def _neuprint_get(self, client: HttpClient, path: str) -> Any:
        try:
            return client.get_json(f"{self.neuprint_url}{path}")
        except TransferError as exc:
            # A parameterless GET fails with 400 only over its Authorization header (a malformed JWT).
            raise self._rejected(exc, (400, 401, 403)) from None

    def _neuprint_query(self, client: HttpClient, dataset: str, cypher: str) -> dict[str, Any]:
        """POST /api/custom/custom: one Cypher query, answered as {columns, data}."""
        url = f"{self.neuprint_url}/api/custom/custom"
        try:
            result = client.post_json(url, {"cypher": cypher, "dataset": dataset})
        except TransferError as exc:
            if exc.status == 404:
                raise SelectionError(f"neuPrint at {self.neuprint_url} has no dataset {dataset!r}") from None
            raise self._rejected(exc) from None
        if not isinstance(result, dict) or not isinstance(result.get("columns"), list) \
                or not isinstance(result.get("data"), list):
            raise SourceResponseError(f"POST {url}: expected {{columns, data}}, got {str(result)[:120]}")
        return result

    def _datasets(self, client: HttpClient) -> dict[str, Any]:
        listing = self._neuprint_get(client, "/api/dbmeta/datasets")
        if not isinstance(listing, dict):
            raise SourceResponseError(f"{self.neuprint_url}/api/dbmeta/datasets: expected an object keyed by "
                                      f"dataset, got {type(listing).__name__}")
        return listing

    # ---- Source interface ----------------------------------------------------------------------
    def discover(self) -> Iterable[InventoryItem]:
        listing = self._datasets(self._neuprint_client())
        for dataset, info in sorted(listing.items()):
            info = info if isinstance(info, dict) else {}
            if info.get("hidden"):
                continue
            yield InventoryItem(self.name, dataset.replace(":", "-"), info.get("description") or dataset,
                                {"dataset": dataset, "uuid": info.get("uuid"), "last-mod": info.get("last-mod"),
                                 "neuprint": self.neuprint_url})

    def fetch_raw(self, request: DatasetRequest, raw: RawStore) -> Manifest:
        options: FlyemOptions = request.options  # type: ignore[assignment]
        self._check_grayscale_matches(request, options)
        entries, stats, version = self._fetch_neuprint(options, raw)
        if options.grayscale == "precomputed":
            more, more_stats = self._fetch_precomputed(request, raw)
        else:
            more, more_stats = self._fetch_dvid(request, raw)
        return raw.commit(entries + more, request.options_dict(), stats + more_stats, source_version=version)

    def describe(self, request: DatasetRequest, raw: RawStore) -> Description:
        options: FlyemOptions = request.options  # type: ignore[assignment]
        entry = raw.read_document(DATASETS_DOC).get(options.dataset, {})
        meta = self._meta(raw)
        known = KNOWN_DATASETS.get(str(meta.get("dataset") or options.dataset.split(":")[0]), {})
        z, y, x = options.offset_zyx
        dz, dy, dx = options.shape_zyx
        grayscale_url = self.settings.flyem_precomputed_url if options.grayscale == "precomputed" else \
            f"{self.settings.flyem_dvid_url.rstrip('/')}/api/node/{self.settings.flyem_dvid_uuid}/{DVID_INSTANCE}"
        return Description(
            title=f"{options.dataset} grayscale, z {z}-{z + dz}, y {y}-{y + dy}, x {x}-{x + dx}",
            description=entry.get("description") or (entry.get("info") if entry.get("info") != "N/A" else None),
            organism=known.get("organism"),
            sample=known.get("sample"),
            imaging_method=known.get("imaging_method"),
            source_url=grayscale_url,
            doi=known.get("doi"),
            license=known.get("license"),
            source_version=self._version(entry, meta),
            extra={"neuprint_server": self.neuprint_url, "neuprint_dataset": options.dataset,
                   "grayscale": options.grayscale, "offset_zyx": list(options.offset_zyx),
                   "shape_zyx": list(options.shape_zyx), "citation": known.get("citation"),
                   "neuprint_uuid": entry.get("uuid"), "neuprint_last_mod": entry.get("last-mod")},
        )

    def open_volume(self, request: DatasetRequest, raw: RawStore) -> Volume:
        options: FlyemOptions = request.options  # type: ignore[assignment]
        name = f"{self.name}/{request.key}"
        if options.grayscale == "precomputed":
            info = PrecomputedInfo.from_json(json.loads(raw.path(INFO_FILE).read_bytes()), str(raw.path(INFO_FILE)))
            scale = info.full_resolution()
            geometry = self._geometry(options, raw, scale.resolution_nm, "precomputed info resolution")
            return PrecomputedCrop(info, scale, options.start_xyz, options.shape_zyx,
                                   self._chunk_loader(raw, scale), geometry, name=name)
        info = raw.read_document(DVID_INFO_DOC)
        voxel_xyz = _dvid_voxel_size_nm(info, str(raw.path(DVID_INFO_DOC)))
        geometry = self._geometry(options, raw, voxel_xyz, "DVID VoxelSize")
        return DvidTiles(raw, options.start_xyz, options.shape_zyx, geometry, name=name)

    def _check_grayscale_matches(self, request: DatasetRequest, options: FlyemOptions) -> None:
        """The default grayscale endpoints hold the hemibrain; another dataset needs its own."""
        if options.dataset.split(":")[0] == "hemibrain":
            return
        defaults = {"precomputed": ("EM_INGEST_FLYEM_PRECOMPUTED_URL", self.settings.flyem_precomputed_url,
                                    Settings.flyem_precomputed_url),
                    "dvid": ("EM_INGEST_FLYEM_DVID_UUID", self.settings.flyem_dvid_uuid, Settings.flyem_dvid_uuid)}
        variable, value, hemibrain = defaults[options.grayscale]
        if value == hemibrain:
            raise SelectionError(
                f"{request.source}.{request.key}: dataset {options.dataset!r} is not the hemibrain, but {variable} "
                f"still points at the hemibrain grayscale; set it to {options.dataset}'s grayscale")

    # ---- neuPrint metadata ---------------------------------------------------------------------
    def _fetch_neuprint(self, options: FlyemOptions, raw: RawStore) -> tuple[list[ManifestEntry], TransferStats, str]:
        client = self._neuprint_client()
        listing = self._datasets(client)
        if options.dataset not in listing:
            known = ", ".join(sorted(listing)) or "none"
            raise SelectionError(f"neuPrint at {self.neuprint_url} has no dataset {options.dataset!r} "
                                 f"(it lists: {known})")
        meta = self._neuprint_query(client, options.dataset, META_QUERY)
        # Only this dataset's entry: other datasets' edits must not look like a change of this one.
        documents = [(DATASETS_DOC, f"{self.neuprint_url}/api/dbmeta/datasets",
                      {options.dataset: listing[options.dataset]}),
                     (META_DOC, f"{self.neuprint_url}/api/custom/custom", meta)]
        entries, stats = _store_documents(raw, documents)
        return entries, stats, self._version(listing[options.dataset], _meta_row(meta, documents[1][1]))

    @staticmethod
    def _version(entry: dict[str, Any], meta: dict[str, Any]) -> str | None:
        uuid = entry.get("uuid") or meta.get("uuid")
        last_mod = entry.get("last-mod") or meta.get("lastDatabaseEdit")
        parts = [f"uuid {uuid}" if uuid else None, f"last-mod {last_mod}" if last_mod else None]
        return ", ".join(p for p in parts if p) or None

    def _meta(self, raw: RawStore) -> dict[str, Any]:
        return _meta_row(raw.read_document(META_DOC), str(raw.path(META_DOC)))

    def _geometry(self, options: FlyemOptions, raw: RawStore, grayscale_xyz: tuple[float, float, float],
                  grayscale_what: str) -> Geometry:
        """Voxel size from the neuPrint Meta node, checked against the grayscale's own metadata."""
        meta = self._meta(raw)
        where = f"{raw.path(META_DOC)}"
        meta_xyz = _meta_voxel_size_nm(meta, where)
        if options.voxel_size_nm is not None:
            zyx, origin = tuple(float(v) for v in options.voxel_size_nm), "override"
        elif meta_xyz is None:
            zyx, origin = tuple(float(v) for v in grayscale_xyz[::-1]), "source-metadata"
        else:
            if not np.allclose(meta_xyz, grayscale_xyz, rtol=1e-6):
                raise SourceResponseError(
                    f"{options.dataset}: neuPrint Meta voxelSize {list(meta_xyz)} nm (x, y, z) disagrees with the "
                    f"{grayscale_what} {list(grayscale_xyz)} nm; set voxel_size_nm: [z, y, x] to decide")
            zyx, origin = tuple(float(v) for v in meta_xyz[::-1]), "source-metadata"
        translation = tuple(float(o * v) for o, v in zip(options.offset_zyx, zyx))
        return Geometry(zyx, origin, translation)  # type: ignore[arg-type]

    # ---- precomputed -----------------------------------------------------------------------------
    @property
    def precomputed_url(self) -> str:
        return self.settings.flyem_precomputed_url.rstrip("/")

    def _fetch_precomputed(self, request: DatasetRequest, raw: RawStore) -> tuple[list[ManifestEntry], TransferStats]:
        options: FlyemOptions = request.options  # type: ignore[assignment]
        info_entry, stats = raw.fetch_http(f"{self.precomputed_url}/info", INFO_FILE)
        info = PrecomputedInfo.from_json(json.loads(raw.path(INFO_FILE).read_bytes()), f"{self.precomputed_url}/info")
        if info.num_channels != 1:
            raise UnsupportedDataError(f"{self.precomputed_url}/info: {info.num_channels} channels; "
                                       "only single-channel grayscale is ingested")
        scale = info.full_resolution()
        _check_bounds(request, options, scale.voxel_offset,
                      tuple(o + n for o, n in zip(scale.voxel_offset, scale.size)),  # type: ignore[arg-type]
                      f"{self.precomputed_url} scale {scale.key}")
        grids = scale.chunks_in_box(options.start_xyz, options.stop_xyz)
        shard_versions: dict[str, str | None] = {}
        if scale.sharding is None:
            entries, located, more = self._fetch_unsharded(raw, scale, grids)
        else:
            entries, located, more = self._fetch_sharded(raw, scale, grids, shard_versions)
        absent = sum(v is None for v in located.values())
        if absent:
            log.warning("%s: %d of %d chunks are absent at the source and read as zeros", request.key, absent,
                        len(located))
        document = {"scale": scale.key, "chunks": located, "shard_versions": shard_versions}
        chunks_doc = raw.store_document(CHUNKS_DOC, f"{self.precomputed_url}/{scale.key}", document)
        return [info_entry, chunks_doc, *entries], stats + more

    def _fetch_unsharded(self, raw: RawStore, scale: Scale, grids: list) -> tuple[list, dict, TransferStats]:
        items = {_grid_key(g): (f"{self.precomputed_url}/{scale.key}/{scale.chunk_name(g)}",
                                f"precomputed/{scale.key}/{scale.chunk_name(g)}") for g in grids}

        def fetch(item: tuple[str, str]) -> tuple[ManifestEntry, TransferStats] | None:
            try:
                return raw.fetch_http(*item)
            except TransferError as exc:
                if exc.status == 404:  # an unwritten chunk: the fill value, as neuroglancer reads it
                    return None
                raise

        with ThreadPoolExecutor(max_workers=max(1, self.settings.transfer.max_in_flight)) as pool:
            results = dict(zip(items, pool.map(fetch, items.values())))
        entries, located, stats = [], {}, TransferStats()
        for key, result in results.items():
            if result is None:
                located[key] = None
                continue
            entries.append(result[0])
            stats = stats + result[1]
            located[key] = result[0].path
        return entries, located, stats

    def _fetch_sharded(self, raw: RawStore, scale: Scale, grids: list,
                       shard_versions: dict[str, str | None]) -> tuple[list, dict, TransferStats]:
        entries: list[ManifestEntry] = []
        located: dict[str, str | None] = {}
        stats = TransferStats()
        for shard, minishards in iter_shard_groups(scale, grids):
            shard_entries, shard_located, shard_stats = self._fetch_shard(raw, scale, shard, minishards,
                                                                          shard_versions)
            entries += shard_entries
            located.update(shard_located)
            stats = stats + shard_stats
        return entries, located, stats

    def _fetch_shard(self, raw: RawStore, scale: Scale, shard: int, minishards: dict[int, list],
                     shard_versions: dict[str, str | None]) -> tuple[list, dict, TransferStats]:
        """The chunks wanted from one shard file, by byte ranges; skipped if the shard is unchanged."""
        spec = scale.sharding
        assert spec is not None
        url = f"{self.precomputed_url}/{scale.key}/{spec.shard_name(shard)}"
        wanted = [(grid, chunk_id) for chunk_list in minishards.values() for grid, chunk_id in chunk_list]
        relpaths = {cid: f"precomputed/{scale.key}/{spec.shard_name(shard)}/{cid}" for _, cid in wanted}
        try:
            remote = self.http.head(url)
        except TransferError as exc:
            if exc.status == 404:  # a shard that was never written holds only absent chunks
                shard_versions[spec.shard_name(shard)] = None
                return [], {_grid_key(g): None for g, _ in wanted}, TransferStats()
            raise
        shard_versions[spec.shard_name(shard)] = remote.etag or remote.last_modified
        previous = {cid: _current_range_entry(raw, rel, remote) for cid, rel in relpaths.items()}
        version = remote.etag or remote.last_modified
        was_absent = self._previously_absent(raw, scale, spec.shard_name(shard), version)
        if all(previous[cid] is not None or _grid_key(g) in was_absent for g, cid in wanted):
            entries = [e for e in previous.values() if e is not None]
            located = {_grid_key(g): (relpaths[c] if previous[c] is not None else None) for g, c in wanted}
            return entries, located, \
                TransferStats(skipped_objects=len(entries), skipped_bytes=sum(e.size for e in entries))
        index = self._get_range(url, 0, spec.shard_index_bytes, remote)
        fetched = len(index)
        plan: list[tuple[tuple, int, int, int]] = []  # (grid, chunk id, start, size)
        located: dict[str, str | None] = {}
        for minishard, chunk_list in sorted(minishards.items()):
            start, end = spec.minishard_range(index, minishard, f"{url} shard index")
            table = {}
            if end > start:
                data = self._get_range(url, start, end, remote)
                fetched += len(data)
                table = spec.parse_minishard_index(data, f"{url} minishard {minishard}")
            for grid, chunk_id in chunk_list:
                if chunk_id in table:
                    plan.append((grid, chunk_id, *table[chunk_id]))
                else:
                    located[_grid_key(grid)] = None

        def fetch_chunk(item: tuple[tuple, int, int, int]) -> ManifestEntry:
            grid, chunk_id, start, size = item
            data = self._get_range(url, start, start + size, remote)
            relpath = relpaths[chunk_id]
            write_atomic(raw.target(relpath), data)
            return ManifestEntry(path=relpath, url=url, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                                 etag=remote.etag, last_modified=remote.last_modified,
                                 version=f"bytes={start}-{start + size - 1}")

        with ThreadPoolExecutor(max_workers=max(1, self.settings.transfer.max_in_flight)) as pool:
            entries = list(pool.map(fetch_chunk, plan))
        for (grid, chunk_id, _, _), entry in zip(plan, entries):
            located[_grid_key(grid)] = entry.path
        fetched += sum(e.size for e in entries)
        return entries, located, TransferStats(fetched_objects=len(entries), fetched_bytes=fetched)

    @staticmethod
    def _previously_absent(raw: RawStore, scale: Scale, shard_name: str, version: str | None) -> set[str]:
        """Chunks the last download found absent in this shard, if the shard is still that version."""
        if version is None or raw.previous_entry(CHUNKS_DOC) is None or not raw.path(CHUNKS_DOC).exists():
            return set()
        document = raw.read_document(CHUNKS_DOC)
        if document.get("scale") != scale.key or document.get("shard_versions", {}).get(shard_name) != version:
            return set()
        return {key for key, relpath in document.get("chunks", {}).items() if relpath is None}

    def _get_range(self, url: str, start: int, stop: int, remote: RemoteObject) -> bytes:
        """Bytes [start, stop) of `url`, refused if the object changed since `remote` was seen."""
        headers = {"Range": f"bytes={start}-{stop - 1}"}
        if remote.etag:
            headers["If-Match"] = remote.etag
        data = self.http.get_bytes(url, headers=headers)
        if len(data) == stop - start:
            return data
        if remote.size is not None and len(data) == remote.size and stop <= len(data):
            return data[start:stop]  # the server ignored Range and sent the whole object
        raise IntegrityError(f"{url}: asked for bytes {start}-{stop - 1}, got {len(data)} bytes", url=url)

    def _chunk_loader(self, raw: RawStore, scale: Scale):
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
    @property
    def dvid_node_url(self) -> str:
        return f"{self.settings.flyem_dvid_url.rstrip('/')}/api/node/{self.settings.flyem_dvid_uuid}"

    def _fetch_dvid(self, request: DatasetRequest, raw: RawStore) -> tuple[list[ManifestEntry], TransferStats]:
        options: FlyemOptions = request.options  # type: ignore[assignment]
        commit_url, info_url = f"{self.dvid_node_url}/commit", f"{self.dvid_node_url}/{DVID_INSTANCE}/info"
        commit = self.http.get_json(commit_url)
        info = self.http.get_json(info_url)
        entries, doc_stats = _store_documents(raw, [(DVID_COMMIT_DOC, commit_url, commit),
                                                    (DVID_INFO_DOC, info_url, info)])
        type_name = (info.get("Base") or {}).get("TypeName") if isinstance(info, dict) else None
        if type_name != "uint8blk":
            raise UnsupportedDataError(f"{info_url}: instance type {type_name!r}; expected uint8blk grayscale")
        low, high = _dvid_extents(info, info_url)
        _check_bounds(request, options, low, high, f"DVID {self.dvid_node_url}/{DVID_INSTANCE}")
        # A locked (committed) DVID node never changes, so a tile fetched from it stays valid.
        locked = isinstance(commit, dict) and commit.get("Locked") is True
        if not locked:
            log.warning("%s: DVID node %s is not locked; fetching every tile again", request.key,
                        self.settings.flyem_dvid_uuid)
        tiles = dvid_tiles(options.start_xyz, options.stop_xyz)

        def fetch(tile: Tile) -> tuple[ManifestEntry, TransferStats]:
            size, offset = "_".join(map(str, tile.size)), "_".join(map(str, tile.start))
            url = f"{self.dvid_node_url}/{DVID_INSTANCE}/raw/0_1_2/{size}/{offset}?throttle=true"
            previous = raw.previous_entry(tile.relpath)
            local = raw.path(tile.relpath)
            if locked and previous is not None and previous.url == url and local.exists() \
                    and local.stat().st_size == previous.size and _sha256(local) == previous.sha256:
                return previous, TransferStats(skipped_objects=1, skipped_bytes=previous.size)
            download = self.http.download(url, raw.target(tile.relpath))
            if download.size != tile.nbytes:
                local.unlink(missing_ok=True)
                raise IntegrityError(f"{url}: got {download.size} bytes, expected {tile.nbytes} "
                                     f"({'x'.join(map(str, tile.size))} uint8)", url=url)
            entry = ManifestEntry(path=tile.relpath, url=url, size=download.size, sha256=download.sha256,
                                  version=f"node {self.settings.flyem_dvid_uuid}")
            return entry, TransferStats(fetched_objects=1, fetched_bytes=download.size)

        workers = max(1, min(DVID_MAX_IN_FLIGHT, self.settings.transfer.max_in_flight))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(fetch, tiles))
        stats = doc_stats
        for _, s in results:
            stats = stats + s
        return entries + [e for e, _ in results], stats


# ---- helpers -------------------------------------------------------------------------------------

def _grid_key(grid: tuple[int, int, int]) -> str:
    return "_".join(map(str, grid))


def _store_documents(raw: RawStore, documents: list[tuple[str, str, Any]]) -> tuple[list[ManifestEntry], TransferStats]:
    """Keep metadata responses; a document identical to last time counts as skipped, not fetched."""
    entries, stats = [], TransferStats()
    for relpath, url, document in documents:
        previous = raw.previous_entry(relpath)
        entry = raw.store_document(relpath, url, document)
        unchanged = previous is not None and previous.sha256 == entry.sha256
        stats = stats + (TransferStats(skipped_objects=1, skipped_bytes=entry.size) if unchanged
                         else TransferStats(fetched_objects=1, fetched_bytes=entry.size))
        entries.append(entry)
    return entries, stats


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _current_range_entry(raw: RawStore, relpath: str, remote: RemoteObject) -> ManifestEntry | None:
    """The previous manifest entry of a chunk cut from a shard, if the shard is the same version."""
    entry = raw.previous_entry(relpath)
    local = raw.path(relpath)
    if entry is None or entry.url != remote.url or not local.exists() or local.stat().st_size != entry.size:
        return None
    if remote.etag and entry.etag:
        return entry if remote.etag == entry.etag else None
    if remote.last_modified and entry.last_modified:
        return entry if remote.last_modified == entry.last_modified else None
    return None


def _check_bounds(request: DatasetRequest, options: FlyemOptions, low_xyz: tuple[int, int, int],
                  high_xyz: tuple[int, int, int], what: str) -> None:
    start, stop = options.start_xyz, options.stop_xyz
    if any(a < lo or b > hi for a, b, lo, hi in zip(start, stop, low_xyz, high_xyz)):
        raise SelectionError(
            f"{request.source}.{request.key}: crop offset_zyx {list(options.offset_zyx)} shape_zyx "
            f"{list(options.shape_zyx)} reaches outside {what}, whose voxels span z {low_xyz[2]}-{high_xyz[2]}, "
            f"y {low_xyz[1]}-{high_xyz[1]}, x {low_xyz[0]}-{high_xyz[0]} (end exclusive)")


def _meta_row(response: Any, where: str) -> dict[str, Any]:
    """The Meta node's properties from a /api/custom/custom answer (columns `m.<name>`)."""
    if not isinstance(response, dict) or not response.get("data"):
        raise SourceResponseError(f"{where}: the Meta query returned no rows")
    columns = [str(c).removeprefix("m.") for c in response["columns"]]
    return dict(zip(columns, response["data"][0]))


def _meta_voxel_size_nm(meta: dict[str, Any], where: str) -> tuple[float, float, float] | None:
    size = meta.get("voxelSize")
    if size is None:
        return None
    units = meta.get("voxelUnits") or "nanometers"  # neuPrint states nm implicitly when absent
    if isinstance(units, list):
        units = units[0] if units and len(set(units)) == 1 else None
    if units not in NM_PER_UNIT:
        raise SourceResponseError(f"{where}: unknown voxelUnits {meta.get('voxelUnits')!r}")
    try:
        values = tuple(float(v) * NM_PER_UNIT[units] for v in size)
    except (TypeError, ValueError):
        raise SourceResponseError(f"{where}: voxelSize must be numbers, got {size!r}") from None
    if len(values) != 3 or min(values) <= 0:
        raise SourceResponseError(f"{where}: voxelSize must be three positive lengths (x, y, z), got {size!r}")
    return values  # type: ignore[return-value]


def _dvid_voxel_size_nm(info: Any, where: str) -> tuple[float, float, float]:
    extended = info.get("Extended") if isinstance(info, dict) else None
    if not isinstance(extended, dict) or "VoxelSize" not in extended:
        raise SourceResponseError(f"{where}: instance info lacks Extended.VoxelSize")
    units = extended.get("VoxelUnits") or ["nanometers"] * 3
    try:
        values = tuple(float(v) * NM_PER_UNIT[str(u)] for v, u in zip(extended["VoxelSize"], units))
    except (KeyError, TypeError, ValueError):
        raise SourceResponseError(f"{where}: cannot read VoxelSize {extended.get('VoxelSize')!r} in "
                                  f"{units!r}") from None
    if len(values) != 3 or min(values) <= 0:
        raise SourceResponseError(f"{where}: VoxelSize must be three positive lengths, got {values!r}")
    return values  # type: ignore[return-value]


def _dvid_extents(info: Any, where: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """[MinPoint, MaxPoint + 1) of a DVID instance, (x, y, z)."""
    extended = info.get("Extended") if isinstance(info, dict) else None
    low = (extended or {}).get("MinPoint")
    high = (extended or {}).get("MaxPoint")
    if not (isinstance(low, list) and isinstance(high, list) and len(low) == 3 and len(high) == 3):
        raise SourceResponseError(f"{where}: instance has no extents (Extended.MinPoint / MaxPoint)")
    return tuple(int(v) for v in low), tuple(int(v) + 1 for v in high)  # type: ignore[return-value]


SOURCE = FlyemSource
