"""Neuroglancer precomputed volumes: info JSON, scales, chunk grid and names, raw/jpeg/png chunks, sharding."""

from __future__ import annotations

import gzip
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import imagecodecs
import mmh3
import numpy as np

from em_ingest.errors import FormatError, SourceResponseError, UnsupportedDataError
from em_ingest.formats.box import copy_overlap
from em_ingest.formats.volume import Geometry, Region, Volume, triple
from em_ingest.limits import check_chunk

# Axis order in this module: precomputed documents are (x, y, z); arrays we return are (z, y, x).
XYZ = tuple[int, int, int]
ENCODINGS = ("raw", "jpeg", "png")
SHARDING_TYPE = "neuroglancer_uint64_sharded_v1"
DTYPES = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64"}


def _xyz(value: Any, field: str, where: str, *, positive: bool = False) -> XYZ:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise SourceResponseError(f"{where}: {field} must be three numbers [x, y, z], got {value!r}")
    try:
        out = triple(int(v) for v in value)
    except (TypeError, ValueError):
        raise SourceResponseError(f"{where}: {field} must be integers [x, y, z], got {value!r}") from None
    if positive and min(out) <= 0:
        raise SourceResponseError(f"{where}: {field} must be positive, got {value!r}")
    return out


# ---- sharding (neuroglancer_uint64_sharded_v1) ------------------------------------------------

