"""The `em-ingest` command: an offline demo on the replicas, the replicas themselves, the catalog, discovery."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from em_ingest.errors import EmIngestError

QUIET_RUNS = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
DEMO_COLUMNS = ["source", "dataset_key", "shape_z", "shape_y", "shape_x", "dtype", "voxel_size_z_nm",
                "voxel_size_y_nm", "voxel_size_x_nm", "voxel_size_origin", "n_scales", "stored_bytes", "title"]


def _demo(args: argparse.Namespace) -> int:
    import dagster as dg

    from em_ingest.orchestration import build_definitions
    from em_ingest.replicas import ReplicaSet

    data_root = Path(args.data_root).resolve()
    data_root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with ReplicaSet(args.source or None) as replicas:
        selection_file = replicas.write_selection(data_root / "datasets.demo.yaml")
        # The pipeline reads its configuration from the environment, exactly as under `dagster dev`.
        os.environ.update(replicas.env)
        os.environ["EM_INGEST_DATA_ROOT"] = str(data_root)
        os.environ["EM_INGEST_DATASETS"] = str(selection_file)
        defs = build_definitions()
        assets = [a for a in defs.assets if isinstance(a, (dg.AssetsDefinition, dg.AssetChecksDefinition))]
        instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
        print(f"replicas up: {', '.join(replicas.replicas)}; data root {data_root}")
        failures = 0
        for source, datasets in replicas.selection.items():
            for key in datasets:
                t0 = time.monotonic()
                result = dg.materialize(
                    assets, selection=[dg.AssetKey([source, "raw"]), dg.AssetKey([source, "ome_zarr"])],
                    partition_key=key, instance=instance, resources=defs.resources, raise_on_error=False,
                    run_config=QUIET_RUNS,
                )
                status = "ok" if result.success else "FAILED"
                failures += not result.success
                print(f"  {source}/{key}: {status} in {time.monotonic() - t0:.1f} s")
        result = dg.materialize(assets, selection=dg.AssetSelection.groups("catalog"), instance=instance,
                                resources=defs.resources, raise_on_error=False, run_config=QUIET_RUNS)
        failures += not result.success
    print(f"\ncatalog: {data_root / 'catalog' / 'metadata_catalog.parquet'}")
    _print_catalog(data_root, None, [], DEMO_COLUMNS, "table")
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s with {failures} failed run(s)")
    return 1 if failures else 0


LOCAL_INSTANCE = """\
# Local embedded instance for `em-ingest dev` (SQLite under this folder).
telemetry:
  enabled: false
nux:
  enabled: false
concurrency:
  pools:
    default_limit: 2
"""


def _dev(args: argparse.Namespace) -> int:
    home = Path(os.environ.get("DAGSTER_HOME") or ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text(LOCAL_INSTANCE)
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    dagster = Path(sys.executable).with_name("dagster")
    command = [str(dagster) if dagster.exists() else "dagster", "dev", "-m", "em_ingest.definitions", *args.dagster_args]
    print(f"DAGSTER_HOME={home}\n$ {shlex.join(command)}", flush=True)
    os.execvpe(command[0], command, env)
    return 0  # not reached


def _replicas_serve(args: argparse.Namespace) -> int:
    from em_ingest.replicas import ReplicaSet

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with ReplicaSet(args.source or None) as replicas:
        selection = Path(args.selection).resolve()
        replicas.write_selection(selection)
        print("# replicas running; point em-ingest at them with:")
        for name, value in sorted({**replicas.env, "EM_INGEST_DATASETS": str(selection)}.items()):
            print(f"export {name}={shlex.quote(value)}")
        print("# Ctrl-C to stop", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


def _print_catalog(data_root: Path, source: str | None, where: list[str], columns: list[str] | None,
                   fmt: str) -> None:
    import pandas as pd

    from em_ingest.catalog import read_catalog
    from em_ingest.storage import catalog_path

    path = catalog_path(data_root)
    if not path.exists():
        raise EmIngestError(f"no catalog at {path}; materialize catalog/metadata_catalog first")
    frame = read_catalog(path).to_pandas()
    if source:
        frame = frame[frame["source"] == source]
    for clause in where:
        column, sep, value = clause.partition("=")
        if not sep or column not in frame.columns:
            raise EmIngestError(f"--where {clause!r}: expected COLUMN=VALUE with a catalog column")
        frame = frame[frame[column].astype(str) == value]
    if columns:
        unknown = [c for c in columns if c not in frame.columns]
        if unknown:
            raise EmIngestError(f"unknown catalog columns: {', '.join(unknown)}")
        frame = frame[columns]
    if fmt == "json":
        print(frame.to_json(orient="records", date_format="iso", indent=1))
    elif fmt == "csv":
        print(frame.to_csv(index=False), end="")
    else:
        with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 40):
            print(frame.to_string(index=False) if len(frame) else "(no rows)")


def _catalog(args: argparse.Namespace) -> int:
    from em_ingest.settings import Settings
    from em_ingest.storage import local_root

    data_root = local_root(args.data_root or Settings.from_env().data_root)
    columns = args.columns.split(",") if args.columns else None
    _print_catalog(data_root, args.source, args.where, columns, args.format)
    return 0


def _discover(args: argparse.Namespace) -> int:
    from em_ingest.settings import Settings
    from em_ingest.sources import source_classes

    classes = source_classes()
    if args.source not in classes:
        raise EmIngestError(f"unknown source {args.source!r}; known: {', '.join(classes)}")
    count = 0
    for item in classes[args.source](Settings.from_env()).discover():
        count += 1
        if args.limit and count > args.limit:
            break
        print(json.dumps(vars(item), default=str) if args.json else f"{item.dataset_key}\t{item.title or ''}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="em-ingest", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="start the replicas, ingest every dataset they serve, print the catalog")
    demo.add_argument("--data-root", default="./demo-data", help="where to write (default ./demo-data)")
    demo.add_argument("--source", action="append", help="only this source (repeatable)")
    demo.set_defaults(func=_demo)

    dev = sub.add_parser("dev", add_help=False, help="the Dagster UI and daemon on a local embedded instance (./.dagster_home); "
                                     "other arguments go to `dagster dev`")
    dev.set_defaults(func=_dev)

    replicas = sub.add_parser("replicas", help="the local stand-ins for the archives")
    rsub = replicas.add_subparsers(dest="replicas_command", required=True)
    serve = rsub.add_parser("serve", help="run the replicas in the foreground and print the environment")
    serve.add_argument("--source", action="append", help="only this source (repeatable)")
    serve.add_argument("--selection", default="./datasets.replicas.yaml",
                       help="where to write a selection file of the replicas' datasets")
    serve.set_defaults(func=_replicas_serve)

    cat = sub.add_parser("catalog", help="print the catalog, optionally filtered")
    cat.add_argument("--data-root", help="default: $EM_INGEST_DATA_ROOT or ./data")
    cat.add_argument("--source", help="only rows of this source")
    cat.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE", help="filter (repeatable)")
    cat.add_argument("--columns", help="comma-separated columns to show")
    cat.add_argument("--format", choices=["table", "csv", "json"], default="table")
    cat.set_defaults(func=_catalog)

    disc = sub.add_parser("discover", help="list what an archive offers")
    disc.add_argument("source")
    disc.add_argument("--limit", type=int, default=0)
    disc.add_argument("--json", action="store_true")
    disc.set_defaults(func=_discover)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if args.command == "dev":
        args.dagster_args = extra  # everything else goes to `dagster dev` (e.g. -p 3001)
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except EmIngestError as exc:
        print(f"em-ingest: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
