"""Streaming multiscale OME-Zarr writer: brick by brick, so memory follows the shard, not the volume."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from em_ingest.errors import EmIngestError, FormatError
from em_ingest.formats.volume import Geometry, Region, Volume, triple
from em_ingest.omezarr.pyramid import BlockSummary, Level, WindowMean, WindowMode, plan_pyramid
from em_ingest.omezarr.thumbnail import thumbnail_level, write_thumbnail_plane
from em_ingest.storage import fsync_path

if TYPE_CHECKING:  # imported where they are used: importing the writer (e.g. for ZarrLayout) stays light
    import tensorstore
    import zarr

NGFF_VERSIONS = ("0.5", "0.4")  # 0.5 = Zarr v3 with sharding; 0.4 = Zarr v2
# s0 blocks read ahead of the one being downsampled and written (each is one block of memory).
READ_AHEAD = 1
AXES = [{"name": n, "type": "space", "unit": "nanometer"} for n in ("z", "y", "x")]


@dataclass(frozen=True)
class ZarrLayout:
    """How the normalized image is stored."""

    ngff_version: str = "0.5"
    chunks: tuple[int, int, int] = (64, 64, 64)
    # Chunks per shard along (z, y, x) on Zarr v3: 128 x 256 x 256 voxel shard files.
    chunks_per_shard: tuple[int, int, int] = (2, 4, 4)
    # Level 1: EM noise compresses about as well at 1 as at 3, and 1 is the faster one.
    zstd_level: int = 1
    workers: int = 2

    def __post_init__(self) -> None:
        if self.ngff_version not in NGFF_VERSIONS:
            raise ValueError(f"ngff_version must be one of {NGFF_VERSIONS}, got {self.ngff_version!r}")
        if any(not 2 <= c <= 1024 or c % 2 for c in self.chunks):
            # Even sides keep every block boundary on a 2x window, so blocks downsample independently.
            raise ValueError(f"chunk sides must be even, 2..1024, got {self.chunks}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")

    @property
    def zarr_format(self) -> Literal[2, 3]:
        return 3 if self.ngff_version == "0.5" else 2

    @property
    def compression(self) -> str:
        return f"zstd(level={self.zstd_level})" + (", sharded" if self.zarr_format == 3 else "")

    def chunks_for(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        return triple(max(1, min(c, n)) for c, n in zip(self.chunks, shape))

    def shards_for(self, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        if self.zarr_format == 2:
            return None
        chunks = self.chunks_for(shape)
        # Never larger than needed to cover the array, always a whole number of chunks.
        return triple(c * min(k, -(-n // c)) for c, k, n in zip(chunks, self.chunks_per_shard, shape))

    def block_for(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """Unit of work: one shard on v3 (written whole, never read-modify-write), else 2x2x2 chunks."""
        return self.shards_for(shape) or triple(min(n, 2 * c) for c, n in zip(self.chunks_for(shape), shape))


@dataclass(frozen=True)
class WriteResult:
    path: Path
    levels: tuple[Level, ...]
    dtype: str
    chunks: tuple[int, int, int]
    shards: tuple[int, int, int] | None
    ngff_version: str
    compression: str
    stored_bytes: int
    intensity_min: float | None
    intensity_max: float | None
    intensity_mean: float | None
    thumbnail: Path | None


def multiscales_attributes(levels: Iterable[Level], name: str, ngff_version: str) -> dict[str, Any]:
    multiscale = {
        "name": name,
        "axes": AXES,
        "datasets": [
            {
                "path": level.path,
                "coordinateTransformations": [
                    {"type": "scale", "scale": [float(s) for s in level.scale_nm]},
                    {"type": "translation", "translation": [float(t) for t in level.translation_nm]},
                ],
            }
            for level in levels
        ],
    }
    if ngff_version == "0.4":
        return {"multiscales": [{"version": "0.4", **multiscale}]}
    return {"ome": {"version": ngff_version, "multiscales": [multiscale]}}


class Intensity:
    """Running min, max and mean of the voxels of a level (s0: the image's intensity statistics); the parts
    of a conversion split into regions add up with `merge`."""

    def __init__(self) -> None:
        self.min: float | None = None
        self.max: float | None = None
        self.total: float | int = 0
        self.count = 0

    def add(self, block: np.ndarray, known: BlockSummary | None = None) -> None:
        """Count `block`; `known`, when given, is its exact sum, min and max already taken (with the window sums)."""
        if block.size == 0:
            return
        total: float | int
        if known is not None:
            total, lo, hi = known.total, float(known.min), float(known.max)
        else:
            lo, hi = float(block.min()), float(block.max())
            # Integers are summed exactly in 64-bit integers (numpy's widening sum is fast; a float sum is not).
            wide = np.int64 if block.dtype.kind in "ib" else np.uint64 if block.dtype.kind == "u" else np.float64
            total = block.sum(dtype=wide).item()
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)
        self.total += total
        self.count += block.size

    @property
    def mean(self) -> float | None:
        return float(self.total / self.count) if self.count else None

    def merge(self, other: Intensity) -> Intensity:
        """The statistics of both parts together."""
        merged = Intensity()
        present = [part for part in (self, other) if part.count]
        if present:
            merged.min = min(part.min for part in present if part.min is not None)
            merged.max = max(part.max for part in present if part.max is not None)
        merged.total, merged.count = self.total + other.total, self.count + other.count
        return merged

    def as_dict(self) -> dict[str, Any]:
        return {"min": self.min, "max": self.max, "total": self.total, "count": self.count}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Intensity:
        intensity = cls()
        intensity.min, intensity.max = record["min"], record["max"]
        intensity.total, intensity.count = record["total"], record["count"]
        return intensity


BlockIndex = tuple[int, int, int]


class _Completion(Protocol):
    """What the pool needs of a future (tensorstore's): whether it is done."""

    def done(self) -> bool: ...


class _BufferPool:
    """Block-sized arrays used again once nothing reads them, so a steady conversion faults in no fresh pages.

    An array lent to a write comes back when tensorstore has copied it out (the write's copy future:
    "after which the source is no longer accessed"). At most `keep` idle arrays per shape are kept.
    """

    def __init__(self, dtype: np.dtype, keep: int):
        self.dtype, self.keep = dtype, keep
        self._idle: dict[tuple[int, ...], list[np.ndarray]] = {}
        self._lent: list[tuple[np.ndarray, _Completion]] = []

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        if self._lent:
            self._reclaim()
        idle = self._idle.get(shape)
        return idle.pop() if idle else np.empty(shape, self.dtype)

    def give(self, array: np.ndarray, after: _Completion | None = None) -> None:
        if after is not None and not after.done():
            self._lent.append((array, after))
            return
        idle = self._idle.setdefault(array.shape, [])
        if len(idle) < self.keep:
            idle.append(array)

    def _reclaim(self) -> None:
        lent, self._lent = self._lent, []
        for array, after in lent:
            self.give(array, after)


class _LevelAssembler:
    """Collects one level's voxels, arriving in pieces, into whole write blocks (shards on Zarr v3).

    A block is handed on once every voxel of it has arrived, so each block is written exactly
    once and whole (no read-modify-write of a shard). Pieces are written straight into the open
    block (`views`), or copied in (`add`) when the caller already holds them.
    """

    def __init__(self, shape: tuple[int, int, int], block: tuple[int, int, int], pool: _BufferPool):
        self.shape, self.block, self.pool = shape, block, pool
        self._open: dict[BlockIndex, tuple[np.ndarray, list[int]]] = {}

    @property
    def open_bytes(self) -> int:
        return sum(buffer.nbytes for buffer, _ in self._open.values())

    def region_of(self, index: BlockIndex) -> Region:
        return triple(slice(i * b, min((i + 1) * b, n)) for i, b, n in zip(index, self.block, self.shape))

    def _overlaps(self, region: Region) -> list[tuple[BlockIndex, Region, Region, Region]]:
        """(block index, block region, the part of `region` in it as block-local and as region-local slices)."""
        ranges = [range(r.start // b, -(-r.stop // b)) for r, b in zip(region, self.block)]
        found = []
        for iz, iy, ix in product(*ranges):
            block_region = self.region_of((iz, iy, ix))
            overlap = triple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(region, block_region))
            local = triple(slice(o.start - b.start, o.stop - b.start) for o, b in zip(overlap, block_region))
            source = triple(slice(o.start - r.start, o.stop - r.start) for o, r in zip(overlap, region))
            found.append(((iz, iy, ix), block_region, local, source))
        return found

    def _buffer(self, index: BlockIndex, block_region: Region) -> tuple[np.ndarray, list[int]]:
        entry = self._open.get(index)
        if entry is None:
            entry = self._open[index] = (self.pool.take(tuple(s.stop - s.start for s in block_region)), [0])
        return entry

    def view(self, region: Region) -> np.ndarray | None:
        """Where the voxels of `region` go, when it lies within one block; then call `filled(region)`."""
        overlaps = self._overlaps(region)
        if len(overlaps) != 1:
            return None
        index, block_region, local, _ = overlaps[0]
        return self._buffer(index, block_region)[0][local]

    def filled(self, region: Region) -> list[tuple[Region, np.ndarray]]:
        """The voxels of `region` (within one block) are in place; return the block if that completed it."""
        (index, block_region, _, _), = self._overlaps(region)
        return self._count(index, block_region, math.prod(s.stop - s.start for s in region))

    def add(self, region: Region, data: np.ndarray) -> list[tuple[Region, np.ndarray]]:
        """Place `data` (the voxels of `region`); return the blocks this completed."""
        done = []
        for index, block_region, local, source in self._overlaps(region):
            if region == block_region and index not in self._open:  # a whole block at once, no copy
                done.append((block_region, data))
                continue
            self._buffer(index, block_region)[0][local] = data[source]
            done += self._count(index, block_region, math.prod(s.stop - s.start for s in local))
        return done

    def _count(self, index: BlockIndex, block_region: Region, voxels: int) -> list[tuple[Region, np.ndarray]]:
        buffer, filled = self._open[index]
        filled[0] += voxels
        if filled[0] < buffer.size:
            return []
        del self._open[index]
        return [(block_region, buffer)]


def traversal_order(levels: list[Level], blocks: list[tuple[int, int, int]], within: Region | None = None) -> list[Region]:
    """The blocks of levels[0] (inside the box `within`, if given) ordered depth first through the pyramid
    (coarsest block first, then finer).

    Visiting them in this order completes each coarser block soon after its first voxel arrives,
    so only a few partial blocks per level are open at any time, whatever the volume's extent.
    """
    shape0, block0 = levels[0].shape, blocks[0]
    box = within or triple(slice(0, n) for n in shape0)

    def key(index: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        start = [i * b for i, b in zip(index, block0)]
        path = [tuple(index)]
        for level, block in zip(levels[1:], blocks[1:]):
            start = [s // f for s, f in zip(start, level.factors)]
            path.append(tuple(s // b for s, b in zip(start, block)))
        return tuple(reversed(path))

    indices = product(*(range(r.start // b, -(-min(r.stop, n) // b)) for r, n, b in zip(box, shape0, block0)))
    return [triple(slice(i * b, min((i + 1) * b, n)) for i, b, n in zip(index, block0, shape0))
            for index in sorted(indices, key=key)]


class _BoundedWriter:
    """Writes whole blocks through tensorstore, at most `limit` blocks in flight.

    zarr-python stays the author of the metadata; tensorstore only writes chunk data, because its
    C++ engine compresses and writes shards on its own threads without the GIL (about twice as fast
    as zarr-python's per-chunk asyncio path here, and memory stays that of the blocks in flight).
    tensorstore does not fsync (its default syncs every shard and its folder on the threads that carry
    the writes, so the writes queue behind the disk); `written` is told of each finished block instead,
    and `write_ome_zarr` has a `_Syncer` make it durable off the write path.
    """

    def __init__(self, workers: int, written: Callable[[Path, Region], None] = lambda path, region: None):
        import tensorstore

        self._written = written  # told of each block once its write has succeeded
        self._limit = 2 * workers
        self._context = tensorstore.Context({"data_copy_concurrency": {"limit": workers},
                                             "file_io_concurrency": {"limit": 2 * workers},
                                             "file_io_sync": False})
        self._pending: list[tuple[Path, Region, tensorstore.WriteFutures]] = []
        self._opened: dict[str, tensorstore.TensorStore] = {}

    def open(self, path: Path, zarr_format: int) -> None:
        import tensorstore

        spec = {"driver": "zarr3" if zarr_format == 3 else "zarr", "kvstore": {"driver": "file", "path": str(path)}}
        self._opened[str(path)] = tensorstore.open(spec, open=True, context=self._context).result()

    def submit(self, path: Path, region: Region, data: np.ndarray) -> tensorstore.WriteFutures:
        """Start writing `data` to `region`; it must not change until the returned futures' `copy` is done."""
        while len(self._pending) >= self._limit:
            self._wait_oldest()
        futures = self._opened[str(path)][region].write(data)
        self._pending.append((path, region, futures))
        return futures

    def drain(self) -> None:
        """Wait for every write; raise the first failure."""
        while self._pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        path, region, future = self._pending.pop(0)
        error = future.exception()
        if error is not None:
            raise EmIngestError(f"{path}: writing block {[(r.start, r.stop) for r in region]} failed: {error}")
        self._written(path, region)

    def settle(self) -> None:
        """After a failure elsewhere: wait for the writes in flight without raising theirs, so none
        is still writing when the caller discards the staging directory (the first error propagates)."""
        while self._pending:
            self._pending.pop(0)[2].exception()


class _Syncer:
    """Makes written files durable on its own threads while the conversion goes on, so the disk writes them
    back meanwhile rather than all at the end; `finish` waits for them, syncs the folders they are in, and
    raises the first failure."""

    def __init__(self, threads: int):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="omezarr-sync")
        self._pending: list[tuple[Path, Future[None]]] = []

    def sync_soon(self, paths: Iterable[Path]) -> None:
        self._pending += [(path, self._pool.submit(fsync_path, path)) for path in paths]

    def finish(self, root: Path) -> None:
        folders: set[Path] = set()
        for path, future in self._pending:
            try:
                future.result()
            except FileNotFoundError:
                continue  # not a file this layout writes: `finish_image` syncs whatever exists
            folders.update(folder for folder in path.parents if folder == root or root in folder.parents)
        self._pending = []
        list(self._pool.map(fsync_path, folders))
        self._pool.shutdown()

    def abandon(self) -> None:
        """After a failure: stop syncing (the staging directory is about to be discarded)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def create_image(dest: Path, shape: tuple[int, int, int], dtype: np.dtype, geometry: Geometry, *, name: str,
                 layout: ZarrLayout = ZarrLayout(), attributes: dict[str, Any] | None = None,
                 label_levels: int | None = None, image_label: dict[str, Any] | None = None) -> list[Level]:
    """Create the image's group and its empty level arrays at `dest` (a new, empty staging directory);
    returns the levels, which `write_levels` then fills.

    A label image passes `label_levels` (its image's level count): exactly that many levels; `image_label`
    is its `image-label` metadata (source image, colours), written with the multiscales.
    """
    import zarr

    dtype = np.dtype(dtype).newbyteorder("=")
    translation = geometry.translation_nm or (0.0, 0.0, 0.0)
    levels = plan_pyramid(shape, geometry.voxel_size_nm, translation, layout.chunks_for(shape), label_levels)
    root = zarr.open_group(zarr.storage.LocalStore(dest), mode="w-", zarr_format=layout.zarr_format)
    metadata = multiscales_attributes(levels, name, layout.ngff_version)
    if image_label is not None:
        if layout.ngff_version == "0.4":
            metadata["image-label"] = {"version": "0.4", **image_label}
        else:
            metadata["ome"]["image-label"] = image_label
    root.attrs.update({**(attributes or {}), **metadata})
    for level in levels:
        _create_level(root, level, dtype, layout)
    return levels


def write_levels(volume: Volume, dest: Path, levels: Sequence[Level], *, layout: ZarrLayout = ZarrLayout(),
                 first: int = 0, last: int | None = None, within: Sequence[Region] | None = None,
                 stored: bool = False, labels: bool = False,
                 on_block: Callable[[int], None] | None = None) -> Intensity:
    """Stream `volume`, which holds level `first`, through levels `first`..`last` of the image at `dest`.

    Each block of level `first` is read once and feeds every level above it: it is written, downsampled
    straight into the next level's open block, and so on up the pyramid as blocks complete. Nothing is read
    back. Peak memory is a few blocks per level plus the writes in flight, whatever the volume's size; block
    buffers and the downsampling's scratch arrays are reused from block to block. When it returns, every
    file it wrote is durable (fsynced).

    `within` limits the work to boxes of level `first` (one region of a conversion split into steps); each
    must cover whole blocks of every level up to `last` (`omezarr.regions` plans them so). `stored`: level
    `first` is already in the image (it is being read back from it), so only the levels above are written.
    `labels`: take each window's mode, never a mean (label images). `on_block` is told the bytes of each
    block of level `first` as it is done. Returns the min, max and sum of level `first` (for s0: the image's
    intensity statistics).
    """
    dtype = np.dtype(volume.dtype).newbyteorder("=")
    last = len(levels) - 1 if last is None else last
    levels = list(levels[first:last + 1])
    if volume.shape != levels[0].shape:
        raise FormatError(f"{volume.name}: is {volume.shape} voxels, but level {levels[0].path} is {levels[0].shape}")
    blocks = [layout.block_for(level.shape) for level in levels]
    # Idle buffers kept per shape: as many as are read ahead plus the block at hand; more only raised the peak
    # (blocks lent to writes come back within a block's time, and open blocks are taken as they are needed).
    pool = _BufferPool(dtype, keep=READ_AHEAD + 2)
    assemblers = [_LevelAssembler(level.shape, block, pool) for level, block in zip(levels, blocks)]
    stats = Intensity()
    # How a level's voxels become the next level's, written into the next level's block: the window mean
    # (returning the block's exact sum, min and max when it has them), or for a label image the window's mode.
    reduce_into = (WindowMode() if labels else WindowMean()).into
    syncer = _Syncer(threads=layout.workers)
    paths = [dest / level.path for level in levels]
    storage = {path: (block, layout.chunks_for(level.shape)) for path, block, level in zip(paths, blocks, levels)}
    writer = _BoundedWriter(layout.workers, lambda path, region: syncer.sync_soon(
        _block_files(path, region, *storage[path], layout.zarr_format)))
    for path in paths[1 if stored else 0:]:
        writer.open(path, layout.zarr_format)

    def emit(k: int, region: Region, data: np.ndarray, pooled: bool) -> None:
        """A whole block of level k is ready: write it and push its downsampled voxels up the pyramid."""
        copied = None if (k == 0 and stored) else writer.submit(paths[k], region, data).copy
        summary = None
        if k + 1 < len(levels):
            factors = levels[k + 1].factors
            coarse = triple(slice(r.start // f, -(-r.stop // f)) for r, f in zip(region, factors))
            target = assemblers[k + 1].view(coarse)
            if target is not None:  # the usual case: straight into the next level's open block
                summary = reduce_into(data, factors, target)
                done = assemblers[k + 1].filled(coarse)
            else:  # the piece straddles blocks of the next level (block sides that do not nest)
                piece = pool.take(tuple(s.stop - s.start for s in coarse))
                summary = reduce_into(data, factors, piece)
                done = assemblers[k + 1].add(coarse, piece)
                if all(block is not piece for _, block in done):
                    pool.give(piece)
            for block_region, block in done:  # open blocks, or the piece itself when it was a whole block
                emit(k + 1, block_region, block, pooled=True)
        if k == 0:
            stats.add(data, summary)
            if on_block is not None:
                on_block(data.nbytes)
        if pooled:
            pool.give(data, after=copied)

    def read(region: Region, buffer: np.ndarray) -> np.ndarray:
        block = volume.read_into(region, buffer)
        expected = tuple(s.stop - s.start for s in region)
        if block.shape != expected:
            raise FormatError(f"{volume.name}: reader returned {block.shape} for region of {expected}")
        return np.ascontiguousarray(block, dtype=dtype)

    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="omezarr-read") as reader:
            # Read ahead while the block at hand is downsampled and compressed.
            boxes: Sequence[Region | None] = within if within is not None else [None]
            order = [region for box in boxes for region in traversal_order(levels, blocks, box)]
            ahead: list[tuple[np.ndarray, Future[np.ndarray]]] = []
            for i, region in enumerate(order):
                while len(ahead) < READ_AHEAD + 1 and i + len(ahead) < len(order):
                    upcoming = order[i + len(ahead)]
                    buffer = pool.take(tuple(s.stop - s.start for s in upcoming))
                    ahead.append((buffer, reader.submit(read, upcoming, buffer)))
                buffer, future = ahead.pop(0)
                data = future.result()
                if data is not buffer:  # the reader made its own array: the buffer goes back unused
                    pool.give(buffer)
                emit(0, region, data, pooled=data is buffer)
        writer.drain()
        leftover = [levels[k].path for k, a in enumerate(assemblers) if a.open_bytes]
        if leftover:  # cannot happen unless blocks, levels and boxes disagree; never publish a partial level
            raise FormatError(f"{volume.name}: levels {leftover} were not completely written")
        syncer.finish(dest)
    finally:
        writer.settle()
        syncer.abandon()
    return stats


def finish_image(dest: Path, levels: Sequence[Level], dtype: np.dtype, intensity: Intensity, *,
                 layout: ZarrLayout = ZarrLayout(), thumbnail: bool = True) -> WriteResult:
    """The image's last touches once every level is written: the thumbnail (the middle z-plane of a coarse
    level, read back), and every folder and metadata file made durable (the data files are synced by the
    steps that wrote them)."""
    thumbnail_path = None
    if thumbnail:
        level = levels[thumbnail_level([level.shape for level in levels])]
        plane = StoredLevel(dest, level, layout).read(
            (slice(level.shape[0] // 2, level.shape[0] // 2 + 1), slice(0, level.shape[1]), slice(0, level.shape[2])))
        thumbnail_path = write_thumbnail_plane(plane[0], dest / "thumbnail.png")
    stored = 0
    for folder, _, files in os.walk(dest):
        for name in files:
            path = Path(folder, name)
            stored += path.stat().st_size
            if not name.isdigit():  # chunk and shard files have numeric names; the writing step synced them
                fsync_path(path)
        fsync_path(Path(folder))
    shape0 = levels[0].shape
    return WriteResult(
        path=dest, levels=tuple(levels), dtype=np.dtype(dtype).newbyteorder("=").name, chunks=layout.chunks_for(shape0),
        shards=layout.shards_for(shape0), ngff_version=layout.ngff_version, compression=layout.compression,
        stored_bytes=stored, intensity_min=intensity.min, intensity_max=intensity.max,
        intensity_mean=intensity.mean, thumbnail=thumbnail_path,
    )


class StoredLevel(Volume):
    """One level of an image being written, read back (the source of the levels above a split conversion's
    regions, and of the thumbnail)."""

    def __init__(self, dest: Path, level: Level, layout: ZarrLayout):
        import tensorstore

        spec = {"driver": "zarr3" if layout.zarr_format == 3 else "zarr",
                "kvstore": {"driver": "file", "path": str(dest / level.path)}}
        # No cache: a block is read once, so memory stays that of the block being read.
        self._array = tensorstore.open(spec, open=True, read=True).result()
        self.shape = level.shape
        self.dtype = np.dtype(self._array.dtype.numpy_dtype)
        self.geometry = None
        self.name = f"{dest}/{level.path}"

    def read(self, region: Region) -> np.ndarray:
        return np.asarray(self._array[region].read().result())


def write_ome_zarr(volume: Volume, geometry: Geometry, dest: Path, *, name: str,
                   layout: ZarrLayout = ZarrLayout(), attributes: dict[str, Any] | None = None,
                   label_levels: int | None = None, image_label: dict[str, Any] | None = None) -> WriteResult:
    """Write `volume` as a multiscale OME-Zarr image at `dest` (a new, empty staging directory), in one
    process: `create_image`, `write_levels` over the whole volume, `finish_image`. When it returns, every
    file of the image is durable, so it can be published at once.

    A label image passes `label_levels` (its image's level count): its levels then take each window's mode,
    never a mean, there are exactly that many, and it gets no thumbnail; `image_label` is its `image-label`
    metadata (source image, colours), written with the multiscales.
    """
    levels = create_image(dest, volume.shape, volume.dtype, geometry, name=name, layout=layout,
                          attributes=attributes, label_levels=label_levels, image_label=image_label)
    labels = label_levels is not None
    intensity = write_levels(volume, dest, levels, layout=layout, labels=labels)
    return finish_image(dest, levels, volume.dtype, intensity, layout=layout, thumbnail=not labels)


def _block_files(level_dir: Path, region: Region, block: tuple[int, int, int], chunks: tuple[int, int, int],
                 zarr_format: int) -> list[Path]:
    """The files a block of a level is stored in: its shard on Zarr v3 (a block is one shard), its chunks on
    v2 (keys as `_create_level` asks for them: `c/<z>/<y>/<x>` on v3, `<z>/<y>/<x>` on v2)."""
    if zarr_format == 3:
        return [level_dir.joinpath("c", *(str(r.start // b) for r, b in zip(region, block)))]
    ranges = [range(r.start // c, -(-r.stop // c)) for r, c in zip(region, chunks)]
    return [level_dir.joinpath(str(z), str(y), str(x)) for z, y, x in product(*ranges)]


def _create_level(root: zarr.Group, level: Level, dtype: np.dtype, layout: ZarrLayout) -> zarr.Array[Any]:
    import numcodecs
    from zarr.codecs import ZstdCodec

    kwargs: dict[str, Any] = {}
    if layout.zarr_format == 3:
        kwargs.update(shards=layout.shards_for(level.shape), compressors=ZstdCodec(level=layout.zstd_level),
                      dimension_names=["z", "y", "x"])
    else:
        kwargs.update(compressors=numcodecs.Zstd(level=layout.zstd_level),
                      chunk_key_encoding={"name": "v2", "separator": "/"})
    # Every chunk is written whole: comparing each against the fill value first cost more than
    # the few bytes an all-zero chunk compresses to.
    return root.create_array(level.path, shape=level.shape, dtype=dtype, chunks=layout.chunks_for(level.shape),
                             fill_value=0, config={"write_empty_chunks": True}, **kwargs)
