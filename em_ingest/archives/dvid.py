"""DVID's HTTP API for one node (commit state, instance info, raw-tile URLs) and the tile plan of a crop."""

from __future__ import annotations

from typing import Any

from em_ingest.errors import SourceResponseError, UnsupportedDataError
from em_ingest.formats.dvid import XYZ, Tile
from em_ingest.formats.units import lengths_nm
from em_ingest.formats.volume import triple
from em_ingest.transfer.http import HttpClient

# DVID answers a raw request in one response; keep each below a size a busy server serves
# comfortably (2 MiB of uint8). Tiles are cut from the crop's corner: the fewest requests, and the
# same tiles on every re-run of the same crop.
DVID_TILE_EDGE = 128
DVID_MAX_IN_FLIGHT = 4  # throttle=true asks DVID to shed load; do not hammer it in parallel


def dvid_tiles(start: XYZ, stop: XYZ, edge: int = DVID_TILE_EDGE) -> list[Tile]:
    """The box [start, stop) (x, y, z) cut into tiles of at most `edge` voxels a side, from `start`."""
    axes = [[(a, min(a + edge, b)) for a in range(lo, b, edge)] for lo, b in zip(start, stop)]
    return [Tile((x0, y0, z0), (x1 - x0, y1 - y0, z1 - z0))
            for z0, z1 in axes[2] for y0, y1 in axes[1] for x0, x1 in axes[0]]


class DvidNode:
    """One version (node) of a DVID repository, read over plain HTTP (DVID needs no token for reads)."""

    def __init__(self, http: HttpClient, server: str, uuid: str):
        self.http, self.uuid = http, uuid
        self.url = f"{server.rstrip('/')}/api/node/{uuid}"

    @property
    def commit_url(self) -> str:
        return f"{self.url}/commit"

    def info_url(self, instance: str) -> str:
        return f"{self.url}/{instance}/info"

    def commit(self) -> Any:
        """GET <node>/commit: {"Locked": bool} (a locked node is committed and never changes again)."""
        return self.http.get_json(self.commit_url)

    @staticmethod
    def is_locked(commit: Any) -> bool:
        return isinstance(commit, dict) and commit.get("Locked") is True

    @property
    def locked_version(self) -> str:
        """The version of every object read from this node while it is locked (DVID sends no ETag)."""
        return f"dvid-node {self.uuid}"

    def grayscale_info(self, instance: str) -> dict[str, Any]:
        """GET <node>/<instance>/info, refused unless the instance is uint8blk grayscale."""
        url = self.info_url(instance)
        info = self.http.get_json(url)
        type_name = (info.get("Base") or {}).get("TypeName") if isinstance(info, dict) else None
        if not isinstance(info, dict) or type_name != "uint8blk":
            raise UnsupportedDataError(f"{url}: instance type {type_name!r}; expected uint8blk grayscale")
        return info

    def raw_url(self, instance: str, tile: Tile) -> str:
        """The raw 3-D request of one tile; size and offset are x_y_z, the body ZYX C-order."""
        size, offset = "_".join(map(str, tile.size)), "_".join(map(str, tile.start))
        return f"{self.url}/{instance}/raw/0_1_2/{size}/{offset}?throttle=true"


# ---- reading an instance's info -------------------------------------------------------------------

def voxel_size_nm(info: Any, where: str) -> tuple[float, float, float]:
    """Extended.VoxelSize in nm, (x, y, z)."""
    extended = info.get("Extended") if isinstance(info, dict) else None
    if not isinstance(extended, dict) or "VoxelSize" not in extended:
        raise SourceResponseError(f"{where}: instance info lacks Extended.VoxelSize")
    units = extended.get("VoxelUnits") or "nanometers"
    return lengths_nm(extended["VoxelSize"], units, where=where, what="Extended.VoxelSize (x, y, z)")


def extents(info: Any, where: str) -> tuple[XYZ, XYZ]:
    """[MinPoint, MaxPoint + 1) of a DVID instance, (x, y, z)."""
    extended = info.get("Extended") if isinstance(info, dict) else None
    low = (extended or {}).get("MinPoint")
    high = (extended or {}).get("MaxPoint")
    if not (isinstance(low, list) and isinstance(high, list) and len(low) == 3 and len(high) == 3):
        raise SourceResponseError(f"{where}: instance has no extents (Extended.MinPoint / MaxPoint)")
    return triple(int(v) for v in low), triple(int(v) + 1 for v in high)
