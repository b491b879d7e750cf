"""`em-ingest view`: the Neuroglancer state, the read-only data server, the links in metadata and catalog,
and the viewer itself in headless Chromium."""

from __future__ import annotations

import http.client
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest
from PIL import Image

from em_ingest import view
from em_ingest.catalog import read_catalog, rows_to_table, write_catalog
from em_ingest.cli import main
from em_ingest.errors import ConfigurationError
from em_ingest.orchestration.resources import EmIngestResource
from em_ingest.settings import Settings
from em_ingest_tests.harness import REPO_ROOT, Workspace, failure_text, workspace_for

EM_INGEST = str(Path(sys.executable).with_name("em-ingest"))
ARTIFACTS = REPO_ROOT / "test-artifacts" / "view"
# An anisotropic image with a translation (OpenOrganelle's region), and EPFL's stack with an override.
OO_KEY = "jrc_mus-nacc-2"
EPFL_KEY = "hippocampus-training"
PUBLIC = "https://data.example.org/em"
FAKE_TOKEN = "nt-0123456789-not-a-real-token"


def ome_zarr_metadata(result: dg.ExecuteInProcessResult, source: str) -> dict[str, Any]:
    return next(e.materialization.metadata for e in result.get_asset_materialization_events()
                if e.asset_key == dg.AssetKey([source, "ome_zarr"]))


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, replicas) -> tuple[Workspace, dict[str, dict[str, Any]]]:
    """Two real images and their catalog, made through Dagster as the UI would; and each ome_zarr's metadata."""
    oo = replicas["openorganelle"]
    ws = workspace_for(tmp_path_factory.mktemp("view"), oo, replicas["epfl"], selection={
        "openorganelle": {OO_KEY: dict(oo.selection[OO_KEY])},
        "epfl": {EPFL_KEY: {"file": "training.tif", "voxel_size_nm": [50, 8, 6]}},
    })
    ws.env.pop("EM_INGEST_PUBLIC_URL", None)
    metadata = {}
    for source, key in (("openorganelle", OO_KEY), ("epfl", EPFL_KEY)):
        metadata[source] = ome_zarr_metadata(ws.materialize(source, key), source)
    assert ws.materialize_catalog().success
    return ws, metadata


def catalog_rows(ws: Workspace) -> dict[str, dict[str, Any]]:
    rows = read_catalog(ws.data_root / "catalog" / "metadata_catalog.parquet").to_pylist()
    return {f"{r['source']}/{r['dataset_key']}": r for r in rows}


def parse_link(link: str) -> dict[str, Any]:
    """A state link as Neuroglancer's own Python package reads it."""
    import neuroglancer

    return neuroglancer.parse_url(link).to_json()


# ---- the state --------------------------------------------------------------------------------

ROW = {"source": "empiar", "dataset_key": "EMPIAR-1", "shape_z": 10, "shape_y": 20, "shape_x": 30,
       "voxel_size_z_nm": 50.0, "voxel_size_y_nm": 8.0, "voxel_size_x_nm": 6.0, "translation_z_nm": 100.0,
       "translation_y_nm": 16.0, "translation_x_nm": None, "intensity_min": 3.0, "intensity_max": 250.0,
       "extra_json": json.dumps({"ngff_version": "0.5"})}


def test_state_is_centred_in_physical_coordinates_with_the_voxel_size():
    image = view.ImageView.from_row(ROW, labels=["cells"])
    state = view.viewer_state([image], PUBLIC)
    # x, y, z (Neuroglancer's xy panel shows the first two), in metres per voxel of this image.
    assert list(state["dimensions"].items()) == [("x", [6e-09, "m"]), ("y", [8e-09, "m"]), ("z", [5e-08, "m"])]
    # Physical centre: translation + (n - 1) / 2 voxels; the position is in voxels of the dimensions.
    centre_nm = {"x": 0 + 29 / 2 * 6, "y": 16 + 19 / 2 * 8, "z": 100 + 9 / 2 * 50}
    position = dict(zip(state["dimensions"], state["position"]))
    assert {axis: position[axis] * state["dimensions"][axis][0] * 1e9 for axis in "xyz"} == pytest.approx(centre_nm)
    image_layer, label_layer = state["layers"]
    assert image_layer == {"type": "image", "name": "empiar/EMPIAR-1", "opacity": 1.0,
                           "source": f"zarr3://{PUBLIC}/zarr/empiar/EMPIAR-1.ome.zarr/",
                           "shaderControls": {"normalized": {"range": [3, 250]}}}
    assert label_layer == {"type": "segmentation", "name": "empiar/EMPIAR-1 labels/cells",
                           "source": f"zarr3://{PUBLIC}/zarr/empiar/EMPIAR-1.ome.zarr/labels/cells/"}
    # The xy plane (30 x 6 nm wide, 20 x 8 nm high) fits FIT_PIXELS at the zoom, in 6 nm units per pixel.
    assert state["crossSectionScale"] == pytest.approx(180 / 6 / view.FIT_PIXELS)

    # Neuroglancer's own parser reads the link back to the same state.
    link = view.state_link(state)
    assert link.startswith("https://neuroglancer-demo.appspot.com/#!%7B")
    parsed = parse_link(link)
    assert parsed["position"] == pytest.approx(state["position"])
    assert [layer["source"] for layer in parsed["layers"]] == [layer["source"] for layer in state["layers"]]
    assert parsed["dimensions"] == state["dimensions"]


