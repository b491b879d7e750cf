"""Replica of FlyEM: neuPrint behind a bearer token, hemibrain precomputed on GCS (sharded and unsharded), DVID."""

from __future__ import annotations

import gzip
import json
import re
import secrets
import struct
import threading
from collections.abc import Callable, Mapping

import imagecodecs
import numpy as np

from em_ingest.formats.volume import triple
from em_ingest.replicas.base import Expected, Replica
from em_ingest.replicas.http import ReplicaHTTPServer, Reply, Request
from em_ingest.replicas.volumes import synthetic_em

# One small ground truth (z, y, x) placed at a non-zero absolute position, served by every service.
SHAPE_ZYX = (80, 224, 256)
ORIGIN_XYZ = (3000, 2000, 1000)
# A chunk-sized block of background (as outside the tissue): the precomputed writers omit it.
EMPTY_XYZ = (slice(3064, 3128), slice(2064, 2128), slice(1000, 1064))
BUCKET = "/neuroglancer-janelia-flyem-hemibrain"
SHARDED_PATH = f"{BUCKET}/emdata/clahe_yz/jpeg"
UNSHARDED_PATH = f"{BUCKET}/emdata/raw/jpeg"
SHARDING = {"@type": "neuroglancer_uint64_sharded_v1", "preshift_bits": 1, "hash": "identity",
            "minishard_bits": 2, "shard_bits": 2, "minishard_index_encoding": "gzip", "data_encoding": "raw"}
SHARDED_CHUNK_XYZ = (64, 64, 64)
UNSHARDED_CHUNK_XYZ = (64, 32, 16)  # not a cube, so a reader that swaps axes fails
JPEG_QUALITY = 90
# Largest |decoded - truth| the JPEG chunks above produce on this volume (measured: 21); the slack
# keeps the check meaningful without tying it to one libjpeg build.
JPEG_TOLERANCE = 28
DVID_UUID = "a89eb3af216a46cdba81204d8f954786"
DVID_INSTANCE = "grayscale"
DVID_MAX_BYTES = 128 ** 3  # larger raw requests are refused, as a server's response cap
NEUPRINT_VERSION = "1.7.4"

DATASETS = {
    "hemibrain:v1.2.1": {
        "meta": {"dataset": "hemibrain", "tag": "v1.2.1", "uuid": "52a13", "lastDatabaseEdit": "2021-06-08 15:22:58",
                 "voxelSize": [8.0, 8.0, 8.0], "voxelUnits": "nanometers",
                 "info": "https://www.janelia.org/project-team/flyem/hemibrain",
                 "logo": "", "totalPreCount": 0, "totalPostCount": 0},
        "description": "Replica of the hemibrain v1.2.1 release (FIB-SEM, adult Drosophila central brain)",
    },
    "manc:v1.0": {
        "meta": {"dataset": "manc", "tag": "v1.0", "uuid": "a3d1b", "lastDatabaseEdit": "2022-10-17 08:00:00",
                 "voxelSize": [8.0, 8.0, 8.0], "voxelUnits": "nanometers", "info": "N/A", "logo": ""},
        "description": "Replica of the male adult nerve cord v1.0",
    },
}
_META_QUERY = re.compile(r"^\s*MATCH\s+\(m:Meta\)\s+RETURN\s+(?P<items>.+?)\s*$", re.IGNORECASE | re.DOTALL)
_RAW_PATH = re.compile(r"^/api/node/(?P<uuid>[0-9a-f]+)/(?P<instance>[^/]+)/raw/0_1_2/"
                       r"(?P<size>\d+_\d+_\d+)/(?P<offset>\d+_\d+_\d+)$")


# ---- precomputed writing (kept apart from the product's reader on purpose) --------------------

def _morton(grid: tuple[int, int, int], grid_shape: tuple[int, int, int]) -> int:
    bits = [(n - 1).bit_length() for n in grid_shape]
    code, j = 0, 0
    for i in range(max(bits)):
        for axis in range(3):
            if i < bits[axis]:
                code |= ((grid[axis] >> i) & 1) << j
                j += 1
    return code


