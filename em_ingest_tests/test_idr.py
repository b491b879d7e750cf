"""IDR: ImageJ calibration, the Zarr mirror read by zarr-python, both voxel paths end to end, refusals, re-runs."""

from __future__ import annotations

import json
from collections import Counter
from itertools import product

import numcodecs
import numpy as np
import pytest
import tifffile
import zarr

from em_ingest import catalog
from em_ingest.errors import FormatError, SelectionError, UnsupportedDataError
from em_ingest.formats import imagej
from em_ingest.formats.ome_ngff import Level, Multiscale, multiscale_of
from em_ingest.formats.tiff import TiffStack
from em_ingest.replicas.idr import IdrReplica, ReplicaImage, imagej_tiff
from em_ingest.replicas.volumes import synthetic_em
from em_ingest.sources.idr import IdrSource, bare_doi, map_values, study_of
from em_ingest_tests.contract import SourceContract

DEFAULT, ZARR_IMAGE, TWO_CHANNELS = "9846137", "90000001", "90000002"


# ---- ImageJ TIFF ----------------------------------------------------------------------------------

def test_big_endian_imagej_tiff_reads_exact_voxels_and_calibration(tmp_path):
    volume = synthetic_em((7, 33, 41), "uint16", seed=3)
    path = tmp_path / "stack.tif"
    path.write_bytes(imagej_tiff(volume, pixel_size_um=0.008, spacing_um=0.05))
    assert path.read_bytes()[:2] == b"MM"  # really big-endian on disk

    with tifffile.TiffFile(path) as tif:  # the ImageJ part of the one TIFF calibration reader
        calibration = imagej.calibration_of(tif, where=str(path))
    assert calibration is not None and calibration.byteorder == ">"
    assert calibration.unit == "µm"  # ImageJ's ASCII escape \u00B5m undone
    assert calibration.voxel_size_nm == pytest.approx((50.0, 8.0, 8.0))
    with TiffStack(path) as stack:
        assert stack.shape == (7, 33, 41)
        region = (slice(2, 6), slice(5, 30), slice(0, 41))
        data = stack.read(region)
        assert data.dtype == np.dtype("uint16") and data.dtype.isnative
        np.testing.assert_array_equal(data, volume[region])


@pytest.mark.parametrize(("description", "resolution", "unit_tag", "expected"), [
    ({"unit": "micron", "spacing": "0.02"}, 50.0, 1, (20.0, 20.0, 20.0)),
    ({"unit": "nm", "spacing": "30"}, 0.25, 1, (30.0, 4.0, 4.0)),
    ({"unit": "\\u00B5m", "spacing": "-0.1"}, 10.0, 1, (100.0, 100.0, 100.0)),  # ImageJ may store a negative spacing
    ({"unit": "um", "spacing": "0.05", "zunit": "nm"}, 100.0, 1, (0.05, 10.0, 10.0)),  # per-axis unit wins
    ({"slices": "1", "images": "1"}, 1e5, 3, (100.0, 100.0, 100.0)),  # pixels per cm, a single plane
    ({"unit": "pixel", "spacing": "1"}, 1.0, 1, None),  # ImageJ's "not calibrated"
    ({"images": "5"}, 50.0, 1, None),  # no unit anywhere
])
def test_imagej_calibration_rules(description, resolution, unit_tag, expected):
    calibration = imagej.calibration_from_tags(description, resolution, resolution, unit_tag, ">", where="t.tif")
    if expected is None:
        assert calibration.voxel_size_nm is None
    else:
        assert calibration.voxel_size_nm == pytest.approx(expected)


def test_imagej_calibration_refuses_nonsense():
    with pytest.raises(FormatError, match="spacing='abc'"):
        imagej.calibration_from_tags({"unit": "um", "spacing": "abc"}, 1.0, 1.0, 1, ">", where="t.tif")
    with pytest.raises(UnsupportedDataError, match="furlong"):
        imagej.calibration_from_tags({"unit": "furlong", "spacing": "1"}, 1.0, 1.0, 1, ">", where="t.tif")


# ---- pure mapping rules ---------------------------------------------------------------------------

