"""Replica of IDR: OMERO.web JSON (webgateway, /api/v0, webclient api), the EBI file mirror, the OME-Zarr bucket."""

from __future__ import annotations

import io
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numcodecs
import numpy as np
import tifffile

from em_ingest.replicas.base import Expected, Replica
from em_ingest.replicas.http import ReplicaHTTPServer, Reply, Request
from em_ingest.replicas.volumes import synthetic_em

API = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
FILES_ROOT = "/pub/databases/IDR"
ZARR_ROOT = "/idr/zarr/v0.4"

# idr0086 study-level key/values as IDR attaches them to the project (SOURCES.md 3.1, idr0086-study.txt).
IDR0086_STUDY = [
    ["Study Title", "Chromatin arranges in chains of mesoscale domains with nanoscale functional topography "
                    "independent of cohesin"],
    ["Study Type", "micrograph"],
    ["Organism", "Homo sapiens"],
    ["Imaging Method", "scanning electron microscopy (SEM)"],
    ["Publication Title", "Chromatin arranges in chains of mesoscale domains with nanoscale functional "
                          "topography independent of cohesin"],
    ["Publication Authors", "Miron E, Oldenkamp R, Brown JM, Pinto DMS, Xu CS, Faria AR, Shaban HA, "
                            "Rhodes JDP, Innocent C, de Ornellas S, Hess HF, Buckle V, Schermelleh L"],
    ["PubMed ID", "32967822 https://www.ncbi.nlm.nih.gov/pubmed/32967822"],
    ["Publication DOI", "10.1126/sciadv.aba8811 https://doi.org/10.1126/sciadv.aba8811"],
    ["Release Date", "2020-07-22"],
    ["License", "CC BY 4.0 https://creativecommons.org/licenses/by/4.0/"],
    ["Copyright", "Lothar Schermelleh and Ezequiel Miron"],
    ["Data Publisher", "University of Dundee"],
    ["Data DOI", "https://doi.org/10.17867/10000141"],
    ["Annotation File", "idr0086-experimentD-annotation.csv"],
]
# The per-image bulk annotation of the U2OS xy volume (idr0086-experimentD-annotation.csv).
U2OS_IMAGE = [
    ["Organism", "Homo sapiens"],
    ["Cell Line", "U2OS"],
    ["Cell Cycle Stage", "G1"],
    ["Assay Description", "chromatin image in U2OS cells in G1"],
    ["Image Description", "FIB-SEM chromatin IF image in U2OS cells in G1"],
    ["Channels", "Channel 1: greyscale cell"],
]
# A synthetic screen whose images have an OME-Zarr copy, so the Zarr path runs end to end.
SYNTHETIC_STUDY = [
    ["Study Title", "Synthetic FIB-SEM screen served by the em-ingest replica"],
    ["Organism", "Mus musculus"],
    ["Imaging Method", "focused ion beam scanning electron microscopy (FIB-SEM)"],
    ["Publication Authors", "Replica A, Replica B"],
    ["License", "CC0 1.0 https://creativecommons.org/publicdomain/zero/1.0/"],
    ["Data DOI", "https://doi.org/10.17867/00000000"],
]


@dataclass
class ReplicaImage:
    """One OMERO image the replica knows: its OMERO metadata and where its voxels are."""

    id: int
    name: str
    size_tczyx: tuple[int, int, int, int, int]
    pixel_size_um: tuple[float | None, float | None, float | None]  # x, y, z as OMERO reports them
    pixels_type: str
    dataset: tuple[int, str] | None = None  # (id, name)
    project: tuple[int, str] | None = None
    screen: tuple[int, str] | None = None
    plate_well: tuple[int, int, int] | None = None  # (plate, well, well sample)
    image_values: list[list[str]] = field(default_factory=list)
    client_paths: list[str] = field(default_factory=list)