def _jpeg_chunk(block_zyx: np.ndarray) -> bytes:
    z, y, x = block_zyx.shape
    return imagecodecs.jpeg_encode(np.ascontiguousarray(block_zyx.reshape(z * y, x)), level=JPEG_QUALITY)


def _chunks(volume: np.ndarray, origin_xyz, chunk_xyz):
    """(grid xyz, absolute start xyz, stop xyz, block zyx) of every chunk that is not all background."""
    size_xyz = volume.shape[::-1]
    grid_shape = tuple(-(-n // c) for n, c in zip(size_xyz, chunk_xyz))
    for gz in range(grid_shape[2]):
        for gy in range(grid_shape[1]):
            for gx in range(grid_shape[0]):
                lo = [g * c for g, c in zip((gx, gy, gz), chunk_xyz)]
                hi = [min(a + c, n) for a, c, n in zip(lo, chunk_xyz, size_xyz)]
                block = volume[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
                if not block.any():
                    continue  # like tensorstore and neuroglancer writers: fill-value chunks are not stored
                start = [o + a for o, a in zip(origin_xyz, lo)]
                yield (gx, gy, gz), start, [o + b for o, b in zip(origin_xyz, hi)], block



def _shard_files(chunks: dict[int, bytes], spec: dict) -> dict[str, bytes]:
    """Pack chunk id -> data into neuroglancer_uint64_sharded_v1 shard files (identity hash)."""
    assert spec["hash"] == "identity"
    mb, sb = spec["minishard_bits"], spec["shard_bits"]
    layout: dict[int, dict[int, list[int]]] = {}
    for chunk_id in sorted(chunks):
        hashed = chunk_id >> spec["preshift_bits"]
        shard, minishard = (hashed >> mb) & ((1 << sb) - 1), hashed & ((1 << mb) - 1)
        layout.setdefault(shard, {}).setdefault(minishard, []).append(chunk_id)
    files = {}
    for shard, minishards in layout.items():
        body, index = bytearray(), bytearray(16 << mb)
        for minishard, ids in sorted(minishards.items()):
            starts, sizes = [], []
            for chunk_id in ids:
                starts.append(len(body))
                sizes.append(len(chunks[chunk_id]))
                body += chunks[chunk_id]
            ends = [0] + [s + n for s, n in zip(starts, sizes)][:-1]
            table = np.array([np.diff(ids, prepend=0), np.subtract(starts, ends), sizes], dtype="<u8")
            encoded = table.tobytes()
            if spec["minishard_index_encoding"] == "gzip":
                encoded = gzip.compress(encoded, mtime=0)  # same bytes in, same shard out
            struct.pack_into("<QQ", index, 16 * minishard, len(body), len(body) + len(encoded))
            body += encoded
        files[f"{shard:0{(sb + 3) // 4}x}.shard"] = bytes(index + body)
    return files


def precomputed_files(volume: np.ndarray, origin_xyz, *, sharded: bool) -> dict[str, bytes]:
    """info + chunk objects of a two-scale JPEG precomputed image (relative path -> bytes)."""
    files: dict[str, bytes] = {}
    scales = []
    chunk_xyz = SHARDED_CHUNK_XYZ if sharded else UNSHARDED_CHUNK_XYZ
    level, origin = volume, list(origin_xyz)
    for factor in (1, 2):
        if factor == 2:  # 2x mean downsampling, as the FlyEM pyramids are built
            z, y, x = (n // 2 * 2 for n in volume.shape)
            blocks = volume[:z, :y, :x].reshape(z // 2, 2, y // 2, 2, x // 2, 2)
            level = blocks.mean(axis=(1, 3, 5)).round().astype(np.uint8)
            origin = [o // 2 for o in origin_xyz]
        key = f"{8.0 * factor}x{8.0 * factor}x{8.0 * factor}"
        scale = {"key": key, "size": list(level.shape[::-1]), "resolution": [8 * factor] * 3,
                 "voxel_offset": origin, "chunk_sizes": [list(chunk_xyz)], "encoding": "jpeg"}
        grid_shape = tuple(-(-n // c) for n, c in zip(level.shape[::-1], chunk_xyz))
        encoded = {}
        for grid, lo, hi, block in _chunks(level, origin, chunk_xyz):
            data = _jpeg_chunk(block)
            if sharded:
                encoded[_morton(grid, grid_shape)] = data
            else:
                files[f"{key}/{lo[0]}-{hi[0]}_{lo[1]}-{hi[1]}_{lo[2]}-{hi[2]}"] = data
        if sharded:
            scale["sharding"] = dict(SHARDING)
            files.update({f"{key}/{name}": data for name, data in _shard_files(encoded, SHARDING).items()})
        scales.append(scale)
    info = {"@type": "neuroglancer_multiscale_volume", "type": "image", "data_type": "uint8", "num_channels": 1,
            "scales": scales}
    files["info"] = json.dumps(info, indent=1).encode()
    return files


# ---- the replica -------------------------------------------------------------------------------

class FlyemReplica(Replica):
    source = "flyem"
    DEMO_KEYS = ("hemibrain-crop", "hemibrain-crop-dvid")

    def __init__(self) -> None:
        super().__init__()
        # Unguessable per run, so a test can search every output for it.
        self.token = "replica-token-" + secrets.token_urlsafe(32)
        self.volume = np.zeros(SHAPE_ZYX, np.uint8)
        self.dvid_busy = 0  # answer this many throttled raw requests with 503, as a loaded server does
        self.dvid_locked = True
        self.dvid_raw_requests: list[str] = []
        self._lock = threading.Lock()

    def adopt_environment(self, environ: Mapping[str, str]) -> None:
        """Accept the NEUPRINT_TOKEN the pipeline is given instead of a random one."""
        if environ.get("NEUPRINT_TOKEN"):
            self.token = environ["NEUPRINT_TOKEN"]

    @property
    def neuprint(self) -> ReplicaHTTPServer:
        return self.servers[0]

    @property
    def gcs(self) -> ReplicaHTTPServer:
        return self.servers[1]

    @property
    def dvid(self) -> ReplicaHTTPServer:
        return self.servers[2]

    @property
    def sharded_url(self) -> str:
        return self.gcs.url + SHARDED_PATH

    @property
    def unsharded_url(self) -> str:
        return self.gcs.url + UNSHARDED_PATH

    def start(self) -> FlyemReplica:
        for name in ("neuprint", "gcs", "dvid"):
            # neuPrint speaks only HTTPS (its clients refuse plain HTTP), with a certificate trusted through
            # NEUPRINT_CA_BUNDLE below; the storage and DVID replicas answer plain HTTP.
            self.servers.append(ReplicaHTTPServer(f"flyem-{name}", tls=name == "neuprint").start())
        volume = synthetic_em(SHAPE_ZYX, "uint8", seed=62)
        x, y, z = (slice(s.start - o, s.stop - o) for s, o in zip(EMPTY_XYZ, ORIGIN_XYZ))
        volume[z, y, x] = 0
        self.volume = volume  # what DVID serves and what every crop is checked against
        self.publish_precomputed(volume)
        self._neuprint_routes()
        self.dvid.add_handler("/api/", self._dvid)
        self.env = {
            "NEUPRINT_SERVER": self.neuprint.url,
            "NEUPRINT_TOKEN": self.token,
            "NEUPRINT_CA_BUNDLE": str(self.neuprint.ca_bundle),
            "EM_INGEST_FLYEM_PRECOMPUTED_URL": self.sharded_url,
            "EM_INGEST_FLYEM_DVID_URL": self.dvid.url,
            "EM_INGEST_FLYEM_DVID_UUID": DVID_UUID,
        }
        # Crops at offsets that match no chunk or tile boundary, crossing several of each.
        self.selection = {
            "hemibrain-crop": {"dataset": "hemibrain:v1.2.1", "grayscale": "precomputed",
                               "offset_zyx": [1013, 2045, 3033], "shape_zyx": [40, 150, 170]},
            "hemibrain-crop-dvid": {"dataset": "hemibrain:v1.2.1", "grayscale": "dvid",
                                    "offset_zyx": [1021, 2011, 3061], "shape_zyx": [44, 170, 190]},
        }
        self._set_expected()
        return self

    def publish_precomputed(self, volume: np.ndarray) -> None:
        """Serve `volume` in both precomputed layouts (tests call this again to change the source; the
        locked DVID node keeps its data)."""
        for path, sharded in ((SHARDED_PATH, True), (UNSHARDED_PATH, False)):
            for name, data in precomputed_files(volume, ORIGIN_XYZ, sharded=sharded).items():
                self.gcs.add_file(f"{path}/{name}", data,
                                  content_type="application/json" if name == "info" else "application/octet-stream")

    def _set_expected(self) -> None:
        meta = DATASETS["hemibrain:v1.2.1"]["meta"]
        catalog = {"organism": "Drosophila melanogaster", "doi": "10.7554/eLife.57443", "license": "CC-BY-4.0",
                   "imaging_method": "FIB-SEM",
                   "source_version": f"uuid {meta['uuid']}, last-mod {meta['lastDatabaseEdit']}"}
        for key, options in self.selection.items():
            offset, shape = options["offset_zyx"], options["shape_zyx"]
            crop = self.crop(offset, shape)
            self.expected[key] = Expected(
                crop, (8.0, 8.0, 8.0), "source-metadata", triple(8.0 * o for o in offset),
                catalog, tolerance=JPEG_TOLERANCE if options["grayscale"] == "precomputed" else 0.0)

    def crop(self, offset_zyx, shape_zyx) -> np.ndarray:
        """Ground truth of a crop given in absolute voxel coordinates (z, y, x)."""
        lo = [o - g for o, g in zip(offset_zyx, ORIGIN_XYZ[::-1])]
        return self.volume[tuple(slice(a, a + n) for a, n in zip(lo, shape_zyx))].copy()

    # ---- neuPrint ------------------------------------------------------------------------------
    def _neuprint_routes(self) -> None:
        routes: dict[str, Callable[[Request], Reply]] = {
            "/api/dbmeta/datasets": lambda r: Reply.json({name: self._dataset_info(d) for name, d in DATASETS.items()}),
            "/api/serverinfo": lambda r: Reply.json({"IsPublic": False, "Version": NEUPRINT_VERSION}),
            "/api/version": lambda r: Reply.json({"Version": NEUPRINT_VERSION}),
            "/api/custom/custom": self._custom,
        }

        def handle(request: Request) -> Reply | None:
            route = routes.get(request.path.rstrip("/"))
            if route is None:
                return None
            header = request.headers.get("Authorization") or request.headers.get("authorization") or ""
            if not header.startswith("Bearer "):
                return Reply.json({"message": "missing or malformed jwt"}, 401)
            if not secrets.compare_digest(header.removeprefix("Bearer ").strip(), self.token):
                return Reply.json({"message": "invalid or expired jwt"}, 401)
            return route(request)

        self.neuprint.add_handler("/api/", handle)

    @staticmethod
    def _dataset_info(dataset: dict) -> dict:
        meta = dataset["meta"]
        return {"last-mod": meta["lastDatabaseEdit"], "uuid": meta["uuid"], "ROIs": [], "superLevelROIs": [],
                "info": meta.get("info", "N/A"), "hidden": False, "logo": meta.get("logo", ""),
                "description": dataset["description"]}

    def _custom(self, request: Request) -> Reply:
        if request.method != "POST":
            return Reply.json({"error": "method not allowed"}, 405)
        try:
            body = json.loads(request.headers.get("_body") or "")
            cypher, dataset = str(body["cypher"]), str(body["dataset"])
        except (ValueError, KeyError, TypeError):
            return Reply.json({"error": "request object not formatted correctly"}, 400)
        if dataset not in DATASETS:
            return Reply.json({"error": f"dataset {dataset} not found"}, 404)
        match = _META_QUERY.match(cypher)
        if match is None:
            return Reply.json({"error": "replica answers only MATCH (m:Meta) RETURN m.<property>, ..."}, 400)
        columns = [item.strip() for item in match["items"].split(",")]
        meta = DATASETS[dataset]["meta"]
        row = []
        for column in columns:
            name = column.split(" AS ")[0].strip()
            if not name.startswith("m."):
                return Reply.json({"error": f"Variable `{name}` not defined"}, 400)
            row.append(meta.get(name[2:]))  # a missing property is null, as in neo4j
        return Reply.json({"columns": columns, "data": [row], "debug": cypher})

    # ---- DVID ----------------------------------------------------------------------------------
    def _dvid(self, request: Request) -> Reply | None:
        node = f"/api/node/{DVID_UUID}"
        if request.path in (f"{node}/commit", f"{node}/status"):
            return Reply.json({"Locked": self.dvid_locked})
        if request.path == f"{node}/{DVID_INSTANCE}/info":
            return Reply.json(self._dvid_info())
        match = _RAW_PATH.match(request.path)
        if match is None:
            return None
        if match["uuid"] != DVID_UUID:
            return Reply.text(f"UUID {match['uuid']} not found", 400, "text/plain")
        if match["instance"] != DVID_INSTANCE:
            return Reply.text(f"data {match['instance']} not found at {DVID_UUID}", 400, "text/plain")
        size = [int(v) for v in match["size"].split("_")]
        offset = [int(v) for v in match["offset"].split("_")]
        nbytes = size[0] * size[1] * size[2]
        if nbytes > DVID_MAX_BYTES:
            return Reply.text(f"requested payload of {nbytes} bytes exceeds the {DVID_MAX_BYTES} byte limit",
                              413, "text/plain")
        throttled = request.query.get("throttle", [""])[0] == "true"
        with self._lock:
            self.dvid_raw_requests.append(request.raw_path + ("?throttle=true" if throttled else ""))
            if throttled and self.dvid_busy > 0:
                self.dvid_busy -= 1
                return Reply.text("server busy, try again", 503, "text/plain")
        return Reply(200, self._dvid_voxels(offset, size), "application/octet-stream")

    def _dvid_voxels(self, offset_xyz: list[int], size_xyz: list[int]) -> bytes:
        """ZYX C-order bytes of a box; voxels outside the stored extents are background (0)."""
        out = np.zeros(size_xyz[::-1], np.uint8)
        lo = [max(o, g) for o, g in zip(offset_xyz, ORIGIN_XYZ)]
        hi = [min(o + n, g + s) for o, n, g, s in zip(offset_xyz, size_xyz, ORIGIN_XYZ, SHAPE_ZYX[::-1])]
        if all(a < b for a, b in zip(lo, hi)):
            dst = tuple(slice(lo[i] - offset_xyz[i], hi[i] - offset_xyz[i]) for i in (2, 1, 0))
            src = tuple(slice(lo[i] - ORIGIN_XYZ[i], hi[i] - ORIGIN_XYZ[i]) for i in (2, 1, 0))
            out[dst] = self.volume[src]
        return out.tobytes()

    @staticmethod
    def _dvid_info() -> dict:
        max_point = [o + n - 1 for o, n in zip(ORIGIN_XYZ, SHAPE_ZYX[::-1])]
        return {
            "Base": {"TypeName": "uint8blk", "TypeURL": "github.com/janelia-flyem/dvid/datatype/imageblk/uint8.go",
                     "TypeVersion": "0.2", "DataUUID": "b1c5e7d0a3f94c2e8d6b", "Name": DVID_INSTANCE,
                     "RepoUUID": DVID_UUID, "Compression": "LZ4 compression, level -1", "Checksum": "No checksum",
                     "Syncs": [], "Versioned": True},
            "Extended": {"Values": [{"DataType": "uint8", "Label": "uint8"}], "Interpolable": True,
                         "BlockSize": [64, 64, 64], "VoxelSize": [8, 8, 8],
                         "VoxelUnits": ["nanometers", "nanometers", "nanometers"],
                         "MinPoint": list(ORIGIN_XYZ), "MaxPoint": max_point,
                         "MinIndex": [o // 64 for o in ORIGIN_XYZ], "MaxIndex": [m // 64 for m in max_point],
                         "Background": 0},
        }


REPLICA = FlyemReplica
