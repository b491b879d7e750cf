"""CellMap/COSEM multiscale metadata: OME-NGFF 0.4 on Zarr v2 and COSEM attributes on N5, as levels and chunk grids.

Pure parsing of the attribute documents (no I/O), so the same code plans which chunk objects to
fetch and later opens the mirrored copy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np

from em_ingest.errors import SelectionError, SourceResponseError, UnsupportedDataError
from em_ingest.formats import ome_ngff, units
from em_ingest.formats.n5 import N5_DTYPES
from em_ingest.formats.volume import triple
from em_ingest.limits import check_chunk

Vec3 = tuple[float, float, float]
Index3 = tuple[int, int, int]
LAYOUTS = ("zarr", "n5")
# The metadata objects of each layout; everything else below an array is a chunk.
METADATA_NAMES = {"zarr": (".zgroup", ".zattrs", ".zarray"), "n5": ("attributes.json",)}
ZYX = ("z", "y", "x")


def to_nm(value: float, unit: Any, where: str) -> float:
    """`value` in `unit` as nanometres, without float noise (µm 0.0079983 is 7.9983 nm); a missing unit means nm."""
    # COSEM and OME-NGFF files from CellMap always say nm; absent means the default.
    return units.to_nm(value, "nm" if unit is None else str(unit), where=where)


@dataclass(frozen=True)
class LevelGeometry:
    """Where one level's voxels sit: index × scale + translation, (z, y, x) in nanometres."""

    scale_nm: Vec3
    translation_nm: Vec3 | None


