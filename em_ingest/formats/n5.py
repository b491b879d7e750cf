"""N5 arrays (the older OpenOrganelle layout) as lazy numpy-sliceable arrays, plus the block codec."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import math
import struct
import zlib
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from em_ingest.errors import FormatError, UnsupportedDataError
from em_ingest.formats.box import copy_overlap
from em_ingest.limits import check_chunk

# N5 data types; the payload is always big-endian.
N5_DTYPES = {name: np.dtype(name).newbyteorder(">") for name in (
    "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float32", "float64")}
_MODE_DEFAULT, _MODE_VARLENGTH = 0, 1


def _decompress(payload: bytes, compression: dict[str, Any], where: str, limit: int) -> bytes:
    """The decompressed payload, never more than `limit` bytes of it (a compression bomb stops there)."""
    kind = compression.get("type", "raw")
    try:
        if kind == "raw":
            return payload[:limit]
        if kind == "gzip":
            # N5's gzip codec writes a gzip stream, or a bare zlib stream when "useZlib" is set.
            stream = zlib.decompressobj(zlib.MAX_WBITS if compression.get("useZlib") else 16 + zlib.MAX_WBITS)
            return stream.decompress(payload, limit)
        if kind == "bzip2":
            return bz2.BZ2Decompressor().decompress(payload, limit)
        if kind == "xz":
            return lzma.LZMADecompressor().decompress(payload, limit)
        if kind in ("blosc", "zstd"):
            import numcodecs

            codec = numcodecs.Blosc() if kind == "blosc" else numcodecs.Zstd()
            declared = _declared_size(kind, payload)
            if declared is not None and declared > limit:
                raise FormatError(f"{where}: the {kind} block would decompress to {declared} bytes, "
                                  f"more than the {limit} its header allows")
            # Decoding into a buffer of the declared (or largest allowed) size never grows past it.
            out = bytes(codec.decode(payload, out=bytearray(declared if declared is not None else limit)))
            return out
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError, RuntimeError) as exc:
        raise FormatError(f"{where}: cannot decompress the {kind} block ({exc})") from None
    raise UnsupportedDataError(f"{where}: N5 compression {kind!r} is not supported "
                               "(supported: raw, gzip, bzip2, xz, blosc, zstd)")


def _declared_size(kind: str, payload: bytes) -> int | None:
    """The decompressed size a blosc or zstd frame states in its header, if it states one."""
    if kind == "blosc":
        return struct.unpack("<I", payload[4:8])[0] if len(payload) >= 16 else None
    # Zstandard frame header (RFC 8878, 3.1.1.1): magic, descriptor, [window], [dictionary id], [content size].
    if len(payload) < 5 or payload[:4] != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = payload[4]
    size_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    field = (1 if single_segment else 0) if size_flag == 0 else (1, 2, 4, 8)[size_flag]
    if field == 0:
        return None  # streamed frame: size unknown, bounded by the output buffer instead
    start = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    if len(payload) < start + field:
        return None
    value = int.from_bytes(payload[start:start + field], "little")
    return value + 256 if field == 2 else value


def _compress(data: bytes, compression: dict[str, Any]) -> bytes:
    kind = compression.get("type", "raw")
    if kind == "raw":
        return data
    if kind == "gzip":
        level = compression.get("level", -1)
        level = 6 if level is None or level < 0 else level
        return zlib.compress(data, level) if compression.get("useZlib") else gzip.compress(data, level, mtime=0)
    if kind == "bzip2":
        return bz2.compress(data)
    if kind == "xz":
        return lzma.compress(data)
    raise UnsupportedDataError(f"writing N5 compression {kind!r} is not supported")


def decode_block(data: bytes, dtype: np.dtype, compression: dict[str, Any], where: str,
                 block_zyx: tuple[int, ...] | None = None) -> np.ndarray:
    """One N5 block file as a (z, y, x) array; the header states the block's own (possibly cut) size,
    which may not exceed the dataset's `block_zyx` (nor MAX_CHUNK_BYTES)."""
    if len(data) < 4:
        raise FormatError(f"{where}: N5 block of {len(data)} bytes has no header")
    mode, ndim = struct.unpack(">HH", data[:4])
    if mode not in (_MODE_DEFAULT, _MODE_VARLENGTH) or ndim != 3:
        raise UnsupportedDataError(f"{where}: N5 block mode {mode} with {ndim} dimensions (expected a 3-D array block)")
    header = 4 + 4 * ndim + (4 if mode == _MODE_VARLENGTH else 0)
    if len(data) < header:
        raise FormatError(f"{where}: N5 block header cut short")
    size_xyz = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    if block_zyx is not None and any(n > b for n, b in zip(size_xyz[::-1], block_zyx)):
        raise FormatError(f"{where}: N5 block header announces {list(size_xyz)} (x, y, z) voxels, more than "
                          f"the dataset's blockSize {list(block_zyx[::-1])}")
    check_chunk(size_xyz, dtype.itemsize, where, "N5 block")
    count = math.prod(size_xyz)
    # One byte more than needed tells "complete" from "the payload goes on" without inflating the rest.
    raw = _decompress(data[header:], compression, where, count * dtype.itemsize + 1)
    if len(raw) < count * dtype.itemsize:
        raise FormatError(f"{where}: N5 block holds {len(raw)} bytes, its header announces {count} "
                          f"{dtype.name} values ({count * dtype.itemsize} bytes)")
    # N5 stores x fastest: read as C order with the axes reversed, i.e. (z, y, x).
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(size_xyz[::-1])