def sharding_hash(value: int) -> int:
    """neuroglancer's `murmurhash3_x86_128` sharding hash: the low 64 bits of MurmurHash3_x86_128 (seed 0)
    of the preshifted chunk id as 8 little-endian bytes."""
    low64: int = mmh3.hash64((value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"), 0, x64arch=False, signed=False)[0]
    return low64


@dataclass(frozen=True)
class ShardingSpec:
    """How chunks are packed into shard files (see neuroglancer's precomputed `sharded.md`)."""

    preshift_bits: int
    hash: str
    minishard_bits: int
    shard_bits: int
    minishard_index_encoding: str = "raw"
    data_encoding: str = "raw"

    @classmethod
    def from_json(cls, doc: Any, where: str) -> ShardingSpec:
        if not isinstance(doc, Mapping) or doc.get("@type") != SHARDING_TYPE:
            raise UnsupportedDataError(f"{where}: unsupported sharding {doc!r} (expected @type {SHARDING_TYPE})")
        try:
            spec = cls(int(doc["preshift_bits"]), str(doc["hash"]), int(doc["minishard_bits"]),
                       int(doc["shard_bits"]), str(doc.get("minishard_index_encoding", "raw")),
                       str(doc.get("data_encoding", "raw")))
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceResponseError(f"{where}: malformed sharding spec ({exc!r})") from None
        if spec.hash not in ("identity", "murmurhash3_x86_128"):
            raise UnsupportedDataError(f"{where}: unsupported sharding hash {spec.hash!r}")
        for name in ("minishard_index_encoding", "data_encoding"):
            if getattr(spec, name) not in ("raw", "gzip"):
                raise UnsupportedDataError(f"{where}: unsupported sharding {name} {getattr(spec, name)!r}")
        if not (0 <= spec.preshift_bits <= 64 and 0 <= spec.minishard_bits <= 32 and 0 <= spec.shard_bits <= 64):
            raise SourceResponseError(f"{where}: sharding bit counts out of range: {doc!r}")
        return spec

    @property
    def shard_index_bytes(self) -> int:
        """Size of the index at the start of every shard file: [start, end) per minishard, uint64le."""
        return 16 << self.minishard_bits

    def locate(self, chunk_id: int) -> tuple[int, int]:
        """(shard number, minishard number) that hold `chunk_id`."""
        hashed = chunk_id >> self.preshift_bits
        if self.hash == "murmurhash3_x86_128":
            hashed = sharding_hash(hashed)
        minishard = hashed & ((1 << self.minishard_bits) - 1)
        shard = (hashed >> self.minishard_bits) & ((1 << self.shard_bits) - 1)
        return shard, minishard

    def shard_name(self, shard: int) -> str:
        digits = (self.shard_bits + 3) // 4
        return f"{shard:0{digits}x}.shard" if digits else "0.shard"

    def minishard_range(self, shard_index: bytes, minishard: int, where: str) -> tuple[int, int]:
        """Absolute byte range [start, end) of a minishard's index inside its shard file."""
        if len(shard_index) != self.shard_index_bytes:
            raise FormatError(f"{where}: shard index is {len(shard_index)} bytes, expected {self.shard_index_bytes}")
        start, end = struct.unpack_from("<QQ", shard_index, 16 * minishard)
        if end < start:
            raise FormatError(f"{where}: minishard {minishard} has a negative extent [{start}, {end})")
        return self.shard_index_bytes + start, self.shard_index_bytes + end

    def parse_minishard_index(self, data: bytes, where: str) -> dict[int, tuple[int, int]]:
        """chunk id -> absolute (start, size) in the shard file, from a minishard index as stored."""
        if self.minishard_index_encoding == "gzip":
            data = _gunzip(data, where)
        if len(data) % 24:
            raise FormatError(f"{where}: minishard index of {len(data)} bytes is not a multiple of 24")
        table = np.frombuffer(data, dtype="<u8").reshape(3, -1).astype(np.uint64)
        ids = np.cumsum(table[0], dtype=np.uint64)
        sizes = table[2]
        # Each start is the previous chunk's end plus a delta (offsets relative to the index's end).
        starts = np.empty_like(sizes)
        position = np.uint64(0)
        for i in range(len(sizes)):
            position = position + table[1][i]
            starts[i] = position
            position = position + sizes[i]
        base = self.shard_index_bytes
        return {int(c): (base + int(s), int(n)) for c, s, n in zip(ids, starts, sizes)}

    def decode_data(self, data: bytes, where: str) -> bytes:
        return _gunzip(data, where) if self.data_encoding == "gzip" else data


def _gunzip(data: bytes, where: str) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise FormatError(f"{where}: not valid gzip data ({exc})") from None


# ---- info and scales ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Scale:
    """One resolution level of a precomputed volume; every vector is (x, y, z) as in the info file."""

    key: str
    size: XYZ
    resolution_nm: tuple[float, float, float]
    voxel_offset: XYZ
    chunk_size: XYZ
    encoding: str
    sharding: ShardingSpec | None = None

    @property
    def voxel_stop(self) -> XYZ:
        """The absolute end (exclusive) of the scale's voxels."""
        (ox, oy, oz), (nx, ny, nz) = self.voxel_offset, self.size
        return (ox + nx, oy + ny, oz + nz)

    @property
    def grid_shape(self) -> XYZ:
        return triple(-(-n // c) for n, c in zip(self.size, self.chunk_size))

    def contains(self, start: XYZ, stop: XYZ) -> bool:
        return all(o <= a and b <= o + n for a, b, o, n in zip(start, stop, self.voxel_offset, self.size))

    def chunks_in_box(self, start: XYZ, stop: XYZ) -> list[XYZ]:
        """Grid positions of the chunks a box [start, stop) of absolute voxel coordinates touches."""
        ranges = [range((a - o) // c, -(-(b - o) // c)) for a, b, o, c in
                  zip(start, stop, self.voxel_offset, self.chunk_size)]
        return [(x, y, z) for z in ranges[2] for y in ranges[1] for x in ranges[0]]

    def chunk_box(self, grid: XYZ) -> tuple[XYZ, XYZ]:
        """Absolute [start, stop) of a chunk, clipped to the volume (edge chunks are smaller)."""
        start = triple(o + g * c for o, g, c in zip(self.voxel_offset, grid, self.chunk_size))
        stop = triple(min(s + c, o + n) for s, c, o, n in zip(start, self.chunk_size, self.voxel_offset, self.size))
        return start, stop

    def chunk_name(self, grid: XYZ) -> str:
        """Object name of an unsharded chunk: `<x0>-<x1>_<y0>-<y1>_<z0>-<z1>` in absolute voxels."""
        start, stop = self.chunk_box(grid)
        return "_".join(f"{a}-{b}" for a, b in zip(start, stop))

    def chunk_id(self, grid: XYZ) -> int:
        """Compressed Morton code of a grid position (the chunk id inside shards)."""
        bits = [max(0, (n - 1).bit_length()) for n in self.grid_shape]
        code, out_bit = 0, 0
        for i in range(max(bits)):
            for axis in range(3):
                if i < bits[axis]:
                    code |= ((grid[axis] >> i) & 1) << out_bit
                    out_bit += 1
        return code


@dataclass(frozen=True)
class PrecomputedInfo:
    """The `info` document of a precomputed volume."""

    type: str
    data_type: str
    num_channels: int
    scales: tuple[Scale, ...]

    @classmethod
    def from_json(cls, doc: Any, where: str) -> PrecomputedInfo:
        if not isinstance(doc, Mapping):
            raise SourceResponseError(f"{where}: expected a JSON object, got {type(doc).__name__}")
        missing = [k for k in ("data_type", "num_channels", "scales") if k not in doc]
        if missing:
            raise SourceResponseError(f"{where}: info lacks {', '.join(missing)}")
        data_type = str(doc["data_type"])
        if data_type not in DTYPES:
            raise UnsupportedDataError(f"{where}: unsupported data_type {data_type!r}")
        if not isinstance(doc["scales"], list) or not doc["scales"]:
            raise SourceResponseError(f"{where}: scales must be a non-empty list")
        scales = tuple(_scale(s, f"{where} scales[{i}]") for i, s in enumerate(doc["scales"]))
        return cls(str(doc.get("type", "image")), data_type, int(doc["num_channels"]), scales)

    def full_resolution(self) -> Scale:
        """The finest scale (by convention scales[0]; checked, not assumed)."""
        return min(self.scales, key=lambda s: s.resolution_nm[0] * s.resolution_nm[1] * s.resolution_nm[2])


def _scale(doc: Any, where: str) -> Scale:
    if not isinstance(doc, Mapping):
        raise SourceResponseError(f"{where}: expected a JSON object")
    for key in ("key", "size", "resolution", "chunk_sizes", "encoding"):
        if key not in doc:
            raise SourceResponseError(f"{where}: missing {key!r}")
    chunk_sizes = doc["chunk_sizes"]
    if not isinstance(chunk_sizes, list) or not chunk_sizes:
        raise SourceResponseError(f"{where}: chunk_sizes must be a non-empty list of [x, y, z]")
    encoding = str(doc["encoding"])
    if encoding not in ENCODINGS:
        raise UnsupportedDataError(f"{where}: unsupported chunk encoding {encoding!r} (supported: {ENCODINGS})")
    try:
        resolution = tuple(float(v) for v in doc["resolution"])
    except (TypeError, ValueError):
        raise SourceResponseError(f"{where}: resolution must be numbers, got {doc['resolution']!r}") from None
    if len(resolution) != 3 or min(resolution) <= 0:
        raise SourceResponseError(f"{where}: resolution must be three positive lengths, got {doc['resolution']!r}")
    sharding = doc.get("sharding")
    # Decoded whole per chunk (and at most 8 bytes a voxel): refuse an implausible chunk before any read.
    check_chunk(_xyz(chunk_sizes[0], "chunk_sizes[0]", where, positive=True), 8, where)
    return Scale(
        key=str(doc["key"]).strip("/"),
        size=_xyz(doc["size"], "size", where, positive=True),
        resolution_nm=resolution,
        voxel_offset=_xyz(doc.get("voxel_offset", [0, 0, 0]), "voxel_offset", where),
        # Several chunk sizes are alternatives for the same data; the first serves every read.
        chunk_size=_xyz(chunk_sizes[0], "chunk_sizes[0]", where, positive=True),
        encoding=encoding,
        sharding=ShardingSpec.from_json(sharding, f"{where} sharding") if sharding else None,
    )


# ---- chunk decoding ------------------------------------------------------------------------------

def decode_chunk(data: bytes, scale: Scale, grid: XYZ, dtype: str, num_channels: int, where: str) -> np.ndarray:
    """One chunk's voxels as a (z, y, x) array of the chunk's clipped shape (first channel only)."""
    start, stop = scale.chunk_box(grid)
    nx, ny, nz = (b - a for a, b in zip(start, stop))
    if scale.encoding == "raw":
        expected = nx * ny * nz * num_channels * np.dtype(dtype).itemsize
        if len(data) != expected:
            raise FormatError(f"{where}: raw chunk has {len(data)} bytes, expected {expected} "
                              f"({nx}x{ny}x{nz}x{num_channels} {dtype})")
        # Fortran-order [x, y, z, channel] is C-order [channel, z, y, x].
        channels = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(num_channels, nz, ny, nx)
        first: np.ndarray = channels[0]  # numpy types an integer index as Any (it may be a scalar)
        return first
    try:
        image = imagecodecs.jpeg_decode(data) if scale.encoding == "jpeg" else imagecodecs.png_decode(data)
    except (RuntimeError, ValueError) as exc:  # imagecodecs' codec errors derive from these
        raise FormatError(f"{where}: cannot decode {scale.encoding} chunk ({type(exc).__name__}: {exc})") from None
    if image.ndim == 3:
        image = image[..., 0]
    # The format lets the image have any width and height with the chunk's pixel count: its rows, concatenated,
    # are the chunk flattened in [x, y, z] Fortran order, i.e. [z, y, x] C order. Writers mostly use x wide and
    # y * z tall (neuroglancer, cloud-volume) or x * y wide and z tall; DVID's blocks are 64 wide, 4096 tall.
    if image.ndim != 2 or image.size != nx * ny * nz:
        size = f"{image.shape[1]}x{image.shape[0]}" if image.ndim == 2 else f"of shape {image.shape}"
        raise FormatError(f"{where}: {scale.encoding} chunk image is {size} pixels ({image.size}), but a "
                          f"{nx}x{ny}x{nz} (x, y, z) chunk needs an image of {nx * ny * nz} pixels")
    return image.reshape(nz, ny, nx).astype(dtype, copy=False)


ChunkLoader = Callable[[XYZ], "bytes | None"]


class PrecomputedCrop(Volume):
    """A box of a precomputed scale, read chunk by chunk through `load_chunk` (None = absent, zeros).

    `start` is the box's absolute voxel position (x, y, z); the volume is (z, y, x). Decoded chunks
    are kept in a small LRU so neighbouring bricks of the writer do not decode a chunk twice; its
    capacity is in bytes, so memory stays bounded by chunk size, not by the crop.
    """

    def __init__(self, info: PrecomputedInfo, scale: Scale, start: XYZ, shape_zyx: tuple[int, int, int],
                 load_chunk: ChunkLoader, geometry: Geometry | None, *, name: str = "precomputed",
                 cache_bytes: int = 64 << 20):
        if info.num_channels != 1:
            raise UnsupportedDataError(f"{name}: {info.num_channels} channels; only single-channel images are ingested")
        stop = triple(a + n for a, n in zip(start, reversed(shape_zyx)))
        if not scale.contains(start, stop):
            raise FormatError(f"{name}: box {start}..{stop} (x, y, z) lies outside scale {scale.key} "
                              f"({scale.voxel_offset}..{scale.voxel_stop})")
        self.info, self.scale, self.start = info, scale, start
        self.shape = triple(int(n) for n in shape_zyx)
        self.dtype = np.dtype(info.data_type)
        self.geometry = geometry
        self.name = name
        self._load_chunk = load_chunk
        chunk_bytes = int(np.prod(scale.chunk_size)) * self.dtype.itemsize
        self._cache_capacity = max(4, cache_bytes // chunk_bytes)
        self._cache: OrderedDict[XYZ, np.ndarray | None] = OrderedDict()
        self._lock = threading.Lock()

    def _chunk(self, grid: XYZ) -> np.ndarray | None:
        with self._lock:
            if grid in self._cache:
                self._cache.move_to_end(grid)
                return self._cache[grid]
        data = self._load_chunk(grid)
        where = f"{self.name} chunk {self.scale.key}/{self.scale.chunk_name(grid)}"
        block = None if data is None else decode_chunk(data, self.scale, grid, self.info.data_type,
                                                        self.info.num_channels, where)
        with self._lock:
            self._cache[grid] = block
            while len(self._cache) > self._cache_capacity:
                self._cache.popitem(last=False)
        return block

    def read(self, region: Region) -> np.ndarray:
        out = np.zeros(tuple(s.stop - s.start for s in region), dtype=self.dtype)
        # Absolute (x, y, z) box of the region; the arrays are placed by their (z, y, x) origins.
        lo = tuple(self.start[a] + region[2 - a].start for a in range(3))
        hi = tuple(self.start[a] + region[2 - a].stop for a in range(3))
        for grid in self.scale.chunks_in_box(lo, hi):
            block = self._chunk(grid)
            if block is None:
                continue  # an absent chunk reads as the fill value, zero
            chunk_start, _ = self.scale.chunk_box(grid)
            copy_overlap(out, lo[::-1], block, chunk_start[::-1])
        return out


def iter_shard_groups(scale: Scale, grids: list[XYZ]) -> Iterator[tuple[int, dict[int, list[tuple[XYZ, int]]]]]:
    """Chunks grouped by shard, then minishard: (shard, {minishard: [(grid, chunk id), ...]})."""
    assert scale.sharding is not None
    shards: dict[int, dict[int, list[tuple[XYZ, int]]]] = {}
    for grid in grids:
        chunk_id = scale.chunk_id(grid)
        shard, minishard = scale.sharding.locate(chunk_id)
        shards.setdefault(shard, {}).setdefault(minishard, []).append((grid, chunk_id))
    yield from sorted(shards.items())
