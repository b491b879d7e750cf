"""The `em-ingest` command: an offline demo on the replicas, the replicas themselves, the catalog, discovery,
and a Neuroglancer view of the ingested images."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from em_ingest.errors import EmIngestError
from em_ingest.objectstore import ObjectRoot

QUIET_RUNS = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
DEMO_COLUMNS = ["source", "dataset_key", "shape_z", "shape_y", "shape_x", "dtype", "voxel_size_z_nm",
                "voxel_size_y_nm", "voxel_size_x_nm", "voxel_size_origin", "n_scales", "stored_bytes", "title"]


def _require_replicas() -> None:
    """A one-line error naming the extra to install when the replicas' packages are missing."""
    from em_ingest.replicas import missing_packages

    missing = missing_packages()
    if missing:
        raise EmIngestError(f"the replicas need {', '.join(missing)}, which the `replicas` extra installs: "
                            'pip install -e ".[replicas]" (or "em-ingest[replicas]")')


@contextmanager
def _progress_on_stderr() -> Iterator[None]:
    """While the demo runs, the core's progress lines (logger em_ingest.progress; each names the step and its
    partition, e.g. "fetch epfl/hippocampus-training: ...") go to stderr, indented, ahead of the line that says
    how that partition's run ended."""
    from em_ingest.progress import LOGGER_NAME

    logger = logging.getLogger(LOGGER_NAME)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("    %(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # shown once, here, whatever the root logger does
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _demo(args: argparse.Namespace) -> int:
    import dagster as dg

    from em_ingest.orchestration import build_definitions
    from em_ingest.replicas import ReplicaSet

    _require_replicas()
    data_root = _data_root(args.data_root)
    if isinstance(data_root, Path):
        data_root.mkdir(parents=True, exist_ok=True)
        selection_dir = data_root
    else:  # a bucket: the selection file is local configuration, like datasets.yaml
        ObjectRoot(data_root).check_writable()
        selection_dir = Path(tempfile.mkdtemp(prefix="em-ingest-demo."))
    started = time.monotonic()
    with ReplicaSet(args.source or None) as replicas, _progress_on_stderr():
        selection_file = replicas.write_selection(selection_dir / "datasets.demo.yaml")
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
    print(f"\ncatalog: {data_root}/catalog/metadata_catalog.parquet")
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


def _publish_ca_bundles(env: dict[str, str], path: Path) -> dict[str, str]:
    """Copy each *_CA_BUNDLE the replicas made (a temporary file of this process) to `path`, and point those
    variables there. Several authorities go into the one file, as a CA bundle may hold several."""
    names = sorted(name for name in env if name.endswith("_CA_BUNDLE"))
    if not names:
        return {}
    from em_ingest.storage import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, b"".join(Path(env[name]).read_bytes() for name in names))
    return {name: str(path) for name in names}