def encode_block(block_zyx: np.ndarray, compression: dict[str, Any]) -> bytes:
    """The N5 block file for a (z, y, x) array (used by replicas and tests)."""
    dtype = N5_DTYPES[np.dtype(block_zyx.dtype).name]
    header = struct.pack(">HH3I", _MODE_DEFAULT, 3, *block_zyx.shape[::-1])
    return header + _compress(np.ascontiguousarray(block_zyx, dtype=dtype).tobytes(), compression)


def array_attributes(shape_zyx: tuple[int, ...], block_zyx: tuple[int, ...], dtype: str,
                     compression: dict[str, Any]) -> dict[str, Any]:
    """The standard N5 dataset attributes (x, y, z order) for an array of this shape."""
    return {"dimensions": list(shape_zyx[::-1]), "blockSize": list(block_zyx[::-1]), "dataType": dtype,
            "compression": compression}


class N5Array:
    """A local N5 dataset directory as a lazy (z, y, x) array: `array[z0:z1, y0:y1, x0:x1]` reads
    only the blocks the region touches; a missing block reads as zeros, as N5 defines it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        attributes_path = self.path / "attributes.json"
        try:
            self.attributes = json.loads(attributes_path.read_text())
            dims_xyz = [int(n) for n in self.attributes["dimensions"]]
            block_xyz = [int(n) for n in self.attributes["blockSize"]]
            data_type = self.attributes["dataType"]
        except FileNotFoundError:
            raise FormatError(f"{attributes_path}: missing; not an N5 dataset") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"{attributes_path}: not valid N5 dataset attributes ({exc!r})") from None
        if len(dims_xyz) != 3 or len(block_xyz) != 3:
            raise UnsupportedDataError(f"{attributes_path}: expected a 3-D dataset, got dimensions {dims_xyz}")
        if data_type not in N5_DTYPES:
            raise UnsupportedDataError(f"{attributes_path}: N5 dataType {data_type!r} is not supported")
        self.shape = tuple(dims_xyz[::-1])
        self.chunks = tuple(block_xyz[::-1])
        self._stored_dtype = N5_DTYPES[data_type]
        self.dtype = self._stored_dtype.newbyteorder("=")
        self.compression = self.attributes.get("compression") or {"type": "raw"}
        self.ndim = 3

    def block_path(self, index_zyx: tuple[int, int, int]) -> Path:
        """Blocks live at <x>/<y>/<z> below the dataset."""
        iz, iy, ix = index_zyx
        return self.path / str(ix) / str(iy) / str(iz)

    def read_block(self, index_zyx: tuple[int, int, int]) -> np.ndarray | None:
        path = self.block_path(index_zyx)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return decode_block(data, self._stored_dtype, self.compression, str(path), self.chunks)

    def __getitem__(self, region: tuple[slice, slice, slice]) -> np.ndarray:
        bounds = [s.indices(n) for s, n in zip(region, self.shape)]
        if len(bounds) != 3 or any(step != 1 for _, _, step in bounds):
            raise ValueError(f"{self.path}: only 3-D regions with step 1 can be read, got {region}")
        starts = [max(0, a) for a, _, _ in bounds]
        stops = [max(a, b) for (a, b, _), a in zip(bounds, starts)]
        out = np.zeros([b - a for a, b in zip(starts, stops)], dtype=self.dtype)
        if out.size == 0:
            return out
        index_ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(starts, stops, self.chunks)]
        for iz, iy, ix in product(*index_ranges):
            block = self.read_block((iz, iy, ix))
            if block is not None:
                # A block at the array's far edge may be cut: its own shape says how much it holds.
                copy_overlap(out, starts, block, [i * c for i, c in zip((iz, iy, ix), self.chunks)])
        return out
