"""OME-NGFF 0.1-0.4 `multiscales` (Zarr v2 `.zattrs`): axes, levels, and each level's scale and translation
in nanometres, read the one way every source does."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from em_ingest.errors import FormatError, UnsupportedDataError
from em_ingest.formats.units import to_nm

# The versions this reader understands; 0.5 lives in Zarr v3 `zarr.json` under "ome" and is not read here.
NGFF_VERSIONS = ("0.1", "0.2", "0.3", "0.4")
# 0.1 and 0.2 name no axes (always t, c, z, y, x); writers of that era also wrote fewer dimensions.
DEFAULT_AXES = {5: ["t", "c", "z", "y", "x"], 4: ["c", "z", "y", "x"], 3: ["z", "y", "x"], 2: ["y", "x"]}
SPATIAL = ("z", "y", "x")
Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class Multiscale:
    """The first `multiscales` entry of an OME-Zarr image group.

    `axes` are the names in array order (e.g. t, c, z, y, x), empty until `for_rank` fills in the
    implicit ones of 0.1-0.2; `level_path` is the full-resolution level (`datasets[0].path`). Every
    length method takes a `level` (default: full resolution) and answers in (z, y, x) nanometres.
    """

    document: dict[str, Any]
    axes: list[str]
    units: dict[str, str | None]
    level_path: str

    @property
    def version(self) -> str | None:
        version = self.document.get("version")
        return None if version is None else str(version)

    @property
    def level_paths(self) -> list[str]:
        """The array paths of the levels, finest first."""
        return [str(d["path"]) for d in self.document["datasets"]]

    @property
    def axis_types(self) -> dict[str, str | None]:
        """Axis name -> type ("space", "time", "channel") where 0.4 states one."""
        return {str(a.get("name")).lower(): a.get("type") for a in self.document.get("axes") or []
                if isinstance(a, dict)}

    def for_rank(self, rank: int, *, where: str) -> Multiscale:
        """Itself, with the axes NGFF 0.1-0.2 left implicit (t, c, z, y, x by rank) filled in."""
        if self.axes:
            return self
        if rank not in DEFAULT_AXES:
            raise FormatError(f"{where}: no axes given and rank {rank} has no default axis order")
        return Multiscale(self.document, DEFAULT_AXES[rank], {}, self.level_path)

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

    def dataset(self, level: str | None = None, *, where: str) -> dict[str, Any]:
        """The `datasets` entry of `level` (default: full resolution)."""
        path = self.level_path if level is None else level
        datasets: list[dict[str, Any]] = self.document["datasets"]  # checked to be objects by multiscale_of
        for dataset in datasets:
            if str(dataset.get("path")) == path:
                return dataset
        raise FormatError(f"{where}: multiscales lists no level {path!r} (levels {self.level_paths})")

    def transforms(self, level: str | None = None, *, where: str) -> tuple[list[float] | None, list[float] | None]:
        """(scale, translation) of `level` in array axis order, composed with the multiscale-wide ones;
        None where neither states one (0.1-0.3 have no coordinateTransformations at all).

        NGFF applies the level's transforms first, then the multiscale's: x -> g_s * (s * x + t) + g_t.
        """
        scale, translation = self._read(self.dataset(level, where=where).get("coordinateTransformations"), where)
        outer_scale, outer_translation = self._read(self.document.get("coordinateTransformations"), where)
        if outer_scale is not None:
            scale = [a * b for a, b in zip(scale, outer_scale)] if scale else outer_scale
            translation = [a * b for a, b in zip(translation, outer_scale)] if translation else None
        if outer_translation is not None:
            translation = [a + b for a, b in zip(translation, outer_translation)] if translation else outer_translation
        return scale, translation

    def _read(self, transforms: Any, where: str) -> tuple[list[float] | None, list[float] | None]:
        found: dict[str, list[float]] = {}
        for transform in transforms or []:
            kind = transform.get("type") if isinstance(transform, dict) else None
            if kind == "identity":
                continue
            if kind not in ("scale", "translation") or kind not in transform:
                # Ignoring one would silently place voxels wrong; 0.4 allows only these (or a `path`).
                raise UnsupportedDataError(f"{where}: coordinate transformation {transform!r} is not supported "
                                           "(expected an inline scale or translation)")
            try:
                values = [float(v) for v in transform[kind]]
            except (TypeError, ValueError):
                raise FormatError(f"{where}: {kind} must be a list of numbers, got {transform[kind]!r}") from None
            if len(values) != len(self.axes) or not all(math.isfinite(v) for v in values):
                raise FormatError(f"{where}: {kind} {values} does not give one finite number per axis {self.axes}")
            found[kind] = values
        return found.get("scale"), found.get("translation")

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


def multiscale_of(zattrs: Any, *, where: str) -> Multiscale:
    """The first multiscale image described by an image group's `.zattrs` (OME-NGFF 0.1-0.4)."""
    try:
        document = zattrs["multiscales"][0]
        datasets = document["datasets"]
        level_path = str(datasets[0]["path"])  # callers check it before using it as a local path
        if not all(isinstance(d, dict) and "path" in d for d in datasets):
            raise TypeError("every datasets entry needs a 'path'")
    except (KeyError, IndexError, TypeError) as exc:
        raise FormatError(f"{where}: not an OME-Zarr image group (no multiscales[0].datasets[0].path: {exc})") from None
    version = document.get("version")
    if version is not None and str(version) not in NGFF_VERSIONS:
        raise UnsupportedDataError(f"{where}: OME-NGFF version {version!r} is not read here "
                                   f"(expected one of {', '.join(NGFF_VERSIONS)})")
    raw_axes = document.get("axes")
    if raw_axes is None:
        return Multiscale(document, [], {}, level_path)  # 0.1-0.2: filled in from the array's rank (`for_rank`)
    if not isinstance(raw_axes, list):
        raise FormatError(f"{where}: multiscales[0].axes must be a list, got {raw_axes!r}")
    names, units = [], {}
    for axis in raw_axes:  # 0.3: names; 0.4: objects with name, type and unit
        name = str(axis.get("name") if isinstance(axis, dict) else axis).lower()
        names.append(name)
        units[name] = axis.get("unit") if isinstance(axis, dict) else None
    return Multiscale(document, names, units, level_path)
