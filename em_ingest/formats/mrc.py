"""MRC-family files (.mrc, .rec, .st, .ali, .mrcs, .map) as memory-mapped volumes in (z, y, x) order, lengths in nm."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from decimal import Context, Decimal
from pathlib import Path
from typing import Any

import numpy as np

from em_ingest.errors import FormatError, UnsupportedDataError
from em_ingest.formats.units import to_nm
from em_ingest.formats.volume import Geometry, Region, Volume, triple

MRC_SUFFIXES = (".mrc", ".rec", ".st", ".ali", ".mrcs", ".map")
STANDARD_AXES = (1, 2, 3)  # MAPC, MAPR, MAPS: columns are x, rows y, sections z
_UNSET_AXES = (0, 0, 0)  # some writers leave the mapping at zero; read as the standard order, as before
_RIGHT_ANGLE_TOLERANCE_DEG = 1e-3
_FLOAT32_DIGITS = Context(prec=9)  # 9 significant digits tell any two float32 values apart


@dataclass(frozen=True)
class MrcHeader:
    """What an MRC header says, with the file's axes mapped to (z, y, x) through MAPC/MAPR/MAPS.

    `voxel_size_nm` is (z, y, x) cell length over grid intervals (CELLA / MX, MY, MZ); None unless x and y are
    both set, and its z alone is None when the cell's z length is 0 — a single image, as EPU and FEI write
    micrographs (mz = 1, cella.z = 0). `origin_nm` is the ORIGIN record, else the grid start (NXSTART...) times
    the voxel size; None when both are zero.
    """

    path: Path
    shape: tuple[int, int, int]  # (z, y, x)
    dtype: np.dtype
    voxel_size_nm: tuple[float | None, float, float] | None  # (z, y, x)
    origin_nm: tuple[float, float, float] | None  # (z, y, x)
    axes_crs: tuple[int, int, int] = STANDARD_AXES  # (MAPC, MAPR, MAPS) as read; (0, 0, 0) taken as standard
    cell_angles_deg: tuple[float, float, float] = (90.0, 90.0, 90.0)  # CELLB (alpha, beta, gamma); 0 = unset

    @property
    def is_orthogonal(self) -> bool:
        """Whether the grid axes are at right angles (CELLB 90° or unset), as OME-Zarr's per-axis scale assumes."""
        return all(a == 0 or abs(a - 90.0) <= _RIGHT_ANGLE_TOLERANCE_DEG for a in self.cell_angles_deg)

    @property
    def geometry(self) -> Geometry | None:
        """Voxel size and origin, or None when the file does not state all three sizes or its cell is sheared
        (a crystallographic map with an angle other than 90°: a per-axis scale would silently square it)."""
        if self.voxel_size_nm is None or not self.is_orthogonal:
            return None
        z, y, x = self.voxel_size_nm
        return Geometry((z, y, x), "source-metadata", self.origin_nm) if z is not None else None


def _open(path: Path) -> Any:  # an mrcfile.mrcmemmap.MrcMemmap; mrcfile has no type information
    import mrcfile  # here, not at import: only MRC maps need it

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


def _axes_crs(header: Any, path: Path) -> tuple[int, int, int]:
    """(MAPC, MAPR, MAPS): which of x=1, y=2, z=3 the file's columns, rows and sections are."""
    axes = (int(header.mapc), int(header.mapr), int(header.maps))
    if axes == _UNSET_AXES:
        return STANDARD_AXES
    if sorted(axes) != [1, 2, 3]:
        raise FormatError(f"{path}: header fields MAPC, MAPR, MAPS are {axes}; expected a permutation of 1, 2, 3 "
                          "(which of x, y, z the columns, rows and sections are)")
    return axes


def _zyx_order(axes_crs: tuple[int, int, int]) -> tuple[int, int, int]:
    """The file array's axes (0 sections, 1 rows, 2 columns) that hold z, y and x: the transpose to (z, y, x)."""
    mapc, mapr, maps = axes_crs
    file_axis = {maps: 0, mapr: 1, mapc: 2}
    return file_axis[3], file_axis[2], file_axis[1]


def _decimal(value: Any) -> Decimal:
    """A float32 header value as the shortest decimal that is that float32 (17.93, not 17.9300003...)."""
    return Decimal(str(np.float32(value)))