def test_study_names_and_annotation_values():
    assert study_of("idr0086-miron-micrographs/experimentD") == "idr0086D"
    assert study_of("idr0004-thorpe-rad52/screenA") == "idr0004A"
    assert study_of("Multiple") is None and study_of(None) is None
    assert bare_doi("https://doi.org/10.17867/10000141") == "10.17867/10000141"
    assert bare_doi("10.1126/sciadv.aba8811 https://doi.org/10.1126/sciadv.aba8811") == "10.1126/sciadv.aba8811"
    values = map_values({"annotations": [{"values": [["Organism", "Homo sapiens"], ["Gene", "A"]]},
                                         {"values": [["Gene", "B"], ["Empty", ""]]}]}, where="x")
    assert values == {"Organism": ["Homo sapiens"], "Gene": ["A", "B"]}


def test_zarr_copy_geometry_units():
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    zattrs = {"multiscales": [{"version": "0.4", "axes": axes, "datasets": [{"path": "0", "coordinateTransformations": [
        {"type": "scale", "scale": [1, 1, 0.5, 0.25, 0.25]},
        {"type": "translation", "translation": [0, 0, 1.0, 0.5, 0.0]}]}],
        "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 0.1, 0.1, 0.1]}]}]}
    multiscale = multiscale_of(zattrs, where="z")
    assert multiscale.voxel_size_nm(where="z") == pytest.approx((50.0, 25.0, 25.0))  # level x multiscale scale
    assert multiscale.translation_nm(where="z") == pytest.approx((100.0, 50.0, 0.0))  # scaled by the outer scale
    # bioformats2raw without physical sizes: scale 1.0 and no unit means unknown, not 1 nm.
    for axis in axes[2:]:
        del axis["unit"]
    assert multiscale_of(zattrs, where="z").voxel_size_nm(where="z") is None


def test_ngff_versions_levels_and_refusals():
    # 0.1-0.2 name no axes: the rank decides; 0.3 names them as strings; 0.4 as objects.
    old = multiscale_of({"multiscales": [{"version": "0.1", "datasets": [{"path": "0"}, {"path": "1"}]}]}, where="o")
    assert old.axes == [] and old.for_rank(5, where="o").axes == ["t", "c", "z", "y", "x"]
    assert old.level_paths == ["0", "1"] and old.voxel_size_nm(where="o") is None  # no transforms at all
    with pytest.raises(FormatError, match="rank 6"):
        old.for_rank(6, where="o")
    assert multiscale_of({"multiscales": [{"version": "0.3", "axes": ["Z", "y", "x"], "datasets": [{"path": "0"}]}]},
                         where="o").axes == ["z", "y", "x"]
    # Any level, not only the finest; a writer known to mean nanometres may pass its default unit.
    levels = [{"path": f"s{i}", "coordinateTransformations": [{"type": "scale", "scale": [4.0 * 2**i] * 3},
                                                              {"type": "translation", "translation": [i, 0, 0]}]}
              for i in range(2)]
    cellmap = multiscale_of({"multiscales": [{"version": "0.4", "axes": [{"name": a, "type": "space"} for a in "zyx"],
                                              "datasets": levels}]}, where="c")
    assert cellmap.voxel_size_nm("s1", where="c") is None  # no unit: unknown
    assert cellmap.voxel_size_nm("s1", where="c", default_unit="nanometer") == (8.0, 8.0, 8.0)
    assert cellmap.translation_nm("s1", where="c", default_unit="nanometer") == (1.0, 0.0, 0.0)
    with pytest.raises(FormatError, match="no level 's9'"):
        cellmap.voxel_size_nm("s9", where="c")
    with pytest.raises(UnsupportedDataError, match="version '0.5' in 'multiscales'"):
        multiscale_of({"multiscales": [{"version": "0.5", "datasets": [{"path": "0"}]}]}, where="v")
    with pytest.raises(UnsupportedDataError, match="coordinateTransformations in OME-NGFF 0.3"):
        multiscale_of({"multiscales": [{"version": "0.3", "axes": ["z", "y", "x"], "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 2, 3]}]}]}]}, where="o")
    with pytest.raises(FormatError, match="one finite number per axis"):
        Multiscale((Level("0", scale=(1.0, 2.0)),), ["z", "y", "x"]).voxel_size_nm(where="s")


def test_ngff_04_and_05_are_read_through_the_spec_models():
    axes = [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"]
    level = {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [8, 4, 4]},
                                                         {"type": "translation", "translation": [1, 2, 3]}]}
    v05 = multiscale_of({"ome": {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [level]}]}}, where="zarr.json")
    assert (v05.version, v05.voxel_size_nm(where="j"), v05.translation_nm(where="j")) == ("0.5", (8, 4, 4), (1, 2, 3))
    unversioned = multiscale_of({"multiscales": [{"axes": axes, "datasets": [level]}]}, where="u")  # the 0.4 shape
    assert unversioned.version == "0.4" and unversioned.voxel_size_nm(where="u") == (8, 4, 4)
    # What the models refuse is a FormatError naming the document, the place in it and what was found there.
    affine = {"multiscales": [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "affine", "affine": [1, 2, 3]}]}]}]}
    with pytest.raises(FormatError, match=r"a/\.zattrs: not valid OME-NGFF 0\.4 .*datasets\[0\]\.coordinateTransformations"
                                          r"\[0\]\.type: .*\(found 'affine'\)"):
        multiscale_of(affine, where="a/.zattrs")
    with pytest.raises(FormatError, match=r"b: not valid OME-NGFF 0\.4 .*axes\[0\]: .*found 'z'"):
        multiscale_of({"multiscales": [{"version": "0.4", "axes": ["z", "y", "x"], "datasets": [level]}]}, where="b")
    with pytest.raises(FormatError, match=r"c: not valid OME-NGFF 0\.5 .*Got 3 axes, but the scale transform has dimension"):
        multiscale_of({"ome": {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 2]}]}]}]}}, where="c")
    stored_in_file = {"multiscales": [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "path": "scale.bin"}]}]}]}
    with pytest.raises(UnsupportedDataError, match="scale stored in a file"):
        multiscale_of(stored_in_file, where="f")
    # JSON parsers let NaN through; the spec models do too.
    nan = {"multiscales": [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [float("nan"), 1, 1]}]}]}]}
    with pytest.raises(FormatError, match="one finite number per axis"):
        multiscale_of(nan, where="n").voxel_size_nm(where="n")


