"""Streaming multiscale OME-Zarr writer: brick by brick, so memory follows the shard, not the volume."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from em_ingest.errors import FormatError
from em_ingest.formats.volume import Geometry, Region, Volume
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
    zstd_level: int = 3
    workers: int = 2

    def __post_init__(self) -> None:
        if self.ngff_version not in NGFF_VERSIONS:
            raise ValueError(f"ngff_version must be one of {NGFF_VERSIONS}, got {self.ngff_version!r}")
        if any(not 1 <= c <= 1024 for c in self.chunks):
            raise ValueError(f"chunk sides must be 1..1024, got {self.chunks}")

    @property
    def zarr_format(self) -> int:
        return 3 if self.ngff_version == "0.5" else 2

    @property
    def compression(self) -> str:
        return f"zstd(level={self.zstd_level})" + (", sharded" if self.zarr_format == 3 else "")

    def chunks_for(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        return tuple(max(1, min(c, n)) for c, n in zip(self.chunks, shape))  # type: ignore[return-value]

    def shards_for(self, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        if self.zarr_format == 2:
            return None
        chunks = self.chunks_for(shape)
        # Never larger than needed to cover the array, always a whole number of chunks.
        return tuple(c * min(k, -(-n // c)) for c, k, n in zip(chunks, self.chunks_per_shard, shape))  # type: ignore[return-value]

    def block_for(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """Unit of work: one shard on v3 (written whole, never read-modify-write), else 2x2x2 chunks."""
        return self.shards_for(shape) or tuple(min(n, 2 * c) for c, n in zip(self.chunks_for(shape), shape))  # type: ignore[return-value]


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


def iter_blocks(shape: tuple[int, ...], block: tuple[int, ...]) -> Iterator[Region]:
    """Regions tiling `shape` with `block`-sized pieces (smaller at the far edges), z-major order."""
    starts = [range(0, n, b) for n, b in zip(shape, block)]
    for z, y, x in product(*starts):
        yield (slice(z, min(z + block[0], shape[0])), slice(y, min(y + block[1], shape[1])),
               slice(x, min(x + block[2], shape[2])))


def run_bounded(fn: Callable[[Region], None], items: Iterable[Region], workers: int) -> None:
    """Apply `fn` to every item on `workers` threads with at most 2 x workers items in flight."""
    if workers <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: set[Future] = set()
        try:
            for item in items:
                if len(pending) >= 2 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        f.result()
                pending.add(pool.submit(fn, item))
            for f in pending:
                f.result()
        except BaseException:
            for f in pending:
                f.cancel()
            raise


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
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.min: float | None = None
        self.max: float | None = None
        self.total = 0.0
        self.count = 0

    def add(self, block: np.ndarray) -> None:
        if block.size == 0:
            return
        lo, hi, s = float(block.min()), float(block.max()), float(block.sum(dtype=np.float64))
        with self._lock:
            self.min = lo if self.min is None else min(self.min, lo)
            self.max = hi if self.max is None else max(self.max, hi)
            self.total += s
            self.count += block.size

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


def write_ome_zarr(volume: Volume, geometry: Geometry, dest: Path, *, name: str,
                   layout: ZarrLayout = ZarrLayout(), attributes: dict[str, Any] | None = None) -> WriteResult:
    """Write `volume` as a multiscale OME-Zarr image at `dest` (a new, empty staging directory).

    s0 is copied brick by brick from the volume; each further level is computed brick by brick
    from the level before. Peak memory is a few bricks per worker, whatever the volume's size.
    """
    dtype = np.dtype(volume.dtype).newbyteorder("=")
    translation = geometry.translation_nm or (0.0, 0.0, 0.0)
    chunks0 = layout.chunks_for(volume.shape)
    levels = plan_pyramid(volume.shape, geometry.voxel_size_nm, translation, chunks0)

    root = zarr.open_group(zarr.storage.LocalStore(dest), mode="w-", zarr_format=layout.zarr_format)
    root.attrs.update({**(attributes or {}), **multiscales_attributes(levels, name, layout.ngff_version)})
    arrays = [_create_level(root, level, dtype, layout) for level in levels]

    stats = _Stats()
    s0 = arrays[0]

    def copy_block(region: Region) -> None:
        block = volume.read(region)
        expected = tuple(s.stop - s.start for s in region)
        if block.shape != expected:
            raise FormatError(f"{volume.name}: reader returned {block.shape} for region of {expected}")
        block = block.astype(dtype, copy=False)
        stats.add(block)
        s0[region] = block

    run_bounded(copy_block, iter_blocks(volume.shape, layout.block_for(volume.shape)), layout.workers)

    for previous, level, array in zip(arrays, levels[1:], arrays[1:]):
        factors = level.factors

        def reduce_block(region: Region, previous=previous, array=array, factors=factors) -> None:
            source = tuple(slice(r.start * f, min(r.stop * f, n)) for r, f, n in zip(region, factors, previous.shape))
            array[region] = downsample(np.asarray(previous[source]), factors)

        run_bounded(reduce_block, iter_blocks(level.shape, layout.block_for(level.shape)), layout.workers)

    thumbnail = write_thumbnail(arrays, dest / "thumbnail.png")
    stored = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    return WriteResult(
        path=dest, levels=tuple(levels), dtype=dtype.name, chunks=chunks0, shards=layout.shards_for(volume.shape),
        ngff_version=layout.ngff_version, compression=layout.compression, stored_bytes=stored,
        intensity_min=stats.min, intensity_max=stats.max, intensity_mean=stats.mean, thumbnail=thumbnail,
    )


def _create_level(root: zarr.Group, level: Level, dtype: np.dtype, layout: ZarrLayout) -> zarr.Array:
    kwargs: dict[str, Any] = {}
    if layout.zarr_format == 3:
        kwargs.update(shards=layout.shards_for(level.shape), compressors=ZstdCodec(level=layout.zstd_level),
                      dimension_names=["z", "y", "x"])
    else:
        kwargs.update(compressors=numcodecs.Zstd(level=layout.zstd_level),
                      chunk_key_encoding={"name": "v2", "separator": "/"})
    return root.create_array(level.path, shape=level.shape, dtype=dtype, chunks=layout.chunks_for(level.shape),
                             fill_value=0, **kwargs)
