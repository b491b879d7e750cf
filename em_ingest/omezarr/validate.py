"""Independent check of a written image against the OME-NGFF spec models (ome-zarr-models)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zarr
from pydantic import ValidationError as PydanticValidationError

from em_ingest.errors import ValidationError


@dataclass(frozen=True)
class ImageSummary:
    """What a valid OME-Zarr image says about itself."""

    ngff_version: str
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    scales_nm: tuple[tuple[float, ...], ...]
    translations_nm: tuple[tuple[float, ...], ...]
    dtype: str


def validate_ome_zarr(path: Path | str) -> ImageSummary:
    """Parse the image at `path` with the spec models of its NGFF version; raise ValidationError if invalid."""
    try:
        group = zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, ValueError, zarr.errors.GroupNotFoundError) as exc:  # type: ignore[attr-defined]
        raise ValidationError(f"{path}: not a Zarr group ({exc})") from None
    attrs = group.attrs.asdict()
    try:
        if "ome" in attrs:
            from ome_zarr_models.v05 import Image

            image = Image.from_zarr(group)
            version = image.attributes.ome.version
            multiscale = image.attributes.ome.multiscales[0]
        elif "multiscales" in attrs:
            from ome_zarr_models.v04 import Image

            image = Image.from_zarr(group)
            version = "0.4"
            multiscale = image.attributes.multiscales[0]
        else:
            raise ValidationError(f"{path}: no OME-NGFF 'multiscales' metadata")
    except PydanticValidationError as exc:
        raise ValidationError(f"{path}: invalid OME-NGFF metadata: {exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValidationError(f"{path}: invalid OME-NGFF image: {exc}") from None
    axes = [(a.name, a.type, a.unit) for a in multiscale.axes]
    if axes != [(n, "space", "nanometer") for n in "zyx"]:
        raise ValidationError(f"{path}: expected axes z, y, x in nanometer, got {axes}")
    paths, shapes, scales, translations = [], [], [], []
    for ds in multiscale.datasets:
        array = group[ds.path]
        paths.append(ds.path)
        shapes.append(tuple(array.shape))
        transforms = {t.type: t for t in ds.coordinateTransformations}
        scales.append(tuple(transforms["scale"].scale))
        translations.append(tuple(transforms["translation"].translation) if "translation" in transforms else (0.0,) * 3)
    dtype = str(group[paths[0]].dtype)
    for p, shape in zip(paths, shapes):
        if len(shape) != 3 or str(group[p].dtype) != dtype:
            raise ValidationError(f"{path}/{p}: expected a 3-D {dtype} array, got {shape} {group[p].dtype}")
    return ImageSummary(version, tuple(paths), tuple(shapes), tuple(scales), tuple(translations), dtype)
