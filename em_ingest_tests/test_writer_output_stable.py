"""The writer's output bytes do not change for the same input: every chunk of every level, and the metadata.

The digests below were computed with the writer as it was before its speed work (commit ae52350), on
anisotropic volumes whose sizes are not multiples of a shard (partial shards and chunks at every edge,
odd sizes downsampled with edge padding). A faster writer must reproduce them exactly.

The volumes are integer arithmetic on the coordinates (no random generator, whose streams may change
between numpy releases). The stored bytes also depend on the zstd encoder tensorstore bundles: if an
upgrade of tensorstore changes them, the decoded-voxel digest (checked first) still tells whether the
values are the same, and the file digests must then be re-derived from the old writer, not from the new.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from em_ingest.formats.tiff import TiffStack
from em_ingest.formats.volume import ArrayVolume, Geometry, Volume
from em_ingest.omezarr.writer import WriteResult, ZarrLayout, write_ome_zarr

# zarr-python notes the thumbnail beside the arrays when the digest lists the group; it is not an array.
pytestmark = pytest.mark.filterwarnings("ignore:Object at thumbnail.png:UserWarning")

GEOMETRY = Geometry((30.0, 6.0, 6.0), "source-metadata", (12.0, -3.0, 4.5))


def volume_for(shape: tuple[int, int, int], dtype: str) -> np.ndarray:
    """EM-like values without a random generator: smooth bands, a lattice of dark lines and hashed noise."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    z, y, x = (a.astype(np.int64) for a in (z, y, x))
    noise = ((z * 73856093) ^ (y * 19349663) ^ (x * 83492791)) & 0xFFFF  # 0..65535
    smooth = (z * 5 + y * 3 + x * 2) % 512  # 0..511
    lines = ((y % 37 < 2) | (x % 41 < 2)).astype(np.int64)
    value = smooth * 64 + noise // 4 - lines * 20000  # about -20000..49000
    kind = np.dtype(dtype)
    if kind.kind == "f":
        return (value / 4096.0).astype(dtype)
    info = np.iinfo(kind)
    span = info.max - info.min
    scaled = (value + 20000) * span // 69000 + info.min
    return np.clip(scaled, info.min, info.max).astype(dtype)


CASES = {
    # name: (shape, dtype, ngff_version, chunks, chunks_per_shard)
    "uint8-v3-default": ((75, 300, 270), "uint8", "0.5", (64, 64, 64), (2, 4, 4)),
    "uint16-v3-default": ((41, 180, 330), "uint16", "0.5", (64, 64, 64), (2, 4, 4)),
    "int16-v3-odd-shards": ((37, 141, 203), "int16", "0.5", (32, 32, 32), (3, 3, 3)),
    "float32-v3-small": ((19, 70, 91), "float32", "0.5", (16, 16, 16), (2, 2, 2)),
    "uint8-v2": ((45, 200, 150), "uint8", "0.4", (64, 64, 64), (2, 4, 4)),
    "uint16-v2-small-chunks": ((23, 90, 77), "uint16", "0.4", (16, 16, 16), (2, 2, 2)),
    # Whole interior shards of whole chunks beside partial ones at the edges, as in a large volume (the cases
    # above have none in s0): chunk rows of 64 bytes (uint8, float32), 128 (uint16) and 256 (int16).
    "uint8-v3-whole-shards": ((40, 70, 300), "uint8", "0.5", (16, 16, 64), (2, 2, 2)),
    "uint16-v3-whole-shards": ((40, 70, 300), "uint16", "0.5", (16, 16, 64), (2, 2, 2)),
    "int16-v3-whole-shards": ((20, 40, 520), "int16", "0.5", (8, 8, 128), (2, 2, 2)),
    "float32-v3-whole-shards": ((32, 64, 96), "float32", "0.5", (16, 16, 16), (2, 2, 2)),
}