def _replicas_serve(args: argparse.Namespace) -> int:
    from em_ingest.replicas import Placement, ReplicaSet
    from em_ingest.settings import declared_settings

    _require_replicas()
    try:
        placement = Placement(bind=args.bind, advertise=args.advertise, first_port=args.port)
    except ValueError as exc:
        raise EmIngestError(str(exc)) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # A credential the pipeline is already configured with (NEUPRINT_TOKEN) is the one the replicas
    # accept; it is not printed back, since the caller has it.
    adopted = {name for name, value in os.environ.items() if value}
    secrets = {s.env for s in declared_settings() if s.secret}
    with ReplicaSet(args.source or None, placement).adopt_environment(os.environ) as replicas:
        selection = Path(args.selection).resolve()
        replicas.write_selection(selection)
        env = {**replicas.env, "EM_INGEST_DATASETS": str(selection)}
        if args.ca_bundle:
            env.update(_publish_ca_bundles(env, Path(args.ca_bundle)))
        shown = {name: value for name, value in env.items() if not (name in secrets and name in adopted)}
        lines = [f"{name}={shlex.quote(value)}" for name, value in sorted(shown.items())]
        print("# replicas running; point em-ingest at them with:")
        print("\n".join(f"export {line}" for line in lines))
        for name in sorted(set(env) - set(shown)):
            print(f"# {name}: the value already in this environment")
        if args.env_file:
            # Written last: its presence says every replica is serving (the compose healthcheck).
            from em_ingest.storage import write_atomic

            write_atomic(Path(args.env_file), "".join(f"{line}\n" for line in lines).encode())
        print("# Ctrl-C to stop", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


# The `status` values pipeline.py writes into the catalog.
CATALOG_STATUSES = ("ok", "unselected")
NULL_VALUE = "null"  # in --where, matches a missing value


@dataclass(frozen=True)
class _Filter:
    """One parsed `--where` clause: keep rows whose `column` equals `value` (None: is missing), or not."""

    column: str
    value: Any
    negate: bool

    def keeps(self, cell: Any) -> bool:
        # Python equality on the Arrow values is typed: 5 == 5.0, and a list equals a list.
        equal = cell is None if self.value is None else cell is not None and cell == self.value
        return equal != self.negate


def _closed_vocabulary(column: str) -> tuple[str, ...] | None:
    """The only values a column can hold, for the columns that have such a list."""
    if column == "source":
        from em_ingest.sources import source_classes

        return tuple(source_classes())
    if column == "voxel_size_origin":
        from em_ingest.formats.volume import VOXEL_SIZE_ORIGINS

        return VOXEL_SIZE_ORIGINS
    if column == "status":
        return CATALOG_STATUSES
    return None


def _parse_filter(clause: str, label: str) -> _Filter:
    """`COLUMN=VALUE` or `COLUMN!=VALUE`, with VALUE read as the column's catalog type."""
    import pyarrow as pa

    from em_ingest.catalog import SCHEMA

    column, sep, text = clause.partition("=")
    negate = column.endswith("!")
    column = column.removesuffix("!").strip()
    if not sep or not column:
        raise EmIngestError(f"{label}: expected COLUMN=VALUE or COLUMN!=VALUE")
    if column not in SCHEMA.names:
        raise EmIngestError(f"{label}: unknown column {column!r}; catalog columns: {', '.join(SCHEMA.names)}")
    if text == NULL_VALUE:
        return _Filter(column, None, negate)
    type_ = SCHEMA.field(column).type
    if pa.types.is_integer(type_) or pa.types.is_floating(type_):
        value: Any = _parse_number(text, f"{label}: {column} is a number column ({type_})")
    elif pa.types.is_boolean(type_):
        if text.lower() not in ("true", "false"):
            raise EmIngestError(f"{label}: {column} is a boolean column; expected true, false or {NULL_VALUE}")
        value = text.lower() == "true"
    elif pa.types.is_timestamp(type_):
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise EmIngestError(f"{label}: {column} is a timestamp column; {text!r} is not an ISO 8601 "
                                "date-time (e.g. 2025-01-31T12:00:00Z)") from None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)  # the catalog stores UTC
    elif pa.types.is_list(type_) and pa.types.is_integer(type_.value_type):
        items = text.strip().removeprefix("[").removesuffix("]").split(",")
        value = [_parse_number(item, f"{label}: {column} is a list of integers (e.g. 64,128,128)") for item in items]
    elif pa.types.is_string(type_):
        value = text
        allowed = _closed_vocabulary(column)
        if allowed is not None and value not in allowed:
            raise EmIngestError(f"{label}: {value!r} is not a valid {column}; "
                                f"allowed: {', '.join(allowed)} (or {NULL_VALUE})")
    else:
        raise EmIngestError(f"{label}: column {column} ({type_}) cannot be filtered")
    return _Filter(column, value, negate)


def _parse_number(text: str, what: str) -> int | float:
    # int first, so that large integers (byte counts) compare exactly rather than through a float.
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        raise EmIngestError(f"{what}; {text!r} is not a number") from None
    if number != number:  # NaN equals nothing, so it could only ever silently match no row
        raise EmIngestError(f"{what}; {text!r} is not a number (use {NULL_VALUE} for missing values)")
    return number


def _data_root(data_root: str) -> Path | str:
    """A local data root as an absolute folder, or a bucket's URL as it is (see `storage.local_root`)."""
    from em_ingest.objectstore import is_object_url
    from em_ingest.storage import local_root

    return ObjectRoot(data_root).url if is_object_url(data_root) else local_root(data_root)


def _read_catalog(data_root: Path | str) -> Any:
    """The catalog table under a data root (local or in a bucket); an error naming where it was looked for."""
    from em_ingest.catalog import read_catalog, read_catalog_bytes
    from em_ingest.storage import catalog_path

    if isinstance(data_root, str):
        bucket = ObjectRoot(data_root)
        data = bucket.read("catalog/metadata_catalog.parquet")
        where = bucket.url_of("catalog/metadata_catalog.parquet")
        if data is None:
            raise EmIngestError(f"no catalog at {where}; materialize catalog/metadata_catalog first")
        return read_catalog_bytes(data, where)
    path = catalog_path(data_root)
    if not path.exists():
        raise EmIngestError(f"no catalog at {path}; materialize catalog/metadata_catalog first")
    return read_catalog(path)


