"""EMPIAR: API forms, autoindex and FTP listings, DM/MRC/TIFF readers, resume on both transports, refusals."""

from __future__ import annotations

import hashlib
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile

from em_ingest import catalog
from em_ingest.errors import FormatError, SelectionError, SourceResponseError, UnsafePathError
from em_ingest.formats.dm import read_dm
from em_ingest.formats.mrc import MrcVolume
from em_ingest.formats.stack import PlaneStack, natural_order
from em_ingest.raw import RawStore
from em_ingest.replicas.dm_writer import dm_bytes
from em_ingest.replicas.empiar import PIXEL_UM_11759, TREE, fei_tiff_bytes, mrc_bytes
from em_ingest.sources.empiar import EmpiarSource, accession_number, entry_record
from em_ingest.transfer.autoindex import parse_autoindex
from em_ingest.transfer.ftp import FtpClient
from em_ingest.transfer.http import HttpClient
from em_ingest_tests.contract import SourceContract
from em_ingest_tests.harness import FAST_TRANSFER, Workspace, read_s0, workspace_for


@pytest.fixture
def empiar(replicas):
    replica = replicas["empiar"]
    yield replica
    replica.ftp_faults.clear()


def _workspace(workspace, empiar, key: str, options: dict | None = None, *, ftp: bool = False) -> Workspace:
    ws = workspace("empiar", selection={"empiar": {key: options or {}}})
    if ftp:
        ws.env = {**ws.env, **empiar.ftp_env}
    return ws


def _s0(ws: Workspace, key: str) -> np.ndarray:
    return read_s0(ws, "empiar", key)


def _file_sha(empiar, key: str, relpath: str) -> str:
    return hashlib.sha256(empiar.entries[key].files[relpath]).hexdigest()


# ---- units: parsing and readers ----------------------------------------------------------------

def test_autoindex_keeps_real_links_only():
    page = """<table><tr><th><a href="?C=N;O=D">Name</a></th><th><a href="?C=M;O=A">Last modified</a></th></tr>
    <tr><td><a href="/empiar/world_availability/11759/">Parent Directory</a></td></tr>
    <tr><td><a href="../">Up</a></td></tr>
    <tr><td><a href="slice%201.dm3">slice 1.dm3</a></td></tr>
    <tr><td><a href="trakem2/">trakem2/</a></td></tr>
    <tr><td><a href="https://elsewhere.example/x.dm3">x</a></td></tr>
    <tr><td><a href="slice%201.dm3">again</a></td></tr></table>"""
    entries = parse_autoindex(page)
    assert [(e.name, e.is_dir) for e in entries] == [("slice 1.dm3", False), ("trakem2", True)]


def test_api_answers_every_url_form_under_the_accession_key(empiar):
    http = HttpClient(FAST_TRANSFER)
    api = empiar.env["EM_INGEST_EMPIAR_API_URL"]
    for form in ("EMPIAR-11759/", "EMPIAR-11759", "11759", "11759/"):
        document = http.get_json(f"{api}/entry/{form}")
        record = entry_record(document, "EMPIAR-11759", form)
        assert record["imagesets"][0]["pixel_width"] == pytest.approx(PIXEL_UM_11759 * 1e4)
        assert isinstance(record["imagesets"][0]["image_width"], str)  # the API sends sizes as strings
    with pytest.raises(SourceResponseError, match="EMPIAR-10001"):
        entry_record({"EMPIAR-11759": {}}, "EMPIAR-10001", "api")
    with pytest.raises(SelectionError, match="accession"):
        accession_number("11759")