@dataclass(frozen=True)
class ChunkGrid:
    """How one array is cut into chunk objects, and the object names (relative to the array)."""

    layout: str
    shape: Index3  # (z, y, x)
    chunks: Index3  # (z, y, x)
    dtype: np.dtype
    separator: str = "."  # Zarr v2 dimension_separator; N5 always uses "/"

    def key(self, index: Index3) -> str:
        """The object name of the chunk at `index` (z, y, x)."""
        if self.layout == "n5":
            return "/".join(str(i) for i in index[::-1])  # N5 names blocks x/y/z
        return self.separator.join(str(i) for i in index)

    def parse_key(self, name: str) -> Index3 | None:
        """The (z, y, x) index of a chunk object name, or None if `name` is not a chunk of this grid."""
        parts = name.split("/" if self.layout == "n5" else self.separator)
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            return None
        index = triple(int(p) for p in parts)
        return index[::-1] if self.layout == "n5" else index

    def index_ranges(self, region: tuple[tuple[int, int], ...]) -> list[range]:
        """Chunk index ranges per axis that a (start, stop) voxel region touches."""
        return [range(a // c, (b - 1) // c + 1) if b > a else range(0) for (a, b), c in zip(region, self.chunks)]

    def chunk_indices(self, region: tuple[tuple[int, int], ...]) -> list[Index3]:
        return [triple(index) for index in product(*self.index_ranges(region))]

    def prefix_for_first_index(self, index_zyx_first: int) -> str:
        """Listing prefix that holds every chunk sharing the first stored component of the name.

        Zarr names start with z (`3.` or `3/`); N5 names start with x (`3/`)."""
        return f"{index_zyx_first}{'/' if self.layout == 'n5' else self.separator}"

    @property
    def first_axis(self) -> int:
        """The (z, y, x) axis whose index comes first in chunk names."""
        return 2 if self.layout == "n5" else 0


def zarr_grid(zarray: dict[str, Any], where: str) -> ChunkGrid:
    """The chunk grid of a Zarr v2 array from its `.zarray`."""
    try:
        if zarray.get("zarr_format") != 2:
            raise UnsupportedDataError(f"{where}: expected zarr_format 2, got {zarray.get('zarr_format')!r}")
        shape = tuple(int(n) for n in zarray["shape"])
        chunks = tuple(int(n) for n in zarray["chunks"])
        dtype = np.dtype(zarray["dtype"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceResponseError(f"{where}: not a valid Zarr v2 .zarray ({exc!r})") from None
    if len(shape) != 3 or len(chunks) != 3:
        raise UnsupportedDataError(f"{where}: expected a 3-D (z, y, x) array, got shape {list(shape)}")
    if any(n < 0 for n in shape):
        raise SourceResponseError(f"{where}: negative array shape {list(shape)}")
    check_chunk(chunks, dtype.itemsize, where)
    separator = zarray.get("dimension_separator") or "."
    if separator not in (".", "/"):
        raise SourceResponseError(f"{where}: dimension_separator {separator!r} is neither '.' nor '/'")
    return ChunkGrid("zarr", shape, chunks, dtype, separator)


def n5_grid(attributes: dict[str, Any], where: str) -> ChunkGrid:
    """The chunk grid of an N5 dataset from its `attributes.json` (stored x, y, z)."""
    try:
        shape = tuple(int(n) for n in attributes["dimensions"])[::-1]
        chunks = tuple(int(n) for n in attributes["blockSize"])[::-1]
        data_type = attributes["dataType"]
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceResponseError(f"{where}: not valid N5 dataset attributes ({exc!r})") from None
    if len(shape) != 3:
        raise UnsupportedDataError(f"{where}: expected a 3-D dataset, got dimensions {list(shape[::-1])}")
    if len(chunks) != 3:
        raise SourceResponseError(f"{where}: blockSize {list(chunks[::-1])} does not give one size per dimension")
    if data_type not in N5_DTYPES:
        raise UnsupportedDataError(f"{where}: N5 dataType {data_type!r} is not supported")
    if any(n < 0 for n in shape):
        raise SourceResponseError(f"{where}: negative dimensions {list(shape[::-1])}")
    check_chunk(chunks, np.dtype(data_type).itemsize, where, "block")
    return ChunkGrid("n5", shape, chunks, np.dtype(data_type), "/")


def grid(layout: str, array_metadata: dict[str, Any], where: str) -> ChunkGrid:
    return zarr_grid(array_metadata, where) if layout == "zarr" else n5_grid(array_metadata, where)


def _vec3(values: Any, where: str, what: str) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise SourceResponseError(f"{where}: {what} must be a list of numbers, got {values!r}") from None
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise SourceResponseError(f"{where}: {what} must hold three finite numbers, got {values!r}")
    return out


def _to_zyx(names: list[str], values: list[float], where: str) -> Vec3:
    """Reorder per-axis values given in the order of `names` into (z, y, x)."""
    lowered = [str(n).lower() for n in names]
    if sorted(lowered) != sorted(ZYX):
        raise UnsupportedDataError(f"{where}: expected the spatial axes z, y, x, got {names}")
    return triple(values[lowered.index(a)] for a in ZYX)


def cosem_transform(transform: dict[str, Any], where: str) -> LevelGeometry:
    """A COSEM `transform` (STTransform): axes/scale/translate/units in `order` C (z, y, x) or F (x, y, z)."""
    try:
        axes = list(transform.get("axes") or ZYX)
        scale = _vec3(transform["scale"], where, "transform.scale")
        translate = _vec3(transform.get("translate", [0.0, 0.0, 0.0]), where, "transform.translate")
        units = list(transform.get("units") or ["nm"] * 3)
    except (AttributeError, KeyError) as exc:
        raise SourceResponseError(f"{where}: transform lacks {exc}") from None
    if str(transform.get("order", "C")).upper() == "F":
        axes, scale, translate, units = axes[::-1], scale[::-1], translate[::-1], units[::-1]
    scale_nm = _to_zyx(axes, [to_nm(s, u, where) for s, u in zip(scale, units)], where)
    translation_nm = _to_zyx(axes, [to_nm(t, u, where) for t, u in zip(translate, units)], where)
    return LevelGeometry(scale_nm, translation_nm)


def ngff_multiscale(attrs: dict[str, Any], where: str) -> dict[str, Any] | None:
    multiscales = attrs.get("multiscales")
    if not multiscales:
        return None
    if not isinstance(multiscales, list) or not isinstance(multiscales[0], dict):
        raise SourceResponseError(f"{where}: 'multiscales' must be a list of objects")
    return multiscales[0]


def level_paths(layout: str, group_attrs: dict[str, Any], where: str) -> list[str]:
    """The array paths of a multiscale image, finest first."""
    multiscale = ngff_multiscale(group_attrs, where)
    if multiscale is not None:
        try:
            return [str(d["path"]) for d in multiscale["datasets"]]
        except (KeyError, TypeError):
            raise SourceResponseError(f"{where}: multiscales[0].datasets must list objects with a 'path'") from None
    if layout == "n5" and isinstance(group_attrs.get("scales"), list):
        return [f"s{i}" for i in range(len(group_attrs["scales"]))]
    return []


def _ngff_level(group_attrs: dict[str, Any], multiscale: dict[str, Any], level: str,
                where: str) -> LevelGeometry | None:
    listed = multiscale.get("datasets")
    if not isinstance(listed, list) or not all(isinstance(d, dict) and "path" in d for d in listed):
        # Malformed is not "absent": falling back would ask the curator for a size the source does state.
        raise SourceResponseError(f"{where}: multiscales[0].datasets must list objects with a 'path', "
                                  f"got {str(listed)[:80]}")
    datasets = [d for d in listed if d.get("path") == level]
    if not datasets:
        return None
    dataset = datasets[0]
    if "coordinateTransformations" not in dataset:
        # The COSEM flavour of multiscales puts a `transform` on each dataset instead.
        return cosem_transform(dataset["transform"], where) if "transform" in dataset else None
    # The one OME-NGFF reader; CellMap writes nanometres, and older files leave the unit out.
    parsed = ome_ngff.multiscale_of(group_attrs, where=where).for_rank(3, where=where)
    types = [parsed.axis_types.get(a) for a in parsed.axes]
    if len(parsed.axes) != 3 or any(t not in (None, "space") for t in types):
        raise UnsupportedDataError(f"{where}: expected three spatial axes, got {parsed.axes} of types {types}")
    if parsed.axes != list(ZYX):
        raise UnsupportedDataError(f"{where}: axes must be stored in (z, y, x) order, got {parsed.axes}")
    scale_nm = parsed.voxel_size_nm(level, where=where, default_unit="nanometer")
    if scale_nm is None:
        return None  # no scale stated: not invented
    translation_nm = parsed.translation_nm(level, where=where, default_unit="nanometer") or (0.0, 0.0, 0.0)
    return LevelGeometry(scale_nm, translation_nm)


def _pixel_resolution(attrs: dict[str, Any], where: str) -> Vec3 | None:
    resolution = attrs.get("pixelResolution")
    if resolution is None:
        return None
    if isinstance(resolution, dict):
        values, unit = resolution.get("dimensions"), resolution.get("unit")
    else:  # some writers store the bare list
        values, unit = resolution, "nm"
    xyz = _vec3(values, where, "pixelResolution.dimensions")
    return triple(to_nm(v, unit, where) for v in xyz[::-1])


def level_geometry(layout: str, group_attrs: dict[str, Any], level: str, array_attrs: dict[str, Any],
                   where: str) -> LevelGeometry | None:
    """The geometry of array `level` from the data's own attributes, or None if they do not state it.

    Zarr: OME-NGFF `multiscales` on the image group, else a COSEM `transform` on the array.
    N5: the array's `transform`, else the group's `multiscales[].datasets[].transform`, else
    `pixelResolution` scaled by the level's factors (`downsamplingFactors` or the group's `scales`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    multiscale = ngff_multiscale(group_attrs, where)
    if layout == "zarr":
        found = _ngff_level(group_attrs, multiscale, level, where) if multiscale else None
        if found is None and isinstance(array_attrs.get("transform"), dict):
            found = cosem_transform(array_attrs["transform"], where)
        return found
    if isinstance(array_attrs.get("transform"), dict):
        return cosem_transform(array_attrs["transform"], where)
    if multiscale:
        found = _ngff_level(group_attrs, multiscale, level, where)
        if found is not None:
            return found
    base = _pixel_resolution(array_attrs, where) if "downsamplingFactors" in array_attrs else None
    factors_xyz = array_attrs.get("downsamplingFactors")
    if base is None:
        base = _pixel_resolution(group_attrs, where)
        match = re.fullmatch(r"s(\d+)", level)
        scales = group_attrs.get("scales")
        if base is None or match is None or not isinstance(scales, list) or int(match.group(1)) >= len(scales):
            return None
        factors_xyz = scales[int(match.group(1))]
    factors = _vec3(factors_xyz, where, "downsampling factors")[::-1]
    # Without a transform the files do not say where downsampled voxels sit: no translation.
    return LevelGeometry(triple(b * f for b, f in zip(base, factors)), None)


def finest_level_at_least(layout: str, group_attrs: dict[str, Any], scale_nm: tuple[float, float, float] | None,
                           where: str) -> str:
    """The finest level whose voxel is at least `scale_nm` on every axis (a label never finer than its image),
    else the coarsest; the first level when the image's voxel is unknown."""
    paths = level_paths(layout, group_attrs, where)
    if not paths:
        raise SelectionError(f"{where}: not a multiscale group (its attributes list no levels); name one with "
                             "{group, level}")
    if scale_nm is None:
        return paths[0]
    for path in paths:
        geometry = level_geometry(layout, group_attrs, path, {}, where)
        if geometry is not None and all(g >= s * (1 - 1e-6) for g, s in zip(geometry.scale_nm, scale_nm)):
            return path
    return paths[-1]


def overlapping_region(image: LevelGeometry, region: Sequence[tuple[int, int]], other: LevelGeometry,
                       other_shape: Sequence[int], where: str) -> tuple[tuple[int, int], ...]:
    """The voxels of another level ([start, stop) per axis, within `other_shape`) whose boxes overlap the box of
    `region` of the image level in physical space, e.g. the part of a coarser label that covers an image crop.

    Voxel i of a level is centred at translation + i x scale and spans half a voxel either side; a level that
    states no translation starts at 0.
    """
    out = []
    for axis in range(3):
        scale_i, scale_l = image.scale_nm[axis], other.scale_nm[axis]
        origin_i = image.translation_nm[axis] if image.translation_nm else 0.0
        origin_l = other.translation_nm[axis] if other.translation_nm else 0.0
        low = origin_i + (region[axis][0] - 0.5) * scale_i
        high = origin_i + (region[axis][1] - 0.5) * scale_i
        # A hair of tolerance: an edge that falls on a voxel boundary must not take the neighbour.
        start = max(0, math.floor((low - origin_l) / scale_l + 0.5 + 1e-9))
        stop = min(other_shape[axis], math.ceil((high - origin_l) / scale_l + 0.5 - 1e-9))
        if stop <= start:
            raise SelectionError(f"{where}: it does not overlap the image region along {'zyx'[axis]} "
                                 f"({low:g}-{high:g} nm)")
        out.append((start, stop))
    return tuple(out)
