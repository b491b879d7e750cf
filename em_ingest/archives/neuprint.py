"""neuPrint through neuprint-python's Client: the dataset listing and the Meta node, under the project's
timeouts, retry policy and body limit; the token is in no message."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from em_ingest.errors import ConfigurationError, IntegrityError, SelectionError, SourceResponseError, TransferError
from em_ingest.formats.units import lengths_nm
from em_ingest.settings import TransferSettings
from em_ingest.transfer.retry import RetryableError, call_with_retries, parse_retry_after

if TYPE_CHECKING:
    import requests
    from neuprint import Client

T = TypeVar("T")

META_FIELDS = ("dataset", "tag", "uuid", "lastDatabaseEdit", "voxelSize", "voxelUnits")
META_QUERY = "MATCH (m:Meta) RETURN " + ", ".join(f"m.{f}" for f in META_FIELDS)
# The statuses the project's retry policy retries (as for every other transport).
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})

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
    """One neuPrint server through neuprint-python, every request carrying the bearer token.

    neuprint-python speaks only HTTPS and verifies the server's certificate: against the system's
    authorities by default, or those of `ca_bundle` (a PEM file) when the server's certificate is
    issued by another one. No message ever contains the token.
    """

    def __init__(self, server: str, token: str | None, transfer: TransferSettings, *, ca_bundle: str | None = None):
        self.url = server.rstrip("/")
        bare = normalize_token(token)
        if bare is None:
            raise ConfigurationError(
                f"NEUPRINT_TOKEN is not set: neuPrint at {self.url} needs a bearer token for dataset "
                "metadata (copy it from your account page on the neuPrint web site and export NEUPRINT_TOKEN)")
        if not self.url.startswith("https://"):
            raise ConfigurationError(f"NEUPRINT_SERVER must be an https:// URL, got {self.url!r} "
                                     "(neuPrint clients do not send the token over plain HTTP)")
        self._token = bare
        self._transfer = transfer
        self._verify: bool | str = ca_bundle or True
        self._client: Client | None = None

    @property
    def datasets_url(self) -> str:
        return f"{self.url}/api/dbmeta/datasets"

    @property
    def query_url(self) -> str:
        return f"{self.url}/api/custom/custom"

    @property
    def client(self) -> Client:
        """The neuprint-python Client (made on first use: importing neuprint takes about a second)."""
        if self._client is None:
            self._client = _make_client(self.url, self._token, self._verify, self._transfer)
        return self._client

    def datasets(self) -> dict[str, Any]:
        """GET /api/dbmeta/datasets: dataset name -> {uuid, last-mod, description, hidden, ...}."""
        # Always asked anew: neuprint-python caches the listing per server for the life of the process,
        # and a refresh must see a new uuid or last-mod.
        # A parameterless GET fails with 400 only over its Authorization header (a malformed JWT).
        listing = self._call(lambda: self.client.fetch_datasets(reload_cache=True), "GET", self.datasets_url,
                             auth_statuses=(400, 401, 403))
        if not isinstance(listing, dict):
            raise SourceResponseError(f"{self.datasets_url}: expected an object keyed by dataset, "
                                      f"got {type(listing).__name__}")
        return listing

    def query(self, dataset: str, cypher: str) -> dict[str, Any]:
        """POST /api/custom/custom: one Cypher query, answered as {columns, data}."""
        try:
            result = self._call(lambda: self.client.fetch_custom(cypher, dataset=dataset, format="json"),
                                "POST", self.query_url)
        except TransferError as exc:
            if exc.status == 404:
                raise SelectionError(f"neuPrint at {self.url} has no dataset {dataset!r}") from None
            raise
        if not isinstance(result, dict) or not isinstance(result.get("columns"), list) \
                or not isinstance(result.get("data"), list):
            raise SourceResponseError(f"POST {self.query_url}: expected {{columns, data}}, got {str(result)[:120]}")
        return result

    def _call(self, fn: Callable[[], T], method: str, url: str, auth_statuses: tuple[int, ...] = (401, 403)) -> T:
        """`fn()` under the project's retry policy; requests' and neuprint's errors become the project's,
        worded from the URL, the status and the server's own error text (never from request headers)."""
        import requests

        def attempt() -> T:
            try:
                return fn()
            except requests.exceptions.SSLError as exc:  # not transient: no retry
                raise TransferError(f"{method} {url}: TLS failed ({_short(exc)}); if the server's certificate is "
                                    "issued by an authority of your own, set NEUPRINT_CA_BUNDLE to its PEM file",
                                    url=url) from None
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise RetryableError(f"{method} {url}: {type(exc).__name__}: {_short(exc)}", url=url) from None
            except requests.exceptions.InvalidHeader:
                # requests quotes the offending value, which may be the token: name the problem only.
                raise TransferError(f"{method} {url}: a request header is not valid HTTP (value withheld)",
                                    url=url) from None
            except requests.HTTPError as exc:
                status = exc.response.status_code if exc.response is not None else None
                if status in _RETRY_STATUSES:
                    assert exc.response is not None
                    raise RetryableError(f"{method} {url}: HTTP {status}", url=url, status=status,
                                         retry_after_s=parse_retry_after(exc.response.headers.get("Retry-After"))
                                         ) from None
                if status in auth_statuses:
                    raise ConfigurationError(
                        f"neuPrint at {self.url} rejected NEUPRINT_TOKEN (HTTP {status} from {url}); "
                        "check that it is a current token for this server") from None
                said = _server_says(exc.response)
                raise TransferError(f"{method} {url}: HTTP {status}{said}", url=url, status=status) from None
            except ValueError as exc:  # the body is not JSON (ujson's error names no input)
                raise SourceResponseError(f"{method} {url}: expected JSON ({exc})") from None

        def give_up(exc: RetryableError) -> Exception:
            status = f" (last status: HTTP {exc.status})" if exc.status else ""
            return TransferError(f"giving up on {url} after retries{status}: {exc}", url=url, status=exc.status)

        return call_with_retries(attempt, self._transfer, describe=f"{method} {url}", on_give_up=give_up)


