"""Real EMDB maps (shipped in mrcfile's source distribution, CC0) read by em-ingest and, as the reference, by
mrcfile: shape, dtype, every voxel in (z, y, x), voxel size and origin in nm, whatever MAPC/MAPR/MAPS say."""

from __future__ import annotations

import itertools
import tracemalloc
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from em_ingest.errors import FormatError, UnsupportedDataError
from em_ingest.formats.mrc import MrcVolume, read_mrc_header
from em_ingest.formats.stack import PlaneStack
from em_ingest.formats.units import lengths_nm, nm_per_unit, to_nm
from em_ingest.replicas.empiar import mrc_bytes

DATA = Path(__file__).parent / "data" / "real" / "mrc"
EMD_3001 = DATA / "EMD-3001.map"  # MicroED, space group P21: MAPC/MAPR/MAPS = 3, 1, 2 and beta = 94.326°
EMD_3197 = DATA / "EMD-3197.map"  # sub-tomogram average, standard axes, 11.4 Å cubic voxels
# Voxel sizes (z, y, x) in nm worked out by hand from each header's CELLA / (MX, MY, MZ), in Å:
# EMD-3001: x 17.93 / 40 = 0.44825, y 4.71 / 12 = 0.3925, z 33.03 / 72 = 0.45875; EMD-3197: 228 / 20 = 11.4.
VOXEL_NM = {EMD_3001: (0.045875, 0.03925, 0.044825), EMD_3197: (1.14, 1.14, 1.14)}
# Where voxel 0 sits, (z, y, x) nm, by hand: ORIGIN is zero in both, so the grid start times the voxel size.
# EMD-3001 starts columns (z) at 0, rows (x) at -21, sections (y) at -12; EMD-3197 starts columns (x) at -2.
ORIGIN_NM = {EMD_3001: (0.0, -12 * 0.03925, -21 * 0.044825), EMD_3197: (0.0, 0.0, -2 * 1.14)}
SHAPE_ZYX = {EMD_3001: (73, 25, 43), EMD_3197: (20, 20, 20)}
ALL_ORDERS = list(itertools.permutations((1, 2, 3)))


def reference(path: Path) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, float, float]]:
    """The map as mrcfile reads it, put in (z, y, x) by sending each stored voxel to its own x, y, z index
    (a scatter, not the transpose em-ingest uses), with mrcfile's voxel size and origin (x, y, z) in Å."""
    with mrcfile.open(path, permissive=True) as mrc:
        data = np.array(mrc.data)
        header = mrc.header
        voxel = mrc.voxel_size
        voxel_a = (float(voxel.x), float(voxel.y), float(voxel.z))
        origin_a = (float(header.origin.x), float(header.origin.y), float(header.origin.z))
        axis_of = {"columns": int(header.mapc), "rows": int(header.mapr), "sections": int(header.maps)}
    if data.ndim == 2:
        data = data[np.newaxis]
    sections, rows, columns = np.indices(data.shape)
    index_along = {axis_of["columns"]: columns, axis_of["rows"]: rows, axis_of["sections"]: sections}
    length_along = {axis_of["columns"]: data.shape[2], axis_of["rows"]: data.shape[1], axis_of["sections"]: data.shape[0]}
    zyx = np.zeros((length_along[3], length_along[2], length_along[1]), dtype=data.dtype.newbyteorder("="))
    zyx[index_along[3], index_along[2], index_along[1]] = data
    return zyx, voxel_a, origin_a


