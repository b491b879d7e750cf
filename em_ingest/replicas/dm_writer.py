"""Writes Gatan DigitalMicrograph DM3/DM4 files laid out like GMS saves them (thumbnail image first)."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# DM tag encodings (Gatan's "encoded types").
_SHORT, _LONG, _USHORT, _ULONG, _FLOAT, _DOUBLE, _BOOL, _OCTET = 2, 3, 4, 5, 6, 7, 8, 10
_STRUCT, _STRING, _ARRAY = 15, 18, 20
_IMAGE_DATA_TYPES = {np.dtype("int16"): 1, np.dtype("float32"): 2, np.dtype("uint8"): 6, np.dtype("int32"): 7,
                     np.dtype("int8"): 9, np.dtype("uint16"): 10, np.dtype("uint32"): 11, np.dtype("float64"): 12}
_ARRAY_ELEMENT = {np.dtype("int16"): _SHORT, np.dtype("float32"): _FLOAT, np.dtype("uint8"): _OCTET,
                  np.dtype("int32"): _LONG, np.dtype("int8"): _OCTET, np.dtype("uint16"): _USHORT,
                  np.dtype("uint32"): _ULONG, np.dtype("float64"): _DOUBLE}
RGBA_DATA_TYPE = 23  # DM's packed RGBA, used by GMS for the file's thumbnail


@dataclass(frozen=True)
class TagList:
    """An ordered list of unnamed entries (DM 'TagList', e.g. ImageList, Dimensions)."""

    items: tuple[Any, ...]


@dataclass(frozen=True)
class Text:
    """A DM string tag: stored as an array of UTF-16 code units, as GMS writes units and names."""

    value: str


@dataclass(frozen=True)
class Raw:
    """A binary array tag (image data): little-endian elements of `element` encoding."""

    data: bytes
    element: int
    count: int


class _Encoder:
    def __init__(self, version: int):
        if version not in (3, 4):
            raise ValueError(f"DM version must be 3 or 4, got {version}")
        self.version = version
        self.long = ">Q" if version == 4 else ">I"  # header/info integers widen in DM4

    def group(self, entries: list[tuple[str, Any]]) -> bytes:
        out = [struct.pack(">BB", 0, 1), struct.pack(self.long, len(entries))]
        for label, value in entries:
            out.append(self.entry(label, value))
        return b"".join(out)

    def entry(self, label: str, value: Any) -> bytes:
        name = label.encode("latin-1")
        if isinstance(value, (Mapping, TagList)):
            body = self.group(list(value.items()) if isinstance(value, Mapping) else [("", v) for v in value.items])
            kind = 20
        else:
            body = self.data(value)
            kind = 21
        head = struct.pack(">BH", kind, len(name)) + name
        if self.version == 4:  # DM4 stores each entry's byte size after its label
            head += struct.pack(">Q", len(body))
        return head + body

    def data(self, value: Any) -> bytes:
        if isinstance(value, bool):
            info, payload = [_BOOL], struct.pack("<B", value)
        elif isinstance(value, int):
            info, payload = [_LONG], struct.pack("<i", value)
        elif isinstance(value, float):
            info, payload = [_DOUBLE], struct.pack("<d", value)
        elif isinstance(value, np.float32):
            info, payload = [_FLOAT], struct.pack("<f", float(value))
        elif isinstance(value, Text):
            units = value.value.encode("utf-16-le")
            info, payload = [_ARRAY, _USHORT, len(units) // 2], units
        elif isinstance(value, Raw):
            info, payload = [_ARRAY, value.element, value.count], value.data
        else:
            raise TypeError(f"cannot encode {type(value).__name__} as a DM tag")
        packed_info = b"".join(struct.pack(self.long, i) for i in info)
        return b"%%%%" + struct.pack(self.long, len(info)) + packed_info + payload


def _calibration(scale: float, units: str, origin: float = 0.0) -> dict[str, Any]:
    return {"Origin": float(origin), "Scale": float(scale), "Units": Text(units)}


def _image_entry(data: Raw, data_type: int, depth: int, shape: tuple[int, ...],
                 calibrations: tuple[tuple[float, str, float], ...], name: str, tags: Mapping[str, Any]) -> dict[str, Any]:
    """One ImageList entry; `shape` and `calibrations` ((scale, units, origin) per axis) in numpy order."""
    return {
        "ImageData": {
            "Calibrations": {
                "Brightness": _calibration(1.0, ""),
                # DM lists the axes fastest first: Dimension 0 is x, 1 is y, 2 is z.
                "Dimension": TagList(tuple(_calibration(s, u, o) for s, u, o in reversed(calibrations))),
                "DisplayCalibratedUnits": True,
            },
            "Data": data,
            "DataType": data_type,
            "Dimensions": TagList(tuple(reversed(shape))),
            "PixelDepth": depth,
        },
        "ImageTags": dict(tags),
        "Name": Text(name),
        "UniqueID": TagList((659757843, 1161985093, 343081743, 1917475625)),
    }


def thumbnail_of(image: np.ndarray, size: int = 192) -> np.ndarray:
    """A size x size RGBA preview of a 2-D image, as GMS stores ahead of the real image."""
    ys = np.linspace(0, image.shape[0] - 1, size).astype(int)
    xs = np.linspace(0, image.shape[1] - 1, size).astype(int)
    grey = image[np.ix_(ys, xs)].astype(np.float64)
    span = float(grey.max() - grey.min()) or 1.0
    grey = ((grey - grey.min()) / span * 255).astype(np.uint8)
    return np.stack([grey, grey, grey, np.full_like(grey, 255)], axis=-1)


def dm_bytes(image: np.ndarray, *, pixel_size: float = 1.0, pixel_units: str = "µm",
             slice_spacing_nm: float | None = None, name: str = "3VBSED", extra_tags: Mapping[str, Any] | None = None,
             version: int = 3, thumbnail: bool = True,
             calibrations: tuple[tuple[float, str, float], ...] | None = None, rgba: bool = False) -> bytes:
    """A DM3/DM4 file holding one image `image`: 2-D (y, x) or 3-D (z, y, x), calibrated `pixel_size`
    `pixel_units` per pixel in y and x, or per axis by `calibrations` ((scale, units, origin), numpy order).

    Like a Gatan 3View (SBF-SEM) slice: ImageList entry 0 is a 192 x 192 RGBA thumbnail, entry 1
    the data with its calibration and `ImageTags` (DataBar, Microscope Info, and the slice spacing
    under `Meta Data.Dimension info.2` when given). With `rgba`, `image` is (y, x, 4) uint8 and is
    stored as a colour image (DataType 23), as GMS does for RGB captures.
    """
    image = np.ascontiguousarray(image)
    if rgba:
        if image.ndim != 3 or image.shape[2] != 4 or image.dtype != np.uint8:
            raise ValueError(f"expected a (y, x, 4) uint8 RGBA image, got {image.dtype} {image.shape}")
    elif image.ndim not in (2, 3) or image.dtype not in _IMAGE_DATA_TYPES:
        raise ValueError(f"expected a 2-D or 3-D image of a DM pixel type, got {image.dtype} {image.shape}")
    shape = image.shape[:2] if rgba else image.shape
    if calibrations is None:
        calibrations = ((1.0, "", 0.0),) * (len(shape) - 2) + ((pixel_size, pixel_units, 0.0),) * 2
    if len(calibrations) != len(shape):
        raise ValueError(f"one calibration per axis: {len(calibrations)} for shape {shape}")
    tags: dict[str, Any] = {
        "DataBar": {"Acquisition Date": Text("11.06.2018"), "Device Name": Text("DigiScan"),
                    "Signal Name": Text("3VBSED")},
        "GMS Version": {"Created": Text("3.21.1374.0"), "Saved": Text("3.21.1374.0")},
        "Microscope Info": {"Name": Text("FEI Quanta"), "Voltage": 1900.0, "Indicated Magnification": 2159.0,
                            "Illumination Mode": Text("SEM")},
        # An approach setting, not the imaging step: readers must not take it for the z spacing.
        "SBFSEM": {"Approach": {"Slice thickness": 200.0, "Cut speed": 200.0}},
    }
    if slice_spacing_nm is not None:
        tags["Meta Data"] = {"Dimension info": {"2": _calibration(slice_spacing_nm, "nm")},
                             "Format": Text("Image"), "Signal": Text("DigiScan")}
    tags.update(extra_tags or {})
    images = []
    if thumbnail:
        thumb = thumbnail_of(image[..., 0] if rgba else image if image.ndim == 2 else image[image.shape[0] // 2])
        images.append(_image_entry(Raw(thumb.tobytes(), _OCTET, thumb.size), RGBA_DATA_TYPE, 4, thumb.shape[:2],
                                   ((1.0, "", 0.0), (1.0, "", 0.0)), f"Image Of {name}",
                                   {"GMS Version": {"Created": Text("3.21.1374.0")}}))
    if rgba:
        images.append(_image_entry(Raw(image.tobytes(), _OCTET, image.size), RGBA_DATA_TYPE, 4, shape,
                                   calibrations, name, tags))
    else:
        pixels = image.astype(image.dtype.newbyteorder("<"), copy=False)
        images.append(_image_entry(Raw(pixels.tobytes(), _ARRAY_ELEMENT[image.dtype], image.size),
                                   _IMAGE_DATA_TYPES[image.dtype], image.dtype.itemsize, image.shape,
                                   calibrations, name, tags))
    root = {
        "ApplicationBounds": TagList((0, 0, 1024, 1280)),
        "HasWindowPosition": True,
        "Image Behavior": {"IsZoomedToWindow": True, "ViewDisplayID": 8},
        "ImageList": TagList(tuple(images)),
        "ImageSourceList": TagList(({"ClassName": Text("ImageSource:Simple"), "ImageRef": len(images) - 1},)),
    }
    encoder = _Encoder(version)
    body = encoder.group(list(root.items()))
    if version == 4:
        header = struct.pack(">IQI", 4, len(body), 1)
    else:
        header = struct.pack(">III", 3, len(body), 1)
    return header + body + b"\x00" * 8  # GMS ends the file with eight zero bytes
