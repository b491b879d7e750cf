"""Loading the code location imports only what loading it uses: the heavy libraries of the formats, the
writer, the S3 transport and the catalog are imported by the code that reads, writes or fetches with them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# What the step that needs them imports: each costs from tens of milliseconds to seconds (ncempy pulls in
# scipy and matplotlib), in every process that loads the code location (a run, a code server, the UI).
HEAVY = ("tensorstore", "zarr", "numcodecs", "pandas", "pyarrow", "s3fs", "aiobotocore", "botocore", "boto3",
         "aiohttp", "fsspec", "moto", "PIL", "tifffile", "mrcfile", "ncempy", "scipy", "matplotlib",
         "ome_zarr_models", "dagster_docker")

_PROBE = """
import json, sys
import em_ingest.definitions as code_location
code_location.defs()  # what `dagster` does when it loads the code location: build the Definitions
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_loading_the_code_location_imports_no_heavy_library():
    env = {k: v for k, v in os.environ.items() if not k.startswith("EM_INGEST_")}
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "dagster" in loaded and "em_ingest" in loaded
    assert not loaded & set(HEAVY), f"imported when the code location loads: {sorted(loaded & set(HEAVY))}"
