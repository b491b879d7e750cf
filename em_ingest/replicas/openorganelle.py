"""Replica of the janelia-cosem-datasets bucket: moto's S3 server behind a loopback proxy that can inject faults.

The bucket holds small generated datasets laid out key for key like the real one: Zarr v2 +
OME-NGFF 0.4 under `<ds>/<ds>.zarr/recon-N/em/<image>` and COSEM N5 under `<ds>/<ds>.n5/em/<image>`,
next to thumbnails, Neuroglancer meshes and viewer states, and label groups that discovery must skip.
Reads are anonymous through a public-read bucket policy, as on AWS Open Data.
"""

from __future__ import annotations

import http.client
import io
import itertools
import json
import logging
import threading
from dataclasses import dataclass, field
from itertools import product
from typing import Any, ClassVar
from urllib.parse import urlencode

import numcodecs
import numpy as np

from em_ingest.formats.volume import triple
from em_ingest.replicas import n5_writer
from em_ingest.replicas.base import Expected, Replica
from em_ingest.replicas.http import ReplicaHTTPServer, Reply, Request
from em_ingest.replicas.volumes import synthetic_em

BUCKET = "janelia-cosem-datasets"
REGION = "us-east-1"
LICENSE = "CC-BY-4.0"
_HOP_BY_HOP = {"content-length", "content-type", "transfer-encoding", "connection", "keep-alive", "server", "date"}
_FORWARDED_REQUEST_HEADERS = ("Range", "If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since")
_bucket_names = itertools.count()
NACC_NUC = "recon-2/labels/inference/segmentations/nuc"
_moto_lock = threading.Lock()


@dataclass
class ReplicaImage:
    """One generated multiscale image and how it is stored."""

    dataset: str
    layout: str  # "zarr" or "n5"
    image: str  # group path inside the container, e.g. "recon-2/em/fibsem-int16"
    shape: tuple[int, int, int]  # s0, (z, y, x)
    dtype: str
    chunks: tuple[int, int, int]  # (z, y, x)
    scale_nm: tuple[float, float, float]  # s0, (z, y, x)
    n_levels: int
    compressor: dict[str, Any]  # numcodecs config (zarr) or N5 compression
    separator: str = "/"
    seed: int = 0
    levels: list[np.ndarray] = field(default_factory=list)
    origin_nm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # where s0's voxel 0 sits (a coarser label's offset)
    is_label: bool = False  # instance ids: blobs of large uint64 ids, levels by taking every other voxel

    @property
    def container(self) -> str:
        return f"{self.dataset}/{self.dataset}.{self.layout}"

    @property
    def prefix(self) -> str:
        return f"{self.container}/{self.image}"

    def scale(self, level: int) -> tuple[float, float, float]:
        return triple(s * 2 ** level for s in self.scale_nm)

    def translation(self, level: int) -> tuple[float, float, float]:
        # Windowed-average downsampling shifts level k by half of the grown voxel (as CellMap writes it).
        return triple(o + (s * 2 ** level - s) / 2 for o, s in zip(self.origin_nm, self.scale_nm))

    def generate(self) -> None:
        """Make the level arrays, unless the caller supplied them (e.g. a benchmark's large s0)."""
        if self.levels:
            return
        if self.is_label:
            self.levels = [instance_ids(self.shape, self.seed)]
            for _ in range(1, self.n_levels):
                self.levels.append(self.levels[-1][::2, ::2, ::2].copy())
            return
        self.levels = [synthetic_em(self.shape, self.dtype, seed=self.seed)]
        for _ in range(1, self.n_levels):
            self.levels.append(downsample_mean(self.levels[-1]))


