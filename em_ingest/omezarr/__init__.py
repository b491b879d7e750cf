"""The normalized image: a streaming multiscale OME-Zarr writer, its validator and thumbnails."""