def test_dm_reader_skips_thumbnail_and_converts_micrometres(tmp_path):
    image = np.arange(40 * 56, dtype=np.uint16).reshape(40, 56)
    for version in (3, 4):
        path = tmp_path / f"a.dm{version}"
        path.write_bytes(dm_bytes(image, pixel_size=0.0125, pixel_units="µm", slice_spacing_nm=30.0, version=version))
        dm = read_dm(path)
        assert (dm.version, dm.shape, dm.dtype) == (version, (40, 56), np.dtype("<u2"))
        assert dm.pixel_size_nm == pytest.approx((12.5, 12.5))
        assert dm.slice_spacing_nm == pytest.approx(30.0)
        np.testing.assert_array_equal(dm.array(), image)
    uncalibrated = tmp_path / "u.dm3"
    uncalibrated.write_bytes(dm_bytes(image, pixel_size=1.0, pixel_units=""))
    assert read_dm(uncalibrated).pixel_size_nm is None and read_dm(uncalibrated).slice_spacing_nm is None
    truncated = tmp_path / "t.dm3"
    truncated.write_bytes((tmp_path / "a.dm3").read_bytes()[:-3000])
    with pytest.raises(FormatError, match="t.dm3"):
        read_dm(truncated)


def test_mrc_volume_is_memory_mapped_with_voxel_size_in_angstrom(tmp_path):
    volume = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    path = tmp_path / "tomo.rec"
    path.write_bytes(mrc_bytes(volume, (30.0, 24.0, 20.0)))
    with MrcVolume(path) as mrc:
        assert mrc.shape == (5, 6, 7) and mrc.geometry.voxel_size_nm == pytest.approx((3.0, 2.4, 2.0))
        np.testing.assert_array_equal(mrc.read((slice(1, 3), slice(0, 6), slice(2, 5))), volume[1:3, :, 2:5])
    with mrcfile.new(tmp_path / "plain.mrc") as new:
        new.set_data(volume)  # voxel size left at 0: unknown, not 1 nm
    with MrcVolume(tmp_path / "plain.mrc") as mrc:
        assert mrc.geometry is None


def test_stack_orders_names_naturally_and_reads_fei_tiff_calibration(tmp_path):
    planes = np.arange(3 * 8 * 9, dtype=np.uint8).reshape(3, 8, 9)
    for z, name in enumerate(["img_2.tif", "img_10.tif", "img_1.tif"]):
        (tmp_path / name).write_bytes(fei_tiff_bytes(planes[z], 6.5e-8))
    assert [p.name for p in natural_order(tmp_path.glob("*.tif"))] == ["img_1.tif", "img_2.tif", "img_10.tif"]
    stack = PlaneStack(tmp_path.glob("*.tif"))
    np.testing.assert_array_equal(stack.read((slice(0, 3), slice(0, 8), slice(0, 9))), planes[[2, 0, 1]])
    assert stack.geometry is None  # xy from the FEI tag, but nothing states the slice spacing
    assert stack.planes[0].pixel_size_nm == pytest.approx((65.0, 65.0))
    with_api_z = PlaneStack(tmp_path.glob("*.tif"), fallback_z_spacing_nm=40.0)
    assert with_api_z.geometry.voxel_size_nm == pytest.approx((40.0, 65.0, 65.0))
    assert (with_api_z.pixel_size_from, with_api_z.z_spacing_from) == ("file", "archive")


# ---- end to end through Dagster ----------------------------------------------------------------

@pytest.mark.parametrize("key", ["EMPIAR-11759", "EMPIAR-90001"])
def test_end_to_end_over_ftp(workspace, empiar, key):
    ws = _workspace(workspace, empiar, key, ftp=True)
    expected = empiar.expected[key]
    assert ws.settings.empiar_files_url.startswith("ftp://")
    assert ws.materialize("empiar", key).success
    s0 = _s0(ws, key)
    assert s0.dtype == expected.volume.dtype
    np.testing.assert_array_equal(s0, expected.volume)
    manifest = RawStore(ws.data_root, "empiar", key).load_manifest()
    assert all(e.url.startswith("ftp://") for e in manifest.entries if e.path.startswith("files/"))
    assert ws.materialize_catalog().success
    row = catalog.read_catalog(ws.data_root / "catalog" / "metadata_catalog.parquet").to_pylist()[0]
    assert (row["voxel_size_z_nm"], row["voxel_size_y_nm"], row["voxel_size_x_nm"]) == pytest.approx(
        expected.voxel_size_nm)
    assert row["voxel_size_origin"] == "source-metadata"
    for column, value in expected.catalog.items():
        assert row[column] == value, column
    assert row["source_url"].startswith("ftp://")

    read_before = empiar.ftp_faults.retr_bytes
    empiar.ftp_faults.commands.clear()
    again = ws.materialize("empiar", key)
    assert again.get_asset_materialization_events()[0].materialization.metadata["fetched_bytes"].value == 0
    assert empiar.ftp_faults.retr_bytes == read_before  # no RETR at all on the re-run
    # The listing (MLSD: size and modification time) decides the re-run: no SIZE or MDTM per file either.
    commands = empiar.ftp_faults.commands
    assert commands["MLSD"] >= 1 and commands["SIZE"] == commands["MDTM"] == commands["RETR"] == 0


