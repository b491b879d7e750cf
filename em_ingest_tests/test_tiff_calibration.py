"""TIFF calibrations (ImageJ, FEI/Thermo SEM) read by em-ingest's readers against tifffile as the reference.

The files are written here by tifffile, an independent writer, with the geometry of real files that were
checked by hand but whose licence and origin keep them out of this repository: an ImageJ 1.51d stack
(2 x 68 x 68 float32, big-endian, 168.67 nm pixels, 2.5 micron spacing; RosettaSciIO's test data), an
ImageJ 1.53f plane (250 x 250 uint16, 325 nm pixels; pyimagej's sample), and a Helios NanoLab 660 SEM image
(512 x 471 pixels of which 442 rows are the scan and 29 the data bar, 3372.4 nm pixels). tifffile's
`imagej_metadata`, resolution tags and `fei_metadata` say what each file states, and the expected voxel
size in nanometres is worked out here from those, with a unit table of the test's own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from em_ingest.formats import tiff
from em_ingest.formats.stack import PlaneStack
from em_ingest.formats.tiff import TiffStack
from em_ingest.replicas.idr import IdrReplica
from em_ingest.sources.empiar import open_files
from em_ingest_tests.harness import workspace_for

FEI_TEXT = ("[User]\nDate=11/10/2017\n[System]\nSystemType=Helios NanoLab 660\n"
            "[Scan]\nPixelWidth=3.3724e-06\nPixelHeight=3.3724e-06\nHorFieldsize=0.0017267\n"
            "[Image]\nResolutionX=512\nResolutionY=442\n")


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiff-samples")
    rng = np.random.default_rng(11)
    paths = {"imagej_stack": root / "imagej_stack.tif", "imagej_plane": root / "imagej_plane.tif"}
    tifffile.imwrite(paths["imagej_stack"], rng.random((2, 68, 68), dtype=np.float32).astype(">f4"), imagej=True,
                     byteorder=">", resolution=(1 / 0.16867, 1 / 0.16867),
                     metadata={"unit": "micron", "spacing": 2.5, "axes": "ZYX"})
    tifffile.imwrite(paths["imagej_plane"], rng.integers(0, 65535, (250, 250), dtype=np.uint16), imagej=True,
                     byteorder=">", resolution=(1 / 0.325, 1 / 0.325), metadata={"unit": "micron"})
    for dtype in ("uint8", "uint16"):
        page = rng.integers(0, 200, (471, 512)).astype(dtype)
        paths[f"fei_{dtype}"] = root / f"fei_{dtype}.tif"
        tifffile.imwrite(paths[f"fei_{dtype}"], page, extratags=[(34682, "s", 0, FEI_TEXT, True)])
    return paths


# The reference's own units: ImageJ spells the micrometre "micron" (or "µm", escaped); FEI writes metres.
NM_PER_IMAGEJ_UNIT = {"micron": 1000.0, "µm": 1000.0, "um": 1000.0, "nm": 1.0}
NM_PER_METRE = 1e9


def imagej_reference(path: Path) -> tuple[np.ndarray, tuple[float | None, float, float], dict]:
    """(pixels as (z, y, x), voxel size (z, y, x) in nm with z None if unstated, resolution tags) per tifffile."""
    with tifffile.TiffFile(path) as tif:
        metadata = tif.imagej_metadata
        page = tif.pages.first
        tags = {name: page.tags[name].value for name in ("XResolution", "YResolution", "ResolutionUnit")}
        pixels = tif.asarray()
    assert metadata is not None and tags["ResolutionUnit"] == 1  # no TIFF unit: ImageJ's `unit=` applies
    nm = NM_PER_IMAGEJ_UNIT[metadata["unit"]]
    (x_num, x_den), (y_num, y_den) = tags["XResolution"], tags["YResolution"]  # pixels per unit
    z = metadata["spacing"] * nm if "spacing" in metadata else None
    return pixels.reshape((-1, *pixels.shape[-2:])), (z, nm * y_den / y_num, nm * x_den / x_num), metadata


def fei_reference(path: Path) -> tuple[np.ndarray, tuple[float, float], int]:
    """(scanned pixels as (1, y, x), pixel size (y, x) in nm, the page's full height) per tifffile's FEI reading."""
    with tifffile.TiffFile(path) as tif:
        assert tif.is_fei
        fei = tif.fei_metadata
        page = tif.pages.first.asarray()
    rows = fei["Image"]["ResolutionY"]  # rows scanned; the page's rows below them are the data bar
    assert fei["Image"]["ResolutionX"] == page.shape[1]
    pixel = (fei["Scan"]["PixelHeight"] * NM_PER_METRE, fei["Scan"]["PixelWidth"] * NM_PER_METRE)
    return page[np.newaxis, :rows], pixel, page.shape[0]


def _all(volume) -> np.ndarray:
    return volume.read(tuple(slice(0, n) for n in volume.shape))


# ---- an ImageJ stack ---------------------------------------------------------------------------

def test_imagej_stack_as_an_empiar_single_file_keeps_its_calibration(samples):
    IMAGEJ_STACK = samples["imagej_stack"]
    pixels, voxel_nm, metadata = imagej_reference(IMAGEJ_STACK)
    assert metadata["unit"] == "micron" and metadata["spacing"] == 2.5
    # The API's pixel size is only a fallback: a TIFF that states its calibration wins.
    with open_files([IMAGEJ_STACK], (1.0, 1.0), name="empiar/real") as volume:
        assert isinstance(volume, TiffStack)
        assert volume.shape == pixels.shape == (2, 68, 68)
        assert volume.dtype == pixels.dtype.newbyteorder("=") == np.dtype("float32")  # big-endian on disk
        np.testing.assert_array_equal(_all(volume), pixels)
        assert volume.geometry is not None and volume.geometry.voxel_size_origin == "source-metadata"
        assert volume.geometry.voxel_size_nm == pytest.approx(voxel_nm)  # z 2500, y = x 168.67 nm
        assert (volume.pixel_size_from, volume.z_spacing_from) == ("file", "file")
    calibration = tiff.read_calibration(IMAGEJ_STACK)
    assert calibration is not None and calibration.stated_by == "imagej" and calibration.planes == 2
    assert calibration.voxel_size_nm == pytest.approx(voxel_nm)


def test_imagej_stack_planes_as_an_empiar_slice_series(samples, tmp_path):
    """Each plane in a file of its own, with the stack's resolution tags and description values."""
    IMAGEJ_STACK = samples["imagej_stack"]
    pixels, voxel_nm, metadata = imagej_reference(IMAGEJ_STACK)
    with tifffile.TiffFile(IMAGEJ_STACK) as tif:
        resolution = (tif.pages.first.tags["XResolution"].value, tif.pages.first.tags["YResolution"].value)
    for z, plane in enumerate(pixels):
        tifffile.imwrite(tmp_path / f"slice_{z + 1}.tif", plane, imagej=True, byteorder=">", resolution=resolution,
                         metadata={"unit": metadata["unit"], "spacing": metadata["spacing"]})
    with open_files(sorted(tmp_path.glob("*.tif")), None, name="empiar/slices") as volume:
        assert isinstance(volume, PlaneStack)
        assert volume.shape == pixels.shape and volume.dtype == np.dtype("float32")
        np.testing.assert_array_equal(_all(volume), pixels)
        assert volume.geometry is not None and volume.geometry.voxel_size_nm == pytest.approx(voxel_nm)
        assert (volume.pixel_size_from, volume.z_spacing_from) == ("file", "file")


def test_imagej_stack_as_an_idr_original_end_to_end(samples, fresh_replica, tmp_path):
    IMAGEJ_STACK = samples["imagej_stack"]
    pixels, voxel_nm, _ = imagej_reference(IMAGEJ_STACK)
    replica = fresh_replica("idr")
    assert isinstance(replica, IdrReplica)
    replica.set_original(replica.U2OS, IMAGEJ_STACK.read_bytes())  # OMERO still says 20 nm: the file wins
    ws = workspace_for(tmp_path, replica, selection={"idr": {"9846137": {}}})
    pipeline = ws.pipeline
    request, source = pipeline.request("idr", "9846137"), pipeline.source("idr")
    raw = pipeline.raw_store(request, source)
    source.fetch_raw(request, raw)
    with source.open_volume(request, raw) as volume:
        assert volume.shape == pixels.shape
        np.testing.assert_array_equal(_all(volume), pixels)
        assert volume.geometry.voxel_size_nm == pytest.approx(voxel_nm)
    extra = source.describe(request, raw).extra
    assert extra["voxel_size_nm_file"] == pytest.approx(list(voxel_nm))
    assert extra["voxel_size_nm_omero"] == pytest.approx([20.0, 20.0, 20.0])
    assert "voxel_size_note" in extra
    json.dumps(extra)  # stays JSON for the catalog


# ---- a single ImageJ plane -----------------------------------------------------------------------

def test_imagej_plane_as_slices_and_as_a_single_image(samples, tmp_path):
    IMAGEJ_PLANE = samples["imagej_plane"]
    pixels, (z, y, x), _ = imagej_reference(IMAGEJ_PLANE)
    assert z is None  # ImageJ writes no spacing for one image
    assert pixels.shape == (1, 250, 250) and pixels.dtype == np.dtype("uint16")
    assert IMAGEJ_PLANE.read_bytes()[:2] == b"MM"  # big-endian on disk, as ImageJ writes
    # EMPIAR: one 2-D file is a one-slice series; its xy is the file's, and nothing states z.
    with open_files([IMAGEJ_PLANE], (1.0, 1.0), name="empiar/plane") as volume:
        assert isinstance(volume, PlaneStack) and volume.shape == pixels.shape
        np.testing.assert_array_equal(_all(volume), pixels)
        assert volume.planes[0].pixel_size_nm == pytest.approx((y, x))  # 325 nm, not the API's 1 nm
        assert (volume.pixel_size_from, volume.z_spacing_from, volume.geometry) == ("file", None, None)
    # Three copies as slices, the slice spacing from the archive.
    copies = [shutil.copy(IMAGEJ_PLANE, tmp_path / f"z{i}.tif") for i in range(3)]
    series = PlaneStack(copies, fallback_z_spacing_nm=50.0)
    np.testing.assert_array_equal(_all(series), np.repeat(pixels, 3, axis=0))
    assert series.geometry.voxel_size_nm == pytest.approx((50.0, y, x))
    # IDR: a 2-D original is one slice as thick as its pixel is wide.
    with TiffStack(IMAGEJ_PLANE) as stack:
        assert stack.geometry.voxel_size_nm == pytest.approx((x, y, x))


# ---- FEI/Thermo SEM images ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_fei_sem_tiff_gives_its_pixel_size_and_leaves_the_data_bar_out(samples, dtype, tmp_path):
    path = samples[f"fei_{dtype}"]
    scanned, pixel_nm, page_rows = fei_reference(path)
    assert scanned.shape == (1, 442, 512) and page_rows == 471  # 29 rows of data bar under the scan
    assert pixel_nm == pytest.approx((3372.4, 3372.4))
    calibration = tiff.read_calibration(path)
    assert calibration is not None and calibration.stated_by == "fei" and calibration.z_spacing_nm is None
    assert calibration.pixel_size_nm == pytest.approx(pixel_nm)
    # The EMPIAR single-file path: one 2-D image, so a one-slice series.
    with open_files([path], None, name="empiar/fei") as volume:
        assert isinstance(volume, PlaneStack)
        assert volume.shape == scanned.shape and volume.dtype == scanned.dtype
        np.testing.assert_array_equal(_all(volume), scanned)
        assert (volume.pixel_size_from, volume.z_spacing_from, volume.geometry) == ("file", None, None)
    # A slice series of the file: xy from FEI, z from the archive (FEI states no slice spacing).
    copies = [shutil.copy(path, tmp_path / f"slice_{i}.tif") for i in (1, 2, 10)]
    series = PlaneStack(copies, fallback_z_spacing_nm=30.0)
    assert series.shape == (3, 442, 512)
    np.testing.assert_array_equal(series.read((slice(1, 3), slice(400, 442), slice(0, 512))),
                                  np.repeat(scanned[:, 400:442], 2, axis=0))
    assert series.geometry.voxel_size_nm == pytest.approx((30.0, *pixel_nm))


# ---- rules, on files made here (tifffile writing as ImageJ does) ---------------------------------------

def test_imagej_calibration_wins_over_fei_and_plain_resolution_tags_are_none(tmp_path):
    """Generated files, not real ones: the order of the calibration rules."""
    image = np.arange(6 * 8, dtype=np.uint8).reshape(6, 8)
    fei = (34682, "s", 0, "[Scan]\nPixelWidth=6.5e-08\nPixelHeight=6.5e-08\n", True)
    both = tmp_path / "both.tif"
    tifffile.imwrite(both, image, imagej=True, resolution=(0.5, 0.5), metadata={"unit": "nm"}, extratags=[fei])
    calibration = tiff.read_calibration(both)
    assert calibration is not None and calibration.stated_by == "imagej"
    assert calibration.pixel_size_nm == pytest.approx((2.0, 2.0))  # 0.5 pixels per nm
    uncalibrated = tmp_path / "uncalibrated_imagej.tif"  # ImageJ's "pixel" unit: FEI's word counts
    tifffile.imwrite(uncalibrated, image, imagej=True, metadata={"unit": "pixel"}, extratags=[fei])
    assert tiff.read_calibration(uncalibrated).pixel_size_nm == pytest.approx((65.0, 65.0))
    dpi = tmp_path / "dpi.tif"  # a screen's 72 dpi says nothing about the specimen
    tifffile.imwrite(dpi, np.stack([image, image]), resolution=(72, 72), resolutionunit="INCH")
    assert tiff.read_calibration(dpi) is None
    # A multipage TIFF that states nothing: the EMPIAR API's pixel size, and z needs an override.
    with open_files([dpi], (65.0, 65.0), name="empiar/plain") as volume:
        assert isinstance(volume, TiffStack) and volume.geometry is None
        assert (volume.pixel_size_from, volume.z_spacing_from) == ("archive", None)


def test_fei_metres_become_the_nearest_decimal_nanometres(tmp_path):
    """7.9983e-09 m is 7.9983 nm exactly as printed, not the 7.998299999999999 of multiplying by 1e9."""
    assert 7.9983e-09 * 1e9 != 7.9983  # the noise a plain product leaves in the catalog
    path = tmp_path / "fei_fine.tif"
    tifffile.imwrite(path, np.zeros((4, 6), np.uint8),
                     extratags=[(34682, "s", 0, "[Scan]\nPixelWidth=7.9983e-09\nPixelHeight=2.4e-09\n", True)])
    calibration = tiff.read_calibration(path)
    assert calibration is not None and calibration.pixel_size_nm == (2.4, 7.9983)
