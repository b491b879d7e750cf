"""N5 arrays (the older OpenOrganelle layout) read through tensorstore's n5 driver as lazy (z, y, x) arrays."""

from __future__ import annotations

import math
import re
import struct
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from em_ingest.errors import FormatError, UnsupportedDataError
from em_ingest.limits import check_chunk

# N5 data types; the payload is always big-endian.
N5_DTYPES = {name: np.dtype(name).newbyteorder(">") for name in (
    "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float32", "float64")}
# tensorstore appends the whole JSON spec it was opened with to every error; the message before it is what helps.
_SPEC_SUFFIX = re.compile(r"\s*\[tensorstore_spec=.*\]\s*$", re.DOTALL)


def _reason(exc: BaseException) -> str:
    return _SPEC_SUFFIX.sub("", str(exc))


class N5Array:
    """A local N5 dataset directory as a lazy (z, y, x) array: `array[z0:z1, y0:y1, x0:x1]` reads
    only the blocks the region touches; a missing block reads as zeros, as N5 defines it.

    tensorstore decodes the blocks. It checks each block's header against the dataset's blockSize
    and stops a block's decompression at the size the header announces (a compression bomb is an
    error, not a large allocation); its errors name the block's file. The one exception is blosc,
    which it decodes whole to the size the blosc header states: that size is checked here first.
    No cache is kept, so memory is the region read plus the blocks being decoded.
    """

    def __init__(self, path: Path):
        import tensorstore as ts  # ~0.2 s cold: imported by what reads N5, not when this module loads

        self.path = Path(path)
        where = str(self.path / "attributes.json")
        spec = {"driver": "n5", "kvstore": {"driver": "file", "path": f"{self.path}/"},
                "context": {"cache_pool": {"total_bytes_limit": 0}}}
        try:
            store = ts.open(spec, read=True, open=True).result()
        except ValueError as exc:  # tensorstore reports bad or missing metadata as ValueError
            raise FormatError(f"{where}: not a readable N5 dataset ({_reason(exc)})") from None
        if store.rank != 3:
            raise UnsupportedDataError(f"{where}: expected a 3-D dataset, got dimensions {list(store.shape)}")
        stored = np.dtype(store.dtype.numpy_dtype)
        if stored.name not in N5_DTYPES:
            raise UnsupportedDataError(f"{where}: N5 dataType {stored.name!r} is not supported")
        # The dataset's attributes as tensorstore parsed them (x, y, z order).
        metadata: dict[str, Any] = store.spec().to_json().get("metadata", {})
        block_xyz = tuple(int(n) for n in metadata.get("blockSize", ()))
        check_chunk(block_xyz, stored.itemsize, where, "N5 block")
        # N5 lists dimensions x fastest; reversing the axes gives (z, y, x) without copying anything.
        self._store: Any = store.T
        self.shape = tuple(int(n) for n in self._store.shape)
        self.chunks = block_xyz[::-1]
        self.dtype = stored.newbyteorder("=")
        self.ndim = 3
        self._blosc = metadata.get("compression", {}).get("type") == "blosc"
        self._block_bytes = math.prod(block_xyz) * stored.itemsize

    def block_path(self, index_zyx: tuple[int, ...]) -> Path:
        """Blocks live at <x>/<y>/<z> below the dataset."""
        iz, iy, ix = index_zyx
        return self.path / str(ix) / str(iy) / str(iz)

    def _check_blosc_sizes(self, starts: list[int], stops: list[int]) -> None:
        """Refuse a blosc block whose header states more bytes than a whole block, before anything inflates it."""
        ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(starts, stops, self.chunks)]
        for index in product(*ranges):
            path = self.block_path(index)
            try:
                with path.open("rb") as file:
                    head = file.read(36)
            except FileNotFoundError:
                continue  # absent: the fill value
            if len(head) < 4:
                continue  # tensorstore refuses the block, naming it
            mode, ndim = struct.unpack_from(">HH", head)
            at = 4 + 4 * ndim + (4 if mode == 1 else 0) + 4  # N5 header, then blosc's nbytes (uint32le) at +4
            if len(head) >= at + 4 and (stated := struct.unpack_from("<I", head, at)[0]) > self._block_bytes:
                raise FormatError(f"{path}: the blosc block states {stated} decompressed bytes, more than the "
                                  f"{self._block_bytes} of a whole block (corrupt or hostile)")

    def __getitem__(self, region: tuple[slice, slice, slice]) -> np.ndarray:
        bounds = [s.indices(n) for s, n in zip(region, self.shape)]
        if len(bounds) != 3 or any(step != 1 for _, _, step in bounds):
            raise ValueError(f"{self.path}: only 3-D regions with step 1 can be read, got {region}")
        starts = [max(0, a) for a, _, _ in bounds]
        stops = [max(a, b) for (a, b, _), a in zip(bounds, starts)]
        if any(b == a for a, b in zip(starts, stops)):
            return np.zeros([b - a for a, b in zip(starts, stops)], dtype=self.dtype)
        if self._blosc:
            self._check_blosc_sizes(starts, stops)
        box = tuple(slice(a, b) for a, b in zip(starts, stops))
        try:
            out: np.ndarray = self._store[box].read().result()
        except ValueError as exc:  # a damaged block: tensorstore's message names its file
            shown = ", ".join(f"{a}:{b}" for a, b in zip(starts, stops))
            raise FormatError(f"{self.path}: N5 region (z, y, x) {shown} cannot be read ({_reason(exc)})") from None
        return out