@pytest.mark.parametrize("ftp", [False, True], ids=["https", "ftp"])
def test_a_changed_slice_alone_is_fetched_again(tmp_path, fresh_replica, ftp):
    replica = fresh_replica("empiar")
    key, relpath = "EMPIAR-11759", "data/F57-8_test1_3VBSED_slice_0005.dm3"
    ws = workspace_for(tmp_path, replica, selection={"empiar": {key: {}}})
    if ftp:
        ws.env = {**ws.env, **replica.ftp_env}
    request = ws.pipeline.request("empiar", key)
    # The store counts the entry document (entry.json) as one object beside the 16 slices.
    assert ws.pipeline.fetch_raw(request).stats.fetched_objects == 16 + 1
    new_plane = np.full((100, 120), 7, np.uint8)  # same size in bytes: only the version tells it apart
    changed = dm_bytes(new_plane, pixel_size=PIXEL_UM_11759, slice_spacing_nm=50.0, name="3VBSED_slice_0005")
    assert len(changed) == len(replica.entries[key].files[relpath])
    replica.set_file(key, relpath, changed)
    manifest = ws.pipeline.fetch_raw(request)
    stats = manifest.stats
    assert (stats.fetched_objects, stats.skipped_objects) == (1, 15 + 1)  # the changed slice; 15 + entry.json
    assert stats.fetched_bytes == len(changed)  # the one fetched object is that slice, not the document
    assert manifest.entry("files/F57-8_test1_3VBSED_slice_0005.dm3").sha256 == hashlib.sha256(changed).hexdigest()
    ws.pipeline.convert(request)
    np.testing.assert_array_equal(_s0(ws, key)[5], new_plane)


def test_dm3_catalog_carries_entry_metadata_and_voxel_provenance(workspace, empiar):
    ws = _workspace(workspace, empiar, "EMPIAR-11759")
    request = ws.pipeline.request("empiar", "EMPIAR-11759")
    ws.pipeline.fetch_raw(request)
    source = ws.pipeline.source("empiar")
    description = source.describe(request, ws.pipeline.raw_store(request, source))
    assert description.doi == "10.6019/EMPIAR-11759" and description.license == "CC0"
    assert description.authors == ("Example B", "Replica A")  # in the API's order_id order
    assert description.extra["citation_doi"] == "10.9999/replica.11759"
    assert description.extra["voxel_size_from"] == {"xy": "file", "z": "file"}
    assert description.extra["files"] == 16  # the XML and the trakem2 folder are not slices
    assert description.source_url.endswith(f"{TREE}/11759/data/")


def test_natural_slice_order_and_override_when_no_slice_spacing(workspace, empiar):
    key = "EMPIAR-90002"
    ws = _workspace(workspace, empiar, key)
    request = ws.pipeline.request("empiar", key)
    ws.pipeline.fetch_raw(request)
    with pytest.raises(SelectionError, match="voxel_size_nm"):
        ws.pipeline.convert(request)
    ws.write_selection({"empiar": {key: {"voxel_size_nm": [25.0, 5.0, 5.0]}}})
    assert ws.materialize("empiar", key).success
    np.testing.assert_array_equal(_s0(ws, key), empiar.expected[key].volume)  # slice_2 before slice_10
    sidecar = catalog.read_sidecar(ws.data_root / "zarr" / "empiar" / f"{key}.ome.zarr")
    assert sidecar["catalog_row"]["voxel_size_origin"] == "override"


