"""Replica of EMPIAR: the REST API, the HTTPS file tree with Apache autoindex pages, and FTP over the same files."""

from __future__ import annotations

import html
import io
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import mrcfile
import numpy as np
import tifffile

with warnings.catch_warnings():  # pyftpdlib still builds on asyncore/asynchat (deprecated, not removed in 3.11)
    warnings.simplefilter("ignore", DeprecationWarning)
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.filesystems import AbstractedFS
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.ioloop import IOLoop
    from pyftpdlib.servers import ThreadedFTPServer

from em_ingest.formats.volume import triple
from em_ingest.replicas.base import Expected, Replica
from em_ingest.replicas.dm_writer import dm_bytes
from em_ingest.replicas.http import ReplicaHTTPServer, Reply, Request
from em_ingest.replicas.placement import next_address
from em_ingest.replicas.volumes import synthetic_em

API_PREFIX = "/empiar/api"
TREE = "/empiar/world_availability"
# EMPIAR-11759's real calibration: 0.007998250424861908 µm pixels, 50 nm slices (DM tags).
PIXEL_UM_11759 = 0.007998250424861908
SLICE_NM_11759 = 50.0
MRC_VOXEL_A = (30.0, 24.0, 20.0)  # (z, y, x), Ångström: anisotropic so axis mix-ups show
LAST_MODIFIED = time.mktime((2024, 3, 1, 12, 0, 0, 0, 0, 0))


@dataclass
class FtpFaults:
    """Connection cuts for RETR: after `cut_after_bytes` of a transfer, the data connection aborts (426)."""

    cut_after_bytes: int | None = None
    cuts: int = 0
    retr_bytes: int = 0  # file bytes read for RETR (all transfers), for "nothing re-fetched" checks
    rest_offsets: list[int] = field(default_factory=list)  # every REST a client sent, to see resumes
    commands: Counter[str] = field(default_factory=Counter)  # every command a client sent, by name
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def clear(self) -> None:
        with self.lock:
            self.cut_after_bytes, self.cuts = None, 0
            self.rest_offsets.clear()
            self.commands.clear()


class _CuttingFile:
    """A file whose reads fail after a byte budget, so pyftpdlib aborts the transfer mid-body."""

    def __init__(self, fh, faults: FtpFaults, budget: int | None):
        self._fh, self._faults, self._budget = fh, faults, budget
        self.name, self.closed = fh.name, False

    def seek(self, *args):
        return self._fh.seek(*args)

    def read(self, n: int = -1) -> bytes:
        if self._budget is not None:
            if self._budget <= 0:
                raise OSError(104, "connection reset (injected)")
            n = self._budget if n < 0 else min(n, self._budget)
            self._budget -= n
        data = self._fh.read(n)
        with self._faults.lock:
            self._faults.retr_bytes += len(data)
        return data

    def close(self) -> None:
        self.closed = True
        self._fh.close()


def _filesystem_with(faults: FtpFaults) -> type[AbstractedFS]:
    class CuttingFS(AbstractedFS):
        def open(self, filename, mode):
            fh = super().open(filename, mode)
            budget = None
            with faults.lock:
                if "r" in mode and faults.cuts and faults.cut_after_bytes is not None:
                    faults.cuts -= 1
                    budget = faults.cut_after_bytes
            return _CuttingFile(fh, faults, budget)

    return CuttingFS


