"""MRC-family files (.mrc, .rec, .st, .ali, .mrcs, .map) as memory-mapped (z, y, x) volumes; voxel size in Å."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np

from em_ingest.errors import FormatError, UnsupportedDataError
from em_ingest.formats.units import NM_PER_ANGSTROM
from em_ingest.formats.volume import Geometry, Region, Volume, triple

MRC_SUFFIXES = (".mrc", ".rec", ".st", ".ali", ".mrcs", ".map")


@dataclass(frozen=True)
class MrcHeader:
    """What an MRC header says: array shape (z, y, x), dtype, and the voxel size in nm if set."""

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype
    voxel_size_nm: tuple[float, float, float] | None  # (z, y, x)
    origin_nm: tuple[float, float, float] | None  # (z, y, x), from the header's origin record


def _open(path: Path) -> Any:  # an mrcfile.mrcmemmap.MrcMemmap; mrcfile has no type information
    # permissive: real archive files often have a wrong map ID or exttyp; we validate what we use.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
        except (ValueError, OSError, EOFError) as exc:
            raise FormatError(f"{path}: not a readable MRC file ({type(exc).__name__}: {exc})") from None
    if mrc.data is None:
        mrc.close()
        raise FormatError(f"{path}: MRC header is invalid or the data block is truncated (mrcfile could not map it)")
    return mrc


def read_mrc_header(path: Path) -> MrcHeader:
    path = Path(path)
    mrc = _open(path)
    try:
        data = mrc.data
        if data.ndim == 2:
            shape = (1, *data.shape)
        elif data.ndim == 3:
            shape = data.shape
        else:
            raise UnsupportedDataError(f"{path}: {data.ndim}-D MRC data (a volume stack?) is not one volume")
        if data.dtype.kind == "c":
            raise UnsupportedDataError(f"{path}: complex MRC data (a Fourier transform) is not an image")
        voxel = mrc.voxel_size  # record (x, y, z), Ångström; 0 where the writer left it unset
        size_a = (float(voxel.z), float(voxel.y), float(voxel.x))
        voxel_nm = triple(v * NM_PER_ANGSTROM for v in size_a) if all(v > 0 for v in size_a) else None
        origin = mrc.header.origin
        origin_a = (float(origin.z), float(origin.y), float(origin.x))
        origin_nm = triple(v * NM_PER_ANGSTROM for v in origin_a) if any(origin_a) else None
        return MrcHeader(path, triple(int(n) for n in shape), np.dtype(data.dtype).newbyteorder("="), voxel_nm, origin_nm)
    finally:
        mrc.close()


class MrcVolume(Volume):
    """An MRC map, tomogram or stack: sections are z. Never loads more than the region asked for."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = str(self.path)
        header = read_mrc_header(self.path)
        self.header = header
        self.shape = header.shape
        self.dtype = header.dtype
        self.geometry = (Geometry(header.voxel_size_nm, "source-metadata", header.origin_nm)
                         if header.voxel_size_nm else None)
        self._mrc = _open(self.path)

    def read(self, region: Region) -> np.ndarray:
        data = self._mrc.data
        if data.ndim == 2:
            data = data[np.newaxis]
        return np.ascontiguousarray(data[region], dtype=self.dtype)

    def read_plane(self, z: int, ys: slice, xs: slice) -> np.ndarray:
        plane: np.ndarray = self.read((slice(z, z + 1), ys, xs))[0]  # numpy types an integer index as Any
        return plane

    def close(self) -> None:
        self._mrc.close()
