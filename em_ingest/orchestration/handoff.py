"""The IO manager that passes a conversion's small records between its steps, as JSON under the data root."""


import json
from typing import Any

import dagster as dg

from em_ingest.errors import EmIngestError
from em_ingest.orchestration.resources import EmIngestResource
from em_ingest.pipeline import ConversionPlan, Pipeline, RegionWritten

HANDOFF_DIR = ".runs"
KEEP_FAILED_RUNS_S = 7 * 24 * 3600  # hand-offs of runs that never finished: kept this long for re-execution
_KINDS: dict[str, type[ConversionPlan] | type[RegionWritten]] = {
    "conversion_plan": ConversionPlan, "region_written": RegionWritten}


class HandoffIOManager(dg.ConfigurableIOManager):
    """Stores a step's output (a conversion plan, a region's result, a region number) as a JSON file under
    `<data root>/.runs/<run id>/`, the one place every step of a run reaches: processes, step containers
    and pods all write the image there (a local folder, or objects in the bucket). JSON, not pickle: whoever
    can write the data root cannot make a step run code. A re-execution from failure reads its parent run's
    records from the same place.

    An asset's own output (the image, which lives in storage) is None and stores nothing.
    """

    em_ingest: dg.ResourceDependency[EmIngestResource]

    @staticmethod
    def _name(identifier: list[str]) -> str:
        run_id, *rest = identifier
        return f"{HANDOFF_DIR}/{run_id}/" + "/".join(rest).replace("[", "_").replace("]", "") + ".json"

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        kind = next((name for name, cls in _KINDS.items() if isinstance(obj, cls)), None)
        if kind is None and not isinstance(obj, (int, str)):
            raise TypeError(f"{context.step_key}: cannot hand {type(obj).__name__} on between steps")
        body = obj.to_json() if kind else json.dumps(obj)
        self.em_ingest.pipeline().write_document(self._name(context.get_identifier()),
                                                 json.dumps({"kind": kind or "json", "body": body}).encode())

    def load_input(self, context: dg.InputContext) -> Any:
        upstream = context.upstream_output
        assert upstream is not None
        pipeline = self.em_ingest.pipeline()
        name = self._name(upstream.get_identifier())
        data = pipeline.read_document(name)
        if data is None:
            raise EmIngestError(f"{context.step_key}: the record of {upstream.step_key} is missing "
                                f"({pipeline.data_root}/{name}); materialize the partition again")
        record = json.loads(data)
        if record["kind"] == "json":
            return json.loads(record["body"])
        return _KINDS[record["kind"]].from_json(record["body"])


def forget_run(pipeline: Pipeline, run_id: str) -> None:
    """After a run's image is published: its hand-offs are not needed again; old ones of failed runs go too."""
    pipeline.remove_documents(f"{HANDOFF_DIR}/{run_id}")
    pipeline.remove_documents(HANDOFF_DIR, older_than_s=KEEP_FAILED_RUNS_S)
