"""OMERO.web, the public JSON API IDR serves its metadata through: URLs, paged listings, imgData, containers,
map annotations and original file paths, over HttpClient."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from em_ingest.errors import SourceResponseError
from em_ingest.formats.units import to_nm
from em_ingest.transfer.http import HttpClient

# What the JSON API (`/api/v0/m/...`) is asked for per page.
PAGE_LIMIT = 200
# "idr0086-miron-micrographs/experimentD" -> ("idr0086", "D"); screens end in "/screenA".
_CONTAINER_NAME = re.compile(r"^(idr\d{4})-[^/]*/(?:experiment|screen)([A-Za-z0-9]+)$")
CONTAINER_KINDS = ("project", "screen")


@dataclass(frozen=True)
class Answer:
    """One OMERO.web JSON answer and the URL that gave it, so a caller can keep both for provenance."""

    url: str
    document: Any


@dataclass(frozen=True)
class Container:
    """The project or screen an image belongs to."""

    kind: str  # "project" or "screen"
    id: int
    name: str | None


def study_of(container_name: str | None) -> str | None:
    """The OME-Zarr study folder of an OMERO project or screen name: `idrNNNN-…/experimentX` -> `idrNNNNX`."""
    if not container_name:
        return None
    match = _CONTAINER_NAME.match(container_name.strip())
    return f"{match.group(1)}{match.group(2)}" if match else None


def map_values(document: Any, *, where: str) -> dict[str, list[str]]:
    """Key -> values of every map annotation in a `/webclient/api/annotations/` answer (keys may repeat)."""
    if not isinstance(document, dict) or not isinstance(document.get("annotations"), list):
        raise SourceResponseError(f"{where}: expected {{'annotations': [...]}} from OMERO.web")
    values: dict[str, list[str]] = {}
    for annotation in document["annotations"]:
        for pair in annotation.get("values") or []:
            if isinstance(pair, (list, tuple)) and len(pair) == 2 and pair[1] not in (None, ""):
                values.setdefault(str(pair[0]).strip(), []).append(str(pair[1]).strip())
    return values


# What OMERO.web's imgData writes as `projectName` / `datasetName` when the image has no single project or
# dataset: a plate image (screen/plate/well), an orphan, or an image linked to several datasets. The id is then
# null. It is not a name (omero-web `webgateway/marshal.py`, `imageMarshal`: `pr and pr.name or "Multiple"`).
NO_SINGLE_PARENT = "Multiple"


def img_data_parent(img_data: dict[str, Any], kind: str) -> tuple[int | None, str | None]:
    """(id, name) of the image's one project or dataset (`kind`) as imgData's `meta` states it, None where unknown.

    imgData's "Multiple" is unknown, not a name; so is a name without an id, or an empty one.
    """
    if kind not in ("project", "dataset"):
        raise ValueError(f"expected 'project' or 'dataset', got {kind!r}")
    meta = img_data.get("meta")
    if not isinstance(meta, dict):
        return None, None
    found_id, name = meta.get(f"{kind}Id"), meta.get(f"{kind}Name")
    if not isinstance(found_id, int) or isinstance(found_id, bool):
        found_id = None
    if found_id is None or not isinstance(name, str) or name.strip() in ("", NO_SINGLE_PARENT):
        name = None
    return found_id, name


def img_data_voxel_size_nm(img_data: dict[str, Any]) -> tuple[float, float, float] | None:
    """imgData's `pixel_size` (OMERO.web converts it to micrometres; null when unknown) as (z, y, x) nanometres."""
    pixel_size = img_data.get("pixel_size") or {}
    x, y, z = (pixel_size.get(axis) for axis in "xyz")
    if z is None and (img_data.get("size") or {}).get("z") == 1:
        z = x  # a single plane has no z spacing; give it the pixel width
    # `not v <= 0` keeps a NaN, which Geometry then refuses rather than the size passing as unknown.
    sizes = [v for v in (z, y, x) if isinstance(v, (int, float)) and not v <= 0]
    if len(sizes) != 3:
        return None
    z_nm, y_nm, x_nm = (to_nm(float(v), "micrometer", where="imgData pixel_size") for v in sizes)
    return (z_nm, y_nm, x_nm)


def container_in_paths(paths: Any) -> tuple[str, int] | None:
    """(kind, id) of the first project or screen on a `paths_to_object` answer's paths, if any."""
    for path in (paths.get("paths") if isinstance(paths, dict) else None) or []:
        for node in path:
            if node.get("type") in CONTAINER_KINDS and isinstance(node.get("id"), int):
                return node["type"], node["id"]
    return None


