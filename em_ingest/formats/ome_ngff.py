"""OME-NGFF `multiscales`: axes, levels, and each level's scale and translation in nanometres, read the one
way every source does. 0.4 (`.zattrs`) and 0.5 (`zarr.json` attributes under "ome") are parsed by the spec
models of ome-zarr-models; 0.1-0.3, which those models do not cover, by a small reader of their own."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from em_ingest.errors import FormatError, UnsupportedDataError
from em_ingest.formats.units import to_nm

MODELLED_VERSIONS = ("0.4", "0.5")
# Before 0.4: no coordinate transformations, and axes (0.3) are bare names.
LEGACY_VERSIONS = ("0.1", "0.2", "0.3")
NGFF_VERSIONS = LEGACY_VERSIONS + MODELLED_VERSIONS
# Versions whose metadata is `multiscales` at the top of the attributes (Zarr v2 `.zattrs`).
ZATTRS_VERSIONS = LEGACY_VERSIONS + ("0.4",)
# 0.1 and 0.2 name no axes (always t, c, z, y, x); writers of that era also wrote fewer dimensions.
DEFAULT_AXES = {5: ["t", "c", "z", "y", "x"], 4: ["c", "z", "y", "x"], 3: ["z", "y", "x"], 2: ["y", "x"]}
SPATIAL = ("z", "y", "x")
Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class Level:
    """One `datasets` entry: its array path and its own scale and translation (array axis order), if stated."""

    path: str
    scale: tuple[float, ...] | None = None
    translation: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Multiscale:
    """The first `multiscales` entry of an OME-Zarr image group.

    `axes` are the names in array order (e.g. t, c, z, y, x), empty until `for_rank` fills in the
    implicit ones of 0.1-0.2; `levels` are finest first. Every length method takes a `level`
    (default: full resolution) and answers in (z, y, x) nanometres.
    """

    levels: tuple[Level, ...]
    axes: list[str]
    units: dict[str, str | None] = field(default_factory=dict)
    axis_types: dict[str, str | None] = field(default_factory=dict)
    version: str | None = None
    # The multiscale-wide scale and translation, applied after each level's own.
    scale: tuple[float, ...] | None = None
    translation: tuple[float, ...] | None = None

    @property
    def level_path(self) -> str:
        """The full-resolution level (`datasets[0].path`)."""
        return self.levels[0].path

    @property
    def level_paths(self) -> list[str]:
        """The array paths of the levels, finest first."""
        return [level.path for level in self.levels]

    def for_rank(self, rank: int, *, where: str) -> Multiscale:
        """Itself, with the axes NGFF 0.1-0.2 left implicit (t, c, z, y, x by rank) filled in."""
        if self.axes:
            return self
        if rank not in DEFAULT_AXES:
            raise FormatError(f"{where}: no axes given and rank {rank} has no default axis order")
        return replace(self, axes=DEFAULT_AXES[rank])

    def check_axes(self, shape: tuple[int, ...], *, where: str) -> None:
        """Refuse an array whose rank does not match the axes, or that has more than one channel or timepoint."""
        if len(shape) != len(self.axes):
            raise FormatError(f"{where}: multiscales names axes {self.axes} but the array has shape {shape}")
        extra = {a: n for a, n in zip(self.axes, shape) if a not in SPATIAL and n != 1}
        if extra:
            raise UnsupportedDataError(f"{where}: axes {dict(zip(self.axes, shape))} have {extra} beyond one; "
                                       "only single-channel, single-timepoint volumes are ingested for now")
        if "y" not in self.axes or "x" not in self.axes:
            raise UnsupportedDataError(f"{where}: expected spatial axes y and x, got {self.axes}")

    def dataset(self, level: str | None = None, *, where: str) -> Level:
        """The `datasets` entry of `level` (default: full resolution)."""
        path = self.level_path if level is None else level
        for found in self.levels:
            if found.path == path:
                return found
        raise FormatError(f"{where}: multiscales lists no level {path!r} (levels {self.level_paths})")

    def transforms(self, level: str | None = None, *, where: str) -> tuple[list[float] | None, list[float] | None]:
        """(scale, translation) of `level` in array axis order, composed with the multiscale-wide ones;
        None where neither states one (0.1-0.3 have no coordinateTransformations at all).

        NGFF applies the level's transforms first, then the multiscale's: x -> g_s * (s * x + t) + g_t.
        """
        found = self.dataset(level, where=where)
        scale = self._checked(found.scale, "scale", where)
        translation = self._checked(found.translation, "translation", where)
        outer_scale = self._checked(self.scale, "scale", where)
        outer_translation = self._checked(self.translation, "translation", where)
        if outer_scale is not None:
            scale = [a * b for a, b in zip(scale, outer_scale)] if scale else outer_scale
            translation = [a * b for a, b in zip(translation, outer_scale)] if translation else None
        if outer_translation is not None:
            translation = [a + b for a, b in zip(translation, outer_translation)] if translation else outer_translation
        return scale, translation

    def _checked(self, values: tuple[float, ...] | None, kind: str, where: str) -> list[float] | None:
        """The spec models check the lengths; JSON parsers also let through NaN and Infinity."""
        if values is None:
            return None
        if len(values) != len(self.axes) or not all(math.isfinite(v) for v in values):
            raise FormatError(f"{where}: {kind} {list(values)} does not give one finite number per axis {self.axes}")
        return list(values)

    def _spatial_nm(self, values: list[float], *, where: str, default_unit: str | None) -> Vec3 | None:
        """(z, y, x) nanometres of a per-axis transform; None when a spatial axis has no unit.

        bioformats2raw writes scale 1.0 without a unit when the original had no physical size, so a
        missing unit means "unknown", not "pixels are 1 long" -- unless the caller knows its writer
        always means one unit (`default_unit`, e.g. CellMap's nanometres).
        """
        out: dict[str, float] = {}
        for axis in SPATIAL:
            if axis not in self.axes:
                continue
            unit = self.units.get(axis) or default_unit
            if not unit:
                return None
            out[axis] = to_nm(values[self.axes.index(axis)], unit, where=where)
        if "y" not in out or "x" not in out:
            raise UnsupportedDataError(f"{where}: expected spatial axes y and x, got {self.axes}")
        # A single plane (no z axis): give z the pixel width.
        return (out["z"] if "z" in out else out["x"], out["y"], out["x"])

    def voxel_size_nm(self, level: str | None = None, *, where: str, default_unit: str | None = None) -> Vec3 | None:
        """(z, y, x) voxel size of `level` in nm; None when the metadata gives no scale or no unit."""
        scale, _ = self.transforms(level, where=where)
        return self._spatial_nm(scale, where=where, default_unit=default_unit) if scale else None

    def translation_nm(self, level: str | None = None, *, where: str,
                       default_unit: str | None = None) -> Vec3 | None:
        """(z, y, x) position of `level`'s first voxel in nm (z 0 for a 2-D image); None when none is given."""
        _, translation = self.transforms(level, where=where)
        nm = self._spatial_nm(translation, where=where, default_unit=default_unit) if translation else None
        if nm is None:
            return None
        return (0.0 if "z" not in self.axes else nm[0], nm[1], nm[2])


def multiscale_of(attrs: Any, *, where: str) -> Multiscale:
    """The first multiscale image described by an image group's attributes: a Zarr v2 `.zattrs`
    (OME-NGFF 0.1-0.4) or the attributes of a Zarr v3 `zarr.json` (0.5, under "ome")."""
    if isinstance(attrs, dict) and isinstance(attrs.get("ome"), dict):
        ome = attrs["ome"]
        version, document = ome.get("version"), _first(ome, where, "ome.multiscales")
        if str(version) != "0.5":
            raise UnsupportedDataError(f"{where}: OME-NGFF version {version!r} under 'ome' is not read here "
                                       "(expected 0.5)")
        return _modelled(document, "0.5", where)
    document = _first(attrs, where, "multiscales")
    version = document.get("version")
    if version is not None and str(version) not in ZATTRS_VERSIONS:
        raise UnsupportedDataError(f"{where}: OME-NGFF version {version!r} in 'multiscales' is not read here "
                                   f"(expected one of {', '.join(ZATTRS_VERSIONS)}; 0.5 keeps it under 'ome')")
    if version is None:
        # Unversioned: axes as objects are the 0.4 shape; bare names or none, the older ones.
        axes = document.get("axes")
        legacy = not (isinstance(axes, list) and axes and all(isinstance(a, dict) for a in axes))
    else:
        legacy = str(version) in LEGACY_VERSIONS
    return _legacy(document, where) if legacy else _modelled(document, "0.4", where)


def _first(container: Any, where: str, name: str) -> dict[str, Any]:
    """`multiscales[0]` of `container`, with at least a first level path; `name` says where it is in errors."""
    try:
        document = container["multiscales"][0]
        level_path = document["datasets"][0]["path"]
    except (KeyError, IndexError, TypeError) as exc:
        raise FormatError(f"{where}: not an OME-Zarr image group (no {name}[0].datasets[0].path: {exc})") from None
    if not isinstance(document, dict) or not isinstance(level_path, str):
        raise FormatError(f"{where}: not an OME-Zarr image group ({name}[0].datasets[0].path must be text)")
    return document


def _modelled(document: dict[str, Any], version: str, where: str) -> Multiscale:
    """0.4 or 0.5, validated by ome-zarr-models (imported here: it costs ~0.2 s beyond zarr)."""
    from ome_zarr_models.v04.axes import Axis as AxisV04
    from ome_zarr_models.v04.multiscales import Multiscale as MultiscaleV04
    from ome_zarr_models.v05.axes import Axis as AxisV05
    from ome_zarr_models.v05.multiscales import Multiscale as MultiscaleV05
    from pydantic import ValidationError as PydanticValidationError

    model: MultiscaleV04 | MultiscaleV05
    try:
        if version == "0.5":
            model = MultiscaleV05.model_validate(document)
        else:
            model = MultiscaleV04.model_validate(document)
    except PydanticValidationError as exc:
        problems = "; ".join(_problem(e) for e in exc.errors())
        raise FormatError(f"{where}: not valid OME-NGFF {version} ({problems})") from None
    axes: Sequence[AxisV04 | AxisV05] = model.axes
    names = [str(a.name).lower() for a in axes]
    units = {n: (str(a.unit) if a.unit is not None else None) for n, a in zip(names, axes)}
    types = {n: a.type for n, a in zip(names, axes)}
    levels = []
    for dataset in model.datasets:
        scale, translation = _vectors(dataset.coordinateTransformations, f"{where} (level {dataset.path!r})")
        levels.append(Level(dataset.path, scale, translation))
    scale, translation = _vectors(model.coordinateTransformations or (), where)
    return Multiscale(tuple(levels), names, units, types, version, scale, translation)


def _problem(error: Any) -> str:
    """One pydantic error as the document's own path, what was wrong, and the value found there if short."""
    # "transforms" is a wrapper the models add while validating a transform list; it is not in the document.
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"] if p != "transforms")
    found = error.get("input")
    shown = f" (found {found!r})" if isinstance(found, (str, int, float)) and len(repr(found)) <= 40 else ""
    return f"multiscales[0]{path}: {error['msg']}{shown}"


def _vectors(transforms: Sequence[Any], where: str) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """(scale, translation) of a validated transform list; the spec also allows them stored in a file."""
    found: dict[str, tuple[float, ...]] = {}
    for transform in transforms:
        values = getattr(transform, transform.type, None)
        if values is None:
            # Ignoring one would silently place voxels wrong.
            raise UnsupportedDataError(f"{where}: a {transform.type} stored in a file ({transform.path!r}) "
                                       "is not supported (expected it inline)")
        found[transform.type] = tuple(float(v) for v in values)
    return found.get("scale"), found.get("translation")


def _legacy(document: dict[str, Any], where: str) -> Multiscale:
    """0.1-0.3: level paths and axis names (none in 0.1-0.2, filled in from the array's rank by `for_rank`)."""
    datasets = document["datasets"]
    if not all(isinstance(d, dict) and isinstance(d.get("path"), str) for d in datasets):
        raise FormatError(f"{where}: every multiscales[0].datasets entry needs a 'path'")
    if any("coordinateTransformations" in d for d in [document, *datasets]):
        # Not part of these versions: a writer that put them there means something this reader cannot know.
        raise UnsupportedDataError(f"{where}: coordinateTransformations in OME-NGFF "
                                   f"{document.get('version') or 'before 0.4'} metadata (they came with 0.4)")
    axes = document.get("axes")
    if axes is not None and not (isinstance(axes, list) and all(isinstance(a, str) for a in axes)):
        raise FormatError(f"{where}: multiscales[0].axes must be a list of names before OME-NGFF 0.4, got {axes!r}")
    levels = tuple(Level(d["path"]) for d in datasets)
    return Multiscale(levels, [a.lower() for a in axes or []], version=document.get("version"))