def instance_ids(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A segmentation: boxes of ids above 2**53 (where a float would round them) on a background of 0."""
    rng = np.random.default_rng(seed)
    ids = np.zeros(shape, np.uint64)
    for _ in range(12):
        low = [int(rng.integers(0, n)) for n in shape]
        high = [min(n, a + int(rng.integers(2, max(3, n // 2)))) for a, n in zip(low, shape)]
        ids[tuple(slice(a, b) for a, b in zip(low, high))] = np.uint64(2**60) + np.uint64(rng.integers(1, 1 << 20))
    return ids


def downsample_mean(volume: np.ndarray) -> np.ndarray:
    """2x windowed mean per axis (edges padded by replication), rounded back to the dtype."""
    pad = [(0, n % 2) for n in volume.shape]
    v = np.pad(volume.astype(np.float64), pad, mode="edge")
    z, y, x = (n // 2 for n in v.shape)
    mean = v.reshape(z, 2, y, 2, x, 2).mean(axis=(1, 3, 5))
    return np.rint(mean).astype(volume.dtype)


def ngff_attributes(image: ReplicaImage) -> dict[str, Any]:
    """`.zattrs` of an image group, shaped like the recorded jrc_mus-nacc-2 one."""
    datasets = [{"coordinateTransformations": [{"scale": list(image.scale(k)), "type": "scale"},
                                               {"translation": list(image.translation(k)), "type": "translation"}],
                 "path": f"s{k}"} for k in range(image.n_levels)]
    return {"multiscales": [{
        "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
        "coordinateTransformations": [{"scale": [1.0, 1.0, 1.0], "type": "scale"}],
        "datasets": datasets, "metadata": None, "name": "", "type": None, "version": "0.4",
    }]}


def cosem_transform(image: ReplicaImage, level: int) -> dict[str, Any]:
    return {"axes": ["z", "y", "x"], "scale": list(image.scale(level)), "translate": list(image.translation(level)),
            "units": ["nm", "nm", "nm"]}


def n5_group_attributes(image: ReplicaImage) -> dict[str, Any]:
    """COSEM attributes of an N5 image group (axes, scales, pixelResolution in x, y, z order)."""
    return {
        "axes": ["x", "y", "z"], "units": ["nm", "nm", "nm"],
        "scales": [[2 ** k] * 3 for k in range(image.n_levels)],
        "pixelResolution": {"dimensions": list(image.scale_nm[::-1]), "unit": "nm"},
        "multiscales": [{"datasets": [{"path": f"s{k}", "transform": cosem_transform(image, k)}
                                      for k in range(image.n_levels)]}],
    }


def zarr_objects(image: ReplicaImage, level: int) -> dict[str, bytes]:
    """The `.zarray` and chunk objects of one level (full-size chunks padded with the fill value)."""
    volume = image.levels[level]
    chunks = tuple(min(c, n) for c, n in zip(image.chunks, volume.shape))
    codec = numcodecs.get_codec(image.compressor)
    zarray = {"chunks": list(chunks), "compressor": image.compressor, "dimension_separator": image.separator,
              "dtype": np.dtype(image.dtype).newbyteorder("<").str, "fill_value": 0, "filters": None,
              "order": "C", "shape": list(volume.shape), "zarr_format": 2}
    prefix = f"{image.prefix}/s{level}"
    objects = {f"{prefix}/.zarray": json.dumps(zarray, indent=4).encode()}
    for index in product(*(range(-(-n // c)) for n, c in zip(volume.shape, chunks))):
        objects[f"{prefix}/{image.separator.join(map(str, index))}"] = zarr_chunk(volume, chunks, index, codec)
    return objects


def zarr_chunk(volume: np.ndarray, chunks: tuple[int, ...], index: tuple[int, ...], codec: Any) -> bytes:
    region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks))
    block = np.zeros(chunks, dtype=np.dtype(volume.dtype).newbyteorder("<"))
    data = volume[region]
    block[tuple(slice(0, n) for n in data.shape)] = data
    return bytes(codec.encode(block.tobytes()))


def n5_objects(image: ReplicaImage, level: int) -> dict[str, bytes]:
    """The `attributes.json` and block objects of one N5 level (edge blocks cut to the data, as N5 writes them)."""
    volume = image.levels[level]
    chunks = tuple(min(c, n) for c, n in zip(image.chunks, volume.shape))
    attributes = n5_writer.array_attributes(volume.shape, chunks, image.dtype, image.compressor)
    attributes["pixelResolution"] = {"dimensions": list(image.scale(level)[::-1]), "unit": "nm"}
    attributes["transform"] = cosem_transform(image, level)
    prefix = f"{image.prefix}/s{level}"
    objects = {f"{prefix}/attributes.json": json.dumps(attributes).encode()}
    for index in product(*(range(-(-n // c)) for n, c in zip(volume.shape, chunks))):
        objects[f"{prefix}/{'/'.join(map(str, index[::-1]))}"] = n5_block(volume, chunks, index, image.compressor)
    return objects


def n5_block(volume: np.ndarray, chunks: tuple[int, ...], index: tuple[int, ...], compression: dict) -> bytes:
    region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks))
    return n5_writer.encode_block(volume[region], compression)


def image_objects(image: ReplicaImage) -> dict[str, bytes]:
    """Every object of one image, group markers of its parents included."""
    objects: dict[str, bytes] = {}
    parts = image.image.split("/")
    if image.layout == "zarr":
        for depth in range(len(parts) + 1):
            group = "/".join([image.container, *parts[:depth]])
            objects[f"{group}/.zgroup"] = json.dumps({"zarr_format": 2}).encode()
        objects[f"{image.prefix}/.zattrs"] = json.dumps(ngff_attributes(image), indent=4).encode()
        for level in range(image.n_levels):
            objects.update(zarr_objects(image, level))
    else:
        objects[f"{image.container}/attributes.json"] = json.dumps({"n5": "2.5.1"}).encode()
        objects[f"{image.prefix}/attributes.json"] = json.dumps(n5_group_attributes(image)).encode()
        for level in range(image.n_levels):
            objects.update(n5_objects(image, level))
    return objects


def companion_objects(dataset: str) -> dict[str, bytes]:
    """What else a dataset prefix holds: thumbnail, Neuroglancer meshes and viewer states."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(synthetic_em((1, 48, 64), "uint8", seed=7)[0]).save(buffer, format="JPEG")
    state = {"layers": [{"type": "image", "source": f"zarr://s3://{BUCKET}/{dataset}/{dataset}.zarr"}]}
    return {
        f"{dataset}/thumbnail.jpg": buffer.getvalue(),
        f"{dataset}/neuroglancer/viewer_states/default.json": json.dumps(state).encode(),
        f"{dataset}/neuroglancer/mesh/mito_seg/info": json.dumps({"@type": "neuroglancer_multilod_draco"}).encode(),
    }


def label_objects(container: str, layout: str, group: str) -> dict[str, bytes]:
    """A small segmentation group (not EM): present in real datasets, never an image to ingest."""
    labels = np.zeros((8, 16, 16), dtype=np.uint64)
    labels[2:6, 4:12, 4:12] = 1
    if layout == "zarr":
        zarray = {"chunks": [8, 16, 16], "compressor": {"id": "gzip", "level": 5}, "dtype": "<u8",
                  "fill_value": 0, "filters": None, "order": "C", "shape": [8, 16, 16], "zarr_format": 2}
        return {f"{container}/{group}/.zgroup": b'{"zarr_format": 2}',
                f"{container}/{group}/s0/.zarray": json.dumps(zarray).encode(),
                f"{container}/{group}/s0/0.0.0": bytes(numcodecs.GZip(5).encode(labels.tobytes()))}
    compression = {"type": "gzip", "useZlib": False, "level": -1}
    return {f"{container}/{group}/s0/attributes.json":
            json.dumps(n5_writer.array_attributes(labels.shape, labels.shape, "uint64", compression)).encode(),
            f"{container}/{group}/s0/0/0/0": n5_writer.encode_block(labels, compression)}


def replica_images() -> list[ReplicaImage]:
    """The generated datasets (names and layouts of real ones; shapes shrunk)."""
    return [
        # The default dataset: anisotropic int16 FIB-SEM, Zarr with "/" chunk names, zstd level 1.
        ReplicaImage("jrc_mus-nacc-2", "zarr", "recon-2/em/fibsem-int16", (40, 150, 170), "int16", (32, 32, 32),
                     (2.96, 4.0, 4.0), 4, {"id": "zstd", "level": 1}, "/", seed=11),
        # An older N5 dataset: uint16, 4.56 nm z, gzip blocks.
        ReplicaImage("jrc_sum159-1", "n5", "em/fibsem-uint16", (36, 90, 110), "uint16", (32, 32, 32),
                     (4.56, 4.0, 4.0), 3, {"type": "gzip", "useZlib": False, "level": -1}, seed=12),
        # Both layouts for one dataset (the Zarr wins by default); uint8, "." chunk names, blosc.
        ReplicaImage("jrc_hela-2", "zarr", "recon-1/em/fibsem-uint8", (32, 96, 96), "uint8", (32, 32, 32),
                     (4.0, 4.0, 4.0), 3, {"id": "blosc", "cname": "zstd", "clevel": 5, "shuffle": 1,
                                          "blocksize": 0}, ".", seed=13),
        ReplicaImage("jrc_hela-2", "n5", "em/fibsem-uint8", (32, 96, 96), "uint8", (32, 32, 32),
                     (4.0, 4.0, 4.0), 2, {"type": "raw"}, seed=13),
        # Nucleus instances of the default dataset at twice its voxel, placed as CellMap places a coarser level.
        ReplicaImage("jrc_mus-nacc-2", "zarr", NACC_NUC, (20, 75, 85), "uint64", (16, 32, 32), (5.92, 8.0, 8.0), 2,
                     {"id": "gzip", "level": 5}, "/", seed=14, origin_nm=(1.48, 2.0, 2.0), is_label=True),
    ]


class MotoBackend:
    """moto's S3 server in this process; objects are seeded straight into its backend (fast start)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        # Quiet: werkzeug would log every request; tests read the proxy's traffic counters instead.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.bucket = ""

    def start(self, bucket: str) -> MotoBackend:
        self.server.start()
        with _moto_lock:
            backend = self.backend()
            # moto keeps one in-process store: a second replica gets its own bucket name.
            name = bucket
            while name in backend.buckets:
                name = f"{bucket}-{next(_bucket_names)}"
            backend.create_bucket(name, REGION)
            self.bucket = name
        policy = {"Version": "2012-10-17", "Statement": [{
            "Sid": "PublicRead", "Effect": "Allow", "Principal": "*",
            # s3:HeadObject is moto's name for HEAD; AWS folds it into s3:GetObject.
            "Action": ["s3:GetObject", "s3:ListBucket", "s3:HeadObject"],
            "Resource": [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"]}]}
        self.backend().put_bucket_policy(name, json.dumps(policy).encode())
        return self

    @staticmethod
    def backend() -> Any:
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        return s3_backends[DEFAULT_ACCOUNT_ID]["aws"]

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.get_host_and_port()
        return host, int(port)

    def put(self, key: str, data: bytes) -> None:
        self.backend().put_object(self.bucket, key, data)

    def stop(self) -> None:
        with _moto_lock:
            backend = self.backend()
            bucket = backend.buckets.get(self.bucket)
            if bucket is not None:
                for key in list(bucket.keys.keys()):
                    backend.delete_object(self.bucket, key)
                backend.delete_bucket(self.bucket)
        self.server.stop()


class S3Proxy:
    """Forwards every request to moto unchanged, through a ReplicaHTTPServer so faults (latency,
    5xx/429 with Retry-After, cut connections) and traffic counts apply."""

    def __init__(self, moto: MotoBackend):
        self.moto = moto

    def __call__(self, request: Request) -> Reply:
        host, port = self.moto.address
        query = urlencode(request.query, doseq=True)
        target = request.raw_path + (f"?{query}" if query else "")
        headers = {k: v for k, v in request.headers.items() if k in _FORWARDED_REQUEST_HEADERS}
        # HEAD goes upstream as GET: the replica server computes Content-Length from the body it
        # holds and sends no body for HEAD, so the announced size stays the object's size.
        method = "GET" if request.method == "HEAD" else request.method
        connection = http.client.HTTPConnection(host, port, timeout=30)
        try:
            connection.request(method, target, headers=headers)
            response = connection.getresponse()
            body = response.read()
            reply_headers = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
            content_type = response.getheader("Content-Type", "application/octet-stream")
            return Reply(response.status, body, content_type, reply_headers)
        finally:
            connection.close()


class OpenOrganelleReplica(Replica):
    source = "openorganelle"
    DEMO_KEYS = ("jrc_mus-nacc-2", "jrc_sum159-1", "jrc_hela-2")
    # Demo/test selections: a region of the default dataset, a whole N5 level, a region of a coarser level.
    SELECTIONS: ClassVar[dict[str, dict[str, Any]]] = {
        "jrc_mus-nacc-2": {"roi": {"z": [5, 37], "y": [20, 140], "x": [30, 160]}, "labels": {"nuc": NACC_NUC}},
        "jrc_sum159-1": {},
        "jrc_hela-2": {"level": "s1", "roi": {"z": [2, 14], "y": [4, 40], "x": [0, 48]}},
    }

    def __init__(self, images: list[ReplicaImage] | None = None) -> None:
        super().__init__()
        self.images = images if images is not None else replica_images()
        self.moto: MotoBackend | None = None

    def start(self) -> OpenOrganelleReplica:
        self.moto = MotoBackend().start(BUCKET)
        proxy = ReplicaHTTPServer("openorganelle")
        proxy.add_handler("/", S3Proxy(self.moto))
        proxy.start()
        self.servers.append(proxy)
        for image in self.images:
            image.generate()
            for key, data in image_objects(image).items():
                self.moto.put(key, data)
        for dataset in sorted({i.dataset for i in self.images}):
            for key, data in companion_objects(dataset).items():
                self.moto.put(key, data)
        for key, data in label_objects("jrc_sum159-1/jrc_sum159-1.n5", "n5", "labels/mito_seg").items():
            self.moto.put(key, data)
        # A dataset with only an old Neuroglancer precomputed copy: nothing discovery can ingest.
        self.moto.put("aic_desmosome-1/neuroglancer/em/fibsem-uint8.precomputed/info",
                      json.dumps({"type": "image", "data_type": "uint8", "num_channels": 1, "scales": []}).encode())
        self.env = {"EM_INGEST_OPENORGANELLE_ENDPOINT": proxy.url, "EM_INGEST_OPENORGANELLE_BUCKET": self.moto.bucket}
        served = {i.dataset for i in self.images}
        self.selection = {key: dict(options) for key, options in self.SELECTIONS.items() if key in served}
        for key in self.selection:
            self._set_expected(key)
        return self

    def stop(self) -> None:
        super().stop()
        if self.moto is not None:
            self.moto.stop()
            self.moto = None

    @property
    def bucket(self) -> str:
        assert self.moto is not None, "replica not started"
        return self.moto.bucket

    def image(self, dataset: str, layout: str | None = None) -> ReplicaImage:
        """The image the source picks by default for `dataset` (Zarr before N5), or the one in `layout`."""
        found = [i for i in self.images
                 if i.dataset == dataset and not i.is_label and (layout is None or i.layout == layout)]
        found.sort(key=lambda i: i.layout != "zarr")
        return found[0]

    def expected_for(self, dataset: str, options: dict[str, Any], layout: str | None = None) -> Expected:
        """Ground truth for a selection of `dataset` (level and roi as in the selection file)."""
        image = self.image(dataset, layout)
        level = int(str(options.get("level", "s0")).removeprefix("s"))
        volume = image.levels[level]
        roi = options.get("roi") or {}
        starts = [roi.get(axis, [0, n])[0] for axis, n in zip("zyx", volume.shape)]
        region = tuple(slice(*roi.get(axis, [0, n])) for axis, n in zip("zyx", volume.shape))
        translation = triple(t + a * s for t, a, s in zip(image.translation(level), starts, image.scale(level)))
        catalog = {"license": LICENSE, "imaging_method": "FIB-SEM", "dtype": image.dtype}
        if dataset == "jrc_mus-nacc-2":
            catalog["organism"] = "Mus musculus"
        labels = {name: self._expected_label(image, level, starts, volume[region].shape, group)
                  for name, group in (options.get("labels") or {}).items()}
        return Expected(volume[region].copy(), image.scale(level), "source-metadata", translation, catalog,
                        labels=labels)

    def _expected_label(self, image: ReplicaImage, level: int, starts: list[int], shape: tuple[int, ...],
                        group: str) -> tuple[np.ndarray, tuple[tuple[float, float, float], tuple[float, float, float]]]:
        """The label voxels whose boxes overlap the image region's box, found by testing every voxel's box."""
        label = next(i for i in self.images if i.is_label and i.dataset == image.dataset and i.image == group)
        ids = label.levels[0]
        keep = []
        for axis in range(3):
            scale_i, origin_i = image.scale(level)[axis], image.translation(level)[axis]
            low = origin_i + (starts[axis] - 0.5) * scale_i
            high = low + shape[axis] * scale_i
            centres = label.translation(0)[axis] + np.arange(ids.shape[axis]) * label.scale_nm[axis]
            half = label.scale_nm[axis] / 2
            keep.append(np.flatnonzero((centres + half > low + 1e-6) & (centres - half < high - 1e-6)))
        crop = ids[np.ix_(*keep)]
        translation = triple(label.translation(0)[a] + keep[a][0] * label.scale_nm[a] for a in range(3))
        return crop, (label.scale_nm, translation)

    def _set_expected(self, key: str) -> None:
        self.expected[key] = self.expected_for(key, self.selection[key])

    def change_chunk(self, dataset: str, level: int, index: tuple[int, int, int], layout: str | None = None) -> str:
        """Change the voxels of one chunk at the source and re-upload only that object; returns its key."""
        image = self.image(dataset, layout)
        assert self.moto is not None
        volume = image.levels[level]
        chunks = tuple(min(c, n) for c, n in zip(image.chunks, volume.shape))
        region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks))
        volume[region] = np.bitwise_xor(volume[region], np.array(0x15, dtype=volume.dtype))
        if image.layout == "zarr":
            key = f"{image.prefix}/s{level}/{image.separator.join(map(str, index))}"
            data = zarr_chunk(volume, chunks, index, numcodecs.get_codec(image.compressor))
        else:
            key = f"{image.prefix}/s{level}/{'/'.join(map(str, index[::-1]))}"
            data = n5_block(volume, chunks, index, image.compressor)
        self.moto.put(key, data)
        if dataset in self.selection:
            self._set_expected(dataset)
        return key

    def put_object(self, key: str, data: bytes) -> None:
        """Serve `data` at `key` (tests use this to damage or replace an object at the source)."""
        assert self.moto is not None
        self.moto.put(key, data)


REPLICA = OpenOrganelleReplica
