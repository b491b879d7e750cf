"""The selection file: which datasets of which archive to ingest, with per-dataset options."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from em_ingest.errors import SelectionError

DATASET_KEY_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")


class DatasetOptions(BaseModel):
    """Options every source accepts; each source subclasses this with its own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    voxel_size_nm: tuple[float, float, float] | None = Field(
        default=None, description="Curator override [z, y, x] in nanometres; wins over the source."
    )

    def model_post_init(self, _context: Any) -> None:
        if self.voxel_size_nm is not None and any(v <= 0 for v in self.voxel_size_nm):
            raise ValueError(f"voxel_size_nm must be positive, got {list(self.voxel_size_nm)}")


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
            key = str(key)
            where = f"{origin}: {source}.{key}"
            if not DATASET_KEY_PATTERN.match(key):
                raise SelectionError(f"{where}: dataset keys may contain only letters, digits, '-', '_' and '.'")
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


def load_selection(path: str | Path, option_models: Mapping[str, type[DatasetOptions]]) -> Selection:
    """Read and validate the selection file at `path`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SelectionError(f"selection file not found: {path} (set EM_INGEST_DATASETS)") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SelectionError(f"{path}: not valid YAML: {exc}") from None
    return parse_selection(document, option_models, origin=str(path))
