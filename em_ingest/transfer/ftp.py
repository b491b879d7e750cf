"""FTP transport (anonymous, passive): listings, SIZE/MDTM, REST-resumed atomic downloads with retries."""

from __future__ import annotations

import ftplib
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlsplit

from em_ingest.errors import ConfigurationError, EmIngestError, IntegrityError, TransferError
from em_ingest.settings import TransferSettings
from em_ingest.transfer.autoindex import ListingEntry
from em_ingest.transfer.base import Download, RemoteObject, Transport
from em_ingest.transfer.http import sha256_file
from em_ingest.transfer.retry import RetryableError, call_with_retries

T = TypeVar("T")
_BLOCK = 1 << 20
# Network trouble worth another attempt; 4xx replies (ftplib.error_temp, e.g. "426 transfer aborted") too.
_TRANSIENT = (OSError, EOFError, socket.timeout, ftplib.error_temp, ftplib.error_reply, ftplib.error_proto)


@dataclass(frozen=True)
class FtpAddress:
    host: str
    port: int
    path: str  # decoded absolute path on the server
    user: str
    password: str

    @classmethod
    def parse(cls, url: str) -> FtpAddress:
        parts = urlsplit(url)
        if parts.scheme != "ftp" or not parts.hostname:
            raise ConfigurationError(f"expected an ftp://host/path URL, got {url!r}")
        # Anonymous by convention; the password is the customary e-mail-like placeholder.
        return cls(parts.hostname, parts.port or 21, unquote(parts.path) or "/",
                   unquote(parts.username or "anonymous"), unquote(parts.password or "anonymous@"))


def part_path_for(dest: Path, remote: RemoteObject) -> Path:
    """Hidden in-progress name tied to the remote version, so a stale partial copy is never resumed."""
    version = f"{remote.size}-{remote.last_modified or 'x'}"
    return dest.with_name(f".{dest.name}.{version}.part")