class OmeroClient:
    """Read-only questions to one OMERO.web server (no login: IDR's public session needs none)."""

    def __init__(self, base_url: str, http: HttpClient):
        self.base_url = base_url.rstrip("/")
        self.http = http
        self._answers: dict[str, Any] = {}  # one run never asks OMERO.web the same question twice

    # ---- URLs -------------------------------------------------------------------------------
    def url(self, path: str, params: dict[str, Any] | None = None) -> str:
        url = f"{self.base_url}/{path.lstrip('/')}"
        return f"{url}?{urlencode(params)}" if params else url

    def viewer_url(self, image_id: int) -> str:
        """The page a person opens to look at the image in OMERO.web."""
        return self.url(f"/webclient/img_detail/{image_id}/")

    # ---- JSON -------------------------------------------------------------------------------
    def get_json(self, url: str) -> Any:
        if url not in self._answers:
            self._answers[url] = self.http.get_json(url)
        return self._answers[url]

    def answer(self, path: str, params: dict[str, Any] | None = None) -> Answer:
        url = self.url(path, params)
        return Answer(url, self.get_json(url))

    def paged(self, path: str, limit: int = PAGE_LIMIT) -> Iterator[dict[str, Any]]:
        """Every object of a JSON-API list, page by page with `offset`/`limit` until `meta.totalCount`."""
        offset = 0
        while True:
            url = self.url(path, {"offset": offset, "limit": limit})
            page = self.get_json(url)
            data = page.get("data") if isinstance(page, dict) else None
            meta = (page.get("meta") if isinstance(page, dict) else None) or {}
            if not isinstance(data, list):
                raise SourceResponseError(f"{url}: expected {{'data': [...], 'meta': {{...}}}}")
            yield from data
            offset += len(data)
            total = meta.get("totalCount")
            if not data or (isinstance(total, int) and offset >= total) or (total is None and len(data) < limit):
                return

    # ---- listings ---------------------------------------------------------------------------
    def images_of_dataset(self, dataset_id: int, limit: int = PAGE_LIMIT) -> Iterator[dict[str, Any]]:
        """The JSON-API image objects of a dataset, each with an integer `@id`."""
        for image in self.paged(f"/api/v0/m/datasets/{dataset_id}/images/", limit):
            if not isinstance(image.get("@id"), int):
                raise SourceResponseError(f"OMERO dataset {dataset_id}: image without an integer '@id': {image}")
            yield image

    def datasets_of_project(self, project_id: int, limit: int = PAGE_LIMIT) -> Iterator[dict[str, Any]]:
        """The JSON-API dataset objects of a project, each with an integer `@id`."""
        for dataset in self.paged(f"/api/v0/m/projects/{project_id}/datasets/", limit):
            if not isinstance(dataset.get("@id"), int):
                raise SourceResponseError(f"OMERO project {project_id}: dataset without an integer '@id': {dataset}")
            yield dataset

    # ---- one image --------------------------------------------------------------------------
    def img_data(self, image_id: int) -> Answer:
        """webgateway's imgData: size, pixel sizes (micrometres), channels and the project/dataset it sits in.

        An unknown image is a TransferError with status 404, as the server answers.
        """
        found = self.answer(f"/webgateway/imgData/{image_id}/")
        if not isinstance(found.document, dict) or not isinstance(found.document.get("size"), dict):
            raise SourceResponseError(f"{found.url}: expected imgData JSON with 'size' and 'meta'")
        return found

    def image(self, image_id: int) -> Answer:
        """The JSON API's image object (Pixels, acquisition details)."""
        return self.answer(f"/api/v0/m/images/{image_id}/")

    def map_annotations(self, kind: str, object_id: int) -> Answer:
        """The key/value annotations of an image, project or screen (read them with `map_values`)."""
        return self.answer("/webclient/api/annotations/", {"type": "map", kind: object_id})

    def paths_to_object(self, image_id: int) -> Answer:
        """Where an image sits: project/dataset or screen/plate/well (read it with `container_in_paths`)."""
        return self.answer("/webclient/api/paths_to_object/", {"image": image_id})

    def container(self, kind: str, container_id: int) -> Answer:
        """The JSON API's project or screen object; its name is `data.Name`."""
        if kind not in CONTAINER_KINDS:
            raise ValueError(f"expected a container kind of {CONTAINER_KINDS}, got {kind!r}")
        return self.answer(f"/api/v0/m/{kind}s/{container_id}/")

    def original_file_paths(self, image_id: int) -> Answer:
        """The paths of the files the image was imported from; `client` holds the paths as uploaded."""
        found = self.answer(f"/webgateway/original_file_paths/{image_id}/")
        client = found.document.get("client") if isinstance(found.document, dict) else None
        if not isinstance(client, list) or not client or not all(isinstance(p, str) for p in client):
            raise SourceResponseError(f"{found.url}: expected {{'client': [paths...]}} naming the original file(s)")
        return found
