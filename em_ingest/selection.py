"""The selection file: which datasets of which archive to ingest, with per-dataset options."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from em_ingest.errors import SelectionError
from em_ingest.formats.label import check_label_name
from em_ingest.formats.volume import VOXEL_SIZE_RANGE_NM

# A key names a folder and a partition: it starts with a letter or digit, so it is never `.`, `..`,
# a hidden name or something a shell reads as an option (`-rf`). Matched in full (no `$` quirks).
DATASET_KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Far above any real selection (a 1,000-dataset file is ~50 KiB); a larger file is a mistake.
MAX_SELECTION_BYTES = 4 << 20
VoxelLength = Annotated[float, Field(strict=True, ge=VOXEL_SIZE_RANGE_NM[0], le=VOXEL_SIZE_RANGE_NM[1],
                                     allow_inf_nan=False)]


def _label_sources(value: dict[str, str]) -> dict[str, str]:
    for name, where in value.items():
        check_label_name(name, "labels")
        if not where.strip():
            raise ValueError(f"labels: {name!r} names no place in the source")
    return value


# Option `labels` of a source that publishes labels beside its images: label name -> where the source keeps it.
LabelSources = Annotated[dict[str, str], AfterValidator(_label_sources),
                         Field(description="label name -> where the source keeps it (a file, a group path)")]


class DatasetOptions(BaseModel):
    """Options every source accepts; each source subclasses this with its own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    voxel_size_nm: tuple[VoxelLength, VoxelLength, VoxelLength] | None = Field(
        default=None, description="Curator override [z, y, x] in nanometres; wins over the source."
    )


@dataclass(frozen=True)
class DatasetRequest:
    """One dataset to ingest: a partition of its source's assets."""

    source: str
    key: str
    options: DatasetOptions

    def options_dict(self) -> dict[str, Any]:
        return self.options.model_dump(mode="json", exclude_none=True)


Selection = dict[str, dict[str, DatasetRequest]]


def parse_selection(document: Any, option_models: Mapping[str, type[DatasetOptions]], *, origin: str) -> Selection:
    """Validate a selection document (source -> key -> options) against the known sources."""
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        raise SelectionError(f"{origin}: expected a mapping of source -> datasets, got {type(document).__name__}")
    selection: Selection = {}
    for source, datasets in document.items():
        if source not in option_models:
            known = ", ".join(sorted(option_models))
            raise SelectionError(f"{origin}: unknown source {source!r} (known sources: {known})")
        if datasets is None:
            datasets = {}
        if not isinstance(datasets, Mapping):
            raise SelectionError(f"{origin}: {source}: expected a mapping of dataset key -> options")
        selection[source] = {}
        for key, options in datasets.items():
            shown = key if isinstance(key, str) and key.isprintable() else repr(key)
            where = f"{origin}: {source}.{shown}"
            if not isinstance(key, str) or not DATASET_KEY_PATTERN.fullmatch(key):
                raise SelectionError(f"{where}: dataset keys may contain only letters, digits, '-', '_' and '.', "
                                     "start with a letter or digit, and have at most 128 characters")
            if options is None:
                options = {}
            if not isinstance(options, Mapping):
                raise SelectionError(f"{where}: options must be a mapping, got {type(options).__name__}")
            try:
                parsed = option_models[source].model_validate(dict(options))
            except PydanticValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in err['loc']) or 'options'}: {err['msg']}" for err in exc.errors()
                )
                raise SelectionError(f"{where}: invalid options: {problems}") from None
            selection[source][key] = DatasetRequest(source=source, key=key, options=parsed)
    return selection


if TYPE_CHECKING:
    # Checked as SafeLoader: CSafeLoader has the same SafeConstructor API, and exists only where PyYAML has libyaml.
    _SafeLoader = yaml.SafeLoader
else:
    _SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 8x faster


class _StrictLoader(_SafeLoader):
    """YAML for the selection file: mapping keys are the text as written, and a repeated key is an error.

    PyYAML would turn the keys `yes` and `~` into True and None, and let a repeated source or key
    silently replace the first one (a whole source's datasets vanish).
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a plain name, not a list or mapping", key_node.start_mark)
            key = key_node.value
            if key in mapping:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (it also appears above)", key_node.start_mark)
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)

# (resolved path, mtime, size, inode) -> the validated selection: a run reads the file once, not per call.
_CACHE: dict[tuple[Any, ...], Selection] = {}


def load_selection(path: str | Path, option_models: Mapping[str, type[DatasetOptions]]) -> Selection:
    """Read and validate the selection file at `path` (cached while the file is unchanged)."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise SelectionError(f"selection file not found: {path} (set EM_INGEST_DATASETS)") from None
    except OSError as exc:
        raise SelectionError(f"selection file {path}: {exc.strerror}") from None
    if not path.is_file():
        raise SelectionError(f"selection file {path} is not a file (set EM_INGEST_DATASETS)")
    if stat.st_size > MAX_SELECTION_BYTES:
        raise SelectionError(f"{path}: {stat.st_size} bytes is larger than the {MAX_SELECTION_BYTES} a selection "
                             "file may have; split the work over several code locations")
    cache_key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, stat.st_ino, tuple(sorted(option_models)))
    cached = _CACHE.get(cache_key)
    if cached is None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SelectionError(f"{path}: cannot be read as UTF-8 text ({exc})") from None
        try:
            document = yaml.load(text, Loader=_StrictLoader)
        except yaml.YAMLError as exc:
            raise SelectionError(f"{path}: not valid YAML: {exc}") from None
        cached = parse_selection(document, option_models, origin=str(path))
        _CACHE.clear()  # one file per process in practice; never grow without bound
        _CACHE[cache_key] = cached
    return {source: dict(datasets) for source, datasets in cached.items()}