def test_zarr_copy_with_several_channels_is_refused():
    multiscale = Multiscale((Level("0"),), ["t", "c", "z", "y", "x"])
    with pytest.raises(UnsupportedDataError, match="'c': 3"):
        multiscale.check_axes((1, 3, 10, 20, 20), where="idr0900A/1.zarr")


# ---- the OME-Zarr mirror, read by zarr-python ----------------------------------------------------

_MIRROR_PROJECT = (1553, "idr0902-replica-zarr/experimentA")


def _zarr_python_copy(folder, *, axes: str, shape, chunks, dtype: str, scale_um, written: list, **array_options):
    """An OME-NGFF 0.4 image written by zarr-python (an independent writer) as Zarr object name -> bytes, and the
    (z, y, x) voxels a correct reader must return, computed without zarr: fill value except where written."""
    zarr.open_group(str(folder), mode="w", zarr_format=2).attrs["multiscales"] = [{
        "version": "0.4", "axes": [{"name": a, "type": "space", "unit": "micrometer"} if a in "zyx"
                                   else {"name": a, "type": "time" if a == "t" else "channel"} for a in axes],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(scale_um)}]}]}]
    array = zarr.create_array(store=str(folder / "0"), shape=shape, chunks=chunks, dtype=dtype, zarr_format=2,
                              **array_options)
    lead = (0,) * (len(axes) - 3)
    truth = np.full(shape[-3:], array_options["fill_value"], dtype=np.dtype(dtype).newbyteorder("="))
    for region, values in written:
        array[lead + region] = values
        truth[region] = values
    objects = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    return objects, truth