def imagej_tiff(volume: np.ndarray, pixel_size_um: float, spacing_um: float) -> bytes:
    """A big-endian ImageJ TIFF as ImageJ 1.52p writes it: one uncompressed strip per page, calibration in
    the description (unit escaped as \\u00B5m) and X/YResolution in pixels per unit, ResolutionUnit none."""
    description = (f"ImageJ=1.52p\nimages={len(volume)}\nslices={len(volume)}\nunit=\\u00B5m\n"
                   f"spacing={spacing_um}\nloop=false\nmin={float(volume.min())}\nmax={float(volume.max())}\n")
    # ImageJ stores 1/pixel_size as the rational n/1000000; tifffile may reduce it, the value is the same.
    resolution = (round(1_000_000 / pixel_size_um), 1_000_000)
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer, byteorder=">") as writer:
        for index, plane in enumerate(volume):
            writer.write(plane.astype(volume.dtype.newbyteorder(">")), photometric="minisblack",
                         description=description if index == 0 else None, metadata=None, software=False,
                         resolution=(resolution, resolution), resolutionunit=1, rowsperstrip=plane.shape[0],
                         contiguous=True)
    return buffer.getvalue()


def zarr_v2_image(volume: np.ndarray, chunks_zyx: tuple[int, int, int], scale_um: tuple[float, float, float],
                  name: str) -> dict[str, bytes]:
    """An OME-NGFF 0.4 image (Zarr v2, 5-D t, c, z, y, x, '/' keys, Blosc-LZ4, big-endian) as bioformats2raw
    and omero-cli-zarr lay IDR's copies out; chunks that hold only the fill value are not written."""
    compressor = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    objects: dict[str, bytes] = {".zgroup": json.dumps({"zarr_format": 2}).encode()}
    levels = []
    level_volume = volume
    for level in range(2):
        path = str(level)
        factor = 2 ** level
        levels.append({"path": path, "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 1.0, scale_um[0], scale_um[1] * factor, scale_um[2] * factor]}]})
        objects.update(_zarr_array(path, level_volume[np.newaxis, np.newaxis], (1, 1, *chunks_zyx), compressor))
        level_volume = level_volume[:, ::2, ::2]
    axes = [{"name": "t", "type": "time", "unit": "second"}, {"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    zattrs = {
        "multiscales": [{"version": "0.4", "name": name, "axes": axes, "datasets": levels}],
        "omero": {"id": 1, "name": name, "version": "0.4",
                  "channels": [{"active": True, "coefficient": 1.0, "color": "808080", "family": "linear",
                                "inverted": False, "label": "0",
                                "window": {"start": 0.0, "end": float(volume.max()), "min": 0.0,
                                           "max": float(np.iinfo(volume.dtype).max)}}],
                  "rdefs": {"defaultT": 0, "defaultZ": volume.shape[0] // 2, "model": "greyscale"}},
    }
    objects[".zattrs"] = json.dumps(zattrs, indent=2).encode()
    return objects


def _zarr_array(path: str, array: np.ndarray, chunks: tuple[int, ...], compressor) -> dict[str, bytes]:
    array = array.astype(array.dtype.newbyteorder(">"))  # bioformats2raw writes big-endian dtypes (">u2")
    zarray = {"zarr_format": 2, "shape": list(array.shape), "chunks": list(chunks), "dtype": array.dtype.str,
              "compressor": compressor.get_config(), "fill_value": 0, "order": "C", "filters": None,
              "dimension_separator": "/"}
    objects = {f"{path}/.zarray": json.dumps(zarray, indent=4).encode()}
    grid = [range(-(-n // c)) for n, c in zip(array.shape, chunks)]
    for index in np.ndindex(*[len(g) for g in grid]):
        block = array[tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks))]
        if not block.any():
            continue  # never written: a reader must fill it with fill_value
        padded = np.zeros(chunks, dtype=array.dtype)  # edge chunks are stored full size, zero padded
        padded[tuple(slice(0, n) for n in block.shape)] = block
        objects[f"{path}/{'/'.join(map(str, index))}"] = compressor.encode(np.ascontiguousarray(padded))
    return objects


class IdrReplica(Replica):
    source = "idr"
    DEMO_KEYS = ("9846137", "90000001")

    # The default image: idr0086 experimentD U2OS_chromatin, the xy volume (real: 184 x 775 x 1121, 20 nm).
    U2OS = ReplicaImage(
        9846137, "Figure_S3B_FIB-SEM_U2OS_20x20x20nm_xy.tif", (1, 1, 23, 97, 140), (0.02, 0.02, 0.02), "uint8",
        dataset=(10740, "U2OS_chromatin"), project=(1551, "idr0086-miron-micrographs/experimentD"),
        image_values=U2OS_IMAGE,
        client_paths=["uod/idr/filesets/idr0086-miron-micrographs/20200610-ftp/experimentD/Miron_FIB-SEM/"
                      "Miron_FIB-SEM_processed/Figure_S3B_FIB-SEM_U2OS_20x20x20nm_xy.tif"],
    )
    # Its xz reslice: listed by the dataset, metadata only (not a separate specimen).
    U2OS_XZ = ReplicaImage(
        9846133, "Figure_S3B_FIB-SEM_U2OS_20x20x20nm_xz.tif", (1, 1, 97, 23, 140), (0.02, 0.02, 0.02), "uint8",
        dataset=(10740, "U2OS_chromatin"), project=(1551, "idr0086-miron-micrographs/experimentD"),
        image_values=U2OS_IMAGE,
        client_paths=["uod/idr/filesets/idr0086-miron-micrographs/20200610-ftp/experimentD/Miron_FIB-SEM/"
                      "Miron_FIB-SEM_processed/Figure_S3B_FIB-SEM_U2OS_20x20x20nm_xz.tif"],
    )
    # A plate image of a synthetic screen with an OME-Zarr copy (5-D, uint16, anisotropic 50 x 10 x 10 nm).
    SCREEN_IMAGE = ReplicaImage(
        90000001, "synthetic FIB-SEM well A1", (1, 1, 20, 70, 90), (0.01, 0.01, 0.05), "uint16",
        screen=(3901, "idr0900-replica-fibsem/screenA"), plate_well=(8901, 7901, 6901),
        image_values=[["Organism", "Mus musculus"], ["Cell Line", "synthetic"]],
        client_paths=["uod/idr/filesets/idr0900-replica-fibsem/plate1/A1.ome.tiff"],
    )
    # Two channels: must be refused before any voxel is fetched.
    TWO_CHANNELS = ReplicaImage(
        90000002, "two-channel image", (1, 2, 5, 16, 16), (0.1, 0.1, 0.3), "uint8",
        dataset=(10741, "two_channels"), project=(1552, "idr0901-replica-multichannel/experimentA"),
        client_paths=["uod/idr/filesets/idr0901-replica-multichannel/two_channels.tif"],
    )

    def start(self) -> IdrReplica:
        started = time.perf_counter()
        self.omero = ReplicaHTTPServer("idr-omero").start()
        self.files = ReplicaHTTPServer("idr-files").start()
        self.zarr = ReplicaHTTPServer("idr-zarr").start()
        self.servers += [self.omero, self.files, self.zarr]
        self.images = {i.id: i for i in (self.U2OS, self.U2OS_XZ, self.SCREEN_IMAGE, self.TWO_CHANNELS)}
        self.container_values = {("project", 1551): IDR0086_STUDY, ("screen", 3901): SYNTHETIC_STUDY,
                                 ("project", 1552): []}
        self.omero.add_handler("/webgateway/", self._webgateway)
        self.omero.add_handler("/api/", self._api)
        self.omero.add_handler("/webclient/api/", self._webclient_api)

        u2os = synthetic_em(self.U2OS.size_tczyx[2:], "uint8", seed=86)
        self.set_original(self.U2OS, imagej_tiff(u2os, 0.02, 0.02))
        self.expected["9846137"] = Expected(u2os, (20.0, 20.0, 20.0), "source-metadata", None, {
            "title": f"{self.U2OS.name} — {IDR0086_STUDY[0][1]}", "organism": "Homo sapiens",
            "license": "CC BY 4.0 https://creativecommons.org/licenses/by/4.0/", "doi": "10.17867/10000141",
            "imaging_method": "scanning electron microscopy (SEM)", "sample": "U2OS"})

        screen_volume = synthetic_em(self.SCREEN_IMAGE.size_tczyx[2:], "uint16", seed=900)
        screen_volume[8:16, 32:64, 32:64] = 0  # exactly one (8, 32, 32) chunk of fill value: not written
        self.publish_zarr_copy(self.SCREEN_IMAGE, "idr0900A",
                               zarr_v2_image(screen_volume, (8, 32, 32), (0.05, 0.01, 0.01), self.SCREEN_IMAGE.name))
        self.expected["90000001"] = Expected(screen_volume, (50.0, 10.0, 10.0), "source-metadata", None, {
            "title": f"{self.SCREEN_IMAGE.name} — {SYNTHETIC_STUDY[0][1]}", "organism": "Mus musculus",
            "license": "CC0 1.0 https://creativecommons.org/publicdomain/zero/1.0/", "doi": "10.17867/00000000"})

        self.env = {"EM_INGEST_IDR_URL": self.omero.url, "EM_INGEST_IDR_FILES_URL": self.files.url + FILES_ROOT,
                    "EM_INGEST_IDR_ZARR_URL": self.zarr.url + ZARR_ROOT}
        self.selection = {key: {} for key in self.DEMO_KEYS}
        self.startup_s = time.perf_counter() - started
        return self

    def publish_zarr_copy(self, image: ReplicaImage, study: str, objects: dict[str, bytes]) -> None:
        """Know `image` in OMERO.web and serve `objects` (Zarr object name -> bytes) as its OME-Zarr copy at
        `<study>/<image id>.zarr/` in the bucket (tests use this to serve images other writers produced)."""
        self.images[image.id] = image
        for key, data in objects.items():
            metadata = key.rsplit("/", 1)[-1] in (".zattrs", ".zarray", ".zgroup")
            self.zarr.add_file(f"{ZARR_ROOT}/{study}/{image.id}.zarr/{key}", data,
                               content_type="application/json" if metadata else "application/octet-stream")

    def set_original(self, image: ReplicaImage, data: bytes) -> None:
        """Serve `data` as the image's original file on the mirror (tests use this to change it)."""
        relative = image.client_paths[0].split("filesets/", 1)[1]
        self.files.add_file(f"{FILES_ROOT}/{relative}", data, content_type="image/tiff")

    # ---- OMERO.web ----------------------------------------------------------------------------
    def _image(self, text: str) -> ReplicaImage | None:
        return self.images.get(int(text)) if text.isdigit() else None

    def _webgateway(self, request: Request) -> Reply | None:
        match = re.fullmatch(r"/webgateway/(imgData|original_file_paths)/(\d+)/?", request.path)
        if match is None:
            return None
        image = self._image(match.group(2))
        if image is None:
            return Reply.json({"message": f"Image {match.group(2)} not found"}, status=404)
        if match.group(1) == "original_file_paths":
            return Reply.json({"repo": [f"demo_2/2020-06/10/{p.rsplit('/', 1)[-1]}" for p in image.client_paths],
                               "client": image.client_paths})
        return Reply.json(self._img_data(image))

    def _img_data(self, image: ReplicaImage) -> dict[str, Any]:
        t, c, z, y, x = image.size_tczyx
        px, py, pz = image.pixel_size_um
        well = image.plate_well
        return {
            "id": image.id,
            "meta": {"imageName": image.name, "imageDescription": "", "imageAuthor": "Public data",
                     "projectName": image.project[1] if image.project else "Multiple",
                     "projectId": image.project[0] if image.project else None,
                     "projectDescription": "",
                     "datasetName": image.dataset[1] if image.dataset else "Multiple",
                     "datasetId": image.dataset[0] if image.dataset else None, "datasetDescription": "",
                     "wellSampleId": well[2] if well else "", "wellId": well[1] if well else "",
                     "imageTimestamp": 1591747200.0, "imageId": image.id, "pixelsType": image.pixels_type},
            "perms": {"canAnnotate": False, "canEdit": False, "canDelete": False, "canLink": False},
            "interpolate": True,
            "size": {"width": x, "height": y, "z": z, "t": t, "c": c},
            "pixel_size": {"x": px, "y": py, "z": pz},
            "pixel_range": [0, 255] if image.pixels_type == "uint8" else [0, 65535],
            "channels": [{"emissionWave": None, "label": str(i), "color": "808080", "inverted": False,
                          "reverseIntensity": False, "family": "linear", "coefficient": 1.0, "active": True,
                          "window": {"min": 0.0, "max": 255.0, "start": 85.0, "end": 153.0}} for i in range(c)],
            "split_channel": {"g": {"width": x + 4, "height": y + 4, "border": 2, "gridx": 1, "gridy": 1},
                              "c": {"width": x + 4, "height": y + 4, "border": 2, "gridx": 1, "gridy": 1}},
            "rdefs": {"model": "greyscale", "projection": "normal", "defaultZ": z // 2, "defaultT": 0,
                      "invertAxis": False},
            "tiles": False, "init_zoom": 0,
        }

    def _api(self, request: Request) -> Reply | None:
        path = request.path
        if path in ("/api", "/api/"):
            return Reply.json({"data": [{"version": "0", "url:base": f"{self.omero.url}/api/v0/"}]})
        if match := re.fullmatch(r"/api/v0/m/images/(\d+)/?", path):
            image = self._image(match.group(1))
            if image is None:
                return Reply.json({"message": f"Image {match.group(1)} not found"}, status=404)
            return Reply.json({"data": self._image_json(image, with_channels=True)})
        if match := re.fullmatch(r"/api/v0/m/datasets/(\d+)/images/?", path):
            images = [i for i in self.images.values() if i.dataset and i.dataset[0] == int(match.group(1))]
            return self._page(request, [self._image_json(i) for i in sorted(images, key=lambda i: i.id)])
        if match := re.fullmatch(r"/api/v0/m/projects/(\d+)/datasets/?", path):
            datasets = sorted({i.dataset for i in self.images.values()
                               if i.project and i.project[0] == int(match.group(1)) and i.dataset})
            return self._page(request, [{"@id": d, "@type": f"{API}#Dataset", "Name": n,
                                         "url:images": f"{self.omero.url}/api/v0/m/datasets/{d}/images/"}
                                        for d, n in datasets])
        if match := re.fullmatch(r"/api/v0/m/(projects|screens)/(\d+)/?", path):
            kind, container_id = match.group(1)[:-1], int(match.group(2))
            names = {i.project for i in self.images.values() if kind == "project" and i.project} | {
                i.screen for i in self.images.values() if kind == "screen" and i.screen}
            for known_id, name in names:
                if known_id == container_id:
                    return Reply.json({"data": {"@id": known_id, "@type": f"{API}#{kind.title()}", "Name": name,
                                                "Description": "", "omero:details": {"permissions": {
                                                    "isGroupRead": True, "perm": "r-r---"}}}})
            return Reply.json({"message": f"{kind.title()} {container_id} not found"}, status=404)
        return None

    def _page(self, request: Request, items: list[dict[str, Any]]) -> Reply:
        try:
            offset = int(request.query.get("offset", ["0"])[0])
            limit = min(int(request.query.get("limit", ["200"])[0]), 500)
        except ValueError as exc:
            return Reply.json({"message": str(exc)}, status=400)
        return Reply.json({"data": items[offset:offset + limit],
                           "meta": {"totalCount": len(items), "maxLimit": 500, "limit": limit, "offset": offset}})

    def _image_json(self, image: ReplicaImage, with_channels: bool = False) -> dict[str, Any]:
        t, c, z, y, x = image.size_tczyx

        def length(value: float | None) -> dict[str, Any] | None:
            if value is None:
                return None
            return {"Symbol": "µm", "Value": value, "@type": "TBD#LengthI", "Unit": "MICROMETER"}

        pixels: dict[str, Any] = {
            "@id": image.id + 1, "SizeX": x, "SizeY": y, "SizeZ": z, "SizeC": c, "SizeT": t,
            "PhysicalSizeX": length(image.pixel_size_um[0]), "PhysicalSizeY": length(image.pixel_size_um[1]),
            "PhysicalSizeZ": length(image.pixel_size_um[2]),
            "Type": {"@id": 1, "@type": "TBD#PixelsType", "value": image.pixels_type},
            "SignificantBits": 8 if image.pixels_type == "uint8" else 16,
        }
        if with_channels:
            pixels["Channels"] = [{"@id": image.id * 10 + i, "@type": f"{API}#Channel", "SamplesPerPixel": 1}
                                  for i in range(c)]
        return {"@id": image.id, "@type": f"{API}#Image", "Name": image.name,
                "AcquisitionDate": 1591747200000, "omero:details": {"permissions": {"perm": "r-r---"}},
                "url:image": f"{self.omero.url}/api/v0/m/images/{image.id}/",
                "Pixels": {k: v for k, v in pixels.items() if v is not None}}

    def _webclient_api(self, request: Request) -> Reply | None:
        query = {k: v[0] for k, v in request.query.items()}
        if request.path.rstrip("/") == "/webclient/api/paths_to_object":
            image = self._image(query.get("image", ""))
            if image is None:
                return Reply.json({"paths": []})
            path: list[dict[str, Any]] = [{"type": "experimenter", "id": 2}]
            if image.screen and image.plate_well:
                path += [{"type": "screen", "id": image.screen[0]}, {"type": "plate", "id": image.plate_well[0]},
                         {"type": "well", "id": image.plate_well[1]}]
            elif image.project and image.dataset:
                path += [{"type": "project", "id": image.project[0]}, {"type": "dataset", "id": image.dataset[0]}]
            return Reply.json({"paths": [path + [{"type": "image", "id": image.id}]]})
        if request.path.rstrip("/") != "/webclient/api/annotations" or query.get("type") != "map":
            return None
        for kind in ("image", "project", "screen", "dataset"):
            if kind in query:
                if not query[kind].isdigit():
                    return Reply.json({"message": f"invalid literal for int() with base 10: '{query[kind]}'"}, 400)
                if kind == "image":
                    image = self._image(query[kind])
                    values = image.image_values if image else []
                    parent = {"id": int(query[kind]), "class": "ImageI", "name": image.name if image else ""}
                    ns = "openmicroscopy.org/mapr/organism"
                else:
                    values = self.container_values.get((kind, int(query[kind])), [])
                    parent = {"id": int(query[kind]), "class": f"{kind.title()}I", "name": ""}
                    ns = "idr.openmicroscopy.org/study/info"
                annotations = [] if not values else [{
                    "id": 1000 + int(query[kind]) % 997, "ns": ns, "name": None, "description": None,
                    "owner": {"id": 2}, "date": "2020-07-22T10:00:00Z",
                    "permissions": {"canDelete": False, "canAnnotate": False, "canLink": False, "canEdit": False},
                    "link": {"id": 5000 + int(query[kind]) % 997, "owner": {"id": 2}, "parent": parent,
                             "date": "2020-07-22T10:00:00Z",
                             "permissions": {"canDelete": False, "canAnnotate": False, "canLink": False,
                                             "canEdit": False}},
                    "class": "MapAnnotationI", "values": values}]
                return Reply.json({"annotations": annotations,
                                   "experimenters": [{"id": 2, "firstName": "Public", "lastName": "Data"}]})
        return Reply.json({"message": "one of image, project, screen, dataset is required"}, status=400)


REPLICA = IdrReplica
