"""Bounds on the work that untrusted metadata can ask for: a volume's size, its expansion over the
bytes the source holds, and the size of one chunk, tile or block.

Every shape and chunk size em-ingest acts on comes from a document it downloaded; a broken or hostile
one can declare 10^18 voxels in a few bytes. These checks turn that into an error naming the input
and the limit, before any memory or time is spent on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from em_ingest.errors import UnsupportedDataError

# One chunk, tile, strip or block is decoded whole in memory; real EM chunks are 64^3 to 512^3
# voxels (<= 1 GiB even at 8 bytes a voxel), so anything above is refused as implausible.
MAX_CHUNK_BYTES = 1 << 30


@dataclass(frozen=True)
class Limits:
    """What one dataset may ask for; both are fields of the `em_ingest` resource."""

    # Uncompressed bytes of the volume to convert (64 TiB: the whole hemibrain at 8 nm is ~56 TB).
    max_volume_bytes: int = 64 << 40
    # Uncompressed bytes of the volume per byte of the raw download. EM compresses 2-10x; a volume
    # that claims to be hundreds of times its download is a mistake or an attack (raise for sparse data).
    max_expansion: float = 256.0

    def __post_init__(self) -> None:
        if self.max_volume_bytes < 1 or not self.max_expansion >= 1:
            raise ValueError(f"limits must be positive (max_expansion >= 1), got {self}")


def nbytes(shape: Sequence[int], itemsize: int) -> int:
    """Bytes of an array of `shape`, as a Python int (never overflows)."""
    return math.prod(int(n) for n in shape) * int(itemsize)


def check_chunk(shape: Sequence[int], itemsize: int, where: str, what: str = "chunk") -> None:
    """Refuse a chunk (tile, strip, block) that is empty-sided or larger than MAX_CHUNK_BYTES."""
    if any(int(n) < 1 for n in shape):
        raise UnsupportedDataError(f"{where}: {what} shape {list(shape)} has a side below 1")
    size = nbytes(shape, itemsize)
    if size > MAX_CHUNK_BYTES:
        raise UnsupportedDataError(f"{where}: one {what} of {list(shape)} voxels is {size} bytes, above the "
                                   f"{MAX_CHUNK_BYTES} bytes em-ingest decodes at once (corrupt metadata?)")


def check_volume(shape: Sequence[int], itemsize: int, limits: Limits, where: str,
                 raw_bytes: int | None = None) -> None:
    """Refuse a volume above `max_volume_bytes`, or (given the bytes the source holds for it) one that
    would expand more than `max_expansion` times."""
    size = nbytes(shape, itemsize)
    if size > limits.max_volume_bytes:
        raise UnsupportedDataError(
            f"{where}: the volume declares {list(shape)} voxels ({size} bytes uncompressed), above "
            f"max_volume_bytes={limits.max_volume_bytes} (a field of the em_ingest resource); select a roi or "
            "raise the limit if the volume is really that large")
    if raw_bytes is not None and size > limits.max_expansion * max(raw_bytes, 1):
        raise UnsupportedDataError(
            f"{where}: the volume declares {list(shape)} voxels ({size} bytes uncompressed) but its raw download "
            f"holds only {raw_bytes} bytes, more than max_expansion={limits.max_expansion:g} times as much "
            "(a field of the em_ingest resource); the metadata is likely corrupt, or raise the limit for "
            "very sparse data")
