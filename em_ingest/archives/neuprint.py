"""neuPrint's HTTP API (bearer token): the dataset listing and the Meta node; the token is in no message."""

from __future__ import annotations

import json
from typing import Any

from em_ingest.errors import ConfigurationError, SelectionError, SourceResponseError, TransferError
from em_ingest.formats.units import lengths_nm
from em_ingest.settings import TransferSettings
from em_ingest.transfer.http import HttpClient

META_FIELDS = ("dataset", "tag", "uuid", "lastDatabaseEdit", "voxelSize", "voxelUnits")
META_QUERY = "MATCH (m:Meta) RETURN " + ", ".join(f"m.{f}" for f in META_FIELDS)

# Facts about neuPrint datasets that neuPrint itself does not serve (SOURCES.md §2.4).
KNOWN_DATASETS: dict[str, dict[str, Any]] = {
    "hemibrain": {
        "organism": "Drosophila melanogaster",
        "sample": "adult female central brain (hemibrain)",
        "imaging_method": "FIB-SEM",
        "doi": "10.7554/eLife.57443",
        # Commonly stated for the hemibrain release; not verified against a primary source.
        "license": "CC-BY-4.0",
        "citation": "Scheffer et al. (2020) A connectome and analysis of the adult Drosophila central brain. "
                    "eLife 9:e57443",
    },
}


def normalize_token(value: str | None) -> str | None:
    """The bare token from NEUPRINT_TOKEN, which may also hold the `{"token": "..."}` document."""
    if not value or not value.strip():
        return None
    value = value.strip()
    if value.startswith("{"):
        try:
            value = str(json.loads(value)["token"])
        except (ValueError, KeyError, TypeError):
            raise ConfigurationError("NEUPRINT_TOKEN looks like a JSON document but has no \"token\" field") from None
    value = value.replace('"', "").strip()
    bad = next((i for i, c in enumerate(value) if not (33 <= ord(c) < 127)), None)
    if bad is not None:
        # Never echo the value: a header library would print it whole in its own error.
        raise ConfigurationError(f"NEUPRINT_TOKEN has a character a bearer token cannot contain (whitespace, a "
                                 f"control or non-ASCII character) at position {bad}; copy the token again")
    return value or None


class NeuprintClient:
    """One neuPrint server, every request carrying the bearer token; no message ever contains the token."""

    def __init__(self, server: str, token: str | None, transfer: TransferSettings):
        self.url = server.rstrip("/")
        bare = normalize_token(token)
        if bare is None:
            raise ConfigurationError(
                f"NEUPRINT_TOKEN is not set: neuPrint at {self.url} needs a bearer token for dataset "
                "metadata (copy it from your account page on the neuPrint web site and export NEUPRINT_TOKEN)")
        # The token lives only in this client's headers; errors name URLs and statuses, never headers.
        self._http = HttpClient(transfer, headers={"Authorization": f"Bearer {bare}",
                                                   "Content-Type": "application/json"})

    @property
    def datasets_url(self) -> str:
        return f"{self.url}/api/dbmeta/datasets"

    @property
    def query_url(self) -> str:
        return f"{self.url}/api/custom/custom"

    def datasets(self) -> dict[str, Any]:
        """GET /api/dbmeta/datasets: dataset name -> {uuid, last-mod, description, hidden, ...}."""
        try:
            listing = self._http.get_json(self.datasets_url)
        except TransferError as exc:
            # A parameterless GET fails with 400 only over its Authorization header (a malformed JWT).
            raise self._rejected(exc, (400, 401, 403)) from None
        if not isinstance(listing, dict):
            raise SourceResponseError(f"{self.datasets_url}: expected an object keyed by dataset, "
                                      f"got {type(listing).__name__}")
        return listing

    def query(self, dataset: str, cypher: str) -> dict[str, Any]:
        """POST /api/custom/custom: one Cypher query, answered as {columns, data}."""
        try:
            result = self._http.post_json(self.query_url, {"cypher": cypher, "dataset": dataset})
        except TransferError as exc:
            if exc.status == 404:
                raise SelectionError(f"neuPrint at {self.url} has no dataset {dataset!r}") from None
            raise self._rejected(exc) from None
        if not isinstance(result, dict) or not isinstance(result.get("columns"), list) \
                or not isinstance(result.get("data"), list):
            raise SourceResponseError(f"POST {self.query_url}: expected {{columns, data}}, got {str(result)[:120]}")
        return result

    def _rejected(self, exc: TransferError, statuses: tuple[int, ...] = (401, 403)) -> Exception:
        """A clear token error for an authentication status; other failures pass through unchanged."""
        if exc.status in statuses:
            return ConfigurationError(
                f"neuPrint at {self.url} rejected NEUPRINT_TOKEN (HTTP {exc.status} from {exc.url}); "
                "check that it is a current token for this server")
        return exc


# ---- reading neuPrint's answers ---------------------------------------------------------------------

def meta_row(response: Any, where: str) -> dict[str, Any]:
    """The Meta node's properties from a /api/custom/custom answer (columns `m.<name>`)."""
    if not isinstance(response, dict) or not response.get("data"):
        raise SourceResponseError(f"{where}: the Meta query returned no rows")
    columns = [str(c).removeprefix("m.") for c in response["columns"]]
    return dict(zip(columns, response["data"][0]))


def meta_voxel_size_nm(meta: dict[str, Any], where: str) -> tuple[float, float, float] | None:
    """The Meta node's voxelSize in nm, (x, y, z); None when the node does not state it."""
    size = meta.get("voxelSize")
    if size is None:
        return None
    units = meta.get("voxelUnits") or "nanometers"  # neuPrint states nm implicitly when absent
    return lengths_nm(size, units, where=where, what="voxelSize (x, y, z)")


def dataset_version(listing_entry: dict[str, Any], meta: dict[str, Any]) -> str | None:
    """What identifies a dataset's version: its uuid and last edit, from the listing or else the Meta node."""
    uuid = listing_entry.get("uuid") or meta.get("uuid")
    last_mod = listing_entry.get("last-mod") or meta.get("lastDatabaseEdit")
    parts = [f"uuid {uuid}" if uuid else None, f"last-mod {last_mod}" if last_mod else None]
    return ", ".join(p for p in parts if p) or None
