"""em-ingest: public electron-microscopy volumes to multiscale OME-Zarr with one catalog."""

__version__ = "0.1.0"