def _voxel_size_a(cell: Any, grid: Any) -> Decimal | None:
    """One axis's voxel size in Å, None if the writer left it unset: the cell length as the decimal its writer
    meant (the shortest decimal of the float32: 33.03, not 33.029998779296875) over the grid intervals, in
    decimal to 9 significant digits — all a float32 holds — so 33.03 / 72 is exactly 0.45875, and EPU's
    2730.1943 / 4096 is 0.666551343 rather than 0.6665513427734375, whose tail is the float32 rounding of
    the cell length, not information."""
    length, intervals = float(np.float32(cell)), int(grid)
    if not (math.isfinite(length) and length > 0 and intervals > 0):
        return None
    return _FLOAT32_DIGITS.divide(_decimal(cell), Decimal(intervals))


def _voxel_size_nm(header: Any, path: Path) -> tuple[float | None, float, float] | None:
    where = f"{path}: MRC cell (CELLA / MX, MY, MZ)"
    sizes = {axis: _voxel_size_a(header.cella[axis], header[f"m{axis}"]) for axis in "xyz"}
    x, y, z = sizes["x"], sizes["y"], sizes["z"]
    if x is None or y is None:
        return None
    return (None if z is None else to_nm(z, "Å", where=where), to_nm(y, "Å", where=where), to_nm(x, "Å", where=where))


def _origin_nm(header: Any, path: Path, axes_crs: tuple[int, int, int],
               voxel_size_nm: tuple[float | None, float, float] | None) -> tuple[float, float, float] | None:
    """Where voxel 0 sits, (z, y, x) nm: the ORIGIN record when it is set, else the grid start (NXSTART, NYSTART,
    NZSTART, in voxels along the file's columns, rows and sections) times the voxel size, as EMDB maps state it
    (ChimeraX reads both the same way); None when both are zero."""
    origin = header.origin  # (x, y, z) in Å: physical axes, whatever the file's axis order
    if any(float(origin[axis]) for axis in "xyz"):
        where = f"{path}: MRC ORIGIN"
        return triple(to_nm(_decimal(origin[axis]), "Å", where=where) for axis in "zyx")
    starts = (int(header.nxstart), int(header.nystart), int(header.nzstart))  # columns, rows, sections
    if not any(starts) or voxel_size_nm is None:
        return None
    start_of = {axis: start for axis, start in zip(axes_crs, starts)}  # physical axis (x=1, y=2, z=3) -> start
    sizes = dict(zip((3, 2, 1), voxel_size_nm))
    if start_of[3] and sizes[3] is None:
        return None  # a z start without a z spacing is no length
    return triple(float(Decimal(start_of[axis]) * Decimal(repr(sizes[axis] or 0.0))) for axis in (3, 2, 1))


def _zyx_view(mrc: Any, path: Path) -> tuple[np.ndarray, MrcHeader]:
    """The data as a lazy (z, y, x) view of the memory map (a transpose reads nothing), and the header."""
    data = mrc.data
    if data.ndim == 2:
        data = data[np.newaxis]  # one section
    elif data.ndim != 3:
        raise UnsupportedDataError(f"{path}: {data.ndim}-D MRC data (a volume stack?) is not one volume")
    if data.dtype.kind == "c":
        raise UnsupportedDataError(f"{path}: complex MRC data (a Fourier transform) is not an image")
    header = mrc.header
    axes = _axes_crs(header, path)
    view = data if axes == STANDARD_AXES else data.transpose(_zyx_order(axes))
    angles = triple(float(header.cellb[name]) for name in ("alpha", "beta", "gamma"))
    voxel_size = _voxel_size_nm(header, path)
    parsed = MrcHeader(path, triple(int(n) for n in view.shape), np.dtype(data.dtype).newbyteorder("="),
                       voxel_size, _origin_nm(header, path, axes, voxel_size), axes, angles)
    return view, parsed


def read_mrc_header(path: Path) -> MrcHeader:
    path = Path(path)
    mrc = _open(path)
    try:
        return _zyx_view(mrc, path)[1]
    finally:
        mrc.close()


class MrcVolume(Volume):
    """An MRC map, tomogram or stack in (z, y, x) order whatever its MAPC/MAPR/MAPS; never loads more than the
    region asked for (a region of a transposed memory map touches only the pages holding its voxels)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = str(self.path)
        self._mrc = _open(self.path)
        try:
            self._zyx, self.header = _zyx_view(self._mrc, self.path)
            self.geometry = self.header.geometry  # may refuse an implausible voxel size
        except BaseException:
            self._mrc.close()
            raise
        self.shape = self.header.shape
        self.dtype = self.header.dtype

    def read(self, region: Region) -> np.ndarray:
        return np.ascontiguousarray(self._zyx[region], dtype=self.dtype)

    def read_plane(self, z: int, ys: slice, xs: slice) -> np.ndarray:
        plane: np.ndarray = self.read((slice(z, z + 1), ys, xs))[0]  # numpy types an integer index as Any
        return plane

    def close(self) -> None:
        self._mrc.close()
