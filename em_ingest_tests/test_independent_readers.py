"""The independent readers the source contract opens every published image with can fail: each refuses an
image broken in the way it is there to catch."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from em_ingest.replicas.epfl import EpflReplica
from em_ingest_tests.harness import workspace_for
from em_ingest_tests.independent import (
    IndependentReadError,
    check_neuroglancer_can_decode,
    check_published_image,
    read_with_ngff_zarr,
)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real image as em-ingest publishes it (EPFL replica, two levels), copied out of its version folder."""
    replica = EpflReplica().start()
    try:
        root = tmp_path_factory.mktemp("published")
        ws = workspace_for(root, replica)
        request = ws.pipeline.request("epfl", next(iter(replica.selection)))
        ws.pipeline.fetch_raw(request)
        ws.pipeline.convert(request)
        image = root / "image.ome.zarr"
        shutil.copytree((ws.data_root / "zarr" / "epfl" / f"{request.key}.ome.zarr").resolve(), image)
        return image
    finally:
        replica.stop()


def edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def multiscale(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["attributes"]["ome"]["multiscales"][0]


BREAKAGES: dict[str, tuple[str, Callable[[dict[str, Any]], None], str]] = {
    # name: (document, change, what the refusal says)
    "a unit that is no length": ("zarr.json", lambda d: multiscale(d)["axes"][2].update(unit="parsecs"), "parsecs"),
    "axes missing": ("zarr.json", lambda d: multiscale(d).pop("axes"), "axes"),
    "a level scaled differently": ("zarr.json", lambda d: multiscale(d)["datasets"][0]["coordinateTransformations"][0]
                                   .update(scale=[5.0, 5.0, 6.0]), "s0 scale"),
}


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_each_breakage_is_refused(published: Path, tmp_path: Path, name: str) -> None:
    image = tmp_path / "broken.ome.zarr"
    shutil.copytree(published, image)
    document, change, message = BREAKAGES[name]
    edit(image / document, change)
    with pytest.raises(IndependentReadError, match=message):
        check_published_image(image, voxel_size_nm=(5.0, 5.0, 5.0))


NEUROGLANCER_GAPS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "a codec it lacks": (lambda d: d["codecs"][0]["configuration"]["codecs"][1].update(name="lz4"), "lz4"),
    "a data type it lacks": (lambda d: d.update(data_type="float64"), "float64"),
    "bytes of unstated order": (lambda d: d.update(data_type="uint16"), "little-endian"),
    "v2 metadata": (lambda d: d.update(zarr_format=2), "not a Zarr v3 array"),
}


@pytest.mark.parametrize("name", list(NEUROGLANCER_GAPS))
def test_what_neuroglancer_cannot_decode_is_refused(published: Path, tmp_path: Path, name: str) -> None:
    image = tmp_path / "gap.ome.zarr"
    shutil.copytree(published, image)
    change, message = NEUROGLANCER_GAPS[name]
    edit(image / "s1" / "zarr.json", change)
    with pytest.raises(IndependentReadError, match=message):
        check_neuroglancer_can_decode(image)


def test_ngff_zarr_validates_against_the_schema(published: Path, tmp_path: Path) -> None:
    """ome-zarr-py reads an image without axes as t, c, z, y, x; ngff-zarr's schema check refuses it outright."""
    image = tmp_path / "no-axes.ome.zarr"
    shutil.copytree(published, image)
    edit(image / "zarr.json", lambda d: multiscale(d).pop("axes"))
    with pytest.raises(IndependentReadError, match="ngff-zarr refuses"):
        read_with_ngff_zarr(image)


def test_other_voxels_are_refused(published: Path) -> None:
    s0 = zarr.open_group(str(published), mode="r")["s0"][...]
    check_published_image(published, expected_s0=s0, voxel_size_nm=(5.0, 5.0, 5.0))  # the image as published
    other = s0.copy()
    other[3, 4, 5] ^= 1
    with pytest.raises(IndependentReadError, match="another s0"):
        check_published_image(published, expected_s0=other)
    with pytest.raises(IndependentReadError, match="another s0"):
        check_published_image(published, expected_s0=s0.astype(np.uint16))
