"""The code location: `dagster dev` / `dagster asset materialize -m em_ingest.definitions`."""

import dagster as dg

from em_ingest.orchestration import build_definitions


@dg.definitions
def defs() -> dg.Definitions:
    # Built when the code location loads (not at import), from the environment and the selection file.
    return build_definitions()