ZARR_PYTHON_CASES = {
    # bioformats2raw-like 5-D, but Fortran order, a Delta filter, big-endian int16, '.' keys, a fill value of -5.
    "fortran-filters-big-endian": dict(
        axes="tczyx", shape=(1, 1, 9, 20, 30), chunks=(1, 1, 4, 8, 16), dtype=">i2",
        scale_um=(1, 1, 0.05, 0.008, 0.008),
        order="F", filters=[numcodecs.Delta(dtype=">i2")], compressors=numcodecs.Zstd(level=3), fill_value=-5,
        chunk_key_encoding={"name": "v2", "separator": "."},
        written=[((slice(0, 4), slice(0, 20), slice(0, 30)), synthetic_em((4, 20, 30), "int16", seed=5)),
                 ((slice(8, 9), slice(3, 9), slice(17, 29)), 1234)]),
    # Plain 3-D z, y, x: little-endian float32, no compressor, '/' keys, a fractional fill value.
    "zyx-uncompressed-float": dict(
        axes="zyx", shape=(7, 12, 10), chunks=(3, 5, 4), dtype="<f4", scale_um=(0.03, 0.004, 0.004),
        order="C", filters=None, compressors=None, fill_value=0.5,
        chunk_key_encoding={"name": "v2", "separator": "/"},
        written=[((slice(0, 7), slice(0, 6), slice(0, 10)),
                  np.linspace(-1, 1, 420, dtype="float32").reshape(7, 6, 10))]),
}


def _publish(replica: IdrReplica, image_id: int, shape_zyx, objects) -> None:
    z, y, x = shape_zyx
    replica.publish_zarr_copy(ReplicaImage(image_id, f"zarr-python image {image_id}", (1, 1, z, y, x),
                                           (0.008, 0.008, 0.05), "int16", dataset=(10742, "zarr_python"),
                                           project=_MIRROR_PROJECT), "idr0902A", objects)


def _fetch_and_open(ws, key: str):
    pipeline = ws.pipeline
    request, source = pipeline.request("idr", key), pipeline.source("idr")
    raw = pipeline.raw_store(request, source)
    manifest = source.fetch_raw(request, raw)
    return manifest, raw, source.open_volume(request, raw)


