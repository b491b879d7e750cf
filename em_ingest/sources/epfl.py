"""EPFL CVLab's CA1 hippocampus EM stacks: plain HTTPS multipage TIFFs with a documented 5 nm voxel."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import field_validator

from em_ingest.formats.label import LabelImage
from em_ingest.formats.tiff import TiffStack
from em_ingest.formats.volume import Geometry, Volume
from em_ingest.raw import Manifest, RawStore, Wanted, safe_relative_path
from em_ingest.selection import DatasetOptions, DatasetRequest, LabelSources
from em_ingest.settings import Setting
from em_ingest.sources.base import Description, InventoryItem, Source, options_as

LANDING_PAGE = "https://www.epfl.ch/labs/cvlab/data/data-em/"
# Not stored in the TIFFs; the landing page says "approximately 5x5x5nm".
DOCUMENTED_VOXEL_SIZE_NM = (5.0, 5.0, 5.0)
PAGE_TEXT = (
    "A 5x5x5 µm section taken from the CA1 hippocampus region of the brain, corresponding to a "
    "1065x2048x1536 volume; each voxel is approximately 5x5x5 nm. Mitochondria are annotated in two "
    "sub-volumes of 165 slices (training and testing)."
)
FILES = {
    "volumedata.tif": "Full CA1 hippocampus volume",
    "training.tif": "Training sub-volume",
    "training_groundtruth.tif": "Training sub-volume, mitochondria ground truth (0 / 255)",
    "testing.tif": "Testing sub-volume",
    "testing_groundtruth.tif": "Testing sub-volume, mitochondria ground truth (0 / 255)",
}
MASK_RGBA = (255, 0, 255, 255)  # the masks' one class (255), drawn in magenta over the grey image
CITATIONS = [
    "Lucchi et al., Supervoxel-Based Segmentation of Mitochondria in EM Image Stacks with Learned Shape "
    "Features, IEEE Transactions on Medical Imaging, 2012",
    "Lucchi et al., Learning Structured Models for Segmentation of 2D and 3D Imagery, IEEE Transactions on "
    "Medical Imaging, 2015",
]


class EpflOptions(DatasetOptions):
    file: str
    # e.g. {mitochondria: training_groundtruth.tif}: a mask of the same shape, in the same folder.
    labels: LabelSources | None = None

    @field_validator("file")
    @classmethod
    def _tiff_file(cls, value: str) -> str:
        return _tiff_file_name(value)

    @field_validator("labels")
    @classmethod
    def _label_files(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return None if value is None else {name: _tiff_file_name(file) for name, file in value.items()}


def _tiff_file_name(value: str) -> str:
    safe_relative_path(value)
    if "/" in value or not value.lower().endswith((".tif", ".tiff")):
        raise ValueError(f"expected a TIFF file name in the EPFL folder, got {value!r}")
    return value


class EpflSource(Source):
    name = "epfl"
    title = "EPFL CVLab electron microscopy dataset (CA1 hippocampus)"
    Options = EpflOptions
    configuration = (
        Setting("epfl_url", "EM_INGEST_EPFL_URL",
                "https://documents.epfl.ch/groups/c/cv/cvlab-unit/www/data/%20ElectronMicroscopy_Hippocampus",
                "EPFL folder"),
    )

    def file_url(self, file: str) -> str:
        return f"{self.settings.epfl_url.rstrip('/')}/{file}"

    def discover(self) -> Iterable[InventoryItem]:
        # The folder has no listing; the landing page names these files.
        for file, title in FILES.items():
            yield InventoryItem(self.name, f"hippocampus-{file.removesuffix('.tif').replace('_', '-')}", title,
                                {"file": file, "url": self.file_url(file)})

    def fetch_raw(self, request: DatasetRequest, raw: RawStore) -> Manifest:
        options = options_as(request, EpflOptions)
        files = [options.file, *(options.labels or {}).values()]
        entries = raw.mirror(Wanted(self.file_url(file), file) for file in dict.fromkeys(files))
        image = entries[0]
        assert image is not None  # not optional: an absent file raised
        return raw.commit(entries, request.options_dict(), source_version=image.etag or image.last_modified)

    def describe(self, request: DatasetRequest, raw: RawStore) -> Description:
        options = options_as(request, EpflOptions)
        entry = raw.previous.entry(options.file) if raw.previous else None
        return Description(
            title=f"CA1 hippocampus — {FILES.get(options.file, options.file)}",
            description=PAGE_TEXT,
            sample="CA1 hippocampus",
            imaging_method="electron microscopy",
            source_url=self.file_url(options.file),
            license="unspecified; academic use",
            source_version=(entry.etag or entry.last_modified) if entry else None,
            extra={"landing_page": LANDING_PAGE, "citations": CITATIONS, "file": options.file},
        )

    def open_volume(self, request: DatasetRequest, raw: RawStore) -> Volume:
        options = options_as(request, EpflOptions)
        return TiffStack(raw.path(options.file), Geometry(DOCUMENTED_VOXEL_SIZE_NM, "documented-default"))

    def open_labels(self, request: DatasetRequest, raw: RawStore) -> list[LabelImage]:
        # The ground truth masks are the image's own grid: 0 background, 255 mitochondria.
        options = options_as(request, EpflOptions)
        return [LabelImage(name, TiffStack(raw.path(file)), file, colors={255: MASK_RGBA})
                for name, file in (options.labels or {}).items()]


SOURCE = EpflSource