def write_copy(path: Path, zyx: np.ndarray, axes_crs: tuple[int, int, int], *, cell_a: tuple[float, float, float],
               grid: tuple[int, int, int], origin_a: tuple[float, float, float] = (0.0, 0.0, 0.0),
               angles: tuple[float, float, float] = (90.0, 90.0, 90.0),
               stated_axes: tuple[int, int, int] | None = None) -> None:
    """Write (z, y, x) voxels with mrcfile (an independent writer) stored in the given MAPC, MAPR, MAPS order;
    cell (x, y, z) in Å over grid intervals (MX, MY, MZ) along x, y, z, as the MRC format defines them.
    `stated_axes` writes other MAPC, MAPR, MAPS values than the storage order (a broken or unset header)."""
    mapc, mapr, maps = axes_crs
    zyx_axis = {3: 0, 2: 1, 1: 2}
    stored = np.ascontiguousarray(zyx.transpose(zyx_axis[maps], zyx_axis[mapr], zyx_axis[mapc]))
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(stored if stored.shape[0] > 1 else stored[0])
        header = mrc.header
        header.mapc, header.mapr, header.maps = stated_axes or axes_crs
        header.mx, header.my, header.mz = grid
        header.cella = cell_a
        header.cellb = angles
        header.origin = origin_a


def full(shape: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    return (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))


def test_the_shipped_maps_are_the_real_emdb_files():
    with mrcfile.open(EMD_3001, permissive=True) as mrc:
        assert (int(mrc.header.mapc), int(mrc.header.mapr), int(mrc.header.maps)) == (3, 1, 2)
        assert mrc.data.shape == (25, 43, 73) and b"EMD-3001" in mrc.header.label[0]
    with mrcfile.open(EMD_3197, permissive=True) as mrc:
        assert (int(mrc.header.mapc), int(mrc.header.mapr), int(mrc.header.maps)) == (1, 2, 3)
        assert mrc.data.shape == (20, 20, 20) and b"EMD-3197" in mrc.header.label[0]


@pytest.mark.parametrize("path", [EMD_3001, EMD_3197], ids=lambda p: p.name)
def test_real_map_reads_like_mrcfile_in_zyx_order(path):
    expected, voxel_a, origin_a = reference(path)
    header = read_mrc_header(path)
    assert header.shape == SHAPE_ZYX[path] == expected.shape
    assert header.dtype == expected.dtype == np.dtype("float32")
    assert header.voxel_size_nm == VOXEL_NM[path]  # exactly: no float noise from Å → nm
    assert header.voxel_size_nm == pytest.approx(tuple(v / 10 for v in voxel_a[::-1]), rel=1e-6)
    assert origin_a == (0.0, 0.0, 0.0) and header.origin_nm == pytest.approx(ORIGIN_NM[path], abs=1e-12)
    with MrcVolume(path) as volume:
        assert volume.shape == expected.shape and volume.dtype == expected.dtype
        np.testing.assert_array_equal(volume.read(full(volume.shape)), expected)  # every voxel
        np.testing.assert_array_equal(volume.read((slice(3, 9), slice(2, 7), slice(1, 13))), expected[3:9, 2:7, 1:13])
        np.testing.assert_array_equal(volume.read_plane(4, slice(0, 5), slice(2, 11)), expected[4, 0:5, 2:11])


def test_emd_3001_has_a_sheared_cell_so_no_geometry_is_claimed():
    # P21 with beta = 94.326°: a per-axis scale (all OME-Zarr can say) would silently square the grid.
    header = read_mrc_header(EMD_3001)
    assert header.axes_crs == (3, 1, 2) and header.cell_angles_deg[1] == pytest.approx(94.326, abs=1e-4)
    assert not header.is_orthogonal and header.geometry is None
    with MrcVolume(EMD_3001) as volume:
        assert volume.geometry is None  # the pipeline asks the curator instead
    with MrcVolume(EMD_3197) as volume:
        assert volume.geometry is not None and volume.geometry.voxel_size_nm == (1.14, 1.14, 1.14)
        assert volume.geometry.voxel_size_origin == "source-metadata"
        assert volume.geometry.translation_nm == (0.0, 0.0, -2.28)  # no float noise either


