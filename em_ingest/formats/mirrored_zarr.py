"""A Zarr v2 array mirrored object for object into a local folder, read lazily by zarr-python as a (z, y, x)
volume; chunks the source never wrote read as the fill value, chunks lost locally are an error."""

from __future__ import annotations

from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from em_ingest.errors import FormatError, UnsupportedDataError
from em_ingest.formats.volume import Geometry, Region, Volume, triple

if TYPE_CHECKING:
    import zarr

SPATIAL = ("z", "y", "x")


def open_mirrored_array(root: Path, level: str, *, where: str) -> zarr.Array[Any]:
    """The mirrored Zarr v2 array `level` of the image group at `root`, opened read-only by zarr-python.

    Opening reads only `.zarray`, so this also checks a fresh `.zarray` before any chunk is fetched.
    """
    import numcodecs.errors
    import zarr
    import zarr.errors
    import zarr.storage

    try:
        array = zarr.open_array(zarr.storage.LocalStore(root, read_only=True), path=level, mode="r", zarr_format=2)
    except (zarr.errors.UnknownCodecError, numcodecs.errors.UnknownCodecError) as exc:  # v3 and v2 codecs
        raise UnsupportedDataError(f"{where}: unsupported Zarr codec ({exc})") from None
    except zarr.errors.NodeNotFoundError:
        raise FormatError(f"{where}: no Zarr v2 array there (expected {level}/.zarray)") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise FormatError(f"{where}: not a Zarr v2 array description ({type(exc).__name__}: {exc})") from None
    if not isinstance(array.dtype, np.dtype) or array.dtype.kind not in "biuf":
        raise UnsupportedDataError(f"{where}: dtype {array.dtype} is not a numeric voxel type")
    return array


def chunk_keys(array: zarr.Array[Any]) -> list[str]:
    """The object name of every chunk of the array's grid, relative to the array, in C order of the grid."""
    return [array.metadata.encode_chunk_key(index) for index in product(*map(range, array.cdata_shape))]


class MirroredZarrVolume(Volume):
    """A mirrored OME-Zarr level read lazily by zarr-python; (t, c, z, y, x) with t = c = 1 seen as (z, y, x).

    Chunks absent at the source (404) read as the fill value, as Zarr specifies; a chunk neither
    mirrored nor recorded as absent means the raw download is incomplete, which is an error rather
    than silently the fill value.
    """

    def __init__(self, array: zarr.Array[Any], array_dir: Path, axes: list[str], absent: frozenset[str],
                 geometry: Geometry | None, *, name: str):
        if len(axes) != array.ndim:
            raise FormatError(f"{name}: axes {axes} do not match an array of shape {array.shape}")
        self._array = array
        self._array_dir = array_dir
        self._axes = axes
        self._absent = absent
        self._spatial = {axis: axes.index(axis) for axis in SPATIAL if axis in axes}
        self.shape = triple(array.shape[self._spatial[a]] if a in self._spatial else 1 for a in SPATIAL)
        self.dtype = array.dtype.newbyteorder("=")  # bioformats2raw writes big-endian; the writer wants native
        self.geometry = geometry
        self.name = name
        # zarr returns the spatial axes in array order; NGFF puts them z, y, x, but do not rely on it.
        in_array_order = [a for a in axes if a in self._spatial]
        self._to_zyx = [in_array_order.index(a) for a in SPATIAL if a in self._spatial]

    def read(self, region: Region) -> np.ndarray:
        self._check_mirrored(region)
        selection = tuple(region[SPATIAL.index(a)] if a in self._spatial else 0 for a in self._axes)
        try:
            block = np.asarray(self._array[selection])
        except (RuntimeError, ValueError, TypeError) as exc:  # what numcodecs raises for bytes that do not decode
            raise FormatError(f"{self.name}: a chunk of region {_show(region)} does not decode "
                              f"({type(exc).__name__}: {exc})") from None
        if not block.dtype.isnative:  # the block is ours: swap in place rather than copy a slab
            block = block.byteswap(inplace=True).view(self.dtype)
        block = block.transpose(self._to_zyx)
        if "z" not in self._spatial:
            block = block[np.newaxis]
        return np.ascontiguousarray(block)

    def _check_mirrored(self, region: Region) -> None:
        """Refuse a region touching a chunk that is neither in the mirror nor recorded as absent at the source."""
        ranges = []
        for axis, chunk in zip(self._axes, self._array.chunks):
            if axis in self._spatial:
                span = region[SPATIAL.index(axis)]
                ranges.append(range(span.start // chunk, (span.stop - 1) // chunk + 1))
            else:
                ranges.append(range(1))
        for index in product(*ranges):
            key = self._array.metadata.encode_chunk_key(index)
            if key not in self._absent and not (self._array_dir / key).is_file():
                raise FormatError(f"{self._array_dir / key}: chunk {key} is missing from the raw download (and was "
                                  "not absent at the source); re-run the raw download")


def _show(region: Region) -> str:
    return "(z, y, x) " + ", ".join(f"{s.start}:{s.stop}" for s in region)