# sha256 of the voxels of every level, then of every file's bytes (relative path + content) but the
# thumbnail, with JSON metadata canonicalized (sorted keys) so only its content counts.
EXPECTED = {
    "uint8-v3-default": ("e259ce6ac0b7d3eba9dd542b5c52d5b949929884c73272bbea02b0f5d7981ae2",
                        "eefa089d122ac3a28392479eda6522f831a7bf150aafce0391d9c54081828122"),
    "uint16-v3-default": ("394e3af20613d9d808c46a392356e7a25b5fdd5b5342a5d90024c67d2e813708",
                         "2ec489cf1298c0b6cd539100dfe6312197cb8d514b02fb01a58a74e4c500f29a"),
    "int16-v3-odd-shards": ("4acffc99e0c79d40a03e83c6969580d733ebc7d3bf20f883460779f662902ab1",
                           "204078366ef6e8db3a3685c479e0c4b38133f1565a29e454ef98e881769c9a20"),
    "float32-v3-small": ("0bdb8ee3a1e2095a0da7bb8601a38b8a6f0f1a87d5292af123d61ab73df8ec18",
                        "a4ef7129b5d00b3f0932701fdcbfd18628ccc2a896e1f3d881e0066084621811"),
    "uint8-v2": ("891dc0f9fd6a0b0b4da338f7ad15d4494383d1bc87bc6a0a4e6de0c88de28d32",
                "f94ff1a0017847bae389303e71e7ddb22021fac08fae7d7d5dc09794642c757e"),
    "uint16-v2-small-chunks": ("0793cf13913e329203667450982e1464bc2fc2879317c295015e683312f65eea",
                              "a06ce165eb16df7298aee9c53e1c3b7ee2a7cd5bb92bead02a066c5b35bf3a87"),
    # The four below: computed with the writer of commit b34dbc0 (which reproduces every digest above).
    "uint8-v3-whole-shards": ("2a2a28b5708a591960f6fb571f7f34b48177a27c899187212f42685fc0fb5d24",
                             "f718f3326706f78e3f7c2976d7c75411c703325b9017c74f38134a76f2e6e352"),
    "uint16-v3-whole-shards": ("a30cfcb83e45257a690b18fd59ae655987863574f3cfc0dda7e1d5162937a7c4",
                              "b8b3ca4b0efcd688277f95a03a393bd926d45fab6bf3bd9318b81cc401b3800f"),
    "int16-v3-whole-shards": ("3746c0252e72e01a44b2f91c30f2664e3647b0f46814da1c5be7d7c6edb646b4",
                             "45836c1d957c507c697cd656ca757873a5d86ba86ae507a063bd21520267eb04"),
    "float32-v3-whole-shards": ("e5e3c8326bcfa3ba3f83b688bbe78fe970a2c635e39b17243df9d14fc1bf86de",
                               "1ba67241784b8126f3838e227c7c9b11db4e7c59ca168a851c75fd977d333490"),
}

METADATA_NAMES = {"zarr.json", ".zarray", ".zattrs", ".zgroup"}


def voxel_digest(root: Path) -> str:
    group = zarr.open_group(str(root), mode="r")
    digest = hashlib.sha256()
    for name in sorted(group.array_keys(), key=lambda n: int(n[1:])):
        array = group[name]
        digest.update(f"{name} {array.shape} {array.dtype}\n".encode())
        digest.update(np.ascontiguousarray(array[...]).tobytes())
    return digest.hexdigest()


def file_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "thumbnail.png"):
        content = path.read_bytes()
        if path.name in METADATA_NAMES:
            content = json.dumps(json.loads(content), sort_keys=True).encode()
        digest.update(f"{path.relative_to(root).as_posix()} {len(content)}\n".encode())
        digest.update(content)
    return digest.hexdigest()


def write_case(name: str, volume: Volume, dest: Path) -> WriteResult:
    _, _, ngff_version, chunks, per_shard = CASES[name]
    layout = ZarrLayout(ngff_version=ngff_version, chunks=chunks, chunks_per_shard=per_shard, workers=2)
    return write_ome_zarr(volume, GEOMETRY, dest, name=name, layout=layout)


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_bytes_are_those_of_the_reference_writer(tmp_path, name):
    shape, dtype, *_ = CASES[name]
    volume = volume_for(shape, dtype)
    result = write_case(name, ArrayVolume(volume), tmp_path / f"{name}.ome.zarr")
    root = result.path
    # The statistics recorded in the catalog: min and max exact, the mean exact for integers.
    assert (result.intensity_min, result.intensity_max) == (float(volume.min()), float(volume.max()))
    if volume.dtype.kind in "iu":
        assert result.intensity_mean == float(int(volume.sum(dtype=np.int64)) / volume.size)
    else:
        assert result.intensity_mean == pytest.approx(float(volume.mean(dtype=np.float64)), rel=1e-12)
    voxels, files = EXPECTED[name]
    assert voxel_digest(root) == voxels, f"{name}: the voxel values of some level changed"
    assert file_digest(root) == files, f"{name}: the stored bytes changed (same voxels: chunk encoding or metadata)"


@pytest.mark.parametrize("name", ["uint8-v3-default", "uint16-v2-small-chunks"])
def test_tiff_input_gives_the_same_bytes(tmp_path, name):
    # The positional-read TIFF path (the one the benchmark and the EPFL source use) writes the same bytes.
    shape, dtype, *_ = CASES[name]
    tif = tmp_path / "input.tif"
    tifffile.imwrite(tif, volume_for(shape, dtype), photometric="minisblack", contiguous=True)
    with TiffStack(tif, GEOMETRY) as volume:
        root = write_case(name, volume, tmp_path / f"{name}.ome.zarr").path
    assert file_digest(root) == EXPECTED[name][1]
