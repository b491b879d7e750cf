"""Published images read by readers no one here wrote: ome-zarr-py, ngff-zarr (with its JSON-schema
validation), and the Zarr v3 / OME-NGFF 0.5 subset Neuroglancer's zarr3 datasource decodes.

A misreading shared by em-ingest's writer and its own validator would cancel out in the other tests;
these readers disagree with it instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

# What Neuroglancer's zarr3 datasource decodes (src/datasource/zarr: data types, codecs, key encodings) and the
# OME-NGFF units its coordinate space converts to SI lengths.
NEUROGLANCER_DATA_TYPES = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "float32"}
NEUROGLANCER_CODECS = {"bytes", "transpose", "sharding_indexed", "gzip", "zstd", "blosc", "crc32c"}
NEUROGLANCER_KEY_ENCODINGS = {"default", "v2"}
LENGTH_UNITS = {"angstrom", "nanometer", "micrometer", "millimeter", "meter"}


class IndependentReadError(AssertionError):
    """An independent reader disagrees with what em-ingest published."""


def check_published_image(path: Path, *, expected_s0: np.ndarray | None = None,
                          voxel_size_nm: tuple[float, float, float] | None = None) -> None:
    """Open the OME-Zarr image at `path` with each independent reader and compare what they see: every level
    with the same shape and scale, s0 equal to `expected_s0` (when given), and the s0 voxel size."""
    ome_zarr_levels = read_with_ome_zarr_py(path)
    ngff_zarr_levels = read_with_ngff_zarr(path)
    if ome_zarr_levels != ngff_zarr_levels:
        raise IndependentReadError(f"{path}: ome-zarr-py sees {ome_zarr_levels}, ngff-zarr {ngff_zarr_levels}")
    if voxel_size_nm is not None and not np.allclose(ome_zarr_levels[0][1], voxel_size_nm, rtol=1e-9):
        raise IndependentReadError(f"{path}: s0 scale {ome_zarr_levels[0][1]} nm, expected {voxel_size_nm}")
    if expected_s0 is not None:
        import ngff_zarr

        s0 = np.asarray(ngff_zarr.from_ngff_zarr(str(path)).images[0].data)
        if s0.shape != expected_s0.shape or s0.dtype != expected_s0.dtype or not np.array_equal(s0, expected_s0):
            raise IndependentReadError(f"{path}: ngff-zarr reads another s0 ({s0.shape} {s0.dtype}) than expected "
                                       f"({expected_s0.shape} {expected_s0.dtype})")
    check_neuroglancer_can_decode(path)


Levels = list[tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]]  # (shape, scale, translation)


def check_published_labels(path: Path, expected: dict[str, tuple[np.ndarray, tuple[Any, Any]]]) -> None:
    """The image's labels as ome-zarr-py finds them (Label nodes) and ngff-zarr reads each: the names expected,
    s0 equal to the expected ids, each level's values among s0's (a mode never invents an id), the s0 placement
    as expected, and as many levels as the image (a level for each of the image's)."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    nodes = list(Reader(parse_url(str(path)))())  # type: ignore[arg-type]
    found = {str(node.metadata["name"]).rsplit("/", 1)[-1]: node for node in nodes
             if any(isinstance(spec, Label) for spec in node.specs)}
    if set(found) != set(expected):
        raise IndependentReadError(f"{path}: ome-zarr-py finds labels {sorted(found)}, expected {sorted(expected)}")
    image_levels = read_with_ome_zarr_py(path)
    for name, (ids, (scale_nm, translation_nm)) in expected.items():
        levels = read_with_ngff_zarr(path / "labels" / name)
        if len(levels) != len(image_levels):
            raise IndependentReadError(f"{path}/labels/{name}: {len(levels)} levels for the image's {len(image_levels)}")
        if not (np.allclose(levels[0][1], scale_nm) and np.allclose(levels[0][2], translation_nm)):
            raise IndependentReadError(f"{path}/labels/{name}: s0 at {levels[0][1:]}, expected {scale_nm, translation_nm}")
        data = [np.asarray(level) for level in found[name].data]
        if data[0].dtype != ids.dtype or not np.array_equal(data[0], ids):
            raise IndependentReadError(f"{path}/labels/{name}: s0 differs from the source's ids")
        check_neuroglancer_can_decode(path / "labels" / name)  # a segmentation layer reads the same arrays
        present = np.unique(data[0])
        for k, level in enumerate(data[1:], 1):
            invented = np.setdiff1d(np.unique(level), present)
            if invented.size:
                raise IndependentReadError(f"{path}/labels/{name}/s{k}: values {invented[:5]} are not in s0")


def read_with_ome_zarr_py(path: Path | str) -> Levels:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    try:
        location = parse_url(str(path))
        nodes = list(Reader(location)()) if location is not None else []
    except Exception as exc:
        raise IndependentReadError(f"{path}: ome-zarr-py refuses it: {type(exc).__name__}: {exc}") from exc
    if not nodes or not any(isinstance(spec, Multiscales) for spec in nodes[0].specs):
        raise IndependentReadError(f"{path}: ome-zarr-py finds no multiscale image")
    image = nodes[0]
    transforms = image.metadata["coordinateTransformations"]
    if [axis.get("unit") for axis in image.metadata["axes"]] != ["nanometer"] * 3:
        raise IndependentReadError(f"{path}: ome-zarr-py reads axes {image.metadata['axes']}")
    levels: Levels = []
    for data, level_transforms in zip(image.data, transforms, strict=True):
        by_type = {t["type"]: t for t in level_transforms}
        levels.append((tuple(data.shape), tuple(map(float, by_type["scale"]["scale"])),
                       tuple(map(float, by_type.get("translation", {}).get("translation", (0.0, 0.0, 0.0))))))
    return levels


def read_with_ngff_zarr(path: Path) -> Levels:
    import ngff_zarr

    try:
        multiscales = ngff_zarr.from_ngff_zarr(str(path), validate=True)  # the NGFF JSON schemas, then the data
    except Exception as exc:
        raise IndependentReadError(f"{path}: ngff-zarr refuses it: {type(exc).__name__}: {exc}") from exc
    levels: Levels = []
    for image in multiscales.images:
        if tuple(image.dims) != ("z", "y", "x") or set((image.axes_units or {}).values()) != {"nanometer"}:
            raise IndependentReadError(f"{path}: ngff-zarr reads axes {image.dims} in {image.axes_units}")
        levels.append((tuple(image.data.shape), tuple(float(image.scale[a]) for a in "zyx"),
                       tuple(float((image.translation or {}).get(a, 0.0)) for a in "zyx")))
    return levels


def check_neuroglancer_can_decode(path: Path) -> None:
    """Every level is an array Neuroglancer's zarr3 datasource decodes, with explicit little-endian bytes for
    multi-byte data, and the image's axes are lengths it converts."""
    group = _document(path / "zarr.json")
    multiscale = group["attributes"]["ome"]["multiscales"][0]
    for axis in multiscale["axes"]:
        if axis.get("type") != "space" or axis.get("unit") not in LENGTH_UNITS:
            raise IndependentReadError(f"{path}: axis {axis} is not a length Neuroglancer places in space")
    for dataset in multiscale["datasets"]:
        array = _document(path / dataset["path"] / "zarr.json")
        where = f"{path / dataset['path']}"
        if array.get("zarr_format") != 3 or array.get("node_type") != "array":
            raise IndependentReadError(f"{where}: not a Zarr v3 array")
        if array["data_type"] not in NEUROGLANCER_DATA_TYPES:
            raise IndependentReadError(f"{where}: data type {array['data_type']} is not one Neuroglancer displays")
        if array["chunk_key_encoding"]["name"] not in NEUROGLANCER_KEY_ENCODINGS:
            raise IndependentReadError(f"{where}: chunk key encoding {array['chunk_key_encoding']}")
        if array.get("dimension_names") not in (None, ["z", "y", "x"]):
            raise IndependentReadError(f"{where}: dimension names {array['dimension_names']}")
        _check_codecs(array["codecs"], np.dtype(array["data_type"]).itemsize, where)


def _check_codecs(codecs: list[dict[str, Any]], itemsize: int, where: str) -> None:
    for codec in codecs:
        name, configuration = codec["name"], codec.get("configuration") or {}
        if name not in NEUROGLANCER_CODECS:
            raise IndependentReadError(f"{where}: codec {name!r} is not one Neuroglancer decodes")
        if name == "bytes" and itemsize > 1 and configuration.get("endian") != "little":
            raise IndependentReadError(f"{where}: {itemsize}-byte data without little-endian bytes: {codec}")
        if name == "sharding_indexed":
            _check_codecs(configuration["codecs"], itemsize, where)
            _check_codecs(configuration["index_codecs"], 8, where)


def _document(path: Path) -> Any:
    return json.loads(path.read_text())