class FtpClient(Transport):
    """One short-lived connection per operation (ftplib is not thread-safe), under the project's retry policy."""

    schemes = ("ftp",)

    def __init__(self, settings: TransferSettings | None = None):
        self.settings = settings or TransferSettings()
        self._lock = threading.Lock()
        self.bytes_received = 0  # data-connection bytes, for "nothing changed" accounting

    def _connect(self, address: FtpAddress) -> ftplib.FTP:
        ftp = ftplib.FTP(timeout=self.settings.read_timeout_s)
        ftp.connect(address.host, address.port, timeout=self.settings.connect_timeout_s)
        ftp.login(address.user, address.password)
        ftp.set_pasv(True)
        ftp.voidcmd("TYPE I")  # binary: SIZE and REST count bytes
        return ftp

    def _call(self, url: str, describe: str, fn: Callable[[ftplib.FTP, FtpAddress], T]) -> T:
        address = FtpAddress.parse(url)

        def attempt() -> T:
            ftp = None
            try:
                ftp = self._connect(address)
                return fn(ftp, address)
            except EmIngestError:
                # Our own verdicts (e.g. IntegrityError) are final; TransferError is an OSError, so
                # without this the transient clause below would turn them into retries.
                raise
            except ftplib.error_perm as exc:  # 5xx: missing file, no permission — retrying will not help
                # 550 is FTP's "no such file": reported with HTTP's 404 so `is_absent` has one rule.
                status = 404 if str(exc).startswith("550") else None
                raise TransferError(f"{describe}: server refused: {exc}", url=url, status=status) from None
            except _TRANSIENT as exc:
                raise RetryableError(f"{describe}: {type(exc).__name__}: {exc}", url=url) from None
            finally:
                if ftp is not None:
                    try:
                        ftp.close()
                    except OSError:
                        pass

        def give_up(exc: RetryableError) -> Exception:
            return TransferError(f"giving up on {url} after retries: {exc}", url=url)

        return call_with_retries(attempt, self.settings, describe=describe, on_give_up=give_up)

    def list_dir(self, url: str) -> list[ListingEntry]:
        """Entries of the directory at `url` (names untrusted: check before use)."""

        def listing(ftp: ftplib.FTP, address: FtpAddress) -> list[ListingEntry]:
            try:
                facts = list(ftp.mlsd(address.path, facts=["type", "size", "modify"]))
            except ftplib.error_perm:  # server without MLSD (RFC 3659): fall back to a Unix-style LIST
                return _parse_list(address.path, ftp)
            return [_mlsd_entry(name, f) for name, f in facts if f.get("type") in ("file", "dir")]

        return self._call(url, f"LIST {url}", listing)

    def stat(self, url: str) -> RemoteObject:
        """Size and modification time (MDTM) of a file, the FTP analogue of an HTTP HEAD."""

        def stat(ftp: ftplib.FTP, address: FtpAddress) -> RemoteObject:
            size = ftp.size(address.path)
            try:
                modified = ftp.voidcmd(f"MDTM {address.path}").split()[-1]
            except ftplib.error_perm:
                modified = None
            return RemoteObject(url=url, size=int(size) if size is not None else None, last_modified=modified)

        return self._call(url, f"SIZE {url}", stat)

    def fetch(self, url: str, dest: Path, *, expected: RemoteObject | None = None,
              on_bytes: Callable[[int], None] | None = None) -> Download:
        return self.download(url, dest, expected=expected if expected is not None else self.stat(url),
                             on_bytes=on_bytes)

    def download(self, url: str, dest: Path, *, expected: RemoteObject,
                 on_bytes: Callable[[int], None] | None = None) -> Download:
        """Fetch `url` to `dest` atomically, continuing a partial copy with REST; the size is verified."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = part_path_for(dest, expected)
        for stale in dest.parent.glob(f".{dest.name}.*.part"):
            if stale != part:
                stale.unlink(missing_ok=True)
        first_offset = part.stat().st_size if part.exists() else 0

        # SIZE's answer bounds the file; without one, the ceiling keeps an endless transfer off the disk.
        cap = expected.size if expected.size is not None else self.settings.max_unannounced_bytes

        def retrieve(ftp: ftplib.FTP, address: FtpAddress) -> int:
            offset = part.stat().st_size if part.exists() else 0
            if offset > cap:
                offset = 0  # cannot be a prefix of this version: start over
            received = offset
            overflow = False
            with open(part, "ab" if offset else "wb") as fh:
                conn = ftp.transfercmd(f"RETR {address.path}", rest=offset or None)
                with conn:
                    while block := conn.recv(_BLOCK):
                        self._count(len(block))
                        if received + len(block) > cap:
                            overflow = True  # not written: the partial never holds more than the cap
                            break
                        fh.write(block)
                        received += len(block)
                        if on_bytes is not None:
                            on_bytes(received)
                if not overflow:  # after an abandoned transfer the server's final reply may never come
                    ftp.voidresp()  # "426 transfer aborted" raises error_temp here -> retried from `received`
            if overflow:
                part.unlink(missing_ok=True)  # not a prefix of the announced file: nothing to resume
                raise IntegrityError(_overflow_message(url, cap, expected.size is not None), url=url)
            if expected.size is not None and received != expected.size:
                raise EOFError(f"got {received} of {expected.size} bytes")
            return received

        size = self._call(url, f"RETR {url}", retrieve)
        if expected.size is not None and size != expected.size:
            part.unlink(missing_ok=True)
            raise IntegrityError(f"{url}: downloaded {size} bytes but the server announced {expected.size}", url=url)
        digest = sha256_file(part)
        os.replace(part, dest)
        return Download(dest, url, size, digest, None, expected.last_modified, first_offset)

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_received += n


def _overflow_message(url: str, cap: int, announced: bool) -> str:
    if announced:
        return f"{url}: the server sent more than the {cap} bytes announced for it (SIZE); download discarded"
    return (f"{url}: the server sent more than max_unannounced_bytes={cap} with no size announced (SIZE gave "
            "none); download discarded (raise max_unannounced_bytes if the file is really that large)")


def _mlsd_entry(name: str, facts: dict[str, str]) -> ListingEntry:
    """One MLSD line; a file's size and modification time (the same time-val as MDTM's, RFC 3659) are kept,
    so a mirror can tell an unchanged file from the listing alone."""
    if facts.get("type") == "dir":
        return ListingEntry(name, True, name + "/")
    size = facts.get("size", "")
    return ListingEntry(name, False, name, size=int(size) if size.isdigit() else None,
                        modified=facts.get("modify") or None)


def _parse_list(path: str, ftp: ftplib.FTP) -> list[ListingEntry]:
    lines: list[str] = []
    ftp.retrlines(f"LIST {path}", lines.append)
    entries = []
    for line in lines:
        fields = line.split(None, 8)
        if len(fields) < 9 or fields[0][0] not in "d-":
            continue  # symlinks, totals and unknown formats are not followed
        name = fields[8]
        is_dir = fields[0][0] == "d"
        entries.append(ListingEntry(name, is_dir, name + ("/" if is_dir else "")))
    return entries