class _IsolatedFTPServer(ThreadedFTPServer):
    """pyftpdlib keeps its IOLoop and the threaded server's exit event process-wide by default, so
    stopping one server would stop every other; each replica server gets its own."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._exit = threading.Event()
        self._lock = threading.Lock()
        super().__init__(*args, **kwargs)


@dataclass
class _Entry:
    record: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)  # path inside <n>/ -> bytes
    extra_links: dict[str, list[str]] = field(default_factory=dict)  # directory -> raw hrefs to add


def _autoindex(path: str, entries: list[tuple[str, bool, int]], extra_hrefs: list[str]) -> str:
    """An Apache 2.4 FancyIndexing page (the layout ftp.ebi.ac.uk serves)."""
    parent = path.rstrip("/").rsplit("/", 1)[0] + "/"
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(LAST_MODIFIED))
    rows = [f'<tr><td valign="top"><img src="/icons/back.gif" alt="[PARENTDIR]"></td><td><a href="{parent}">'
            'Parent Directory</a></td><td>&nbsp;</td><td align="right">  - </td><td>&nbsp;</td></tr>']
    for name, is_dir, size in entries:
        href = quote(name) + ("/" if is_dir else "")
        icon, alt, shown = ("folder.gif", "[DIR]", "-") if is_dir else ("unknown.gif", "[   ]", f"{size / 1024:.0f}K")
        rows.append(f'<tr><td valign="top"><img src="/icons/{icon}" alt="{alt}"></td><td><a href="{href}">'
                    f'{html.escape(name)}{"/" if is_dir else ""}</a></td><td align="right">{stamp}  </td>'
                    f'<td align="right">{shown}</td><td>&nbsp;</td></tr>')
    for href in extra_hrefs:
        rows.append(f'<tr><td valign="top"><img src="/icons/unknown.gif" alt="[   ]"></td><td><a href="{href}">'
                    f'{html.escape(href)}</a></td><td align="right">{stamp}  </td><td align="right">1K</td>'
                    '<td>&nbsp;</td></tr>')
    header = ('<tr><th valign="top"><img src="/icons/blank.gif" alt="[ICO]"></th><th><a href="?C=N;O=D">Name</a></th>'
              '<th><a href="?C=M;O=A">Last modified</a></th><th><a href="?C=S;O=A">Size</a></th>'
              '<th><a href="?C=D;O=A">Description</a></th></tr>\n   <tr><th colspan="5"><hr></th></tr>')
    title = html.escape(path.rstrip("/"))
    return ('<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 3.2 Final//EN">\n<html>\n <head>\n'
            f"  <title>Index of {title}</title>\n </head>\n <body>\n<h1>Index of {title}</h1>\n  <table>\n   "
            + header + "\n" + "\n".join(rows) + '\n   <tr><th colspan="5"><hr></th></tr>\n</table>\n</body></html>\n')


def _record(accession: str, title: str, imagesets: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    number = accession.split("-")[1]
    return {
        "title": title, "status": "REL", "deposition_date": "2023-10-02", "release_date": "2024-03-01",
        "update_date": "2024-03-01", "dataset_size": "1.3 GB", "experiment_type": "SBF-SEM",
        "entry_doi": f"10.6019/{accession}",
        "authors": [{"name": "Replica A", "order_id": 1, "author_orcid": None},
                    {"name": "Example B", "order_id": 0, "author_orcid": None}],
        "principal_investigator": [{"first_name": "Pat", "last_name": "Example", "organization": "Replica Institute"}],
        "cross_references": [], "related_pdb_entries": [],
        "citation": [{"title": f"Replica citation for {accession}", "journal": "Replica Journal", "year": "2024",
                      "doi": f"10.9999/replica.{number}", "pubmedid": None}],
        "imagesets": imagesets, **extra,
    }


def _imageset(name: str, directory: str, data_format: str, shape: tuple[int, int, int], pixel_a: float,
              voxel_type: str = "UNSIGNED BYTE", category: str = "reconstructed volumes",
              count: int | None = None) -> dict[str, Any]:
    return {"name": name, "directory": directory, "category": category, "header_format": data_format,
            "data_format": data_format, "num_images_or_tilt_series": shape[0] if count is None else count,
            "frames_per_image": 1,
            "voxel_type": voxel_type, "pixel_width": pixel_a, "pixel_height": pixel_a,
            "image_width": str(shape[2]), "image_height": str(shape[1]), "details": f"{name} (replica)",
            "micrographs_file_pattern": None, "picked_particles_file_pattern": None,
            "picked_particles_directory": None, "segmentations": []}


def mrc_bytes(volume: np.ndarray, voxel_a_zyx: tuple[float, float, float]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.mrc"
        with mrcfile.new(path) as mrc:
            mrc.set_data(volume)
            mrc.voxel_size = (voxel_a_zyx[2], voxel_a_zyx[1], voxel_a_zyx[0])  # record order (x, y, z)
        return path.read_bytes()


def fei_tiff_bytes(image: np.ndarray, pixel_m: float) -> bytes:
    buffer = io.BytesIO()
    ini = f"[User]\nUser=replica\n[Scan]\nPixelWidth={pixel_m:.6e}\nPixelHeight={pixel_m:.6e}\n"
    tifffile.imwrite(buffer, image, photometric="minisblack", metadata=None, extratags=[(34682, "s", 0, ini, True)])
    return buffer.getvalue()


class EmpiarReplica(Replica):
    source = "empiar"
    DEMO_KEYS = ("EMPIAR-11759", "EMPIAR-90001")

    # Small stand-ins with the real layout; 9000x accessions exist only here (test scenarios).
    SHAPE_11759 = (16, 100, 120)

    def start(self) -> EmpiarReplica:
        # A handler of our own stops pyftpdlib from configuring process-wide logging on start.
        ftp_log = logging.getLogger("pyftpdlib")
        ftp_log.setLevel(logging.WARNING)
        if not ftp_log.handlers:
            ftp_log.addHandler(logging.NullHandler())
        self.entries: dict[str, _Entry] = {}
        self._modified: dict[tuple[str, str], float] = {}
        self._tree = Path(tempfile.mkdtemp(prefix="empiar-replica-"))
        http = ReplicaHTTPServer("empiar").start()
        self.servers.append(http)
        http.add_handler(f"{API_PREFIX}/entry/", self._api_entry)
        http.add_handler(f"{TREE}/", self._listing)
        self.ftp_faults = FtpFaults()
        # file name -> how many more HTTPS listings leave it out (a load-balanced backend's stale index)
        self.listing_gaps: dict[str, int] = {}
        self._start_ftp()
        self._build_datasets()
        self.env = {"EM_INGEST_EMPIAR_API_URL": http.url + API_PREFIX,
                    "EM_INGEST_EMPIAR_FILES_URL": http.url + TREE}
        self.ftp_env = {**self.env, "EM_INGEST_EMPIAR_FILES_URL": self.ftp_url + TREE}
        self.selection = {"EMPIAR-11759": {}, "EMPIAR-90001": {}}
        return self

    def stop(self) -> None:
        if getattr(self, "_ftp", None) is not None:
            self._ftp.close_all()
            self._ftp_thread.join(timeout=5)
            self._ftp = None
        super().stop()
        if getattr(self, "_tree", None) is not None:
            shutil.rmtree(self._tree, ignore_errors=True)
            self._tree = None

    # ---- FTP -----------------------------------------------------------------------------------
    def _start_ftp(self) -> None:
        authorizer = DummyAuthorizer()
        authorizer.add_anonymous(str(self._tree), perm="elr")  # read-only, like ftp.ebi.ac.uk
        faults = self.ftp_faults

        class EmpiarFTPHandler(FTPHandler):
            abstracted_fs = _filesystem_with(faults)
            banner = "EMPIAR replica FTP"

            def pre_process_command(self, line: str, cmd: str, arg: str) -> None:
                with faults.lock:
                    faults.commands[cmd] += 1
                super().pre_process_command(line, cmd, arg)

            def ftp_REST(self, line: str) -> None:
                with faults.lock:
                    faults.rest_offsets.append(int(line) if line.isdigit() else -1)
                super().ftp_REST(line)

        EmpiarFTPHandler.authorizer = authorizer
        handler = EmpiarFTPHandler
        bind, port, host = next_address()
        self._ftp = _IsolatedFTPServer((bind, port), handler, ioloop=IOLoop())
        self.ftp_url = f"ftp://{host}:{self._ftp.address[1]}"
        self._ftp_thread = threading.Thread(target=self._ftp.serve_forever,
                                            kwargs={"timeout": 0.2, "handle_exit": False},
                                            name="replica-empiar-ftp", daemon=True)
        self._ftp_thread.start()

    # ---- content ---------------------------------------------------------------------------------
    def set_file(self, accession: str, relpath: str, data: bytes) -> None:
        """Serve `data` at <tree>/<n>/<relpath> over HTTPS and FTP (tests use it to change the source)."""
        number = accession.split("-")[1]
        previous = self._modified.get((accession, relpath))
        # Each new version gets a later modification time, as on a real server (MDTM has 1 s resolution).
        modified = LAST_MODIFIED if previous is None else previous + 60
        self._modified[(accession, relpath)] = modified
        self.entries[accession].files[relpath] = data
        self.http.add_file(f"{TREE}/{number}/{relpath}", data, last_modified=modified)
        disk = self._tree / "empiar" / "world_availability" / number / relpath
        disk.parent.mkdir(parents=True, exist_ok=True)
        tmp = disk.with_name(disk.name + ".tmp")
        tmp.write_bytes(data)
        os.utime(tmp, (modified, modified))
        os.replace(tmp, disk)

    def _add_entry(self, accession: str, record: dict[str, Any], files: dict[str, bytes]) -> None:
        self.entries[accession] = _Entry(record)
        for relpath, data in files.items():
            self.set_file(accession, relpath, data)

    def _build_datasets(self) -> None:
        self._build_11759()
        self._build_mrc()
        self._build_natural_order()
        self._build_scenarios()

    def _build_11759(self) -> None:
        volume = synthetic_em(self.SHAPE_11759, "uint8", seed=11759)
        files = {f"data/F57-8_test1_3VBSED_slice_{z:04d}.dm3":
                 dm_bytes(plane, pixel_size=PIXEL_UM_11759, pixel_units="µm", slice_spacing_nm=SLICE_NM_11759,
                          name=f"3VBSED_slice_{z:04d}") for z, plane in enumerate(volume)}
        files["data/F57-8_test1.xml"] = b"<?xml version='1.0'?><trakem2 />\n"
        files["data/trakem2/trakem2.1560000000000.1234567890.12345678/trakem2.mipmaps/0/1.jpg"] = b"\xff\xd8\xff"
        record = _record("EMPIAR-11759", "Serial block-face SEM test stack F57-8 (3View BSED), 16 slices",
                         [_imageset("F57-8 test1 3VBSED slices", "data", "DM3", self.SHAPE_11759,
                                    PIXEL_UM_11759 * 1e4)])
        self._add_entry("EMPIAR-11759", record, files)
        pixel_nm = PIXEL_UM_11759 * 1000
        self.expected["EMPIAR-11759"] = Expected(
            volume, (SLICE_NM_11759, pixel_nm, pixel_nm), "source-metadata", None,
            {"title": record["title"], "doi": "10.6019/EMPIAR-11759", "license": "CC0",
             "authors": "Example B; Replica A", "imaging_method": "SBF-SEM"})

    def _build_mrc(self) -> None:
        # Over 1 MiB, so a cut connection can be resumed past the HTTP client's first read block.
        volume = synthetic_em((24, 160, 192), "int16", seed=90001)
        record = _record("EMPIAR-90001", "Cryo-electron tomogram (replica MRC volume)",
                         [_imageset("Movies", "/data/frames", "TIFF", (10, 160, 192), 5.0, "UNSIGNED BYTE",
                                    "micrographs - multiframe"),
                          _imageset("Reconstructed tomogram", "/data/tomograms", "MRC", volume.shape, MRC_VOXEL_A[2],
                                    "SIGNED 16 BIT INTEGER", count=1)],
                         experiment_type="EMDB")
        # The first imageset's files are not images em-ingest reads (.eer): the default picks the MRC one.
        record["imagesets"][0]["data_format"] = "EER"
        record["imagesets"][0]["header_format"] = "EER"
        files = {"data/frames/movie_001.eer": b"EER replica\n",
                 "data/tomograms/tomo_01.rec": mrc_bytes(volume, MRC_VOXEL_A),
                 "data/tomograms/tomo_01.rec.mdoc": b"PixelSpacing = 20\n"}
        self._add_entry("EMPIAR-90001", record, files)
        self.expected["EMPIAR-90001"] = Expected(
            volume, triple(v / 10 for v in MRC_VOXEL_A), "source-metadata", None,
            {"title": record["title"], "doi": "10.6019/EMPIAR-90001", "license": "CC0", "imaging_method": None})

    def _build_natural_order(self) -> None:
        """Unpadded slice numbers (slice_2 before slice_10), DM4, calibrated in nm, no slice spacing."""
        volume = synthetic_em((12, 64, 80), "uint16", seed=90002)
        files = {f"data/stack/slice_{z + 1}.dm4": dm_bytes(plane, pixel_size=5.0, pixel_units="nm", version=4)
                 for z, plane in enumerate(volume)}
        record = _record("EMPIAR-90002", "DM4 series with unpadded slice numbers (replica)",
                         [_imageset("stack", "data/stack", "DM4", volume.shape, 50.0, "UNSIGNED 16 BIT INTEGER")])
        self._add_entry("EMPIAR-90002", record, files)
        self.expected["EMPIAR-90002"] = Expected(volume, (25.0, 5.0, 5.0), "override")

    def _build_scenarios(self) -> None:
        # A listing with a name that would escape the raw folder.
        good = synthetic_em((2, 48, 40), "uint8", seed=90003)
        files = {f"data/slice_{z}.dm3": dm_bytes(p, pixel_size=0.01, slice_spacing_nm=30.0) for z, p in enumerate(good)}
        self._add_entry("EMPIAR-90003", _record("EMPIAR-90003", "Hostile listing (replica)",
                                                [_imageset("s", "data", "DM3", good.shape, 100.0)]), files)
        self.entries["EMPIAR-90003"].extra_links["90003/data"] = ["..%2F..%2F..%2Fescape.dm3"]
        # One slice whose size differs from the others.
        odd = synthetic_em((3, 48, 40), "uint8", seed=90004)
        files = {f"data/slice_{z}.dm3": dm_bytes(p, pixel_size=0.01, slice_spacing_nm=30.0) for z, p in enumerate(odd)}
        files["data/slice_3.dm3"] = dm_bytes(np.zeros((50, 40), np.uint8), pixel_size=0.01, slice_spacing_nm=30.0)
        self._add_entry("EMPIAR-90004", _record("EMPIAR-90004", "Mismatched slice sizes (replica)",
                                                [_imageset("s", "data", "DM3", odd.shape, 100.0)]), files)
        # FEI SEM TIFF slices: xy calibration in the TIFF, no slice spacing anywhere.
        tiffs = synthetic_em((4, 40, 56), "uint8", seed=90005)
        files = {f"data/img_{z + 1}.tif": fei_tiff_bytes(p, 6.5e-8) for z, p in enumerate(tiffs)}
        self._add_entry("EMPIAR-90005", _record("EMPIAR-90005", "FEI TIFF slices (replica)",
                                                [_imageset("t", "data", "TIFF", tiffs.shape, 650.0)]), files)
        self.expected["EMPIAR-90005"] = Expected(tiffs, (100.0, 65.0, 65.0), "override")

    # ---- HTTP handlers ---------------------------------------------------------------------------
    def _api_entry(self, request: Request) -> Reply | None:
        # Accept EMPIAR-<n> and bare <n>, each with or without the trailing slash, as the real API does.
        ident = request.path[len(f"{API_PREFIX}/entry/"):].strip("/")
        accession = ident if ident.startswith("EMPIAR-") else f"EMPIAR-{ident}"
        entry = self.entries.get(accession)
        if entry is None or "/" in ident:
            return Reply.json({"detail": "Not found."}, status=404)
        return Reply.json({accession: entry.record})

    def _listing(self, request: Request) -> Reply | None:
        inside = request.path[len(TREE):].strip("/")
        if not request.path.endswith("/"):
            # Apache redirects a directory URL without its slash.
            if self._children(inside) is None:
                return None
            return Reply(301, b"", "text/html", {"Location": request.raw_path + "/"})
        children = self._children(inside)
        if children is None:
            return None
        children = [c for c in children if not self._omit_once(c[0])]
        extra = [href for entry in self.entries.values() for d, hrefs in entry.extra_links.items()
                 if d == inside for href in hrefs]
        return Reply.text(_autoindex(request.path, children, extra))

    def _omit_once(self, name: str) -> bool:
        with self.http.faults.lock:
            if self.listing_gaps.get(name, 0) > 0:
                self.listing_gaps[name] -= 1
                return True
        return False

    def _children(self, inside: str) -> list[tuple[str, bool, int]] | None:
        """(name, is_dir, size) of a directory of the tree, or None if it is not one."""
        paths = {f"{a.split('-')[1]}/{p}": len(d) for a, e in self.entries.items() for p, d in e.files.items()}
        prefix = f"{inside}/" if inside else ""
        children: dict[str, tuple[bool, int]] = {}
        for path, size in paths.items():
            if not path.startswith(prefix):
                continue
            head, _, rest = path[len(prefix):].partition("/")
            children[head] = (True, 0) if rest else (False, size)
        if not children:
            return None
        return [(name, is_dir, size) for name, (is_dir, size) in sorted(children.items())]


REPLICA = EmpiarReplica
