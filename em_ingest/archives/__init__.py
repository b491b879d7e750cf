"""Clients of the archives' own APIs, over the transfer layer; no Dagster, no raw store."""
