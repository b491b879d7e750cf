"""OME-NGFF labels of an image (segmentations, ground truth): written beside it under `labels/<name>/`, with
pyramids that take each window's mode, so ids are never averaged into values that are not there."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from em_ingest.errors import UnsupportedDataError
from em_ingest.formats.label import LabelImage
from em_ingest.formats.volume import Geometry, Region, Volume
from em_ingest.omezarr.writer import WriteResult, ZarrLayout, write_ome_zarr
from em_ingest.storage import fsync_path

LABELS_GROUP = "labels"
# Distinct values are counted exactly up to this many (a set of ids in memory); beyond, "at least" this many.
MAX_COUNTED_VALUES = 1 << 20


@dataclass(frozen=True)
class WrittenLabel:
    name: str
    origin: str
    result: WriteResult
    distinct_values: int
    distinct_values_exact: bool  # False: at least `distinct_values`, counting stopped there

    def catalog_entry(self) -> dict[str, Any]:
        """What the catalog's extra_json says of this label."""
        return {"origin": self.origin, "shape": list(self.result.levels[0].shape), "dtype": self.result.dtype,
                "distinct_values": self.distinct_values, "distinct_values_exact": self.distinct_values_exact,
                "scale_nm": list(self.result.levels[0].scale_nm),
                "translation_nm": list(self.result.levels[0].translation_nm)}


class _CountingVolume(Volume):
    """Passes regions through and counts the distinct values seen, up to MAX_COUNTED_VALUES (bounded memory)."""

    def __init__(self, inner: Volume):
        self.inner, self.shape, self.dtype, self.geometry, self.name = (
            inner, inner.shape, inner.dtype, inner.geometry, inner.name)
        self.values: set[int] = set()
        self.capped = False

    def read(self, region: Region) -> np.ndarray:
        block = self.inner.read(region)
        if not self.capped:
            self.values.update(np.unique(block).tolist())
            if len(self.values) >= MAX_COUNTED_VALUES:
                self.capped = True
        return block


def write_labels(image_dir: Path, labels: Sequence[LabelImage], image: WriteResult, image_geometry: Geometry, *,
                 image_name: str, layout: ZarrLayout) -> list[WrittenLabel]:
    """Write each label as an image-label of the image at `image_dir` (written as `image`), and the `labels`
    group listing them."""
    if not labels:
        return []
    import zarr  # imported where written, so loading the code location stays light
    names = [label.name for label in labels]
    if len(set(names)) != len(names):
        raise ValueError(f"{image_name}: label names repeat: {names}")
    group = zarr.open_group(zarr.storage.LocalStore(image_dir / LABELS_GROUP), mode="w-", zarr_format=layout.zarr_format)
    group.attrs.update(_versioned({"labels": names}, layout.ngff_version))
    written = []
    for label in labels:
        dtype = np.dtype(label.volume.dtype)
        if dtype.kind not in "iu":
            raise UnsupportedDataError(f"{image_name}: label {label.name!r} ({label.volume.name}) holds {dtype} "
                                       "values; labels are integer ids or classes")
        if label.geometry is None and label.volume.shape != image.levels[0].shape:
            raise UnsupportedDataError(f"{image_name}: label {label.name!r} ({label.volume.name}) is "
                                       f"{label.volume.shape} voxels (z, y, x) but its image is "
                                       f"{image.levels[0].shape}; a label on the image's grid must match it")
        geometry = label.geometry or Geometry(image_geometry.voxel_size_nm, image_geometry.voxel_size_origin,
                                              image_geometry.translation_nm)
        counting = _CountingVolume(label.volume)
        image_label: dict[str, Any] = {"source": {"image": "../../"}}
        if label.colors:
            image_label["colors"] = [{"label-value": value, "rgba": list(rgba)}
                                     for value, rgba in sorted(label.colors.items())]
        result = write_ome_zarr(counting, geometry, image_dir / LABELS_GROUP / label.name,
                                name=f"{image_name}/labels/{label.name}", layout=layout,
                                label_levels=len(image.levels), image_label=image_label)
        written.append(WrittenLabel(label.name, label.origin, result, len(counting.values), not counting.capped))
    # Each label image is durable once written; the group listing them, and its entry in the image, too.
    group_dir = image_dir / LABELS_GROUP
    for path in (*(p for p in group_dir.iterdir() if p.is_file()), group_dir, image_dir):
        fsync_path(path)
    return written


def _versioned(document: dict[str, Any], ngff_version: str) -> dict[str, Any]:
    return {"ome": {"version": ngff_version, **document}} if ngff_version != "0.4" else document
