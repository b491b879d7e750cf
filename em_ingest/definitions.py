"""The code location: `dagster dev` / `dagster asset materialize -m em_ingest.definitions`."""

import os

import dagster as dg

from em_ingest.orchestration import build_definitions
from em_ingest.settings import Settings

# The Definitions last built, and what they were built from.
_built: tuple[tuple[object, ...], dg.Definitions] | None = None


def _inputs() -> tuple[object, ...]:
    """Everything the Definitions are built from: the environment, the folder relative paths start from, and
    the selection file's identity and version (its partitions)."""
    selection = os.path.abspath(Settings.from_env().datasets_file)
    try:
        stat = os.stat(selection)
        version: object = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    except OSError:
        version = None
    return tuple(sorted(os.environ.items())), os.getcwd(), selection, version


@dg.definitions
def defs() -> dg.Definitions:
    # Built when the code location loads (not at import), from the environment and the selection file. Dagster
    # loads a code location several times in one process (`dagster asset materialize` loads it, then its run
    # reconstructs the job, and again for each step): those loads get the same Definitions while nothing they
    # are built from has changed, rather than a new build each time (~0.15 s).
    global _built
    inputs = _inputs()
    if _built is None or _built[0] != inputs:
        _built = (inputs, build_definitions())
    return _built[1]