def test_files_glob_selects_a_subset(workspace, empiar):
    key = "EMPIAR-90002"
    ws = _workspace(workspace, empiar, key, {"files": "slice_1?.dm4", "voxel_size_nm": [25.0, 5.0, 5.0]})
    manifest = ws.pipeline.fetch_raw(ws.pipeline.request("empiar", key))
    assert [e.path for e in manifest.entries if e.path.startswith("files/")] == [
        "files/slice_10.dm4", "files/slice_11.dm4", "files/slice_12.dm4"]


# ---- reliability and refusals ------------------------------------------------------------------

def test_https_download_resumes_after_cut_connection(workspace, empiar):
    key, relpath = "EMPIAR-90001", "data/tomograms/tomo_01.rec"
    size = len(empiar.entries[key].files[relpath])
    ws = _workspace(workspace, empiar, key)
    faults = empiar.http.faults
    faults.path_contains, faults.cut_after_bytes, faults.cuts = "tomo_01.rec", size - 100_000, 1
    empiar.http.traffic.reset()
    manifest = ws.pipeline.fetch_raw(ws.pipeline.request("empiar", key))
    assert manifest.entry("files/tomo_01.rec").sha256 == _file_sha(empiar, key, relpath)
    ranges = [r for m, p, r in empiar.http.traffic.requests if m == "GET" and p.endswith("tomo_01.rec")]
    assert len(ranges) == 2 and ranges[0] is None, ranges
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= size - 100_000  # continued from what had arrived, not restarted
    assert faults.cuts == 0


def test_ftp_download_resumes_after_cut_connection(tmp_path, empiar):
    key, relpath = "EMPIAR-90001", "data/tomograms/tomo_01.rec"
    url = f"{empiar.ftp_url}{TREE}/90001/{relpath}"
    client = FtpClient(FAST_TRANSFER)
    remote = client.stat(url)
    assert remote.size == len(empiar.entries[key].files[relpath]) and remote.last_modified
    empiar.ftp_faults.cut_after_bytes, empiar.ftp_faults.cuts = 100_000, 2
    download = client.download(url, tmp_path / "tomo_01.rec", expected=remote)
    assert download.sha256 == _file_sha(empiar, key, relpath)
    assert (tmp_path / "tomo_01.rec").stat().st_size == remote.size
    assert [p.name for p in tmp_path.iterdir()] == ["tomo_01.rec"]  # no partial file left behind
    offsets = empiar.ftp_faults.rest_offsets
    assert len(offsets) == 2 and all(0 < o <= 200_000 for o in offsets), offsets  # REST from what had arrived


def test_ftp_fetch_raw_resumes_after_cut_connection(workspace, empiar):
    key, relpath = "EMPIAR-90001", "data/tomograms/tomo_01.rec"
    ws = _workspace(workspace, empiar, key, ftp=True)
    empiar.ftp_faults.cut_after_bytes, empiar.ftp_faults.cuts = 100_000, 1
    manifest = ws.pipeline.fetch_raw(ws.pipeline.request("empiar", key))
    entry = manifest.entry("files/tomo_01.rec")
    assert entry.url.startswith("ftp://") and entry.sha256 == _file_sha(empiar, key, relpath)
    offsets = empiar.ftp_faults.rest_offsets
    assert len(offsets) == 1 and 0 < offsets[0] <= 100_000, offsets  # REST from what had arrived
    raw_dir = ws.data_root / "raw" / "empiar" / key
    assert not [p for p in raw_dir.rglob("*") if p.name.endswith(".part")]  # no partial file left behind