def test_mirror_is_the_copy_under_its_own_names_and_zarr_python_reads_it(fresh_replica, tmp_path):
    from em_ingest_tests.harness import workspace_for

    replica: IdrReplica = fresh_replica("idr")  # type: ignore[assignment]
    cases = {}
    for number, (name, case) in enumerate(ZARR_PYTHON_CASES.items()):
        image_id = 90000100 + number
        objects, truth = _zarr_python_copy(tmp_path / name, **case)
        _publish(replica, image_id, truth.shape, objects)
        cases[str(image_id)] = (case, objects, truth)
    ws = workspace_for(tmp_path / "ws", replica, selection={"idr": {key: {} for key in cases}})

    for key, (case, objects, truth) in cases.items():
        manifest, raw, volume = _fetch_and_open(ws, key)
        root = raw.dir / f"{key}.zarr"
        # Every object the bucket holds for the group and the level is in raw/ byte for byte, under its name.
        mirrored = {k: v for k, v in objects.items() if not k.endswith("0/.zattrs")}  # per-array attrs: not needed
        for name, data in mirrored.items():
            assert (root / name).read_bytes() == data, name
        assert {e.path for e in manifest.entries if e.path.startswith(f"{key}.zarr/")} == {
            f"{key}.zarr/{name}" for name in mirrored}
        # The chunks of the grid zarr-python never wrote are recorded as absent, and only those.
        separator = case["chunk_key_encoding"]["separator"]
        grid = product(*(range(-(-n // c)) for n, c in zip(case["shape"], case["chunks"])))
        unwritten = {separator.join(map(str, index)) for index in grid} - {n.removeprefix("0/") for n in objects}
        never_written = json.loads((raw.dir / "zarr_absent_chunks.json").read_text())
        assert unwritten and never_written == {"level": "0", "absent": sorted(unwritten),
                                               "meaning": "HTTP 404: never written, read as fill_value"}

        with volume:
            assert volume.shape == truth.shape and volume.dtype == truth.dtype and volume.dtype.isnative
            assert volume.geometry.voxel_size_nm == pytest.approx(tuple(v * 1000 for v in case["scale_um"][-3:]))
            for region in [tuple(slice(0, n) for n in truth.shape), (slice(3, 7), slice(4, 11), slice(5, 10)),
                           (slice(truth.shape[0] - 1, truth.shape[0]), slice(0, 1), slice(9, 10))]:
                data = volume.read(region)
                assert data.flags["C_CONTIGUOUS"] and data.dtype.isnative
                np.testing.assert_array_equal(data, truth[region])


def test_mirrored_reads_are_lazy_and_damage_is_an_error(fresh_replica, tmp_path):
    from em_ingest_tests.harness import workspace_for

    replica: IdrReplica = fresh_replica("idr")  # type: ignore[assignment]
    case = ZARR_PYTHON_CASES["fortran-filters-big-endian"]
    objects, truth = _zarr_python_copy(tmp_path / "copy", **case)
    _publish(replica, 90000110, truth.shape, objects)
    broken = dict(objects, **{"0/.zarray": objects["0/.zarray"].replace(b'"zstd"', b'"no-such-codec"')})
    _publish(replica, 90000111, truth.shape, broken)
    ws = workspace_for(tmp_path / "ws", replica, selection={"idr": {"90000110": {}, "90000111": {}}})

    _, raw, volume = _fetch_and_open(ws, "90000110")
    level = raw.dir / "90000110.zarr" / "0"
    inside = (slice(0, 4), slice(0, 8), slice(0, 16))  # exactly chunk 0.0.0.0.0
    for chunk in level.iterdir():
        if chunk.name not in (".zarray", "0.0.0.0.0"):
            chunk.write_bytes(b"not zstd")  # any read beyond the region's one chunk would fail to decode
    np.testing.assert_array_equal(volume.read(inside), truth[inside])
    with pytest.raises(FormatError, match="does not decode"):
        volume.read((slice(0, 4), slice(0, 9), slice(0, 16)))
    # A chunk lost from raw/ (not absent at the source) is an error, never silently the fill value.
    (level / "0.0.0.0.1").unlink()
    with pytest.raises(FormatError, match=r"0\.0\.0\.0\.1 is missing from the raw download"):
        volume.read((slice(0, 4), slice(0, 8), slice(10, 20)))

    # A codec zarr-python does not know is refused after `.zarray`, before any chunk is fetched.
    replica.zarr.traffic.reset()
    with pytest.raises(UnsupportedDataError, match="unsupported Zarr codec"):
        _fetch_and_open(ws, "90000111")
    fetched = {p.rsplit("/", 1)[-1] for m, p, _ in replica.zarr.traffic.requests}
    assert fetched <= {".zattrs", ".zgroup", ".zarray"}, fetched


# ---- end to end -----------------------------------------------------------------------------------

def _requests(server) -> Counter:
    return Counter((method, path) for method, path, _ in server.traffic.requests)


def test_original_tiff_path_end_to_end(workspace, replicas):
    replica: IdrReplica = replicas["idr"]
    ws = workspace("idr", selection={"idr": {DEFAULT: {}}})
    assert ws.materialize("idr", DEFAULT).success
    assert ws.materialize_catalog().success
    row = catalog.read_catalog(ws.data_root / "catalog" / "metadata_catalog.parquet").to_pylist()[0]
    extra = json.loads(row["extra_json"])
    assert extra["voxels_from"] == "original-file"
    assert extra["voxel_size_nm_file"] == extra["voxel_size_nm_omero"] == [20.0, 20.0, 20.0]  # 0.02 µm
    assert extra["publication_doi"] == "10.1126/sciadv.aba8811" and extra["study"] == "idr0086D"
    assert row["source_url"] == f"{replica.omero.url}/webclient/img_detail/{DEFAULT}/"
    assert row["source_version"]  # the TIFF's ETag
    raw_dir = ws.data_root / "raw" / "idr" / DEFAULT
    probe = json.loads((raw_dir / "zarr_probe.json").read_text())
    assert probe == {"found": False, "status": 404}  # why the original was read: no idr0086D copy
    assert (raw_dir / "original" / "Figure_S3B_FIB-SEM_U2OS_20x20x20nm_xy.tif").read_bytes()[:2] == b"MM"

    for server in replica.servers:
        server.traffic.reset()
    again = ws.materialize("idr", DEFAULT)
    assert again.get_asset_materialization_events()[0].materialization.metadata["fetched_bytes"].value == 0
    assert replica.files.traffic.body_bytes == 0  # the re-run only HEADs the TIFF
    assert {m for m, _ in _requests(replica.files)} == {"HEAD"}
    # Each OMERO.web answer is asked for once per run (the two annotation queries differ in their query).
    assert _requests(replica.omero) == Counter({
        ("GET", f"/webgateway/imgData/{DEFAULT}/"): 1, ("GET", f"/api/v0/m/images/{DEFAULT}/"): 1,
        ("GET", "/webclient/api/annotations/"): 2, ("GET", f"/webgateway/original_file_paths/{DEFAULT}/"): 1})


def test_ome_zarr_copy_path_end_to_end(workspace, replicas):
    replica: IdrReplica = replicas["idr"]
    ws = workspace("idr", selection={"idr": {ZARR_IMAGE: {}}})
    assert ws.materialize("idr", ZARR_IMAGE).success
    raw_dir = ws.data_root / "raw" / "idr" / ZARR_IMAGE
    absent = json.loads((raw_dir / "zarr_absent_chunks.json").read_text())
    assert absent["level"] == "0" and absent["absent"] == ["0/0/1/1/1"]  # the all-zero chunk never stored
    mirror = raw_dir / f"{ZARR_IMAGE}.zarr"
    assert json.loads((mirror / "0" / ".zarray").read_text())["dtype"] == ">u2"  # big-endian, as served
    assert (mirror / ".zgroup").is_file() and not (mirror / "1").exists()  # only full resolution is mirrored
    # raw/ holds a Zarr that zarr-python opens on its own, the 5-D (t, c, z, y, x) array as the bucket has it.
    mirrored = zarr.open_group(str(mirror), mode="r")["0"]
    np.testing.assert_array_equal(mirrored[0, 0], replica.expected[ZARR_IMAGE].volume)
    s0 = zarr.open_group(str(ws.data_root / "zarr" / "idr" / f"{ZARR_IMAGE}.ome.zarr"), mode="r")["s0"][...]
    assert s0.dtype == np.dtype("uint16")
    np.testing.assert_array_equal(s0, replica.expected[ZARR_IMAGE].volume)
    assert not s0[8:16, 32:64, 32:64].any()

    for server in replica.servers:
        server.traffic.reset()
    again = ws.materialize("idr", ZARR_IMAGE)
    assert again.get_asset_materialization_events()[0].materialization.metadata["fetched_bytes"].value == 0
    zarr_requests = _requests(replica.zarr)
    assert {m for m, _ in zarr_requests} == {"HEAD"}, zarr_requests  # every object revalidated, no body fetched
    assert zarr_requests[("HEAD", f"/idr/zarr/v0.4/idr0900A/{ZARR_IMAGE}.zarr/0/0/0/1/1/1")] == 1  # still absent


def test_both_voxel_paths_through_the_dagster_cli(replicas, tmp_path):
    from em_ingest_tests.harness import materialize_cli_side_by_side, workspace_for

    replica: IdrReplica = replicas["idr"]
    # Both images as a user runs them, with the Definitions' own executor and no run config. Separate
    # DAGSTER_HOMEs, so the two CLI runs can go side by side.
    keys = (DEFAULT, ZARR_IMAGE)
    spaces = {key: workspace_for(tmp_path / key, replica, selection={"idr": {key: {}}}) for key in keys}

    done = materialize_cli_side_by_side(spaces, "idr")
    for key, ws in spaces.items():
        assert done[key].returncode == 0, done[key].stderr[-3000:]
        path = ws.data_root / "zarr" / "idr" / f"{key}.ome.zarr"
        np.testing.assert_array_equal(zarr.open_group(str(path), mode="r")["s0"][...], replica.expected[key].volume)
        row = catalog.read_sidecar(path)["catalog_row"]
        expected = replica.expected[key]
        assert (row["voxel_size_z_nm"], row["voxel_size_y_nm"], row["voxel_size_x_nm"]) == \
            pytest.approx(expected.voxel_size_nm)
        for column, value in expected.catalog.items():
            assert row[column] == value, column


def test_multichannel_image_fails_clearly_before_any_voxel(workspace, replicas):
    replica: IdrReplica = replicas["idr"]
    ws = workspace("idr", selection={"idr": {TWO_CHANNELS: {}}})
    replica.files.traffic.reset()
    replica.zarr.traffic.reset()
    with pytest.raises(UnsupportedDataError, match=f"IDR image {TWO_CHANNELS} has 2 channels"):
        ws.materialize("idr", TWO_CHANNELS)
    assert replica.files.traffic.requests == [] and replica.zarr.traffic.requests == []


def test_unknown_image_names_the_key(workspace):
    ws = workspace("idr", selection={"idr": {"123": {}}})
    with pytest.raises(SelectionError, match="IDR has no image 123"):
        ws.materialize("idr", "123", steps=("raw",))


def test_flaky_services_still_give_exact_voxels(workspace, replicas):
    replica: IdrReplica = replicas["idr"]
    ws = workspace("idr", selection={"idr": {DEFAULT: {}}})
    replica.omero.faults.statuses = [503, 429]
    replica.omero.faults.retry_after = "0"
    replica.files.faults.cut_after_bytes, replica.files.faults.cuts = 200_000, 1  # > one 64 KiB read
    try:
        assert ws.materialize("idr", DEFAULT).success
    finally:
        replica.files.faults.clear()
    ranges = [r for m, _, r in replica.files.traffic.requests if m == "GET" and r]
    assert ranges, replica.files.traffic.requests
    s0 = zarr.open_group(str(ws.data_root / "zarr" / "idr" / f"{DEFAULT}.ome.zarr"), mode="r")["s0"][...]
    np.testing.assert_array_equal(s0, replica.expected[DEFAULT].volume)


def test_changed_original_is_fetched_again(workspace, fresh_replica, tmp_path):
    from em_ingest_tests.harness import workspace_for

    replica: IdrReplica = fresh_replica("idr")  # type: ignore[assignment]
    ws = workspace_for(tmp_path / "ws", replica, selection={"idr": {DEFAULT: {}}})
    assert ws.materialize("idr", DEFAULT).success
    changed = synthetic_em(replica.U2OS.size_tczyx[2:], "uint8", seed=7)
    replica.set_original(replica.U2OS, imagej_tiff(changed, 0.02, 0.02))
    again = ws.materialize("idr", DEFAULT)
    meta = [e.materialization.metadata for e in again.get_asset_materialization_events()]
    assert meta[0]["fetched_bytes"].value > 0 and meta[1]["skipped_unchanged"].value is False
    s0 = zarr.open_group(str(ws.data_root / "zarr" / "idr" / f"{DEFAULT}.ome.zarr"), mode="r")["s0"][...]
    np.testing.assert_array_equal(s0, changed)


def test_discovery_pages_through_the_json_api(workspace, replicas):
    replica: IdrReplica = replicas["idr"]
    # Other sources' blocks in the selection file must not get in the way of finding the IDR seeds.
    ws = workspace("idr", "epfl", selection={"idr": {DEFAULT: {}}, "epfl": {"hippocampus-training": {
        "file": "training.tif"}}})
    source = IdrSource(ws.settings)
    replica.omero.traffic.reset()
    items = list(source.images_of_dataset(10740, "U2OS_chromatin", limit=1))
    assert [i.dataset_key for i in items] == ["9846133", DEFAULT]
    assert items[1].detail["size_tczyx"] == [1, 1, 23, 97, 140]
    pages = [p for m, p, _ in replica.omero.traffic.requests if "/images/" in p]
    assert len(pages) == 2  # offset 0 and offset 1, then totalCount says stop
    # discover() starts from the project of each selected image and walks its datasets.
    assert {i.dataset_key for i in source.discover()} == {"9846133", DEFAULT}


class TestIdrContract(SourceContract):
    source, key = "idr", DEFAULT  # the original-TIFF path (the Zarr-copy path is covered above)

    def change_one_object(self, replica) -> None:
        changed = synthetic_em(replica.U2OS.size_tczyx[2:], "uint8", seed=7)
        replica.set_original(replica.U2OS, imagej_tiff(changed, 0.02, 0.02))
        replica.expected[self.key].volume = changed


# ---- OMERO's micrometres in nanometres, without float noise ------------------------------------

def test_omero_micrometres_become_the_nearest_decimal_nanometres():
    from em_ingest.archives.omero import img_data_voxel_size_nm

    assert 0.0079983 * 1000 != 7.9983  # the noise a plain product leaves in the catalog
    img_data = {"pixel_size": {"x": 0.0079983, "y": 0.0024, "z": 0.05}, "size": {"z": 40}}
    assert img_data_voxel_size_nm(img_data) == (50.0, 2.4, 7.9983)


# ---- OMERO's "Multiple": no single project or dataset, not a name ---------------------------------

def test_omero_multiple_is_no_name():
    from em_ingest.archives.omero import img_data_parent

    def meta(**fields) -> dict:
        return {"meta": fields}

    # What imgData says for a plate image (omero-web marshal: `pr and pr.name or "Multiple"`, id null).
    plate = meta(projectName="Multiple", projectId=None, datasetName="Multiple", datasetId=None)
    assert img_data_parent(plate, "project") == (None, None)
    assert img_data_parent(plate, "dataset") == (None, None)
    # An image linked to two datasets of one project: the project is known, the dataset is not.
    two_datasets = meta(projectName="idr0086-miron-micrographs/experimentD", projectId=1551,
                        datasetName="Multiple", datasetId=None)
    assert img_data_parent(two_datasets, "project") == (1551, "idr0086-miron-micrographs/experimentD")
    assert img_data_parent(two_datasets, "dataset") == (None, None)
    # "Multiple" also stands in for an empty name: the id stays, the name is unknown.
    assert img_data_parent(meta(datasetName="Multiple", datasetId=10740), "dataset") == (10740, None)
    assert img_data_parent(meta(datasetName="U2OS_chromatin", datasetId=10740), "dataset") == (10740, "U2OS_chromatin")
    assert img_data_parent({"meta": None}, "project") == (None, None)
    with pytest.raises(ValueError, match="plate"):
        img_data_parent(plate, "plate")


def test_plate_image_describes_without_multiple(fresh_replica, tmp_path):
    from em_ingest.replicas.idr import zarr_v2_image
    from em_ingest_tests.harness import workspace_for

    replica = fresh_replica("idr")
    assert isinstance(replica, IdrReplica)
    # A second well of the synthetic screen, with no per-image key-values (so no Cell Line to name the sample).
    well = ReplicaImage(90000003, "synthetic FIB-SEM well A2", (1, 1, 4, 16, 16), (0.01, 0.01, 0.05), "uint8",
                        screen=(3901, "idr0900-replica-fibsem/screenA"), plate_well=(8901, 7902, 6902),
                        client_paths=["uod/idr/filesets/idr0900-replica-fibsem/plate1/A2.ome.tiff"])
    volume = synthetic_em((4, 16, 16), "uint8", seed=903)
    replica.publish_zarr_copy(well, "idr0900A", zarr_v2_image(volume, (4, 16, 16), (0.05, 0.01, 0.01), well.name))
    key = str(well.id)
    ws = workspace_for(tmp_path, replica, selection={"idr": {key: {}}})
    _, raw, opened = _fetch_and_open(ws, key)
    opened.close()
    source = ws.pipeline.source("idr")
    img_data = json.loads((raw.dir / "omero" / "imgData.json").read_text())
    assert img_data["meta"]["datasetName"] == img_data["meta"]["projectName"] == "Multiple"  # as OMERO.web says
    description = source.describe(ws.pipeline.request("idr", key), raw)
    assert description.sample is None  # not "Multiple"
    assert "dataset" not in description.extra and "dataset_id" not in description.extra
    assert description.extra["project_or_screen"] == "idr0900-replica-fibsem/screenA"  # from paths_to_object
    assert description.extra["study"] == "idr0900A"
    assert "Multiple" not in json.dumps([description.title, description.description, description.sample,
                                         description.extra])