def _print_catalog(data_root: Path | str, source: str | None, where: list[str], columns: list[str] | None,
                   fmt: str) -> None:
    import pandas as pd
    import pyarrow as pa

    # Parse every filter before touching the catalog, so a mistyped clause is reported as such.
    filters = [_parse_filter(clause, f"--where {clause!r}") for clause in where]
    if source:
        filters.insert(0, _parse_filter(f"source={source}", f"--source {source!r}"))
    table = _read_catalog(data_root)
    for where_filter in filters:
        cells = table.column(where_filter.column).to_pylist()
        table = table.filter(pa.array([where_filter.keeps(cell) for cell in cells], pa.bool_()))
    frame = table.to_pandas()
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

    # An explicit --data-root "" is an error (local_root), not a fallback to the environment.
    data_root = _data_root(args.data_root if args.data_root is not None else Settings.from_env().data_root)
    columns = args.columns.split(",") if args.columns else None
    _print_catalog(data_root, args.source, args.where, columns, args.format)
    return 0


def _discover(args: argparse.Namespace) -> int:
    from em_ingest.settings import Settings
    from em_ingest.sources import source_classes

    classes = source_classes()
    if args.source not in classes:
        raise EmIngestError(f"unknown source {args.source!r}; known: {', '.join(classes)}")
    for count, item in enumerate(classes[args.source](Settings.from_env()).discover(), start=1):
        if args.limit and count > args.limit:
            break
        print(json.dumps(vars(item), default=str) if args.json else f"{item.dataset_key}\t{item.title or ''}")
    return 0


def _view(args: argparse.Namespace) -> int:
    from em_ingest import view
    from em_ingest.catalog import read_catalog
    from em_ingest.objectstore import is_object_url
    from em_ingest.settings import core_setting
    from em_ingest.storage import catalog_path, local_root, zarr_path

    if args.layout not in view.LAYOUTS:
        raise view.ViewError(f"--layout {args.layout!r}: expected one of {', '.join(view.LAYOUTS)}")
    if args.public_url is not None and not args.no_serve:
        raise EmIngestError("--public-url goes with --no-serve (which prints a link for data served there); "
                            "without it the data root is served here")
    given = args.data_root if args.data_root is not None else str(core_setting("data_root"))
    if is_object_url(given):
        raise EmIngestError(f"data root {given}: `view` serves a local data root; for one in a bucket, set "
                            "EM_INGEST_PUBLIC_URL to the bucket's HTTPS address (readable by browsers, with CORS) "
                            "and open the catalog's neuroglancer_url, or load its zarr_path in Neuroglancer")
    data_root = local_root(given)
    path = catalog_path(data_root)
    if not path.exists():
        raise EmIngestError(f"no catalog at {path}; materialize catalog/metadata_catalog first "
                            "(or pass --data-root, or set EM_INGEST_DATA_ROOT)")
    rows = read_catalog(path).to_pylist()
    images = []
    for row in view.select_images(rows, args.images, path):
        image_dir = zarr_path(data_root, row["source"], row["dataset_key"])
        if not args.no_serve and not ((image_dir / "zarr.json").exists() or (image_dir / ".zattrs").exists()):
            message = f"{row['source']}/{row['dataset_key']}: the catalog lists it but {image_dir} holds no image"
            if args.images:
                raise view.ViewError(message + "; materialize its ome_zarr partition again")
            print(f"em-ingest: skipped {message}", file=sys.stderr)
            continue
        images.append(view.ImageView.from_row(row, view.label_names(image_dir)))
    if not images:
        raise view.ViewError(f"no image of the catalog at {path} is present under {data_root / 'zarr'}")

    if args.no_serve:
        what = "--public-url" if args.public_url is not None else "EM_INGEST_PUBLIC_URL"
        base = view.public_base(args.public_url if args.public_url is not None else core_setting("public_url"), what)
        if base is None:
            raise EmIngestError("--no-serve needs --public-url URL (or EM_INGEST_PUBLIC_URL): where browsers "
                                "reach this data root")
        print(view.state_link(view.viewer_state(images, base, layout=args.layout)))
        print(f"(a link to Neuroglancer's public demo app, {view.NEUROGLANCER_DEMO_APP}, which reads the images "
              f"from {base}/zarr/... in the browser: that location must allow cross-origin GET and Range requests)",
              file=sys.stderr)
        return 0
    return _serve_view(images, data_root, args)


