"""The Dagster UI in headless Chromium: lineage of all five sources, a partition launched and its metadata."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from em_ingest.orchestration.factory import RAW_CODE_VERSION
from em_ingest.pipeline import CONVERTER_VERSION
from em_ingest.sources import source_classes
from em_ingest_tests.harness import REPO_ROOT
from em_ingest_tests.services import DagsterDev

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")

ARTIFACTS = REPO_ROOT / "test-artifacts" / "ui"
SOURCE = "epfl"
PARTITION = "hippocampus-training"
RUN_TIMEOUT_S = 240
# Headless Chromium that needs no sandbox, GPU or network beyond loopback (ENVIRONMENT.md).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

ASSET_NODES = """{ assetNodes { assetKey { path } dependencyKeys { path } isPartitioned description opVersion
                   groupName } }"""
RUN_STATUS = """query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status assetSelection { path }
                tags { key value } } } }"""
RUNS = """{ runsOrError { ... on Runs { results { runId status } } } }"""
MATERIALIZATIONS = """query($path: [String!]!, $partition: String!) {
  assetOrError(assetKey: {path: $path}) { ... on Asset {
    assetMaterializations(partitions: [$partition]) { partition runId tags { key value }
      metadataEntries { label __typename
        ... on TextMetadataEntry { text } ... on IntMetadataEntry { intValue }
        ... on BoolMetadataEntry { boolValue } ... on MarkdownMetadataEntry { mdStr }
        ... on JsonMetadataEntry { jsonString } ... on PathMetadataEntry { path } } } } } }"""


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("Chromium is not installed (Debian package `chromium`); .ci/run installs it")
    return found


@pytest.fixture
def dagster_ui(tmp_path, replicas) -> Iterator[tuple[DagsterDev, Path, float]]:
    """`em-ingest dev` on a temporary instance, the five replicas' selection, a temporary data root."""
    selection = replicas.write_selection(tmp_path / "datasets.yaml")
    data_root = tmp_path / "data"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("EM_INGEST_")}
    env.update(replicas.env, EM_INGEST_DATA_ROOT=str(data_root), EM_INGEST_DATASETS=str(selection))
    home = tmp_path / "dagster_home"
    home.mkdir()
    dev = DagsterDev(env, home, tmp_path / "dagster-dev.log")
    try:
        startup_s = dev.start()
        yield dev, data_root, startup_s
    finally:
        dev.stop()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(dev.log_path, ARTIFACTS / "dagster-dev.log")


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path