def test_origin_record_wins_over_the_grid_start_and_the_start_follows_the_axis_order(tmp_path):
    zyx = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    path = tmp_path / "start.mrc"
    # Columns are y, rows z, sections x; starts 3 (y), -1 (z), 2 (x); voxel (z, y, x) 2, 3, 4 Å.
    write_copy(path, zyx, (2, 3, 1), cell_a=(24.0, 15.0, 8.0), grid=(6, 5, 4))
    with mrcfile.open(path, mode="r+") as mrc:
        mrc.header.nxstart, mrc.header.nystart, mrc.header.nzstart = 3, -1, 2
    assert read_mrc_header(path).origin_nm == (-0.2, 0.9, 0.8)
    with mrcfile.open(path, mode="r+") as mrc:
        mrc.header.origin = (10.0, 20.0, 30.0)  # x, y, z in Å
    assert read_mrc_header(path).origin_nm == (3.0, 2.0, 1.0)


@pytest.mark.parametrize("axes_crs", ALL_ORDERS, ids=lambda a: "mapc{}-mapr{}-maps{}".format(*a))
def test_every_axis_order_of_a_real_map_gives_the_same_zyx_volume_and_geometry(tmp_path, axes_crs):
    """EMD-3001's voxels and cell (distinct extents and voxel sizes on every axis), rewritten by mrcfile in each
    of the six orders with right angles and an origin: em-ingest must give back one and the same volume."""
    zyx, _, _ = reference(EMD_3001)
    path = tmp_path / "copy.map"
    write_copy(path, zyx, axes_crs, cell_a=(17.93, 4.71, 33.03), grid=(40, 12, 72), origin_a=(1.5, -2.25, 3.75))
    as_mrcfile_sees_it, _, _ = reference(path)
    np.testing.assert_array_equal(as_mrcfile_sees_it, zyx)  # the reference agrees with itself across orders
    header = read_mrc_header(path)
    assert header.axes_crs == axes_crs and header.shape == (73, 25, 43)
    with MrcVolume(path) as volume:
        assert volume.shape == (73, 25, 43) and volume.dtype == np.dtype("float32")
        np.testing.assert_array_equal(volume.read(full(volume.shape)), zyx)
        np.testing.assert_array_equal(volume.read((slice(70, 73), slice(0, 25), slice(40, 43))), zyx[70:, :, 40:])
        assert volume.geometry is not None
        assert volume.geometry.voxel_size_nm == (0.045875, 0.03925, 0.044825)
        assert volume.geometry.translation_nm == (0.375, -0.225, 0.15)  # ORIGIN (x, y, z) Å as (z, y, x) nm


def test_an_unset_axis_mapping_reads_as_standard_and_a_broken_one_is_refused_naming_the_fields(tmp_path):
    zyx, _, _ = reference(EMD_3197)
    unset = tmp_path / "unset.map"
    write_copy(unset, zyx, (1, 2, 3), cell_a=(228.0, 228.0, 228.0), grid=(20, 20, 20), stated_axes=(0, 0, 0))
    with MrcVolume(unset) as volume:
        np.testing.assert_array_equal(volume.read(full(volume.shape)), zyx)
    broken = tmp_path / "broken.map"
    write_copy(broken, zyx, (1, 2, 3), cell_a=(228.0, 228.0, 228.0), grid=(20, 20, 20), stated_axes=(1, 1, 3))
    with pytest.raises(FormatError, match=r"broken\.map.*MAPC, MAPR, MAPS are \(1, 1, 3\)"):
        read_mrc_header(broken)
    with pytest.raises(FormatError, match="MAPC, MAPR, MAPS"):
        MrcVolume(broken)


