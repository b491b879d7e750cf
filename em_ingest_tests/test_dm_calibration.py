"""DigitalMicrograph calibrations read by em-ingest and, as the reference, by ncempy: shape, dtype, every
pixel, and each axis's scale, units and first-pixel position in numpy order (z, y, x).

The files are written by the replicas' DM writer with the calibrations of real Gatan-written test files
(openNCEM's `dmTest_3D_int16_64,65,66`: x 2 pm, y 3 nm, z 4 µm; `dmTest_float32_nonSquare_diffPixelSize`:
x 1 nm, y 2 Å; RosettaSciIO's `test_STEM_image`: origin -207, -171 px; `test-23`: an RGBA image;
`EELS_SI`: a spectrum image). The reader was checked against those real files, which their GPL licence and
origin keep out of this repository; ncempy, an independent reader, checks every file here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ncempy.io.dm import dmReader

from em_ingest.errors import UnsupportedDataError
from em_ingest.formats.dm import read_dm
from em_ingest.formats.stack import PlaneStack
from em_ingest.formats.volume import ArrayVolume
from em_ingest.replicas.dm_writer import dm_bytes
from em_ingest.sources.empiar import _single_file_volume

# Nanometres per unit as these files spell them: the test's own table, independent of em_ingest.formats.units.
NM_PER = {"nm": 1.0, "Å": 0.1, "pm": 1e-3, "µm": 1e3}
STACK_CALIBRATION = ((4.0, "µm", 0.0), (3.0, "nm", 0.0), (2.0, "pm", 0.0))  # z, y, x


def write(tmp_path: Path, name: str, image: np.ndarray, **options: Any) -> Path:
    path = tmp_path / name
    path.write_bytes(dm_bytes(image, version=4 if name.endswith(".dm4") else 3, **options))
    return path


def stack() -> np.ndarray:
    # The pixel value is its x index, as in openNCEM's test stack: x must come out as the fastest axis.
    return np.broadcast_to(np.arange(64, dtype=np.int16), (66, 65, 64)).copy()


@pytest.mark.parametrize("name", ["stack.dm3", "stack.dm4"])
def test_3d_dm_is_a_volume_with_its_own_z_calibration(tmp_path: Path, name: str) -> None:
    """A single 3-D DM file in an EMPIAR entry becomes a volume whose voxel size is the file's, z included,
    without asking the curator; the archive's xy (here a made-up 9 nm) does not override the file's."""
    path = write(tmp_path, name, stack(), calibrations=STACK_CALIBRATION)
    reference = dmReader(str(path))
    expected_nm = tuple(s * NM_PER[str(u)] for s, u in zip(reference["pixelSize"], reference["pixelUnit"]))
    volume = _single_file_volume(path, (9.0, 9.0))
    assert isinstance(volume, ArrayVolume)
    assert volume.shape == reference["data"].shape == (66, 65, 64) and volume.dtype == reference["data"].dtype
    assert volume.geometry is not None and volume.geometry.voxel_size_origin == "source-metadata"
    assert volume.geometry.voxel_size_nm == pytest.approx(expected_nm)
    assert expected_nm == pytest.approx((4000.0, 3.0, 0.002))
    np.testing.assert_array_equal(volume.read((slice(0, 66), slice(0, 65), slice(0, 64))), reference["data"])
    region = volume.read((slice(10, 12), slice(30, 33), slice(0, 64)))
    np.testing.assert_array_equal(region, np.broadcast_to(np.arange(64, dtype=np.int16), (2, 3, 64)))


def test_uncalibrated_3d_dm_leaves_the_voxel_size_to_the_curator(tmp_path: Path) -> None:
    """Scale 1 without a unit is GMS's "uncalibrated": no voxel size, not 1 nm."""
    z, y, x = np.indices((2, 2, 2))
    path = write(tmp_path, "uncalibrated.dm3", (1 + x + 2 * y + 4 * z).astype(np.int16), thumbnail=False,
                 calibrations=((1.0, "", 0.0),) * 3)
    image = read_dm(path)
    np.testing.assert_array_equal(image.array(), dmReader(str(path))["data"])
    assert (image.pixel_size_nm, image.slice_spacing_nm, image.translation_nm) == (None, None, None)
    volume = _single_file_volume(path, None)
    assert isinstance(volume, ArrayVolume) and volume.geometry is None