def _serve_view(images: list[Any], data_root: Path, args: argparse.Namespace) -> int:
    """The data root on a read-only loopback server, Neuroglancer's bundled client on another, until Ctrl-C."""
    from urllib.parse import urlsplit

    import neuroglancer  # here only: the code location never pays for it

    from em_ingest import view

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    neuroglancer.set_server_bind_address(view.LOOPBACK, args.port)
    try:
        viewer = neuroglancer.Viewer()  # starts Neuroglancer's server
    except OSError as exc:
        raise view.ViewError(f"cannot start Neuroglancer on {view.LOOPBACK}:{args.port}: {exc.strerror or exc}; "
                             "choose another port (--port)") from None
    try:
        viewer_url = viewer.get_viewer_url()
        origin = urlsplit(viewer_url)
        # Only the Neuroglancer page may read the data from another origin.
        origins = {f"{origin.scheme}://{host}:{origin.port}" for host in (view.LOOPBACK, "localhost")}
        with view.DataRootServer(data_root, port=args.data_port, allow_origins=origins) as server:
            viewer.set_state(neuroglancer.ViewerState(view.viewer_state(images, server.url, layout=args.layout)))
            print(f"Neuroglancer: {viewer_url}")
            print(f"data root {data_root}, read-only at {server.url}/")
            for image in images:
                print(f"  {image.name}: {' x '.join(map(str, image.shape_zyx))} voxels (z, y, x) of "
                      f"{' x '.join(f'{v:g}' for v in image.voxel_size_nm)} nm"
                      + (f", labels {', '.join(image.labels)}" if image.labels else ""))
            print("Ctrl-C to stop", flush=True)
            try:
                stop.wait()
            except KeyboardInterrupt:
                pass
    finally:
        neuroglancer.stop()
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line, in the same form as every other em-ingest error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"em-ingest: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="em-ingest", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="start the replicas, ingest every dataset they serve, print the catalog")
    demo.add_argument("--data-root", default="./demo-data",
                      help="where to write: a folder, or s3://bucket/prefix (default ./demo-data)")
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
    serve.add_argument("--bind", default="127.0.0.1", metavar="ADDRESS",
                       help="address to listen on (default 127.0.0.1; 0.0.0.0 serves other containers)")
    serve.add_argument("--advertise", metavar="HOST",
                       help="host name in the printed URLs, as clients reach this machine "
                            "(default: the bind address; required with 0.0.0.0)")
    serve.add_argument("--port", type=int, default=0, metavar="N",
                       help="first of consecutive fixed ports, one per server in a fixed order "
                            "(default 0: free ports)")
    serve.add_argument("--env-file", metavar="PATH",
                       help="also write the environment as NAME=value lines here once every replica serves")
    serve.add_argument("--ca-bundle", metavar="PATH",
                       help="copy the certificate authority of the replicas that speak HTTPS (neuPrint) here, "
                            "for clients on other machines to trust (e.g. a volume they mount)")
    serve.set_defaults(func=_replicas_serve)

    cat = sub.add_parser("catalog", help="print the catalog, optionally filtered")
    cat.add_argument("--data-root", help="default: $EM_INGEST_DATA_ROOT or ./data")
    cat.add_argument("--source", help="only rows of this source")
    cat.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                     help="keep rows where COLUMN equals VALUE, or with COLUMN!=VALUE where it does not "
                          "(repeatable; all must hold). VALUE is read as the column's type: numbers compare "
                          "by value (5 matches 5.0); the value null matches a missing value; source, "
                          "voxel_size_origin and status accept only their known values")
    cat.add_argument("--columns", help="comma-separated columns to show")
    cat.add_argument("--format", choices=["table", "csv", "json"], default="table")
    cat.set_defaults(func=_catalog)

    vw = sub.add_parser("view", help="open ingested images in Neuroglancer (offline, on this machine), "
                                     "or print a Neuroglancer link for data served elsewhere",
                        description="Serve the data root read-only on 127.0.0.1 and open the images in the Neuroglancer "
                                    "client that the neuroglancer package bundles (no internet needed); print its URL "
                                    "and stay up until Ctrl-C. With --no-serve, only print a link to Neuroglancer's "
                                    "public demo app for a data root that browsers reach at --public-url.")
    vw.add_argument("images", nargs="*", metavar="SOURCE/KEY", help="images to show (default: every image in the catalog)")
    vw.add_argument("--data-root", help="default: $EM_INGEST_DATA_ROOT or ./data")
    vw.add_argument("--port", type=int, default=0, help="port of the Neuroglancer viewer on 127.0.0.1 (default: a free one)")
    vw.add_argument("--data-port", type=int, default=0, help="port of the data server on 127.0.0.1 (default: a free one)")
    vw.add_argument("--layout", default="4panel", help="Neuroglancer layout: 4panel (default), xy, xz, yz, 3d, xy-3d, ...")
    vw.add_argument("--no-serve", action="store_true", help="serve nothing; print a Neuroglancer link for --public-url")
    vw.add_argument("--public-url", help="with --no-serve: where browsers reach the data root "
                                         "(default: $EM_INGEST_PUBLIC_URL)")
    vw.set_defaults(func=_view)

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
    except (EmIngestError, OSError) as exc:
        # User errors (bad input, a path we may not write, ...): one line, no traceback.
        # OSError's message names the path (e.g. "[Errno 13] Permission denied: '/data'").
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"em-ingest: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
