"""The benchmark harness runs end to end in --quick mode and reports every goal it measured (timings are not asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_quick_harness_reports_conversion_memory_and_refresh(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "run.py"), "--quick", "--only", "conversion,memory,refresh",
         "--fast-levels", "-3", "--numpy-windows", "--workdir", str(tmp_path / "work"), "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    goals = results["goals"]
    assert set(goals) == {"conversion_over_copy", "conversion_cpu_seconds_per_gib", "peak_rss_large_mib",
                          "peak_rss_large_over_small", "refresh_over_first", "refresh_fetched_bytes"}
    assert all(math.isfinite(g["value"]) and g["value"] >= 0 for g in goals.values())
    # Facts, not timings: nothing changed at the source, so the refresh moved no data bytes, and
    # the conversion wrote the whole pyramid of the 32 MiB input.
    assert results["refresh"]["refresh_fetched_bytes"] == 0
    assert results["refresh"]["first_fetched_bytes"] >= results["refresh"]["mib"] * 2**20
    conversion = results["conversion"]
    assert conversion["levels"] >= 4 and conversion["stored_mib"] > 0
    # zstd's fast levels leave literals uncompressed: EM noise takes more room than at the default level.
    assert set(conversion["fast_levels"]) == {"-3"}
    assert all(fast["stored_mib"] > conversion["stored_mib"] for fast in conversion["fast_levels"].values())
    # Without the compiled window kernel: the same conversion, the same bytes (so the same size).
    assert conversion["numpy_windows"]["stored_mib"] == conversion["stored_mib"]
    assert results["machine"]["window_kernel"] == "compiled"
    assert 0 <= results["steal_fraction"] <= 1
    assert results["machine"]["freed_pages"] == {"mode": "leave"}  # --quick neither holds nor waits
    assert results["machine"]["cores"] >= 1
    assert "conversion_over_copy" in done.stdout and "goals:" in done.stdout
    assert not any((tmp_path / "work").iterdir()), "the synthetic volumes are deleted afterwards"
