"""Labels (ground truth, segmentations) as OME-Zarr labels of their image: mode pyramids that never invent a
value, ids of any width kept exactly, placement in physical space, refresh, and what is refused."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from em_ingest.errors import SelectionError, UnsupportedDataError
from em_ingest.formats.label import LabelImage
from em_ingest.formats.volume import ArrayVolume, Geometry
from em_ingest.omezarr.labels import write_labels
from em_ingest.omezarr.pyramid import downsample_labels
from em_ingest.omezarr.validate import validate_ome_zarr
from em_ingest.omezarr.writer import ZarrLayout, write_ome_zarr
from em_ingest_tests.harness import workspace_for
from em_ingest_tests.independent import check_published_labels

KEY = "hippocampus-training"
LAYOUT = ZarrLayout(chunks=(8, 8, 8), chunks_per_shard=(2, 2, 2))


def mode_by_hand(block: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Each window's most frequent value, smallest on a tie, over the voxels the window has (plain Python)."""
    out_shape = tuple(-(-n // f) for n, f in zip(block.shape, factors))
    out = np.zeros(out_shape, block.dtype)
    for index in itertools.product(*map(range, out_shape)):
        window = block[tuple(slice(i * f, (i + 1) * f) for i, f in zip(index, factors))].ravel().tolist()
        out[index] = min(set(window), key=lambda v: (-window.count(v), v))
    return out


@settings(max_examples=60, deadline=None)
@given(block=hnp.arrays(st.sampled_from([np.uint8, np.uint16, np.int32, np.uint64]),
                        hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=7),
                        elements=st.integers(0, 3)),
       factors=st.sampled_from([(2, 2, 2), (1, 2, 2), (2, 1, 1), (1, 1, 2)]))
def test_downsampling_takes_each_windows_mode(block, factors):
    np.testing.assert_array_equal(downsample_labels(block, factors), mode_by_hand(block, factors))


def test_a_majority_survives_and_a_tie_goes_to_the_smaller_id():
    block = np.array([[[7, 7], [7, 1]], [[9, 9], [9, 9]]], np.uint64).reshape(1, 4, 2)
    assert downsample_labels(block, (1, 2, 2)).ravel().tolist() == [7, 9]
    tie = np.array([5, 3, 3, 5], np.uint8).reshape(1, 2, 2)
    assert downsample_labels(tie, (1, 2, 2)).ravel().tolist() == [3]


def image_and_label(tmp_path: Path, ids: np.ndarray, label_geometry: Geometry | None = None):
    image = np.random.default_rng(0).integers(0, 255, (20, 36, 28), dtype=np.uint8)
    geometry = Geometry((30.0, 4.0, 4.0), "source-metadata", (100.0, 0.0, -8.0))
    dest = tmp_path / "image.ome.zarr"
    result = write_ome_zarr(ArrayVolume(image, geometry), geometry, dest, name="test/image", layout=LAYOUT)
    label = LabelImage("cells", ArrayVolume(ids, name="ids.npy"), "ids.npy", label_geometry, {1: (255, 0, 0, 255)})
    written = write_labels(dest, [label], result, geometry, image_name="test/image", layout=LAYOUT)
    return dest, result, written


def test_uint64_ids_survive_exactly_at_every_level(tmp_path):
    rng = np.random.default_rng(1)
    # Large ids (above 2**53, where a float would round them) in blobs, so coarse levels keep several.
    ids = (np.uint64(2**64 - 1) - rng.integers(0, 4, (20, 36, 28)).astype(np.uint64) * np.uint64(2**60 + 3))
    dest, image, (written,) = image_and_label(tmp_path, ids)
    levels = zarr.open_group(str(dest / "labels" / "cells"), mode="r")
    assert [levels[p.path].shape for p in image.levels] == [lv.shape for lv in image.levels]
    np.testing.assert_array_equal(levels["s0"][...], ids)
    present = set(np.unique(ids).tolist())
    for level in image.levels[1:]:
        assert levels[level.path].dtype == np.uint64 and set(np.unique(levels[level.path][...]).tolist()) <= present
    assert written.catalog_entry()["distinct_values"] == len(present) and written.distinct_values_exact
    # On the image's grid the label sits level for level where the image does.
    label_summary, image_summary = validate_ome_zarr(dest / "labels" / "cells"), validate_ome_zarr(dest)
    assert image_summary.labels == ("cells",)
    assert (label_summary.scales_nm, label_summary.translations_nm) == (image_summary.scales_nm,
                                                                        image_summary.translations_nm)
    attrs = zarr.open_group(str(dest / "labels" / "cells"), mode="r").attrs["ome"]
    assert attrs["image-label"] == {"source": {"image": "../../"},
                                    "colors": [{"label-value": 1, "rgba": [255, 0, 0, 255]}]}
    check_published_labels(dest, {"cells": (ids, ((30.0, 4.0, 4.0), (100.0, 0.0, -8.0)))})


def test_a_coarser_label_keeps_its_own_placement_and_the_images_level_count(tmp_path):
    ids = np.repeat(np.arange(5, dtype=np.uint32), 2)[:, None, None] * np.ones((1, 9, 7), np.uint32)  # 10 x 9 x 7
    coarse = Geometry((60.0, 8.0, 8.0), "source-metadata", (115.0, 2.0, -6.0))  # 2x the image's voxel, centred
    dest, image, (written,) = image_and_label(tmp_path, ids, coarse)
    summary = validate_ome_zarr(dest / "labels" / "cells")
    assert summary.shapes[0] == (10, 9, 7) and len(summary.paths) == len(image.levels)
    assert summary.scales_nm[0] == (60.0, 8.0, 8.0) and summary.translations_nm[0] == (115.0, 2.0, -6.0)
    assert written.catalog_entry()["scale_nm"] == [60.0, 8.0, 8.0]


def test_what_is_no_label_is_refused(tmp_path):
    with pytest.raises(UnsupportedDataError, match=r"label 'cells' \(ids.npy\) is \(20, 36, 29\) voxels .* image is "
                                                   r"\(20, 36, 28\)"):
        image_and_label(tmp_path, np.zeros((20, 36, 29), np.uint8))
    with pytest.raises(UnsupportedDataError, match=r"label 'cells' \(ids.npy\) holds float32 values"):
        image_and_label(tmp_path / "float", np.zeros((20, 36, 28), np.float32))


@pytest.mark.parametrize(("labels", "message"), [
    ({"..": "training_groundtruth.tif"}, r"label name '\.\.' must be"),
    ({"mito": "../secret.tif"}, r"unsafe remote name '\.\./secret.tif'"),
    ({"mito": "training_groundtruth.png"}, "expected a TIFF file name"),
    ({"mito": " "}, "'mito' names no place in the source"),
])
def test_bad_label_options_are_refused_naming_them(tmp_path, fresh_replica, labels, message):
    replica = fresh_replica("epfl")
    ws = workspace_for(tmp_path, replica, selection={"epfl": {KEY: {"file": "training.tif", "labels": labels}}})
    with pytest.raises(SelectionError, match=message) as info:
        ws.pipeline.selection()
    assert KEY in str(info.value)


def test_a_changed_ground_truth_alone_is_fetched_and_written_again(tmp_path, fresh_replica):
    replica = fresh_replica("epfl")
    ws = workspace_for(tmp_path, replica, selection={"epfl": {KEY: replica.selection[KEY]}})
    request = ws.pipeline.request("epfl", KEY)
    first = ws.pipeline.fetch_raw(request)
    assert first.stats.fetched_objects == 2  # the image and its mask
    ws.pipeline.convert(request)
    mask = replica.expected[KEY].labels["mitochondria"][0].copy()
    mask[:, :10, :10] = 255  # a curator's correction
    replica.set_file("training_groundtruth.tif", mask)
    second = ws.pipeline.fetch_raw(request)
    assert (second.stats.fetched_objects, second.stats.skipped_objects) == (1, 1)
    conversion = ws.pipeline.convert(request)
    assert not conversion.skipped
    path = ws.data_root / "zarr" / "epfl" / f"{KEY}.ome.zarr"
    np.testing.assert_array_equal(zarr.open_group(str(path / "labels" / "mitochondria"), mode="r")["s0"][...], mask)
    assert json.loads(conversion.row["extra_json"])["labels"]["mitochondria"]["origin"] == "training_groundtruth.tif"


# ---- OpenOrganelle: a segmentation group of the same container, at a coarser level ----------------------

NACC = "jrc_mus-nacc-2"


def test_a_changed_segmentation_chunk_alone_is_fetched_and_written_again(tmp_path, fresh_replica):
    from em_ingest.replicas.openorganelle import NACC_NUC, zarr_chunk

    replica = fresh_replica("openorganelle")
    ws = workspace_for(tmp_path, replica, selection={"openorganelle": {NACC: replica.selection[NACC]}})
    request = ws.pipeline.request("openorganelle", NACC)
    ws.pipeline.fetch_raw(request)
    ws.pipeline.convert(request)
    label = next(i for i in replica.images if i.is_label and i.image == NACC_NUC)
    ids = label.levels[0]
    ids[16:20, 32:64, 32:64] = np.uint64(2**64 - 2)  # one chunk of s0 (16 x 32 x 32) gets a new id
    codec = numcodecs.get_codec(label.compressor)
    replica.moto.put(f"{label.prefix}/s0/1/1/1", zarr_chunk(ids, label.chunks, (1, 1, 1), codec))
    replica._set_expected(NACC)
    second = ws.pipeline.fetch_raw(request)
    assert second.stats.fetched_objects == 1  # that chunk; the image and the label's metadata are unchanged
    assert not ws.pipeline.convert(request).skipped
    path = ws.data_root / "zarr" / "openorganelle" / f"{NACC}.ome.zarr"
    check_published_labels(path, replica.expected[NACC].labels)
    assert 2**64 - 2 in np.unique(zarr.open_group(str(path / "labels" / "nuc"), mode="r")["s0"][...]).tolist()


@pytest.mark.parametrize(("place", "message"), [
    ("labels/mito_seg", r"label 'mito' \(.*labels/mito_seg\): not a multiscale group"),
    ({"group": "labels/mito_seg", "level": "s0"}, r"label 'mito' .*states no voxel size"),
    ({"group": "labels/mito_seg", "level": "s3"}, r"label 'mito': level 's3' is not an array of .*labels/mito_seg"),
])
def test_a_label_that_cannot_be_placed_is_refused_naming_it(tmp_path, fresh_replica, place, message):
    """The N5 dataset's segmentation is a bare array, with no multiscale attributes and no voxel size."""
    replica = fresh_replica("openorganelle")
    ws = workspace_for(tmp_path, replica, selection={"openorganelle": {"jrc_sum159-1": {"labels": {"mito": place}}}})
    with pytest.raises(SelectionError, match=message):
        ws.pipeline.fetch_raw(ws.pipeline.request("openorganelle", "jrc_sum159-1"))
