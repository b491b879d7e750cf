"""The streaming writer's fast paths: window means into reused buffers, TIFF windows read through a released
memory map, and the written files synced as they are finished. (Output bytes: test_writer_output_stable.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from em_ingest.errors import FormatError
from em_ingest.formats.tiff import TiffStack
from em_ingest.formats.volume import ArrayVolume, Geometry
from em_ingest.omezarr import pyramid, writer
from em_ingest.omezarr.pyramid import WindowMean, downsample


def test_the_compiled_window_kernel_is_built():
    # setup.py builds it wherever a C compiler is (CI and the Docker image require it); without it every
    # conversion silently takes the slower numpy path, so its absence here is a failure, not a skip.
    assert pyramid._windows is not None, "em_ingest/omezarr/_windows.c was not built (pip install -e . with a C compiler)"


@pytest.fixture(params=["native", "numpy"])
def kernel(request, monkeypatch):
    """WindowMean with the compiled kernel, and with numpy alone (as in a build without a C compiler)."""
    if request.param == "numpy":
        monkeypatch.setattr(pyramid, "_windows", None)
    return request.param


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    # x up to 70: the compiled loops run in vectors of 16 bytes, with a scalar tail.
    shape=st.tuples(st.integers(1, 6), st.integers(1, 9), st.integers(1, 70)),
    factors=st.tuples(st.sampled_from([1, 2]), st.sampled_from([1, 2]), st.sampled_from([1, 2])),
    dtype=st.sampled_from(["uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float32", "bool"]),
    extremes=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_window_mean_is_downsample_and_knows_the_sum(kernel, shape, factors, dtype, extremes, seed):
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        block = rng.integers(0, 2, size=shape).astype(bool)
    elif dtype.startswith("float"):
        block = (rng.standard_normal(shape) * 1000).astype(dtype)
    else:
        info = np.iinfo(dtype)
        # Only the type's two extremes: every window sum at its largest or most negative (rounding, overflow).
        values = np.array([info.min, info.max], dtype) if extremes else None
        block = (rng.choice(values, size=shape) if extremes else
                 rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype))
    mean = WindowMean()
    expected = downsample(block, factors)
    for _ in range(2):  # the second call reuses the scratch arrays of the first
        # Into a view of a larger array, as the writer does (the next level's open block).
        fill = np.ones((), block.dtype)
        around = np.full(tuple(n + 2 for n in expected.shape), fill)
        out = around[1:-1, 1:-1, 1:-1]
        summary = mean.into(block, factors, out)
        np.testing.assert_array_equal(out, expected)
        inside = np.zeros(around.shape, bool)
        inside[1:-1, 1:-1, 1:-1] = True
        assert (around[~inside] == fill).all(), "nothing written outside the view"
        if summary is not None:
            assert summary.total == sum(int(v) for v in block.ravel())
            assert (summary.min, summary.max) == (block.min(), block.max())
    even = all(n % f == 0 for n, f in zip(shape, factors))
    if dtype in ("uint8", "int8", "uint16", "int16", "uint32", "int32") and even and factors != (1, 1, 1):
        assert summary is not None, "the sum comes with the window sums whenever no edge was padded"


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16"])
def test_window_mean_of_a_block_that_is_a_view(kernel, dtype):
    # A block cut out of a larger array (outer strides of its own) and starting at an odd byte: its x pairs are not
    # aligned as the compiled kernel reads them fastest, so it takes the voxels one by one, with the same values.
    info = np.iinfo(dtype)
    larger = np.random.default_rng(3).integers(info.min, info.max, size=(6, 10, 70), endpoint=True, dtype=dtype)
    unaligned = np.frombuffer(b"\0" + larger.tobytes(), dtype=dtype, count=larger.size, offset=1).reshape(larger.shape)
    for block in (larger[1:5, 2:8, 2:66], unaligned[1:5, 2:8, 2:66], unaligned[:, :, 1:67]):
        out = np.empty(tuple(n // 2 for n in block.shape), block.dtype)
        summary = WindowMean().into(block, (2, 2, 2), out)
        np.testing.assert_array_equal(out, downsample(np.ascontiguousarray(block), (2, 2, 2)))
        assert summary == (int(block.sum(dtype=np.int64)), block.min(), block.max())


def test_window_mean_writes_into_a_view_of_a_larger_block():
    block = np.arange(4 * 6 * 8, dtype=np.uint16).reshape(4, 6, 8)
    target = np.zeros((5, 5, 5), np.uint16)
    WindowMean().into(block, (2, 2, 2), target[1:3, 1:4, 0:4])
    np.testing.assert_array_equal(target[1:3, 1:4, 0:4], downsample(block, (2, 2, 2)))
    assert target.sum() == downsample(block, (2, 2, 2)).sum(), "nothing written outside the view"


def _rss_file_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssFile:"))


@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_tiff_windows_are_exact_and_leave_no_mapped_pages(tmp_path, byteorder):
    volume = np.random.default_rng(0).integers(0, 60000, size=(40, 300, 1000), dtype=np.uint16)  # 23 MiB
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, volume, byteorder=byteorder, photometric="minisblack", contiguous=True)
    with TiffStack(path, Geometry((1.0, 1.0, 1.0), "override")) as stack:
        before = _rss_file_kib()
        for region in [(slice(0, 40), slice(0, 300), slice(0, 1000)), (slice(3, 17), slice(0, 300), slice(0, 1000)),
                       (slice(5, 9), slice(20, 290), slice(0, 1000)), (slice(0, 40), slice(7, 299), slice(1, 999))]:
            out = np.empty(tuple(s.stop - s.start for s in region), np.uint16)
            assert stack.read_into(region, out) is out
            np.testing.assert_array_equal(out, volume[region])
        out = np.empty((20, 100, 100), np.uint16)
        for z in range(0, 40, 20):
            for y in range(0, 300, 100):
                for x in range(0, 1000, 100):
                    region = (slice(z, z + 20), slice(y, y + 100), slice(x, x + 100))
                    stack.read_into(region, out)
                    np.testing.assert_array_equal(out, volume[region])
        # Every window of the file was read through the map; none of its pages stay counted as resident.
        assert _rss_file_kib() - before < 4096


def test_tiff_window_of_a_file_cut_short_since_it_was_opened_fails_cleanly(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.ones((8, 64, 64), np.uint8), photometric="minisblack", contiguous=True)
    with TiffStack(path, Geometry((1.0, 1.0, 1.0), "override")) as stack:
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size - 5000)
        with pytest.raises(FormatError, match="truncated or changed while reading"):
            stack.read_into((slice(0, 8), slice(0, 32), slice(0, 32)), np.empty((8, 32, 32), np.uint8))


@pytest.mark.parametrize("ngff_version", ["0.5", "0.4"])
def test_finished_blocks_are_synced_by_their_own_file_names(tmp_path, monkeypatch, ngff_version):
    # The early syncs name the shard (v3) or chunk (v2) files each block went to; a wrong name would
    # only move the work to the final walk, so check the names themselves.
    synced, missing = [], []
    real_fsync = writer.fsync_path

    def record(path):
        (synced if path.exists() else missing).append(path)
        real_fsync(path)

    monkeypatch.setattr(writer, "fsync_path", record)
    layout = writer.ZarrLayout(ngff_version=ngff_version, chunks=(16, 16, 16), chunks_per_shard=(2, 2, 2))
    result = writer.write_ome_zarr(ArrayVolume(np.ones((40, 70, 90), np.uint8)), Geometry((8.0, 4.0, 4.0), "override"),
                                   tmp_path / "img.ome.zarr", name="img", layout=layout)
    assert not missing
    data_files = {p for p in result.path.rglob("*") if p.is_file() and p.name not in
                  {"zarr.json", ".zarray", ".zattrs", ".zgroup", "thumbnail.png"}}
    assert data_files <= set(synced)
    assert set(result.path.rglob("*")) | {result.path} <= set(synced), "every file and folder is synced once written"
