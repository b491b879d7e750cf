"""The lazy volume every reader returns: shape and dtype up front, voxels read by region."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from em_ingest.errors import ValidationError

Region = tuple[slice, slice, slice]
VOXEL_SIZE_ORIGINS = ("source-metadata", "override", "documented-default")
# Plausible voxel lengths: a picometre (below any EM pixel) to a metre. Anything outside is a typo or
# a unit mix-up, and inf / NaN would be written into zarr.json as non-JSON.
VOXEL_SIZE_RANGE_NM = (1e-3, 1e9)
T = TypeVar("T")


def triple(values: Iterable[T]) -> tuple[T, T, T]:
    """Three values (a per-axis vector such as a shape, a voxel size or a region) as a 3-tuple; ValueError
    if there are not exactly three."""
    first, second, third = values
    return (first, second, third)


@dataclass(frozen=True)
class Geometry:
    """Where voxels sit in space, axis order (z, y, x), lengths in nanometres."""

    voxel_size_nm: tuple[float, float, float]
    voxel_size_origin: str
    translation_nm: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.voxel_size_origin not in VOXEL_SIZE_ORIGINS:
            raise ValueError(f"voxel_size_origin must be one of {VOXEL_SIZE_ORIGINS}")
        low, high = VOXEL_SIZE_RANGE_NM
        if len(self.voxel_size_nm) != 3 or any(isinstance(v, bool) or not low <= v <= high for v in self.voxel_size_nm):
            raise ValidationError(f"voxel size must be three lengths between {low:g} and {high:g} nm, "
                                  f"got {self.voxel_size_nm}")
        if self.translation_nm is not None and (
                len(self.translation_nm) != 3 or not all(math.isfinite(t) for t in self.translation_nm)):
            raise ValidationError(f"translation must be three finite lengths in nm, got {self.translation_nm}")


class Sliceable(Protocol):
    """Anything a volume reads voxels from by numpy slicing: an ndarray, a memmap, a zarr or N5 array."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> Any: ...  # a numpy dtype, or what a reader converts with np.dtype()

    def __getitem__(self, key: Any) -> Any: ...


class Volume(ABC):
    """A 3-D array (z, y, x) whose voxels are read only when asked, region by region.

    `geometry` may be None when the data itself does not say where voxels sit; the pipeline then
    uses the curator override or fails asking for one.
    """

    shape: tuple[int, int, int]
    dtype: np.dtype
    geometry: Geometry | None
    # Human-readable name of what is read, used in error messages.
    name: str = "volume"

    @abstractmethod
    def read(self, region: Region) -> np.ndarray:
        """Voxels of `region` (three slices with step 1, within bounds) as a C-ordered array."""

    def read_into(self, region: Region, out: np.ndarray) -> np.ndarray:
        """Voxels of `region`, in `out` (C-ordered, native byte order, the region's shape) when the reader
        can fill it directly, so a streaming consumer can reuse its buffers; otherwise a new array, as
        `read` returns it. The returned array holds the voxels either way."""
        return self.read(region)

    def close(self) -> None:  # noqa: B027 - optional for readers without open handles
        """Release open files or connections."""

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ArrayVolume(Volume):
    """A volume over anything numpy-sliceable (an in-memory array, a zarr array, a memmap)."""

    def __init__(self, array: Sliceable, geometry: Geometry | None = None, *, name: str = "array"):
        shape = array.shape
        if len(shape) != 3:
            raise ValueError(f"{name}: expected a 3-D array, got shape {array.shape}")
        self._array = array
        self.shape = (int(shape[0]), int(shape[1]), int(shape[2]))
        self.dtype = np.dtype(array.dtype)
        self.geometry = geometry
        self.name = name

    def read(self, region: Region) -> np.ndarray:
        return np.ascontiguousarray(self._array[region])
