"""The only code that opens sockets: HTTP(S), FTP and S3 transports with one retry policy."""

from em_ingest.transfer.http import HttpClient, RemoteObject

__all__ = ["HttpClient", "RemoteObject"]
