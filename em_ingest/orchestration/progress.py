"""Progress lines of the core (em_ingest.progress) into a Dagster run's log."""

import threading

import dagster as dg

from em_ingest.progress import Sink, log_sink


def run_log_sink(context: dg.AssetExecutionContext) -> Sink:
    """A sink that writes each progress line to the step's run log (INFO), so the UI shows how far the step
    has come, and to the `em_ingest.progress` logger, which a terminal (e.g. `em-ingest demo`) may show.

    The core calls it from its worker threads, and several reporters may share one sink: the lock keeps
    each line's two writes together.
    """
    lock = threading.Lock()

    def sink(line: str) -> None:
        with lock:
            context.log.info(line)
            log_sink(line)

    return sink