def wait_for_run(dev: DagsterDev, known_runs: set[str]) -> tuple[str, dict]:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        runs = dev.graphql(RUNS)["runsOrError"]["results"]
        new = [r for r in runs if r["runId"] not in known_runs]
        if new:
            run = dev.graphql(RUN_STATUS, {"id": new[0]["runId"]})["runOrError"]
            if run["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
                return new[0]["runId"], run
        time.sleep(2)
    raise AssertionError(f"no run finished within {RUN_TIMEOUT_S} s: {dev.log_tail()}")


def metadata(dev: DagsterDev, path: list[str]) -> tuple[dict, dict]:
    """Latest materialization of the partition as the UI reads it: (metadata by label, tags)."""
    events = dev.graphql(MATERIALIZATIONS, {"path": path, "partition": PARTITION})["assetOrError"]
    latest = events["assetMaterializations"][0]
    values = {}
    for entry in latest["metadataEntries"]:
        values[entry["label"]] = next((entry[k] for k in ("text", "intValue", "boolValue", "mdStr", "jsonString",
                                                          "path") if k in entry), None)
    return values, {t["key"]: t["value"] for t in latest["tags"]}


def test_ui_shows_lineage_launches_a_partition_and_its_metadata(dagster_ui):
    dev, data_root, startup_s = dagster_ui
    timings = {"dagster_dev_ready_s": round(startup_s, 1)}

    # What the graph draws: every source's raw -> ome_zarr, every ome_zarr -> the catalog.
    nodes = {"/".join(n["assetKey"]["path"]): n for n in dev.graphql(ASSET_NODES)["assetNodes"]}
    sources = sorted(source_classes())
    assert len(sources) == 5
    for source in sources:
        assert nodes[f"{source}/ome_zarr"]["dependencyKeys"] == [{"path": [source, "raw"]}]
        assert nodes[f"{source}/raw"]["isPartitioned"] and nodes[f"{source}/ome_zarr"]["isPartitioned"]
        assert nodes[f"{source}/raw"]["opVersion"] == RAW_CODE_VERSION
        assert nodes[f"{source}/ome_zarr"]["opVersion"] == CONVERTER_VERSION
    catalog_parents = {"/".join(d["path"]) for d in nodes["catalog/metadata_catalog"]["dependencyKeys"]}
    assert catalog_parents == {f"{s}/ome_zarr" for s in sources}

    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1150})
        page.set_default_timeout(60_000)

        # 1. The global lineage: the five source groups and the catalog group.
        page.goto(f"{dev.url}/asset-groups")
        page.get_by_text("Global asset lineage").wait_for()
        for group in [*sources, "catalog"]:
            page.get_by_text(group, exact=True).first.wait_for()
        shot(page, "01-global-lineage")
        # The catalog's upstream lineage two levels deep: every source's raw -> ome_zarr -> the catalog.
        page.goto(f"{dev.url}/assets/catalog/metadata_catalog?view=lineage&lineageScope=upstream&lineageDepth=2")
        page.get_by_text("ome_zarr", exact=True).first.wait_for()
        page.wait_for_timeout(1500)  # layout settles
        for group in sources:
            assert page.get_by_text(group, exact=True).filter(visible=True).count() >= 1, group
        assert page.get_by_text("ome_zarr", exact=True).filter(visible=True).count() == 5
        assert page.get_by_text("raw", exact=True).filter(visible=True).count() == 5
        assert page.get_by_text("metadata_catalog", exact=True).filter(visible=True).count() >= 1
        edges = page.locator("svg path").count()
        assert edges >= 10, f"{edges} edges drawn; expected 5 raw->ome_zarr and 5 ome_zarr->catalog"
        shot(page, "02-catalog-lineage")

        # 2. A partitioned asset: its description (paths intact) and its partitions.
        page.goto(f"{dev.url}/assets/{SOURCE}/ome_zarr")
        page.get_by_text(f"zarr/{SOURCE}/<dataset>.ome.zarr").first.wait_for()
        page.get_by_role("tab", name="Partitions").click()
        page.get_by_text(PARTITION, exact=True).filter(visible=True).first.wait_for()
        shot(page, "03-partitioned-asset")

        # 3. Launch one partition of the source's two assets from its group, as a user would.
        known_runs = {r["runId"] for r in dev.graphql(RUNS)["runsOrError"]["results"]}
        page.goto(f"{dev.url}/locations/em_ingest.definitions/asset-groups/{SOURCE}")
        page.get_by_role("button", name="Materialize all").click()
        page.get_by_text("Select a partition or create one").click()
        page.get_by_text(PARTITION, exact=True).filter(visible=True).first.click()
        page.keyboard.press("Escape")  # close the partition list, keep the dialog
        shot(page, "04-launch-dialog")
        launched = time.monotonic()
        page.get_by_role("button", name="Launch 1 run").click()
        run_id, run = wait_for_run(dev, known_runs)
        timings["ui_run_s"] = round(time.monotonic() - launched, 1)
        assert run["status"] == "SUCCESS", dev.log_tail()
        assert {"/".join(k["path"]) for k in run["assetSelection"]} == {f"{SOURCE}/raw", f"{SOURCE}/ome_zarr"}
        assert {t["key"]: t["value"] for t in run["tags"]}["dagster/partition"] == PARTITION
        page.goto(f"{dev.url}/runs/{run_id}")
        page.get_by_text("Success").first.wait_for()
        shot(page, "05-run-succeeded")

        # 4. The materialization's metadata in the asset's page, thumbnail included.
        page.goto(f"{dev.url}/assets/{SOURCE}/ome_zarr?partition={PARTITION}")
        for label in ("voxel_size_nm_zyx", "compression_ratio", "raw_manifest_sha256", "thumbnail"):
            page.get_by_text(label, exact=True).first.wait_for()
        shot(page, "06-materialization-metadata")
        # Markdown metadata opens on request; the thumbnail is a PNG embedded in it.
        page.locator("tr", has=page.get_by_text("thumbnail", exact=True)).get_by_text("[Show Markdown]").first.click()
        thumbnail = page.locator("img[src^='data:image/png;base64']").first
        thumbnail.wait_for()
        thumbnail.scroll_into_view_if_needed()
        assert thumbnail.evaluate("img => img.complete && img.naturalWidth > 0")
        shot(page, "07-thumbnail")
        browser.close()

    # 5. Lineage the UI shows equals what is on disk: manifest digest -> raw data version -> ome_zarr -> sidecar.
    manifest = json.loads((data_root / "raw" / SOURCE / PARTITION / "manifest.json").read_text())
    raw_meta, raw_tags = metadata(dev, [SOURCE, "raw"])
    zarr_meta, zarr_tags = metadata(dev, [SOURCE, "ome_zarr"])
    assert raw_tags["dagster/data_version"] == raw_meta["manifest_sha256"] == manifest["digest"]
    assert zarr_meta["raw_manifest_sha256"] == manifest["digest"]
    assert raw_tags["dagster/code_version"] == RAW_CODE_VERSION
    assert zarr_tags["dagster/code_version"] == CONVERTER_VERSION
    # The conversion's plan step reads the raw partition as its input: Dagster records its data version.
    assert zarr_tags[f"dagster/input_data_version/{SOURCE}/raw"] == manifest["digest"]
    assert raw_meta["fetched_bytes"] > 0 and zarr_meta["skipped_unchanged"] is False  # a first ingest
    (ARTIFACTS / "timings.json").write_text(json.dumps(timings, indent=1))