def test_listing_gap_is_filled_by_listing_again(workspace, empiar):
    key, missing = "EMPIAR-11759", "F57-8_test1_3VBSED_slice_0007.dm3"
    ws = _workspace(workspace, empiar, key)
    empiar.listing_gaps[missing] = 1  # the first listing omits a file the API counts
    empiar.http.traffic.reset()
    try:
        manifest = ws.pipeline.fetch_raw(ws.pipeline.request("empiar", key))
    finally:
        empiar.listing_gaps.clear()
    assert len([e for e in manifest.entries if e.path.startswith("files/")]) == 16
    assert manifest.entry(f"files/{missing}").sha256 == _file_sha(empiar, key, f"data/{missing}")
    listings = [p for m, p, _ in empiar.http.traffic.requests if m == "GET" and p.endswith("/11759/data/")]
    assert len(listings) == 2


def test_hostile_name_in_listing_is_refused(workspace, empiar):
    key = "EMPIAR-90003"
    ws = _workspace(workspace, empiar, key)
    with pytest.raises(UnsafePathError, match="escape.dm3"):
        ws.pipeline.fetch_raw(ws.pipeline.request("empiar", key))
    assert not list(Path(ws.root).rglob("escape.dm3"))
    assert not any(p.endswith("escape.dm3") for _, p, _ in empiar.http.traffic.requests)


def test_mismatched_slice_shape_fails_naming_the_file(workspace, empiar):
    key = "EMPIAR-90004"
    ws = _workspace(workspace, empiar, key, {"voxel_size_nm": [30.0, 10.0, 10.0]})
    request = ws.pipeline.request("empiar", key)
    ws.pipeline.fetch_raw(request)
    with pytest.raises(FormatError, match=r"slice_3\.dm3.*50 x 40.*slice_0\.dm3 is 48 x 40"):
        ws.pipeline.convert(request)


def test_unknown_imageset_and_empty_selection_fail_clearly(workspace, empiar):
    ws = _workspace(workspace, empiar, "EMPIAR-90001", {"imageset": "nope"})
    with pytest.raises(SelectionError, match="Reconstructed tomogram"):
        ws.pipeline.fetch_raw(ws.pipeline.request("empiar", "EMPIAR-90001"))
    ws.write_selection({"empiar": {"EMPIAR-90001": {"imageset": "Movies"}}})
    with pytest.raises(SourceResponseError, match="no image files"):
        ws.pipeline.fetch_raw(ws.pipeline.request("empiar", "EMPIAR-90001"))


@pytest.mark.parametrize("ftp", [False, True], ids=["https", "ftp"])
def test_discovery_lists_entries_from_the_file_tree(workspace, empiar, ftp):
    ws = _workspace(workspace, empiar, "EMPIAR-11759", ftp=ftp)
    keys = {item.dataset_key for item in EmpiarSource(ws.settings).discover()}
    assert {"EMPIAR-11759", "EMPIAR-90001", "EMPIAR-90002"} <= keys


def test_tiff_series_over_ftp_with_override(workspace, empiar):
    key = "EMPIAR-90005"
    ws = _workspace(workspace, empiar, key, {"voxel_size_nm": [100.0, 65.0, 65.0]}, ftp=True)
    assert ws.materialize("empiar", key).success
    np.testing.assert_array_equal(_s0(ws, key), empiar.expected[key].volume)
    assert tifffile.TiffFile(ws.data_root / "raw" / "empiar" / key / "files" / "img_1.tif").pages.first.tags[34682]


class TestEmpiarContract(SourceContract):
    source, key = "empiar", "EMPIAR-11759"

    def change_one_object(self, replica) -> None:
        relpath = "data/F57-8_test1_3VBSED_slice_0005.dm3"
        plane = np.full((100, 120), 7, np.uint8)
        replica.set_file(self.key, relpath, dm_bytes(plane, pixel_size=PIXEL_UM_11759, slice_spacing_nm=50.0,
                                                     name="3VBSED_slice_0005"))
        volume = replica.expected[self.key].volume.copy()
        volume[5] = plane
        replica.expected[self.key].volume = volume