def test_a_region_of_a_transposed_map_costs_the_region_not_the_volume(tmp_path):
    """Sections along x: a (z, y, x) region is scattered through the file; only the region is allocated."""
    rng = np.random.default_rng(7)
    zyx = rng.integers(0, 255, size=(96, 160, 200), dtype=np.uint8)  # 3 MB
    path = tmp_path / "big.mrc"
    write_copy(path, zyx, (2, 3, 1), cell_a=(200.0, 160.0, 96.0), grid=(200, 160, 96))
    with MrcVolume(path) as volume:
        tracemalloc.start()
        try:
            region = volume.read((slice(10, 26), slice(30, 46), slice(50, 66)))
            plane = volume.read_plane(40, slice(0, 32), slice(0, 32))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    np.testing.assert_array_equal(region, zyx[10:26, 30:46, 50:66])
    np.testing.assert_array_equal(plane, zyx[40, :32, :32])
    assert region.flags.c_contiguous and peak < 256 * 1024, peak  # 4 KB region, 1 KB plane; the volume is 3 MB


def test_a_single_section_keeps_its_pixel_size_and_leaves_z_to_the_series_or_the_curator(tmp_path):
    """A real plane written as EPU and FEI write micrographs: MZ = 1 and a cell z length of 0 (both seen in the
    headers of mrcfile's real epu2.9_example.mrc and fei-extended.mrc)."""
    zyx, _, _ = reference(EMD_3001)
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"section_{k + 1}.mrc")
        write_copy(paths[-1], zyx[k:k + 1], (1, 2, 3), cell_a=(17.93, 4.71, 0.0), grid=(40, 12, 1))
        with mrcfile.open(paths[-1]) as mrc:
            assert mrc.data.ndim == 2 and float(mrc.header.cella.z) == 0.0 and int(mrc.header.mz) == 1
    header = read_mrc_header(paths[0])
    assert header.shape == (1, 25, 43) and header.voxel_size_nm == (None, 0.03925, 0.044825)
    with MrcVolume(paths[0]) as volume:
        assert volume.geometry is None  # z unknown: the curator says it
        np.testing.assert_array_equal(volume.read(full(volume.shape)), zyx[:1])
    stack = PlaneStack(paths)  # files as z: xy from the files, z from the series' metadata
    assert stack.planes[0].pixel_size_nm == (0.03925, 0.044825) and stack.pixel_size_from == "file"
    assert stack.geometry is None
    np.testing.assert_array_equal(stack.read(full(stack.shape)), zyx[:3])
    with_z = PlaneStack(paths, fallback_z_spacing_nm=5.0)
    assert with_z.geometry is not None and with_z.geometry.voxel_size_nm == (5.0, 0.03925, 0.044825)


def test_angstrom_to_nm_is_the_nearest_decimal_not_float_noise(tmp_path):
    assert 24 * nm_per_unit("Å", where="t") != 2.4  # the noise the catalog used to get
    assert to_nm(24, "Å", where="t") == 2.4
    assert to_nm(0.034909, "angstrom", where="t") == 0.0034909  # 0.034909 / 10 would give ...9000000000003
    assert to_nm(0.0079983, "µm", where="t") == 7.9983  # EMPIAR-11759's pixel; * 1000 gives 7.9982999999999995
    assert to_nm(3, "pm", where="t") == 0.003 and to_nm(1.5, "inch", where="t") == 38100000.0
    assert nm_per_unit("Å", where="t") == 0.1  # the factor itself is unchanged for its callers
    assert lengths_nm([24, 8, 0.0079983], ["Å", "nm", "µm"], where="t", what="size") == (2.4, 8.0, 7.9983)
    with pytest.raises(UnsupportedDataError, match="furlong"):
        to_nm(1.0, "furlong", where="t")
    path = tmp_path / "tomo.rec"
    path.write_bytes(mrc_bytes(np.zeros((2, 3, 4), np.float32), (30.0, 24.0, 20.0)))
    assert read_mrc_header(path).voxel_size_nm == (3.0, 2.4, 2.0)
    with MrcVolume(path) as volume:
        assert volume.geometry is not None and volume.geometry.voxel_size_nm == (3.0, 2.4, 2.0)
