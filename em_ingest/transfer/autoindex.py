"""Apache autoindex directory listings: the entries a listing page links to, without sort or parent links."""

from __future__ import annotations

from dataclasses import dataclass
from html.parser import HTMLParser
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class ListingEntry:
    """One entry of a directory listing. `name` is percent-decoded and untrusted (check before use)."""

    name: str
    is_dir: bool
    href: str  # as linked, relative to the listing's URL
    # What the listing says of a file when it says it exactly (FTP MLSD: bytes, and the modification time
    # in MDTM's form); None otherwise (an autoindex page's sizes are rounded, a Unix LIST's times too).
    size: int | None = None
    modified: str | None = None


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href is not None:
                self.hrefs.append(href)


def _is_entry_link(href: str) -> bool:
    """True for a link to a child of the listed directory (Apache writes them relative)."""
    if not href or href.startswith(("?", "#", "/")):  # sort links (?C=N;O=D), anchors, parent "/path/"
        return False
    parts = urlsplit(href)
    if parts.scheme or parts.netloc or parts.query or parts.fragment:
        return False  # another site, or a link with a query: not a file of this directory
    return href not in ("../", "..", "./", ".")


def parse_autoindex(html: str) -> list[ListingEntry]:
    """Entries of an Apache autoindex page in page order, each once; sort and parent links are skipped.

    Names are returned decoded but NOT validated: a hostile server can list "..%2F..%2Fetc" — callers
    must pass every name they use through `safe_relative_path`.
    """
    parser = _Links()
    parser.feed(html)
    parser.close()
    seen: set[str] = set()
    entries = []
    for href in parser.hrefs:
        if not _is_entry_link(href) or href in seen:
            continue
        seen.add(href)
        is_dir = href.endswith("/")
        entries.append(ListingEntry(unquote(href[:-1] if is_dir else href), is_dir, href))
    return entries