def _short(exc: BaseException) -> str:
    """requests' own message (URL, host and cause; it never quotes request headers), without neuprint's preamble."""
    # neuprint-python re-raises requests' errors with its own preamble; requests' message is in the cause.
    return " ".join(str(exc.__cause__ or exc).split())[-300:]


def _server_says(response: requests.Response | None) -> str:
    """neuPrint's own error text (e.g. a Cypher error), short; never anything from the request."""
    if response is None:
        return ""
    try:
        said = response.json().get("error")
    except (ValueError, AttributeError):
        return ""
    return f": {str(said)[:200]}" if said else ""


def _make_client(server: str, token: str, verify: bool | str, transfer: TransferSettings) -> Client:
    import neuprint
    from requests.adapters import HTTPAdapter

    class BoundedAdapter(HTTPAdapter):
        """Every request with the project's timeouts and no retries of its own (the retry policy is `_call`'s);
        a body read whole stops at max_body_bytes."""

        # Kept when neuprint deep-copies the client (an adapter pickles only what __attrs__ names).
        __attrs__ = [*HTTPAdapter.__attrs__, "timeout", "max_body_bytes"]  # noqa: RUF012  (as requests declares it)

        def __init__(self) -> None:
            self.timeout = (transfer.connect_timeout_s, transfer.read_timeout_s)
            self.max_body_bytes = transfer.max_body_bytes
            super().__init__(max_retries=0)

        def send(self, request: requests.PreparedRequest, stream: bool = False,
                 timeout: float | tuple[float | None, float | None] | None = None, verify: bool | str = True,
                 cert: str | tuple[str, str] | None = None, proxies: dict[str, str] | None = None) -> requests.Response:
            response = super().send(request, stream=True, timeout=timeout or self.timeout, verify=verify, cert=cert,
                                    proxies=proxies)
            if not stream:
                _read_bounded(response, self.max_body_bytes)
            return response

    class BoundClient(neuprint.Client):  # type: ignore[misc]  # neuprint is untyped
        """neuprint.Client with the adapter mounted before its first request.

        Its constructor lists the server's datasets to choose a default one, with the session it has just
        made: `_select_dataset` is where that happens. Here it mounts the adapter instead and chooses
        nothing; em-ingest names the dataset of every query and reads the listing itself.
        """

        def _select_dataset(self, dataset: str | None, reload_cache: bool) -> str | None:
            self.session.mount("https://", BoundedAdapter())
            return dataset

    try:
        client: Client = BoundClient(server, dataset=None, token=token, verify=verify, progress=False)
    except RuntimeError as exc:  # the token or the URL refused; neuprint's messages quote neither the token
        raise ConfigurationError(f"NEUPRINT_SERVER / NEUPRINT_TOKEN refused by neuprint-python: {exc}") from None
    return client


def _read_bounded(response: requests.Response, limit: int) -> None:
    """Read a streamed response's body into it, refusing more than `limit` bytes (or than it announced)."""
    import requests

    url = response.url
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    length = response.headers.get("Content-Length", "")
    announced = int(length) if encoding in ("", "identity") and length.strip().isdigit() else None
    if announced is not None and announced > limit:
        response.close()
        raise IntegrityError(f"{url}: the response announces {announced} bytes, more than max_body_bytes={limit}; "
                             "not read", url=url)
    cap = limit if announced is None else announced
    blocks, received = [], 0
    try:
        for block in response.iter_content(64 << 10):
            received += len(block)
            if received > cap:
                response.close()
                raise IntegrityError(f"{url}: the body is larger than {cap} bytes "
                                     f"({'its Content-Length' if announced is not None else 'max_body_bytes'}); "
                                     "stopped reading", url=url)
            blocks.append(block)
    except requests.exceptions.ChunkedEncodingError as exc:
        raise requests.ConnectionError(f"body cut short: {exc}") from None
    # What requests itself does when it reads a body: the content is then served from memory.
    response._content = b"".join(blocks)
    response._content_consumed = True


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