def test_state_for_ngff_04_images_and_rows_without_intensities():
    row = {**ROW, "extra_json": json.dumps({"ngff_version": "0.4"}), "intensity_min": None, "translation_z_nm": None}
    layer = view.viewer_state([view.ImageView.from_row(row)], PUBLIC, layout="xy")["layers"][0]
    assert layer["source"].startswith("zarr2://") and "shaderControls" not in layer
    with pytest.raises(view.ViewError, match="layout 'sideways'"):
        view.viewer_state([view.ImageView.from_row(row)], PUBLIC, layout="sideways")
    with pytest.raises(view.ViewError, match="empiar/EMPIAR-1: the catalog row has no complete shape"):
        view.ImageView.from_row({**ROW, "shape_y": None})


def test_label_images_are_read_from_the_labels_group(tmp_path):
    labels = tmp_path / "img.ome.zarr" / "labels"
    (labels / "cells").mkdir(parents=True)
    (labels / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {
        "ome": {"version": "0.5", "labels": ["cells", "../../escape", "not-written"]}}}))
    assert view.label_names(tmp_path / "img.ome.zarr") == ("cells",)
    assert view.label_names(tmp_path / "none.ome.zarr") == ()


@pytest.mark.parametrize(("url", "expected"), [
    ("https://data.example.org/em/", "https://data.example.org/em"),
    ("s3://bucket/em", "s3://bucket/em"),
    ("  ", None),
])
def test_public_url_is_normalised(url, expected):
    assert view.public_base(url) == expected


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://data.example.org/em", "expected an http(s)://, s3:// or gs:// URL"),
    ("/srv/em", "expected an http(s)://, s3:// or gs:// URL"),
    ("https://data.example.org/em?token=x", "takes no '?' or '#' part"),
])
def test_malformed_public_url_is_refused_naming_the_variable(url, message):
    with pytest.raises(ConfigurationError, match="EM_INGEST_PUBLIC_URL") as info:
        view.public_base(url)
    assert message in str(info.value)


# ---- the command's failure paths and --no-serve -------------------------------------------------

