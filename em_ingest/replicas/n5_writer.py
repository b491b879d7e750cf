"""Writes N5 dataset attributes and default-mode blocks byte for byte as the N5 specification lays them out.

Written here, independently of the reader (tensorstore), so a misreading of the format is not shared by the
replica that writes N5 and the code that reads it.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from typing import Any

import numpy as np

_MODE_DEFAULT = 0


def array_attributes(shape_zyx: tuple[int, ...], block_zyx: tuple[int, ...], dtype: str,
                     compression: dict[str, Any]) -> dict[str, Any]:
    """The standard N5 dataset attributes (x, y, z order) for an array of this shape."""
    return {"dimensions": list(shape_zyx[::-1]), "blockSize": list(block_zyx[::-1]), "dataType": dtype,
            "compression": compression}


def _compress(data: bytes, compression: dict[str, Any]) -> bytes:
    kind = compression.get("type", "raw")
    if kind == "raw":
        return data
    if kind == "gzip":
        level = compression.get("level", -1)
        level = 6 if level is None or level < 0 else level
        # N5's gzip codec writes a gzip stream, or a bare zlib stream when "useZlib" is set.
        return zlib.compress(data, level) if compression.get("useZlib") else gzip.compress(data, level, mtime=0)
    if kind == "bzip2":
        return bz2.compress(data)
    if kind == "xz":
        return lzma.compress(data)
    raise ValueError(f"writing N5 compression {kind!r} is not supported")


def encode_block(block_zyx: np.ndarray, compression: dict[str, Any]) -> bytes:
    """The N5 block file for a (z, y, x) array: big-endian header (mode, rank, size x, y, z), then the
    big-endian voxels x fastest, compressed. An edge block holds only the voxels inside the dataset."""
    dtype = np.dtype(block_zyx.dtype).newbyteorder(">")
    header = struct.pack(">HH3I", _MODE_DEFAULT, 3, *block_zyx.shape[::-1])
    return header + _compress(np.ascontiguousarray(block_zyx, dtype=dtype).tobytes(), compression)
