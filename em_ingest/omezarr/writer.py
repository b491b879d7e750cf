"""Streaming multiscale OME-Zarr writer: brick by brick, so memory follows the shard, not the volume."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any, Literal

import numcodecs
import numpy as np
import tensorstore
import zarr
from zarr.codecs import ZstdCodec

from em_ingest.errors import EmIngestError, FormatError
from em_ingest.formats.volume import Geometry, Region, Volume, triple
from em_ingest.omezarr.pyramid import Level, downsample, plan_pyramid
from em_ingest.omezarr.thumbnail import write_thumbnail

NGFF_VERSIONS = ("0.5", "0.4")  # 0.5 = Zarr v3 with sharding; 0.4 = Zarr v2
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


class _Stats:
    """Running min, max and mean of every voxel written to s0."""

    def __init__(self) -> None:
        self.min: float | None = None
        self.max: float | None = None
        self.total: float | int = 0
        self.count = 0

    def add(self, block: np.ndarray) -> None:
        if block.size == 0:
            return
        # Integers are summed exactly in 64-bit integers (numpy's widening sum is fast; a float sum is not).
        wide = np.int64 if block.dtype.kind in "ib" else np.uint64 if block.dtype.kind == "u" else np.float64
        lo, hi = float(block.min()), float(block.max())
        total = block.sum(dtype=wide).item()
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)
        self.total += total
        self.count += block.size

    @property
    def mean(self) -> float | None:
        return float(self.total / self.count) if self.count else None


BlockIndex = tuple[int, int, int]


class _LevelAssembler:
    """Collects one level's voxels, arriving in pieces, into whole write blocks (shards on Zarr v3).

    A block is handed on once every voxel of it has arrived, so each block is written exactly
    once and whole (no read-modify-write of a shard), and is then freed.
    """

    def __init__(self, shape: tuple[int, int, int], block: tuple[int, int, int], dtype: np.dtype):
        self.shape, self.block, self.dtype = shape, block, dtype
        self._open: dict[BlockIndex, tuple[np.ndarray, list[int]]] = {}

    @property
    def open_bytes(self) -> int:
        return sum(buffer.nbytes for buffer, _ in self._open.values())

    def region_of(self, index: BlockIndex) -> Region:
        return triple(slice(i * b, min((i + 1) * b, n)) for i, b, n in zip(index, self.block, self.shape))

    def add(self, region: Region, data: np.ndarray) -> list[tuple[Region, np.ndarray]]:
        """Place `data` (the voxels of `region`); return the blocks this completed."""
        ranges = [range(r.start // b, -(-r.stop // b)) for r, b in zip(region, self.block)]
        done = []
        for iz, iy, ix in product(*ranges):
            index = (iz, iy, ix)
            block_region = self.region_of(index)
            overlap = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(region, block_region))
            if region == block_region:  # the common case: a whole block at once, no copy
                done.append((block_region, data))
                continue
            buffer, filled = self._open.get(index) or self._open.setdefault(
                index, (np.empty(tuple(s.stop - s.start for s in block_region), self.dtype), [0]))
            local = tuple(slice(o.start - b.start, o.stop - b.start) for o, b in zip(overlap, block_region))
            source = tuple(slice(o.start - r.start, o.stop - r.start) for o, r in zip(overlap, region))
            buffer[local] = data[source]
            filled[0] += int(np.prod([o.stop - o.start for o in overlap]))
            if filled[0] == buffer.size:
                del self._open[index]
                done.append((block_region, buffer))
        return done


def traversal_order(levels: list[Level], blocks: list[tuple[int, int, int]]) -> list[Region]:
    """s0 blocks ordered depth first through the pyramid (coarsest block first, then finer).

    Visiting s0 in this order completes each coarser block soon after its first voxel arrives,
    so only a few partial blocks per level are open at any time, whatever the volume's extent.
    """
    shape0, block0 = levels[0].shape, blocks[0]

    def key(index: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        start = [i * b for i, b in zip(index, block0)]
        path = [tuple(index)]
        for level, block in zip(levels[1:], blocks[1:]):
            start = [s // f for s, f in zip(start, level.factors)]
            path.append(tuple(s // b for s, b in zip(start, block)))
        return tuple(reversed(path))

    indices = product(*(range(-(-n // b)) for n, b in zip(shape0, block0)))
    return [triple(slice(i * b, min((i + 1) * b, n)) for i, b, n in zip(index, block0, shape0))
            for index in sorted(indices, key=key)]


class _BoundedWriter:
    """Writes whole blocks through tensorstore, at most `limit` blocks in flight.

    zarr-python stays the author of the metadata; tensorstore only writes chunk data, because its
    C++ engine compresses and writes shards on its own threads without the GIL (about twice as fast
    as zarr-python's per-chunk asyncio path here, and memory stays that of the blocks in flight).
    """

    def __init__(self, workers: int):
        self._limit = 2 * workers
        self._context = tensorstore.Context({"data_copy_concurrency": {"limit": workers},
                                             "file_io_concurrency": {"limit": 2 * workers}})
        self._pending: list[tuple[Path, Region, tensorstore.WriteFutures]] = []
        self._opened: dict[str, tensorstore.TensorStore] = {}

    def open(self, path: Path, zarr_format: int) -> None:
        spec = {"driver": "zarr3" if zarr_format == 3 else "zarr", "kvstore": {"driver": "file", "path": str(path)}}
        self._opened[str(path)] = tensorstore.open(spec, open=True, context=self._context).result()

    def submit(self, path: Path, region: Region, data: np.ndarray) -> None:
        while len(self._pending) >= self._limit:
            self._wait_oldest()
        self._pending.append((path, region, self._opened[str(path)][region].write(data)))

    def drain(self) -> None:
        """Wait for every write; raise the first failure."""
        while self._pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        path, region, future = self._pending.pop(0)
        error = future.exception()
        if error is not None:
            raise EmIngestError(f"{path}: writing block {[(r.start, r.stop) for r in region]} failed: {error}")

    def settle(self) -> None:
        """After a failure elsewhere: wait for the writes in flight without raising theirs, so none
        is still writing when the caller discards the staging directory (the first error propagates)."""
        while self._pending:
            self._pending.pop(0)[2].exception()


def write_ome_zarr(volume: Volume, geometry: Geometry, dest: Path, *, name: str,
                   layout: ZarrLayout = ZarrLayout(), attributes: dict[str, Any] | None = None,
                   reduce: Callable[[np.ndarray, tuple[int, int, int]], np.ndarray] = downsample,
                   level_count: int | None = None, thumbnail: bool = True) -> WriteResult:
    """Write `volume` as a multiscale OME-Zarr image at `dest` (a new, empty staging directory).

    Each s0 block is read once and feeds every level: it is written, downsampled into the next
    level's open block, and so on up the pyramid as blocks complete. Nothing is read back.
    Peak memory is a few blocks per level plus the writes in flight, whatever the volume's size.
    A label image passes its own `reduce` (a window's mode, never a mean), its image's `level_count`,
    and no thumbnail.
    """
    dtype = np.dtype(volume.dtype).newbyteorder("=")
    translation = geometry.translation_nm or (0.0, 0.0, 0.0)
    chunks0 = layout.chunks_for(volume.shape)
    levels = plan_pyramid(volume.shape, geometry.voxel_size_nm, translation, chunks0, level_count)

    root = zarr.open_group(zarr.storage.LocalStore(dest), mode="w-", zarr_format=layout.zarr_format)
    root.attrs.update({**(attributes or {}), **multiscales_attributes(levels, name, layout.ngff_version)})
    arrays = [_create_level(root, level, dtype, layout) for level in levels]
    blocks = [layout.block_for(level.shape) for level in levels]
    assemblers = [_LevelAssembler(level.shape, block, dtype) for level, block in zip(levels, blocks)]
    stats = _Stats()
    writer = _BoundedWriter(layout.workers)
    paths = [dest / level.path for level in levels]
    for path in paths:
        writer.open(path, layout.zarr_format)

    def emit(k: int, region: Region, data: np.ndarray) -> None:
        """A whole block of level k is ready: write it and push its downsampled voxels up the pyramid."""
        writer.submit(paths[k], region, data)
        if k + 1 < len(levels):
            factors = levels[k + 1].factors
            coarse = triple(slice(r.start // f, -(-r.stop // f)) for r, f in zip(region, factors))
            for block_region, block in assemblers[k + 1].add(coarse, reduce(data, factors)):
                emit(k + 1, block_region, block)

    def read(region: Region) -> np.ndarray:
        block = volume.read(region)
        expected = tuple(s.stop - s.start for s in region)
        if block.shape != expected:
            raise FormatError(f"{volume.name}: reader returned {block.shape} for region of {expected}")
        return np.ascontiguousarray(block, dtype=dtype)

    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="omezarr-read") as reader:
            # Read the next s0 block while this one is downsampled and compressed.
            order = traversal_order(levels, blocks)
            ahead: Future[np.ndarray] | None = reader.submit(read, order[0]) if order else None
            for i, region in enumerate(order):
                assert ahead is not None  # submitted before the loop for the first block, then one step ahead
                data = ahead.result()
                ahead = reader.submit(read, order[i + 1]) if i + 1 < len(order) else None
                stats.add(data)
                emit(0, region, data)
        writer.drain()
        leftover = [k for k, a in enumerate(assemblers) if a.open_bytes]
        if leftover:  # cannot happen unless blocks and levels disagree; never publish a partial level
            raise FormatError(f"{volume.name}: levels {leftover} were not completely written")
    finally:
        writer.settle()

    thumbnail_path = write_thumbnail(arrays, dest / "thumbnail.png") if thumbnail else None
    stored = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    return WriteResult(
        path=dest, levels=tuple(levels), dtype=dtype.name, chunks=chunks0, shards=layout.shards_for(volume.shape),
        ngff_version=layout.ngff_version, compression=layout.compression, stored_bytes=stored,
        intensity_min=stats.min, intensity_max=stats.max, intensity_mean=stats.mean, thumbnail=thumbnail_path,
    )


def _create_level(root: zarr.Group, level: Level, dtype: np.dtype, layout: ZarrLayout) -> zarr.Array[Any]:
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
