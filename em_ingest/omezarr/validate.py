"""Independent check of a written image against the OME-NGFF spec models (ome-zarr-models)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError as PydanticValidationError

from em_ingest.errors import ValidationError

if TYPE_CHECKING:
    import zarr
    from ome_zarr_models.v04.multiscales import Multiscale as MultiscaleV04
    from ome_zarr_models.v05.multiscales import Multiscale as MultiscaleV05


@dataclass(frozen=True)
class ImageSummary:
    """What a valid OME-Zarr image says about itself."""

    ngff_version: str
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    scales_nm: tuple[tuple[float, ...], ...]
    translations_nm: tuple[tuple[float, ...], ...]
    dtype: str
    labels: tuple[str, ...] = ()  # label images under labels/, each valid as an image-label (integer ids)


def validate_ome_zarr(path: Path | str, storage_options: dict[str, Any] | None = None) -> ImageSummary:
    """Parse the image at `path` (a folder, or a URL opened with fsspec's `storage_options`) with the spec models of
    its NGFF version; raise ValidationError if invalid."""
    import zarr
    import zarr.errors
    try:
        group = zarr.open_group(str(path), mode="r", storage_options=storage_options)
    except (FileNotFoundError, ValueError, zarr.errors.GroupNotFoundError) as exc:
        raise ValidationError(f"{path}: not a Zarr group ({exc})") from None
    attrs = group.attrs.asdict()
    version: str
    multiscale: MultiscaleV04 | MultiscaleV05
    try:
        if "ome" in attrs:
            from ome_zarr_models.v05 import Image as ImageV05

            image_v05 = ImageV05.from_zarr(group)
            version = image_v05.attributes.ome.version
            multiscale = image_v05.attributes.ome.multiscales[0]
        elif "multiscales" in attrs:
            from ome_zarr_models.v04 import Image as ImageV04

            version = "0.4"
            multiscale = ImageV04.from_zarr(group).attributes.multiscales[0]
        else:
            raise ValidationError(f"{path}: no OME-NGFF 'multiscales' metadata")
    except PydanticValidationError as exc:
        raise ValidationError(f"{path}: invalid OME-NGFF metadata: {exc}") from None
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:  # RuntimeError: its labels disagree with it
        raise ValidationError(f"{path}: invalid OME-NGFF image: {exc}") from None
    from ome_zarr_models.common.coordinate_transformations import VectorScale, VectorTranslation

    axes = [(a.name, a.type, a.unit) for a in multiscale.axes]
    if axes != [(n, "space", "nanometer") for n in "zyx"]:
        raise ValidationError(f"{path}: expected axes z, y, x in nanometer, got {axes}")
    paths: list[str] = []
    arrays: list[zarr.Array[Any]] = []
    scales: list[tuple[float, ...]] = []
    translations: list[tuple[float, ...]] = []
    for ds in multiscale.datasets:
        array = group[ds.path]
        if not isinstance(array, zarr.Array):
            raise ValidationError(f"{path}/{ds.path}: expected an array, got a group")
        paths.append(ds.path)
        arrays.append(array)
        transforms = {t.type: t for t in ds.coordinateTransformations}
        scale, translation = transforms["scale"], transforms.get("translation")
        if not isinstance(scale, VectorScale) or not (translation is None or isinstance(translation, VectorTranslation)):
            # Valid NGFF, but the writer only ever writes the values inline.
            raise ValidationError(f"{path}/{ds.path}: expected the scale and translation inline, not in a file")
        scales.append(tuple(scale.scale))
        translations.append(tuple(translation.translation) if translation is not None else (0.0,) * 3)
    shapes = [tuple(array.shape) for array in arrays]
    dtype = str(arrays[0].dtype)
    for p, shape, array in zip(paths, shapes, arrays):
        if len(shape) != 3 or str(array.dtype) != dtype:
            raise ValidationError(f"{path}/{p}: expected a 3-D {dtype} array, got {shape} {array.dtype}")
    labels = _validate_labels(group, path, len(paths), storage_options)
    return ImageSummary(version, tuple(paths), tuple(shapes), tuple(scales), tuple(translations), dtype, labels)


def _validate_labels(group: zarr.Group, path: Path | str, levels: int,
                     storage_options: dict[str, Any] | None) -> tuple[str, ...]:
    """The names the `labels` group lists, each checked as an image of its own (axes, inline transforms) with
    integer values and as many levels as the image; the spec models already checked the image-label metadata."""
    if "labels" not in group:
        return ()
    attrs = group["labels"].attrs.asdict()
    ome = attrs.get("ome")
    names = (ome if isinstance(ome, dict) else attrs).get("labels")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValidationError(f"{path}/labels: expected a list of label names, got {names!r}")
    for name in names:
        label = validate_ome_zarr(f"{path}/labels/{name}", storage_options)
        if label.labels or len(label.paths) != levels or not label.dtype.startswith(("int", "uint")):
            raise ValidationError(f"{path}/labels/{name}: expected {levels} levels of integer values, got "
                                  f"{len(label.paths)} of {label.dtype}")
    return tuple(names)
