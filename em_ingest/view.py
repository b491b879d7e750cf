"""Neuroglancer views of ingested images: the viewer state and its links (pure), and a read-only
loopback server for the data root.

Nothing here imports Neuroglancer or Dagster: the state is plain JSON, which `em-ingest view` hands to
the `neuroglancer` package's viewer and the Dagster layer puts into links for the public demo app.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shlex
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, unquote, urlsplit

from em_ingest.errors import ConfigurationError, EmIngestError

log = logging.getLogger(__name__)

# Neuroglancer's public demo deployment: a state link opened there reads the data straight from
# EM_INGEST_PUBLIC_URL in the user's browser (so that location must allow cross-origin reads).
NEUROGLANCER_DEMO_APP = "https://neuroglancer-demo.appspot.com/"
# URL schemes Neuroglancer can read a Zarr from; a public URL must use one of them.
PUBLIC_URL_SCHEMES = ("https", "http", "s3", "gs")
# The cross-section zoom makes an image's larger in-plane side about this many screen pixels.
FIT_PIXELS = 600
LAYOUTS = ("4panel", "xy", "xz", "yz", "3d", "xy-3d", "xz-3d", "yz-3d")
# Characters left unescaped in a state fragment: Neuroglancer's own choice (url_state.to_url_fragment).
_FRAGMENT_SAFE = "~@#$&()*!+=:;,.?/'"
_LABEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ViewError(EmIngestError, ValueError):
    """An image cannot be viewed as asked: not in the catalog, missing on disk, a malformed name."""


@dataclass(frozen=True)
class ImageView:
    """What a viewer needs to know about one published image (axes z, y, x; lengths in nanometres)."""

    source: str
    key: str
    shape_zyx: tuple[int, int, int]
    voxel_size_nm: tuple[float, float, float]
    translation_nm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    zarr_format: int = 3  # 3 for OME-NGFF 0.5, 2 for 0.4
    intensity_range: tuple[float, float] | None = None  # the default contrast window
    labels: tuple[str, ...] = ()  # label images under <image>/labels/<name>
    version: str | None = None  # in a bucket: the published version's folder name (see `path`)

    @property
    def name(self) -> str:
        return f"{self.source}/{self.key}"

    @property
    def path(self) -> str:
        """The image's folder relative to the data root: the storage layout's zarr/<source>/<key>.ome.zarr, or in a
        bucket (where that name is a pointer object) the version it points to."""
        if self.version:
            return f"zarr/{self.source}/.versions/{self.key}.ome.zarr/{self.version}"
        return f"zarr/{self.source}/{self.key}.ome.zarr"

    @property
    def centre_nm(self) -> tuple[float, float, float]:
        """The physical centre: halfway between the centres of the first and the last voxel (OME-NGFF
        places a voxel's coordinate at its centre)."""
        c = [t + (n - 1) / 2 * v for t, n, v in zip(self.translation_nm, self.shape_zyx, self.voxel_size_nm)]
        return (c[0], c[1], c[2])

    @classmethod
    def from_row(cls, row: Mapping[str, Any], labels: Iterable[str] = ()) -> ImageView:
        """From a catalog row (or an ome_zarr sidecar's row): shape, voxel size, translation, intensities."""
        name = f"{row.get('source')}/{row.get('dataset_key')}"
        try:
            shape = tuple(int(row[f"shape_{a}"]) for a in "zyx")
            voxel = tuple(float(row[f"voxel_size_{a}_nm"]) for a in "zyx")
        except (KeyError, TypeError, ValueError):
            raise ViewError(f"{name}: the catalog row has no complete shape and voxel size") from None
        if any(n <= 0 for n in shape) or not all(math.isfinite(v) and v > 0 for v in voxel):
            raise ViewError(f"{name}: shape {list(shape)} and voxel size {list(voxel)} nm cannot be shown")
        translation = tuple(float(row.get(f"translation_{a}_nm") or 0.0) for a in "zyx")
        lo, hi = row.get("intensity_min"), row.get("intensity_max")
        window = (float(lo), float(hi)) if lo is not None and hi is not None and hi > lo else None
        return cls(str(row["source"]), str(row["dataset_key"]), (shape[0], shape[1], shape[2]),
                   (voxel[0], voxel[1], voxel[2]), (translation[0], translation[1], translation[2]),
                   zarr_format=_zarr_format(row.get("extra_json")), intensity_range=window,
                   labels=tuple(labels), version=_bucket_version(row))


def _bucket_version(row: Mapping[str, Any]) -> str | None:
    """The version folder a row's zarr_path names when it is a bucket URL (…/zarr/<source>/.versions/<key>.ome.zarr/<v>)."""
    url = str(row.get("zarr_path") or "")
    parts = url.rstrip("/").split("/")
    if "://" in url and len(parts) >= 5 and parts[-5:-1] == ["zarr", str(row.get("source")), ".versions",
                                                              f"{row.get('dataset_key')}.ome.zarr"]:
        return parts[-1]
    return None


def _zarr_format(extra_json: Any) -> int:
    try:
        extra = json.loads(extra_json) if extra_json else {}
    except ValueError:
        extra = {}
    return 2 if isinstance(extra, dict) and extra.get("ngff_version") == "0.4" else 3


def label_names(zarr_dir: Path) -> tuple[str, ...]:
    """The label images an OME-Zarr declares (`labels/` group: 0.5 `ome.labels`, 0.4 `labels`) that
    are present on disk; none when it has no labels group."""
    labels_dir = zarr_dir / "labels"
    declared: Any = None
    for name, keys in (("zarr.json", ("attributes", "ome", "labels")), (".zattrs", ("labels",))):
        try:
            declared = json.loads((labels_dir / name).read_text())
        except (OSError, ValueError):
            continue
        for key in keys:
            declared = declared.get(key) if isinstance(declared, dict) else None
        if declared is not None:
            break
    if not isinstance(declared, list):
        return ()
    # Names become URL path segments: only plain names of folders that exist.
    return tuple(n for n in declared if isinstance(n, str) and _LABEL_NAME.match(n) and (labels_dir / n).is_dir())


def public_base(url: str | None, what: str = "EM_INGEST_PUBLIC_URL") -> str | None:
    """The public URL of the data root, checked and without a trailing slash; None when unset."""
    if url is None or not url.strip():
        return None
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme.lower() not in PUBLIC_URL_SCHEMES or not parts.netloc:
        raise ConfigurationError(f"{what} {url!r}: expected an http(s)://, s3:// or gs:// URL of the data root "
                                 "as browsers reach it, e.g. https://data.example.org/em")
    if parts.query or parts.fragment:
        raise ConfigurationError(f"{what} {url!r}: the data root's URL takes no '?' or '#' part")
    return url.rstrip("/")


def image_url(base_url: str, image: ImageView, *subpath: str) -> str:
    """The URL of an image (or a path inside it) under the data root at `base_url`, ending in '/'."""
    parts = [image.path, *subpath]
    return f"{base_url.rstrip('/')}/{quote('/'.join(parts))}/"


def viewer_state(images: Sequence[ImageView], base_url: str, *, layout: str = "4panel") -> dict[str, Any]:
    """Neuroglancer state JSON: each image as an image layer (its labels as segmentation layers), the
    view at the first image's centre, dimensions x, y, z in that image's voxel size, zoomed so its xy
    plane fits a panel."""
    if not images:
        raise ViewError("no image to show")
    if layout not in LAYOUTS:
        raise ViewError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    first = images[0]
    layers: list[dict[str, Any]] = []
    for image in images:
        scheme = "zarr3" if image.zarr_format == 3 else "zarr2"
        layer: dict[str, Any] = {"type": "image", "name": image.name, "source": f"{scheme}://{image_url(base_url, image)}",
                                 "opacity": 1.0}
        if image.intensity_range is not None:
            # The default shader's contrast control, set to the image's own range rather than the dtype's.
            layer["shaderControls"] = {"normalized": {"range": [_number(v) for v in image.intensity_range]}}
        layers.append(layer)
        for label in image.labels:
            layers.append({"type": "segmentation", "name": f"{image.name} labels/{label}",
                           "source": f"{scheme}://{image_url(base_url, image, 'labels', label)}"})
    # Global dimensions in Neuroglancer's order x, y, z (its "xy" panel shows the first two), in units
    # of the first image's voxels. Neuroglancer's model space for an OME-Zarr is physical position /
    # voxel size, so the position is the physical centre divided by the voxel size.
    voxel_xyz = first.voxel_size_nm[::-1]
    position = [c / v for c, v in zip(first.centre_nm[::-1], voxel_xyz)]
    extents = [n * v for n, v in zip(first.shape_zyx[::-1], voxel_xyz)]
    canonical_nm = min(voxel_xyz)  # zoom is measured in the smallest dimension unit
    return {
        "dimensions": {axis: [_metres(v), "m"] for axis, v in zip("xyz", voxel_xyz)},
        "position": [_number(p) for p in position],
        # Zoom: screen pixels per canonical unit such that the larger side of the xy plane fits the panel.
        "crossSectionScale": _number(max(extents[0], extents[1]) / canonical_nm / FIT_PIXELS),
        "projectionScale": _number(max(extents) / canonical_nm * 1.5),
        "layers": layers,
        "selectedLayer": {"layer": first.name},
        "layout": layout,
    }


def _metres(nm: float) -> float:
    # Through the decimal text, so 8 nm is 8e-09 m and not 8.000000000000001e-09.
    return float(f"{nm!r}e-9")


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else round(float(x), 6)


def state_fragment(state: Mapping[str, Any]) -> str:
    """The state as Neuroglancer's URL fragment (`#!` + URL-encoded compact JSON)."""
    return "#!" + quote(json.dumps(state, separators=(",", ":")), safe=_FRAGMENT_SAFE)


def state_link(state: Mapping[str, Any], app: str = NEUROGLANCER_DEMO_APP) -> str:
    """A link that opens `state` in the Neuroglancer web app at `app` (default: the public demo app)."""
    return app + state_fragment(state)


def neuroglancer_link(row: Mapping[str, Any], public_url: str, labels: Iterable[str] = (),
                      app: str = NEUROGLANCER_DEMO_APP) -> str:
    """The demo-app link to one catalog row's image, read from the data root at `public_url`."""
    base = public_base(public_url)
    assert base is not None, "public_url is empty"
    return state_link(viewer_state([ImageView.from_row(row, labels)], base), app)


def view_command(source: str, key: str, data_root: Path | str) -> str:
    """The shell command that opens one image in a local Neuroglancer."""
    return shlex.join(["em-ingest", "view", f"{source}/{key}", "--data-root", str(data_root)])


def select_images(rows: Sequence[Mapping[str, Any]], names: Sequence[str], catalog: Path) -> list[Mapping[str, Any]]:
    """The catalog rows named `SOURCE/KEY` (in the order given), or every row when none is named."""
    by_name = {f"{r['source']}/{r['dataset_key']}": r for r in rows}
    if not names:
        if not by_name:
            raise ViewError(f"the catalog at {catalog} lists no image yet; materialize an ome_zarr partition "
                            "and catalog/metadata_catalog first")
        return list(by_name.values())
    chosen = []
    for name in names:
        if name.count("/") != 1 or not all(name.split("/")):
            raise ViewError(f"{name!r}: name an image as SOURCE/KEY, e.g. epfl/hippocampus-training")
        if name not in by_name:
            known = sorted(by_name)
            shown = ", ".join(known[:10]) + (f" and {len(known) - 10} more" if len(known) > 10 else "")
            raise ViewError(f"{name}: no such image in the catalog at {catalog}; it lists {shown or 'none'}")
        chosen.append(by_name[name])
    return chosen


# ---- the read-only data server ------------------------------------------------------------------

LOOPBACK = "127.0.0.1"
_BLOCK = 1 << 16
_CONTENT_TYPES = {".json": "application/json", ".png": "image/png", ".parquet": "application/vnd.apache.parquet"}
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class DataRootServer:
    """Serves the files under a data root, read-only, on 127.0.0.1.

    GET, HEAD and OPTIONS only; single byte ranges (including suffix ranges, which sharded Zarr v3
    readers use for the shard index); no directory listings; nothing whose path has a hidden
    component (`.locks`, `.versions`, `.env`, ...) or resolves, symlinks followed, outside the root.
    Cross-origin reads are allowed for `allow_origins` only ("*" for any page), and a request must
    name this server as its Host (so a page that rebinds its own domain to 127.0.0.1 gets nothing).
    """

    def __init__(self, root: Path, *, port: int = 0, allow_origins: Collection[str] = ()):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ViewError(f"data root {self.root} is not a folder")
        self.allow_origins = frozenset(allow_origins)
        handler = type("_Handler", (_DataRootHandler,), {"server_config": self})
        try:
            self._httpd = ThreadingHTTPServer((LOOPBACK, port), handler)
        except OSError as exc:
            raise ViewError(f"cannot serve the data root on {LOOPBACK}:{port}: {exc.strerror or exc}; "
                            "choose another port (--data-port)") from None
        self._httpd.daemon_threads = True
        self.port: int = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def hosts(self) -> frozenset[str]:
        return frozenset({f"{LOOPBACK}:{self.port}", f"localhost:{self.port}"})

    def start(self) -> DataRootServer:
        # A short poll interval: shutdown() waits for the serving loop to notice.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="data-root-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> DataRootServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def resolve(self, request_path: str) -> Path | None:
        """The file a request path names, or None when it is not one this server may serve."""
        if "\\" in request_path or "\x00" in request_path:
            return None
        decoded = unquote(request_path, errors="strict") if "%" in request_path else request_path
        # Decoding once is the only decoding: "%252e%252e" stays the literal name "%2e%2e".
        segments = decoded.split("/")
        if not segments or segments[0] != "":
            return None
        segments = segments[1:]
        if not segments or any(s == "" or s.startswith(".") or "\x00" in s or "\\" in s for s in segments):
            return None  # empty ("//", a trailing "/": a folder), ".", "..", hidden names
        candidate = self.root.joinpath(*segments)
        try:
            real = candidate.resolve(strict=True)
        except (OSError, RuntimeError):  # missing, unreadable, or a symlink loop
            return None
        if not real.is_relative_to(self.root) or not real.is_file():
            return None
        return real


class _DataRootHandler(BaseHTTPRequestHandler):
    server_config: DataRootServer
    server_version = "em-ingest-view"
    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("data server: " + format, *args)

    def _cors(self) -> None:
        origin = self.headers.get("Origin")
        allowed = self.server_config.allow_origins
        if "*" in allowed:
            self.send_header("Access-Control-Allow-Origin", "*")
        elif origin and origin in allowed:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        self.send_header("Access-Control-Expose-Headers", "Content-Range, Content-Length, Accept-Ranges")

    def _refuse(self, status: HTTPStatus, extra: Mapping[str, str] | None = None) -> None:
        body = f"{status.value} {status.phrase}\n".encode()
        self.send_response(status)
        self._cors()
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _host_ok(self) -> bool:
        return (self.headers.get("Host") or "").lower() in self.server_config.hosts

    def do_OPTIONS(self) -> None:
        if not self._host_ok():
            return self._refuse(HTTPStatus.MISDIRECTED_REQUEST)
        self.send_response(HTTPStatus.NO_CONTENT)
        self._cors()
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Range, If-None-Match, If-Modified-Since, Cache-Control")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        self._get(body=False)

    def do_GET(self) -> None:
        self._get(body=True)

    def _not_allowed(self) -> None:
        self.close_connection = True  # any request body stays unread: do not parse it as the next request
        self._refuse(HTTPStatus.METHOD_NOT_ALLOWED, {"Allow": "GET, HEAD, OPTIONS", "Connection": "close"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed

    def _get(self, body: bool) -> None:
        if not self._host_ok():
            return self._refuse(HTTPStatus.MISDIRECTED_REQUEST)
        try:
            path = self.server_config.resolve(urlsplit(self.path).path)
        except UnicodeDecodeError:
            path = None
        if path is None:
            return self._refuse(HTTPStatus.NOT_FOUND)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below, after streaming
        except OSError:
            return self._refuse(HTTPStatus.NOT_FOUND)
        with handle:
            size = os.fstat(handle.fileno()).st_size
            span = _byte_range(self.headers.get("Range"), size)
            if span == "unsatisfiable":
                return self._refuse(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, {"Content-Range": f"bytes */{size}"})
            start, stop = span if isinstance(span, tuple) else (0, size)
            self.send_response(HTTPStatus.PARTIAL_CONTENT if isinstance(span, tuple) else HTTPStatus.OK)
            self._cors()
            if isinstance(span, tuple):
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", _CONTENT_TYPES.get(path.suffix, "application/octet-stream"))
            self.send_header("Content-Length", str(stop - start))
            # Images are republished under the same names: always ask again.
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            if body:
                _copy(handle, self.wfile, start, stop - start)


def _byte_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """(start, stop) of a single `bytes=` range, "unsatisfiable", or None to send the whole file
    (no Range, or one this server does not honour, such as several ranges: RFC 9110 lets it ignore them)."""
    match = _RANGE.match(header.strip()) if header else None
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        length = int(last)
        if length == 0:
            return "unsatisfiable"
        return (max(size - length, 0), size)
    start = int(first)
    stop = min(int(last) + 1, size) if last else size
    if last and int(last) < start:
        return None  # invalid: ignored
    if start >= size:
        return "unsatisfiable"
    return (start, stop)


def _copy(source: BinaryIO, sink: io.BufferedIOBase, start: int, length: int) -> None:
    source.seek(start)
    while length > 0:
        block = source.read(min(_BLOCK, length))
        if not block:
            break
        sink.write(block)
        length -= len(block)