@pytest.mark.parametrize("name", ["non_square.dm3", "non_square.dm4"])
def test_non_square_pixels_keep_y_and_x_apart(tmp_path: Path, name: str) -> None:
    plane = np.random.default_rng(3).random((64, 128), dtype=np.float32)
    path = write(tmp_path, name, plane, calibrations=((2.0, "Å", 0.0), (1.0, "nm", 0.0)))
    reference = dmReader(str(path))
    image = read_dm(path)
    np.testing.assert_array_equal(image.array(), reference["data"])
    assert image.pixel_size_nm == pytest.approx((0.2, 1.0))
    assert tuple(s * NM_PER[str(u)] for s, u in zip(reference["pixelSize"], reference["pixelUnit"])) == \
        pytest.approx(image.pixel_size_nm)


def test_2d_dm_files_stack_with_their_own_pixel_size(tmp_path: Path) -> None:
    planes = np.random.default_rng(4).random((2, 64, 128), dtype=np.float32)
    files = [write(tmp_path, f"slice_{i}.dm3", planes[i], calibrations=((2.0, "Å", 0.0), (1.0, "nm", 0.0)))
             for i in range(2)]
    stack_ = PlaneStack(files, fallback_z_spacing_nm=50.0)
    assert stack_.geometry is not None and stack_.geometry.voxel_size_nm == pytest.approx((50.0, 0.2, 1.0))
    assert (stack_.pixel_size_from, stack_.z_spacing_from) == ("file", "archive")
    np.testing.assert_array_equal(stack_.read((slice(0, 2), slice(0, 64), slice(0, 128))), planes)


def test_origin_places_the_first_pixel(tmp_path: Path) -> None:
    """DM puts pixel i at (i - Origin) x Scale: the STEM image's Origin -171 (y), -207 (x) pixels."""
    scale = 0.24853802
    path = write(tmp_path, "stem.dm3", np.zeros((68, 68), np.float32),
                 calibrations=((scale, "nm", -171.0), (scale, "nm", -207.0)))
    reference = dmReader(str(path))
    image = read_dm(path)
    assert image.translation_nm == pytest.approx((42.5, 51.4474), abs=1e-3)
    assert (float(reference["coords"][0][0]), float(reference["coords"][1][0])) == pytest.approx(
        image.translation_nm, abs=1e-3)


def test_3d_origin_places_the_volume(tmp_path: Path) -> None:
    """A 3-D DM file's origins (pixels) become the volume's translation, z included, as ncempy's coordinates say."""
    path = write(tmp_path, "placed.dm4", stack(), calibrations=((4.0, "µm", 2.0), (3.0, "nm", -10.0), (2.0, "pm", 0.0)))
    reference = dmReader(str(path))
    volume = _single_file_volume(path, None)
    assert volume.geometry is not None and volume.geometry.translation_nm == (-8000.0, 30.0, 0.0)
    first_nm = tuple(float(c[0]) * NM_PER[str(u)] for c, u in zip(reference["coords"], reference["pixelUnit"]))
    assert first_nm == pytest.approx(volume.geometry.translation_nm)


@pytest.mark.parametrize("name", ["colour.dm3", "colour.dm4"])
def test_rgba_dm_image_is_refused_as_a_colour_image(tmp_path: Path, name: str) -> None:
    rgba = np.random.default_rng(5).integers(0, 255, (32, 40, 4), dtype=np.uint8)
    path = write(tmp_path, name, rgba, rgba=True)
    with pytest.raises(UnsupportedDataError, match=r"RGB\(A\) colour image \(DM DataType 23\)") as info:
        read_dm(path)
    assert name in str(info.value) and "thumbnail" not in str(info.value)


def test_spectrum_image_is_refused_rather_than_read_as_a_volume(tmp_path: Path) -> None:
    """Its third axis is energy loss: taking it for z (and asking the curator for a z spacing) would be wrong."""
    data = np.zeros((64, 2, 2), np.float32)
    path = write(tmp_path, "eels.dm4", data, calibrations=((1.0, "eV", 0.0), (0.5, "µm", 0.0), (0.5, "µm", 0.0)))
    assert list(dmReader(str(path))["pixelUnit"]) == ["eV", "µm", "µm"]
    for read in (read_dm, lambda p: _single_file_volume(p, None)):
        with pytest.raises(UnsupportedDataError, match=r"z axis is calibrated in 'eV', not a length") as info:
            read(path)
        assert "eels.dm4" in str(info.value)
