"""One exception hierarchy for the core; every message names the input it is about."""

from __future__ import annotations


class EmIngestError(Exception):
    """Base of every error em-ingest raises on purpose."""


class SelectionError(EmIngestError, ValueError):
    """The selection file (or one dataset's options in it) is malformed."""


class ConfigurationError(EmIngestError, ValueError):
    """A setting such as an endpoint, a token or the data root is missing or invalid."""


class TransferError(EmIngestError, OSError):
    """A download failed for good after retries; names the URL and the last status."""

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class IntegrityError(TransferError):
    """Bytes arrived but do not match what the source announced (size, checksum, ETag)."""


class SourceResponseError(EmIngestError, ValueError):
    """A source answered, but with a document that lacks or mistypes what we need."""


class UnsafePathError(EmIngestError, ValueError):
    """A remote name would escape the folder it is written into."""


class FormatError(EmIngestError, ValueError):
    """A file could not be read as the format it claims to be (truncated, corrupt, unsupported)."""


class UnsupportedDataError(EmIngestError, ValueError):
    """The data is valid but outside what em-ingest ingests (e.g. several channels)."""


class ValidationError(EmIngestError, ValueError):
    """A written output does not satisfy its specification (OME-NGFF, catalog schema)."""


class StorageError(EmIngestError, OSError):
    """The data root's storage (a bucket) refused or failed an operation; names the URL."""
