"""The one transport interface (stat, fetch to a file with resume, byte range, listing), chosen by URL scheme,
and the one bounded pool every concurrent transfer runs on."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

from em_ingest.errors import ConfigurationError, TransferError

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class RemoteObject:
    """What a server says about an object before we fetch it (from a HEAD, SIZE/MDTM or a listing)."""

    url: str
    size: int | None
    etag: str | None = None
    last_modified: str | None = None

    def same_version_as(self, other: Mapping[str, object], *, compare_size: bool = True) -> bool:
        """True when a manifest entry describes this very object version.

        `compare_size` is off for an entry that holds a byte range of the object, whose size is the range's.
        """
        return self.describes(other.get("size"), other.get("etag"), other.get("last_modified"),
                              compare_size=compare_size)

    def describes(self, size: object, etag: object, last_modified: object, *, compare_size: bool = True) -> bool:
        """`same_version_as` on a record's fields (no mapping built: it runs once per object of a refresh)."""
        if compare_size and self.size is not None and size != self.size:
            return False
        if self.etag and etag:
            return self.etag == etag
        if self.last_modified and last_modified:
            return self.last_modified == last_modified
        return False  # nothing to compare: fetch again rather than trust a guess


@dataclass(frozen=True)
class Download:
    """A finished download: where it is and what it was."""

    path: Path
    url: str
    size: int
    sha256: str
    etag: str | None
    last_modified: str | None
    resumed_from: int


def is_absent(error: BaseException) -> bool:
    """True for "there is no such object" (HTTP or S3 404, FTP 550), as opposed to a failure to reach it."""
    return isinstance(error, TransferError) and error.status == 404


class Transport(ABC):
    """One protocol. Every call runs under the project's retry policy and raises TransferError naming the
    URL (status 404 when the object does not exist; see `is_absent`)."""

    #: URL schemes this transport answers for.
    schemes: ClassVar[tuple[str, ...]]
    #: Data bytes received so far, for "nothing changed" accounting.
    bytes_received: int

    @abstractmethod
    def stat(self, url: str) -> RemoteObject:
        """Size and version of `url` without fetching its body."""

    @abstractmethod
    def fetch(self, url: str, dest: Path, *, expected: RemoteObject | None = None,
              on_bytes: Callable[[int], None] | None = None) -> Download:
        """`url` into the file `dest`, atomically (a hidden partial name until complete), resuming a partial
        copy of the same version; the size is checked against `expected`. A transport that streams the body
        calls `on_bytes` with how many bytes of the object it holds so far (for progress; the count starts
        again from zero when a transfer restarts); one that reads the object whole need not call it."""

    def read_range(self, url: str, start: int, stop: int, *, expected: RemoteObject) -> bytes:
        """Bytes [start, stop) of `url`, refused if the object is no longer the version `expected`."""
        raise ConfigurationError(f"{url}: byte ranges are not supported over {self.schemes[0]}://")

    def list(self, url: str) -> list[RemoteObject]:
        """Objects directly below `url` (a directory or a prefix ending in '/')."""
        raise ConfigurationError(f"{url}: listing is not supported over {self.schemes[0]}://")


class Transports:
    """The transport for each URL scheme one source uses; the mirror picks by the URL it is given."""

    def __init__(self, *transports: Transport | Callable[[], Transport], schemes: Iterable[str] = ()):
        self._by_scheme: dict[str, Transport | Callable[[], Transport]] = {}
        self._lock = threading.Lock()
        for transport in transports:
            self.add(transport, schemes)

    def add(self, transport: Transport | Callable[[], Transport], schemes: Iterable[str] = ()) -> None:
        """Register `transport` for its own schemes, or a factory (called on first use) for `schemes`."""
        names = tuple(schemes) or (transport.schemes if isinstance(transport, Transport) else ())
        if not names:
            raise ConfigurationError("a transport factory needs the schemes it serves")
        for scheme in names:
            self._by_scheme[scheme] = transport

    def for_url(self, url: str) -> Transport:
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        transport = self._by_scheme.get(scheme)
        if transport is None:
            known = ", ".join(f"{s}://" for s in sorted(self._by_scheme)) or "none"
            raise ConfigurationError(f"{url}: no transport for {scheme or 'a URL without a scheme'} "
                                     f"(this source reads {known})")
        if isinstance(transport, Transport):
            return transport
        with self._lock:  # a factory runs once, and its transport serves all of its schemes
            factory = self._by_scheme[scheme]
            if isinstance(factory, Transport):
                return factory
            made = factory()
            for name, registered in self._by_scheme.items():
                if registered is factory:
                    self._by_scheme[name] = made
            return made

    @property
    def bytes_received(self) -> int:
        return sum(t.bytes_received for t in set(self._by_scheme.values()) if isinstance(t, Transport))


def map_bounded(fn: Callable[[T], R], items: Iterable[T], max_in_flight: int, *, name: str = "transfer") -> list[R]:
    """`[fn(item) for item in items]` on up to `max_in_flight` threads.

    Items are submitted lazily, so only that many results-in-progress (e.g. chunk bodies) exist at once,
    and the first failure cancels what has not started and propagates.
    """
    workers = max(1, max_in_flight)
    results: dict[int, R] = {}

    def collect(done: set[Future[R]]) -> None:
        for future in done:
            results[pending.pop(future)] = future.result()

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
        pending: dict[Future[R], int] = {}
        try:
            for position, item in enumerate(items):
                if len(pending) >= workers:
                    collect(wait(pending, return_when=FIRST_COMPLETED).done)
                pending[pool.submit(fn, item)] = position
            while pending:
                collect(wait(pending, return_when=FIRST_COMPLETED).done)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return [results[i] for i in range(len(results))]