def test_unknown_or_malformed_image_names_fail_in_one_line(ingested, capsys):
    ws, _ = ingested
    assert main(["view", "--data-root", str(ws.data_root), "openorganelle/nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("em-ingest: error: openorganelle/nope: no such image in the catalog")
    assert f"it lists epfl/{EPFL_KEY}, openorganelle/{OO_KEY}" in err
    assert main(["view", "--data-root", str(ws.data_root), OO_KEY]) == 2
    assert f"'{OO_KEY}': name an image as SOURCE/KEY" in capsys.readouterr().err


def test_missing_catalog_and_missing_image_fail_clearly(ingested, tmp_path, capsys):
    ws, _ = ingested
    assert main(["view", "--data-root", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no catalog at {tmp_path / 'empty' / 'catalog' / 'metadata_catalog.parquet'}" in err
    # A catalog that lists an image no longer on disk.
    row = catalog_rows(ws)[f"epfl/{EPFL_KEY}"]
    write_catalog(rows_to_table([row]), tmp_path / "moved" / "catalog" / "metadata_catalog.parquet")
    assert main(["view", "--data-root", str(tmp_path / "moved"), f"epfl/{EPFL_KEY}"]) == 2
    assert "the catalog lists it but" in capsys.readouterr().err


def test_no_serve_prints_a_demo_app_link_for_a_public_data_root(ingested, capsys, monkeypatch):
    ws, _ = ingested
    monkeypatch.delenv("EM_INGEST_PUBLIC_URL", raising=False)
    root = str(ws.data_root)
    assert main(["view", "--data-root", root, "--no-serve"]) == 2
    assert "--no-serve needs --public-url URL (or EM_INGEST_PUBLIC_URL)" in capsys.readouterr().err
    assert main(["view", "--data-root", root, "--public-url", PUBLIC]) == 2
    assert "--public-url goes with --no-serve" in capsys.readouterr().err

    assert main(["view", "--data-root", root, "--no-serve", "--public-url", PUBLIC + "/"]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and out.startswith(view.NEUROGLANCER_DEMO_APP + "#!")
    assert "neuroglancer-demo.appspot.com" in err and "cross-origin" in err
    state = parse_link(out.strip())
    # Each image, and the OpenOrganelle image's nucleus label as a segmentation layer over it.
    assert [(layer["type"], layer["source"]) for layer in state["layers"]] == [
        ("image", f"zarr3://{PUBLIC}/zarr/epfl/{EPFL_KEY}.ome.zarr/"),
        ("image", f"zarr3://{PUBLIC}/zarr/openorganelle/{OO_KEY}.ome.zarr/"),
        ("segmentation", f"zarr3://{PUBLIC}/zarr/openorganelle/{OO_KEY}.ome.zarr/labels/nuc/")]

    monkeypatch.setenv("EM_INGEST_PUBLIC_URL", "gs://bucket/em")  # the variable is the default
    assert main(["view", "--data-root", root, "--no-serve", f"openorganelle/{OO_KEY}"]) == 0
    state = parse_link(capsys.readouterr().out.strip())
    assert [layer["source"] for layer in state["layers"]] == [
        f"zarr3://gs://bucket/em/zarr/openorganelle/{OO_KEY}.ome.zarr/",
        f"zarr3://gs://bucket/em/zarr/openorganelle/{OO_KEY}.ome.zarr/labels/nuc/"]


# ---- the link in Dagster metadata and the catalog ---------------------------------------------

def test_without_a_public_url_the_metadata_says_how_to_view(ingested):
    ws, metadata = ingested
    entry = metadata["epfl"]["neuroglancer"]
    assert isinstance(entry, dg.TextMetadataValue)
    assert entry.value.startswith(f"em-ingest view epfl/{EPFL_KEY} --data-root {ws.data_root}")
    assert "EM_INGEST_PUBLIC_URL" in entry.value
    assert "neuroglancer_url" not in json.loads(catalog_rows(ws)[f"epfl/{EPFL_KEY}"]["extra_json"])


def test_with_a_public_url_metadata_and_catalog_carry_the_link(workspace):
    ws = workspace("epfl")
    ws.env["EM_INGEST_PUBLIC_URL"] = PUBLIC + "/"
    key = next(iter(ws.selection["epfl"]))
    entry = ome_zarr_metadata(ws.materialize("epfl", key), "epfl")["neuroglancer"]
    assert isinstance(entry, dg.UrlMetadataValue)  # a clickable link in the UI
    state = parse_link(entry.url)
    assert state["layers"][0]["source"] == f"zarr3://{PUBLIC}/zarr/epfl/{key}.ome.zarr/"
    assert ws.materialize_catalog().success
    extra = json.loads(catalog_rows(ws)[f"epfl/{key}"]["extra_json"])
    assert extra["neuroglancer_url"] == entry.url and extra["ngff_version"] == "0.5"  # the rest kept

    # The resource binds the variable like every other setting: by name, resolved at run time.
    resource = EmIngestResource.from_environment({"EM_INGEST_PUBLIC_URL": PUBLIC})
    assert isinstance(resource.public_url, dg.EnvVar) and resource.public_url.env_var_name == "EM_INGEST_PUBLIC_URL"
    assert Settings.from_env({"EM_INGEST_PUBLIC_URL": PUBLIC}).public_url == PUBLIC

    # A malformed one fails the run before any conversion, naming the variable.
    ws.env["EM_INGEST_PUBLIC_URL"] = "ftp://data.example.org/em"
    result = ws.materialize("epfl", key, steps=("ome_zarr",), raise_on_error=False)
    assert not result.success and "EM_INGEST_PUBLIC_URL 'ftp://data.example.org/em'" in failure_text(result)


# ---- the data server ----------------------------------------------------------------------------

@pytest.fixture
def hostile_root(tmp_path) -> Path:
    """A data root with an image published the em-ingest way (a link into .versions/) and traps beside it."""
    root = tmp_path / "data"
    version = root / "zarr" / "epfl" / ".versions" / "k.ome.zarr" / "v1"
    (version / "s0" / "c" / "0" / "0").mkdir(parents=True)
    (version / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    (version / "s0" / "c" / "0" / "0" / "0").write_bytes(bytes(range(200)))
    (root / "zarr" / "epfl" / "k.ome.zarr").symlink_to(Path(".versions") / "k.ome.zarr" / "v1")
    (root / ".env").write_text(f"NEUPRINT_TOKEN={FAKE_TOKEN}\n")
    (root / ".locks").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(FAKE_TOKEN)
    (root / "zarr" / "outside").symlink_to(outside)  # a folder link leading out
    (root / "zarr" / "secret.json").symlink_to(outside / "secret.txt")  # a file link leading out
    (root / "zarr" / "passwd").symlink_to("/etc/passwd")
    (root / "zarr" / "environ").symlink_to("/proc/self/environ")
    return root


ORIGIN = "http://127.0.0.1:9"  # the viewer page's origin, the only one allowed to read


@pytest.fixture
def server(hostile_root, monkeypatch) -> Iterator[view.DataRootServer]:
    monkeypatch.setenv("NEUPRINT_TOKEN", FAKE_TOKEN)  # in this process's environment, so /proc/self/environ has it
    with view.DataRootServer(hostile_root, allow_origins={ORIGIN}) as running:
        yield running


def request(server: view.DataRootServer, path: str, method: str = "GET",
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with the path sent exactly as given (no client-side normalisation of '..')."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in {"Host": f"127.0.0.1:{server.port}", **(headers or {})}.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


IMAGE = "/zarr/epfl/k.ome.zarr"


def test_server_serves_published_images_with_ranges_and_cors(server):
    status, headers, body = request(server, f"{IMAGE}/zarr.json", headers={"Origin": ORIGIN})
    assert status == 200 and json.loads(body)["node_type"] == "group"
    assert headers["access-control-allow-origin"] == ORIGIN and headers["content-type"] == "application/json"
    assert "python" not in headers["server"].lower()
    chunk = f"{IMAGE}/s0/c/0/0/0"
    status, headers, body = request(server, chunk, headers={"Range": "bytes=10-19"})
    assert status == 206 and body == bytes(range(10, 20)) and headers["accept-ranges"] == "bytes"
    status, headers, body = request(server, chunk, headers={"Range": "bytes=-16"})  # a shard index read
    assert status == 206 and body == bytes(range(184, 200)) and headers["content-range"] == "bytes 184-199/200"
    assert request(server, chunk, headers={"Range": "bytes=190-"})[2] == bytes(range(190, 200))
    status, headers, _ = request(server, chunk, headers={"Range": "bytes=500-"})
    assert status == 416 and headers["content-range"] == "bytes */200"
    assert request(server, chunk, headers={"Range": "bytes=0-1,5-6"})[::2] == (200, bytes(range(200)))  # ignored
    status, headers, body = request(server, chunk, method="HEAD")
    assert status == 200 and headers["content-length"] == "200" and body == b""
    # Any other page gets no permission to read; a preflight is answered for the viewer.
    assert "access-control-allow-origin" not in request(server, chunk, headers={"Origin": "https://evil.example"})[1]
    status, headers, _ = request(server, chunk, "OPTIONS", {"Origin": ORIGIN, "Access-Control-Request-Headers": "range"})
    assert status == 204 and "Range" in headers["access-control-allow-headers"]


@pytest.mark.parametrize("path", [
    "/zarr/../../outside/secret.txt",            # dot segments, raw
    "/zarr/epfl/../../../outside/secret.txt",
    "/%2e%2e/outside/secret.txt",                # encoded
    "/zarr/%2E%2E/%2e%2e/outside/secret.txt",
    "/%2e%2e%2foutside%2fsecret.txt",            # encoded slashes too
    "/%252e%252e/outside/secret.txt",            # double-encoded: a literal name, not a parent
    "//etc/passwd", "/zarr/..%5c..%5coutside%5csecret.txt", "/zarr\\..\\..\\outside\\secret.txt",
    "/zarr/outside/secret.txt",                  # a folder symlink leading outside
    "/zarr/secret.json", "/zarr/passwd", "/zarr/environ",  # file symlinks leading outside
    "/.env", "/zarr/epfl/.versions/k.ome.zarr/v1/zarr.json", "/.locks",  # hidden names
    f"{IMAGE}/zarr.json%00.png", "/zarr/epfl/k.ome.zarr/zarr.json/..",
    "/", "/zarr", "/zarr/", "/zarr/epfl/", f"{IMAGE}/", f"{IMAGE}/s0",  # folders: no listings
    "http://127.0.0.1/../outside/secret.txt",     # absolute-form request target
])
def test_server_refuses_everything_outside_the_published_files(server, path):
    status, _, body = request(server, path)
    assert status == 404, path
    assert FAKE_TOKEN.encode() not in body and b"root:" not in body and b"zarr.json" not in body


def test_server_is_read_only_loopback_and_checks_the_host(server, hostile_root):
    chunk = f"{IMAGE}/s0/c/0/0/0"
    for method in ("PUT", "POST", "DELETE", "PATCH"):
        status, headers, _ = request(server, chunk, method, {"Content-Length": "3"})
        assert status == 405 and headers["allow"] == "GET, HEAD, OPTIONS", method
    assert (hostile_root / "zarr" / "epfl" / "k.ome.zarr" / "s0" / "c" / "0" / "0" / "0").read_bytes() == bytes(range(200))
    # A page that rebinds its own name to 127.0.0.1 sends its own Host: it gets nothing.
    assert request(server, f"{IMAGE}/zarr.json", headers={"Host": "evil.example"})[0] == 421
    assert request(server, f"{IMAGE}/zarr.json", headers={"Host": f"localhost:{server.port}"})[0] == 200
    # Bound to loopback only: this machine's other addresses do not answer.
    assert server.url.startswith("http://127.0.0.1:")
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))  # picks the outgoing interface; sends nothing
        address = probe.getsockname()[0]
    except OSError:
        address = "127.0.0.1"
    finally:
        probe.close()
    if address.startswith("127."):
        pytest.skip("this machine has no address but loopback")
    with pytest.raises(OSError):
        socket.create_connection((address, server.port), timeout=2).close()


# ---- the viewer in a real browser ---------------------------------------------------------------

# ENVIRONMENT.md: headless Chromium without GPU, sandbox or network beyond loopback, and software WebGL.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--enable-webgl", "--ignore-gpu-blocklist", "--use-gl=angle", "--use-angle=swiftshader-webgl",
                 "--enable-unsafe-swiftshader"]


def read_until(process: subprocess.Popen, marker: str, timeout: float) -> list[str]:
    """stdout lines of `process` up to the one containing `marker` (read by a thread, so a silent
    process cannot block the test past `timeout`)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if marker in line:
            return seen
    raise AssertionError(f"no {marker!r} within {timeout} s; output: {seen}")


def rendered_slice(page: Any, path: Path) -> np.ndarray:
    page.locator(".neuroglancer-rendered-data-panel").first.screenshot(path=str(path))
    return np.asarray(Image.open(path).convert("L"), dtype=np.float64)


def test_viewer_shows_the_image_in_headless_chromium(ingested, tmp_path):
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Chromium is not installed (Debian package `chromium`); .ci/run installs it")
    ws, _ = ingested
    row = catalog_rows(ws)[f"openorganelle/{OO_KEY}"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EM_INGEST_")}
    stderr = (tmp_path / "stderr.txt").open("w")
    process = subprocess.Popen([EM_INGEST, "view", f"openorganelle/{OO_KEY}", "--data-root", str(ws.data_root),
                                "--layout", "xy"], stdout=subprocess.PIPE, stderr=stderr, text=True,
                               env=env, start_new_session=True)
    timings: dict[str, float] = {}
    try:
        lines = read_until(process, "Ctrl-C to stop", timeout=60)
        timings["command_ready_s"] = round(time.monotonic() - started, 1)
        url = next(line.split(": ", 1)[1] for line in lines if line.startswith("Neuroglancer: "))
        assert url.startswith("http://127.0.0.1:")
        problems: list[str] = []
        with playwright_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.set_default_timeout(30_000)
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", lambda message: problems.append(f"console: {message.text} ({message.location['url']})")
                    if message.type == "error" and not message.location["url"].endswith("/favicon.ico") else None)
            page.goto(url)
            page.locator(".neuroglancer-layer-item").first.wait_for()
            # Chunks stream in (a coarse level first): wait until the slice is textured and has settled.
            shot = ARTIFACTS / "slice.png"
            pixels, deadline = rendered_slice(page, shot), time.monotonic() + 30
            while time.monotonic() < deadline:
                page.wait_for_timeout(700)
                again = rendered_slice(page, shot)
                if again.std() > 10 and np.array_equal(again, pixels):
                    break
                pixels = again
            timings["slice_rendered_s"] = round(time.monotonic() - started, 1)

            # The layer's own panel: loaded as the catalog's dtype, with its shape and voxel size, no error.
            page.locator(".neuroglancer-layer-item").first.click(modifiers=["Control"])
            page.get_by_text(f"{row['dtype']} volume", exact=True).wait_for()
            page.screenshot(path=str(ARTIFACTS / "viewer.png"))
            scales, lower, upper = {}, {}, {}
            for axis in "zyx":
                scales[axis] = page.locator(f"input[title='Override scale of source dimension {axis}']").input_value()
                lower[axis] = page.locator(f"[title='Lower bound of source dimension {axis}']").inner_text()
                upper[axis] = page.locator(f"[title='Upper bound of source dimension {axis}']").inner_text()
            errors = page.locator(".neuroglancer-message-error").all_inner_texts()
            # The position bar: the global dimensions with their voxel sizes and the position shown.
            bar = page.locator(".neuroglancer-viewer-top-row > .neuroglancer-position-widget").first
            text = "e => (e.value ?? e.textContent).trim()"
            names = [e.evaluate(text) for e in bar.locator(".neuroglancer-position-dimension-name").all()]
            bar_scales = [e.evaluate(text) for e in bar.locator(".neuroglancer-position-dimension-scale").all()]
            coordinates = [e.evaluate(text) for e in bar.locator(".neuroglancer-position-dimension-coordinate").all()]
            browser.close()
        timings["browser_done_s"] = round(time.monotonic() - started, 1)
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
        try:
            returncode = process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
        stderr.close()
    assert returncode == 0, (tmp_path / "stderr.txt").read_text()

    assert problems == [] and errors == []
    voxel = {a: row[f"voxel_size_{a}_nm"] for a in "zyx"}
    shape = {a: row[f"shape_{a}"] for a in "zyx"}
    translation = {a: row[f"translation_{a}_nm"] or 0.0 for a in "zyx"}
    # Neuroglancer states each axis's voxel size, and bounds in voxels: [translation / voxel, + shape).
    assert {a: float(s.removesuffix("nm")) for a, s in scales.items()} == voxel
    for a in "zyx":
        start = int(lower[a].strip("[,"))
        assert start == round(translation[a] / voxel[a]) and int(upper[a].strip(")")) - start == shape[a], a
    assert names == ["x", "y", "z"]
    assert [float(s.strip("()").removesuffix("nm")) for s in bar_scales] == [voxel["x"], voxel["y"], voxel["z"]]
    # The position shown is the voxel at the image's physical centre.
    centre = {a: translation[a] / voxel[a] + (shape[a] - 1) / 2 for a in "zyx"}
    assert [float(c) for c in coordinates] == [np.floor(centre[a]) for a in "xyz"]

    # The rendered slice shows the image's texture, with brightness like the thumbnail's (the thumbnail
    # is the middle plane of a coarser level, stretched by percentiles; the viewer stretches by min-max).
    height, width = pixels.shape
    extent = {a: shape[a] * voxel[a] / min(voxel.values()) for a in "yx"}
    scale = max(extent.values()) / view.FIT_PIXELS
    half_h, half_w = int(extent["y"] / scale * 0.4), int(extent["x"] / scale * 0.4)
    image_part = pixels[height // 2 - half_h:height // 2 + half_h, width // 2 - half_w:width // 2 + half_w]
    thumbnail = np.asarray(Image.open(row["thumbnail_path"]), dtype=np.float64)
    measured = {"slice_mean": round(image_part.mean(), 1), "slice_std": round(image_part.std(), 1),
                "thumbnail_mean": round(thumbnail.mean(), 1), "thumbnail_std": round(thumbnail.std(), 1),
                "slice_crop_px": list(image_part.shape), **timings}
    (ARTIFACTS / "measurements.json").write_text(json.dumps(measured, indent=1))
    assert image_part.std() > 20, measured  # not uniform
    assert abs(image_part.mean() - thumbnail.mean()) < 40, measured


def test_code_location_does_not_import_neuroglancer():
    # The viewer is for `em-ingest view` only; every Dagster process imports the code location.
    code = "import sys, em_ingest.definitions; sys.exit('neuroglancer' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
