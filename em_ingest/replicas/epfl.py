"""Replica of the EPFL CVLab file folder: same path (with the literal space), ITK-style multipage TIFFs."""

from __future__ import annotations

import io

import numpy as np
import tifffile

from em_ingest.replicas.base import Expected, Replica
from em_ingest.replicas.http import ReplicaHTTPServer
from em_ingest.replicas.volumes import synthetic_em

FOLDER = "/groups/c/cv/cvlab-unit/www/data/ ElectronMicroscopy_Hippocampus"
# Small stand-ins for the real (1065, 1536, 2048) and (165, 768, 1024) stacks, same dtype and layout.
SHAPES = {"volumedata.tif": (40, 150, 200), "training.tif": (24, 96, 128), "testing.tif": (24, 96, 128)}


def itk_tiff(volume: np.ndarray) -> bytes:
    """A multipage TIFF laid out like ITK writes it: uncompressed 4-row strips, numbered pages,
    no physical resolution."""
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as writer:
        for index, plane in enumerate(volume):
            writer.write(plane, photometric="minisblack", rowsperstrip=4, software="InsightToolkit",
                         subfiletype=2, metadata=None, contiguous=True,
                         extratags=[(297, "H", 2, (index, len(volume)), True)])
    return buffer.getvalue()


class EpflReplica(Replica):
    source = "epfl"
    DEMO_KEYS = ("hippocampus-training", "hippocampus-volumedata")

    def start(self) -> EpflReplica:
        server = ReplicaHTTPServer("epfl").start()
        self.servers.append(server)
        volumes = {name: synthetic_em(shape, "uint8", seed=i) for i, (name, shape) in enumerate(SHAPES.items())}
        for split in ("training", "testing"):
            volumes[f"{split}_groundtruth.tif"] = np.where(volumes[f"{split}.tif"] > 150, 255, 0).astype(np.uint8)
        for name, volume in volumes.items():
            self.set_file(name, volume)
        self.expected["hippocampus-training"].labels = {
            "mitochondria": (volumes["training_groundtruth.tif"], ((5.0, 5.0, 5.0), (0.0, 0.0, 0.0)))}
        self.env = {"EM_INGEST_EPFL_URL": server.url + FOLDER.replace(" ", "%20")}
        self.selection = {
            "hippocampus-training": {"file": "training.tif", "labels": {"mitochondria": "training_groundtruth.tif"}},
            "hippocampus-volumedata": {"file": "volumedata.tif"},
        }
        return self

    def set_file(self, name: str, volume: np.ndarray) -> None:
        """Serve `volume` as `name` (tests use this to change a file at the source)."""
        self.http.add_file(f"{FOLDER}/{name}", itk_tiff(volume), content_type="image/tiff")
        key = {"training.tif": "hippocampus-training", "volumedata.tif": "hippocampus-volumedata"}.get(name)
        if key:
            labels = self.expected[key].labels if key in self.expected else {}  # the masks are files of their own
            self.expected[key] = Expected(volume, (5.0, 5.0, 5.0), "documented-default", None,
                                          {"license": "unspecified; academic use", "sample": "CA1 hippocampus"},
                                          labels=labels)


REPLICA = EpflReplica
