"""The streaming OME-Zarr writer: pyramid shapes and scales, exact s0, spec validity, bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from em_ingest.errors import ValidationError
from em_ingest.formats.volume import ArrayVolume, Geometry, Volume
from em_ingest.omezarr.pyramid import downsample, level_factors, plan_pyramid
from em_ingest.omezarr.validate import validate_ome_zarr
from em_ingest.omezarr.writer import ZarrLayout, write_ome_zarr
from em_ingest.replicas.volumes import synthetic_em


@pytest.mark.parametrize("ngff_version", ["0.5", "0.4"])
@pytest.mark.parametrize(("dtype", "shape"), [("uint8", (37, 141, 203)), ("uint16", (65, 129, 67)),
                                               ("int16", (3, 250, 131)), ("float32", (20, 70, 90))])
def test_writes_exact_valid_pyramid(tmp_path, ngff_version, dtype, shape):
    volume = synthetic_em(shape, dtype, seed=3)
    geometry = Geometry((30.0, 4.0, 4.0), "source-metadata", (100.0, 8.0, -4.0))
    result = write_ome_zarr(ArrayVolume(volume), geometry, tmp_path / "img.ome.zarr", name="t",
                            layout=ZarrLayout(ngff_version=ngff_version))

    summary = validate_ome_zarr(result.path)  # ome-zarr-models, independent of the writer
    assert summary.ngff_version == ngff_version
    group = zarr.open_group(str(result.path), mode="r")
    assert group["s0"].metadata.zarr_format == (3 if ngff_version == "0.5" else 2)
    np.testing.assert_array_equal(group["s0"][...], volume)
    assert str(group["s0"].dtype) == dtype

    # Each level halves the near-finest axes (ceil), scales double there, translations shift by half a voxel.
    for prev, (shape_k, scale_k, trans_k) in zip(
        zip(summary.shapes, summary.scales_nm, summary.translations_nm),
        zip(summary.shapes[1:], summary.scales_nm[1:], summary.translations_nm[1:]),
    ):
        for n0, s0, t0, n1, s1, t1 in zip(*prev, shape_k, scale_k, trans_k):
            factor = round(s1 / s0)
            assert factor in (1, 2)
            assert n1 == -(-n0 // factor)
            assert t1 == pytest.approx(t0 + (s1 - s0) / 2)
    last = summary.shapes[-1]
    assert all(n <= c for n, c in zip(last, result.chunks)), "pyramid stops once a level fits one chunk"
    assert summary.scales_nm[0] == pytest.approx((30.0, 4.0, 4.0))
    assert summary.translations_nm[0] == pytest.approx((100.0, 8.0, -4.0))
    # Every level equals downsampling the previous level (integer-safe mean), voxel for voxel.
    for k in range(1, len(summary.paths)):
        factors = tuple(round(a / b) for a, b in zip(summary.scales_nm[k], summary.scales_nm[k - 1]))
        expected = downsample(group[f"s{k - 1}"][...], factors)
        np.testing.assert_array_equal(group[f"s{k}"][...], expected)
    assert result.thumbnail is not None and result.thumbnail.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.intensity_min == volume.min() and result.intensity_max == volume.max()


def test_anisotropic_volume_downsamples_xy_first():
    levels = plan_pyramid((300, 4000, 4000), (50.0, 8.0, 8.0), (0.0, 0.0, 0.0), (64, 64, 64))
    factors = [lv.factors for lv in levels[1:]]
    assert factors[:3] == [(1, 2, 2)] * 3  # 8 -> 16 -> 32 -> 64 nm in y/x while z stays 50 nm
    assert factors[3] == (2, 2, 2)  # near-isotropic from then on
    assert all(any(n > 64 for n in lv.shape) for lv in levels[:-1])
    assert all(n <= 64 for n in levels[-1].shape)


def test_downsample_is_integer_safe_at_the_extremes():
    block = np.full((2, 2, 2), 65535, dtype=np.uint16)
    assert downsample(block, (2, 2, 2))[0, 0, 0] == 65535  # no overflow
    block = np.array([-32768, -32767] * 4, dtype=np.int16).reshape(2, 2, 2)
    assert downsample(block, (2, 2, 2))[0, 0, 0] == -32767  # -32767.5 rounds half up, no wrap
    odd = np.arange(3, dtype=np.uint8).reshape(1, 1, 3)
    assert downsample(odd, (1, 1, 2)).tolist() == [[[1, 2]]]  # the edge voxel averages what exists


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)),
    factors=st.tuples(st.sampled_from([1, 2]), st.sampled_from([1, 2]), st.sampled_from([1, 2])),
    dtype=st.sampled_from(["uint8", "uint16", "int16", "int32"]),
    seed=st.integers(0, 2**16),
)
def test_downsample_matches_float_mean_rounded(shape, factors, dtype, seed):
    info = np.iinfo(dtype)
    block = np.random.default_rng(seed).integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    out = downsample(block, factors)
    assert out.dtype == block.dtype
    assert out.shape == tuple(-(-n // f) for n, f in zip(shape, factors))
    padded = np.pad(block.astype(np.float64), [(0, (-n) % f) for n, f in zip(shape, factors)], mode="edge")
    z, y, x = padded.shape
    mean = padded.reshape(z // factors[0], factors[0], y // factors[1], factors[1], x // factors[2],
                          factors[2]).mean(axis=(1, 3, 5))
    np.testing.assert_array_equal(out, np.floor(mean + 0.5).astype(dtype))


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 5000)),
       voxel=st.tuples(st.floats(0.5, 100), st.floats(0.5, 100), st.floats(0.5, 100)))
def test_pyramid_plan_terminates_and_fits_last_chunk(shape, voxel):
    levels = plan_pyramid(shape, voxel, (0.0, 0.0, 0.0), (64, 64, 64))
    assert levels[0].shape == shape
    assert all(n <= 64 for n in levels[-1].shape)
    assert len(levels) <= 40
    for lv in levels[1:]:
        assert lv.factors != (1, 1, 1)
        assert all(f == 1 or n > 1 for f, n in zip(level_factors(lv.shape, lv.scale_nm), lv.shape))


class GeneratedVolume(Volume):
    """A large volume that exists only as it is read: a deterministic function of the coordinates."""

    def __init__(self, shape):
        self.shape = shape
        self.dtype = np.dtype(np.uint16)
        self.geometry = Geometry((8.0, 8.0, 8.0), "source-metadata")
        self.name = "generated"

    def read(self, region):
        z, y, x = np.ogrid[region[0], region[1], region[2]]
        return ((z * 7 + y * 3 + x) % 4093).astype(np.uint16)


def _peak_bytes_writing(shape, path) -> int:
    layout = ZarrLayout(chunks=(32, 32, 32), chunks_per_shard=(2, 2, 2), workers=2)
    tracemalloc.start()
    try:
        write_ome_zarr(GeneratedVolume(shape), GeneratedVolume(shape).geometry, path, name="big", layout=layout)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_is_bounded_by_blocks_not_volume(tmp_path):
    small, large = (128, 256, 256), (256, 384, 384)  # 16 MiB and 72 MiB of uint16
    peak_small = _peak_bytes_writing(small, tmp_path / "small.ome.zarr")
    peak_large = _peak_bytes_writing(large, tmp_path / "large.ome.zarr")
    large_bytes = np.prod(large) * 2
    assert peak_large < large_bytes / 2, f"peak {peak_large / 2**20:.1f} MiB for {large_bytes / 2**20:.0f} MiB"
    # 4.5x the voxels, (almost) the same peak: memory follows the block of work, not the volume.
    assert peak_large < 1.25 * peak_small + 2 * 2**20, (peak_small / 2**20, peak_large / 2**20)
    s0 = zarr.open_group(str(tmp_path / "large.ome.zarr"), mode="r")["s0"]
    np.testing.assert_array_equal(s0[100:103, 200:260, 300:333],
                                  GeneratedVolume(large).read((slice(100, 103), slice(200, 260), slice(300, 333))))


def test_validator_rejects_non_ngff(tmp_path):
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(4, 4, 4), dtype="uint8")
    with pytest.raises(ValidationError, match="plain.zarr"):
        validate_ome_zarr(tmp_path / "plain.zarr")
    group = zarr.open_group(str(tmp_path / "bad.zarr"), mode="w")
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [{"name": "z"}], "datasets": []}]}
    with pytest.raises(ValidationError, match="bad.zarr"):
        validate_ome_zarr(tmp_path / "bad.zarr")


@pytest.mark.parametrize("ngff_version", ["0.5", "0.4"])
def test_pyramid_is_exact_when_blocks_of_successive_levels_do_not_nest(tmp_path, ngff_version):
    # Shards of 3 x 32 voxels: a level's block covers 1.5 blocks of the next level's footprint, so
    # downsampled pieces straddle blocks and must be assembled before each block is written once.
    volume = synthetic_em((70, 300, 250), "uint16", seed=11)
    layout = ZarrLayout(ngff_version=ngff_version, chunks=(32, 32, 32), chunks_per_shard=(3, 3, 3), workers=3)
    result = write_ome_zarr(ArrayVolume(volume), Geometry((12.0, 4.0, 4.0), "override"), tmp_path / "odd.ome.zarr",
                            name="odd", layout=layout)
    summary = validate_ome_zarr(result.path)
    group = zarr.open_group(str(result.path), mode="r")
    np.testing.assert_array_equal(group["s0"][...], volume)
    assert len(summary.paths) >= 4 and result.levels[1].factors == (1, 2, 2)
    for k in range(1, len(summary.paths)):
        expected = downsample(group[f"s{k - 1}"][...], result.levels[k].factors)
        np.testing.assert_array_equal(group[f"s{k}"][...], expected)
    assert result.intensity_mean == pytest.approx(float(volume.mean(dtype=np.float64)))


def test_layout_refuses_odd_chunk_sides():
    with pytest.raises(ValueError, match="even"):
        ZarrLayout(chunks=(63, 64, 64))
