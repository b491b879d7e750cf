"""Latency hiding of the OpenOrganelle transfer: throughput with and without per-request latency, and peak memory.

The replica (moto behind the fault-injecting proxy) runs in a child process so its CPU and memory
stay out of the measurement. Each configuration mirrors one region into a fresh raw store with
`Pipeline.fetch_raw`, exactly as the `openorganelle/raw` asset does.

    .venv/bin/python benchmarks/openorganelle_latency.py            # 128 MiB region, 20 ms latency
    .venv/bin/python benchmarks/openorganelle_latency.py --quick    # 32 MiB region, for CI smoke runs

Prints a table and writes JSON (default benchmarks/results/openorganelle_latency.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATASET = "bench_large-1"
IMAGE = "recon-1/em/fibsem-uint16"
CHUNKS = (64, 64, 64)


def _serve(shape: tuple[int, int, int], conn) -> None:
    """Child process: run a replica holding one large uint16 image; obey latency commands."""
    from em_ingest.replicas.openorganelle import OpenOrganelleReplica, ReplicaImage

    rng = np.random.default_rng(0)
    # Smooth-ish 12-bit data: compresses like EM (roughly 2:1 with zstd), cheap to generate.
    base = rng.integers(0, 4096, size=shape, dtype=np.uint16)
    volume = (base >> 2) + 1000
    image = ReplicaImage(DATASET, "zarr", IMAGE, shape, "uint16", CHUNKS, (4.0, 4.0, 4.0), 1,
                         {"id": "zstd", "level": 1}, "/")
    image.levels = [volume]
    replica = OpenOrganelleReplica(images=[image]).start()
    conn.send(replica.env)
    while True:
        command, value = conn.recv()
        if command == "latency":
            replica.http.faults.latency_s = value
            conn.send("ok")
        elif command == "requests":
            conn.send(len(replica.http.traffic.requests))
        else:
            break
    replica.stop()



class _RssSampler:
    """Samples the current RSS (from /proc) every few ms: the peak during one step, not the process's life."""

    def __init__(self) -> None:
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current_mib() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize() / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self.current_mib())
            time.sleep(0.005)

    def __enter__(self) -> _RssSampler:
        self.peak_mib = self.current_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _fetch(env: dict[str, str], in_flight: int, *, trace: bool = False, roi: dict | None = None) -> dict[str, float]:
    from em_ingest.pipeline import Pipeline
    from em_ingest.settings import Settings, TransferSettings

    with tempfile.TemporaryDirectory(prefix="oo-bench-") as tmp:
        selection = Path(tmp) / "datasets.yaml"
        options = {"image": IMAGE, **({"roi": roi} if roi else {})}
        selection.write_text(yaml.safe_dump({"openorganelle": {DATASET: options}}))
        settings = Settings.from_env(env, data_root=str(Path(tmp) / "data"), datasets_file=str(selection),
                                     transfer=TransferSettings(max_in_flight=in_flight))
        pipeline = Pipeline(settings)
        request = pipeline.request("openorganelle", DATASET)
        if trace:
            tracemalloc.start()
        with _RssSampler() as rss:
            before_mib = rss.peak_mib
            started = time.perf_counter()
            manifest = pipeline.fetch_raw(request)
            seconds = time.perf_counter() - started
        traced_peak = tracemalloc.get_traced_memory()[1] / 2**20 if trace else None
        if trace:
            tracemalloc.stop()
    fetched = manifest.stats.fetched_bytes
    return {"seconds": seconds, "fetched_mib": fetched / 2**20, "objects": manifest.stats.fetched_objects,
            "mib_per_s": fetched / 2**20 / seconds, "rss_before_mib": before_mib,
            "rss_peak_mib": rss.peak_mib, "rss_growth_mib": rss.peak_mib - before_mib,
            "python_alloc_peak_mib": traced_peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 MiB region instead of 128 MiB")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "openorganelle_latency.json")
    args = parser.parse_args(argv)

    shape = (64, 512, 512) if args.quick else (128, 512, 1024)
    region_mib = int(np.prod(shape)) * 2 / 2**20
    parent, child = mp.Pipe()
    server = mp.get_context("spawn").Process(target=_serve, args=(shape, child), daemon=True)
    server.start()
    env = parent.recv()

    def set_latency(seconds: float) -> None:
        parent.send(("latency", seconds))
        parent.recv()

    try:
        # Memory first. A one-chunk warm-up loads botocore's service models and the thread pools
        # once, so what follows is what the region itself costs: many times the in-flight budget.
        set_latency(0.0)
        _fetch(env, 8, roi={"z": [0, 64], "y": [0, 64], "x": [0, 64]})
        memory = _fetch(env, 8, trace=True)
        rows = []
        for in_flight in args.in_flight:
            for latency_ms in (0.0, args.latency_ms):
                set_latency(latency_ms / 1000)
                runs = [_fetch(env, in_flight) for _ in range(args.repeats)]
                best = max(runs, key=lambda r: r["mib_per_s"])
                rows.append({"in_flight": in_flight, "latency_ms": latency_ms, **best})
    finally:
        parent.send(("stop", None))
        server.join(timeout=10)

    by = {(r["in_flight"], r["latency_ms"]): r for r in rows}
    ratios = {n: by[(n, args.latency_ms)]["mib_per_s"] / by[(n, 0.0)]["mib_per_s"] for n in args.in_flight}
    chunk_mib = np.prod(CHUNKS) * 2 / 2**20
    print(f"region {shape} uint16 = {region_mib:.0f} MiB in {memory['objects']} chunk objects of "
          f"{chunk_mib:.2f} MiB (uncompressed); {memory['fetched_mib']:.1f} MiB on the wire")
    print(f"{'in flight':>9} {'latency ms':>10} {'MiB/s':>8} {'seconds':>8}")
    for r in rows:
        print(f"{r['in_flight']:>9} {r['latency_ms']:>10.0f} {r['mib_per_s']:>8.1f} {r['seconds']:>8.2f}")
    for n, ratio in ratios.items():
        print(f"throughput with {args.latency_ms:.0f} ms latency / without, {n} in flight: {ratio:.2f}")
    budget_mib = 8 * chunk_mib
    print(f"peak memory while mirroring {region_mib:.0f} MiB with 8 in flight (budget ~{budget_mib:.0f} MiB of "
          f"chunks): RSS +{memory['rss_growth_mib']:.1f} MiB over {memory['rss_before_mib']:.0f} MiB; "
          f"Python allocations peak {memory['python_alloc_peak_mib']:.1f} MiB")
    result = {"region_shape_zyx": shape, "region_mib": region_mib, "chunk_shape": CHUNKS,
              "latency_ms": args.latency_ms, "rows": rows, "ratios": {str(k): v for k, v in ratios.items()},
              "memory": memory, "in_flight_budget_mib": budget_mib}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
