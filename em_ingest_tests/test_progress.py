"""Progress reporting: rate limiting and the message (injected clock), thread safety, a fetch's bytes as they
arrive, and the lines in a Dagster run log."""

from __future__ import annotations

import re
import threading

import dagster as dg
import pytest

from em_ingest.progress import Progress, human_bytes, human_duration
from em_ingest.raw import RawStore, fetch_progress
from em_ingest.replicas.http import ReplicaHTTPServer
from em_ingest.settings import TransferSettings
from em_ingest.transfer.ftp import FtpClient
from em_ingest.transfer.http import HttpClient

FAST = TransferSettings(max_attempts=4, backoff_initial_s=0.01, backoff_max_s=0.05, read_timeout_s=2.0)
DATA = bytes(range(256)) * 4096  # 1 MiB: 16 blocks of the HTTP transport's 64 KiB reads
MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lines(list):
    """A sink that keeps each line with the clock's time when it was written."""

    def __init__(self, clock: Clock):
        super().__init__()
        self.clock = clock
        self.times: list[float] = []

    def __call__(self, line: str) -> None:
        self.append(line)
        self.times.append(self.clock.now)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def lines(clock) -> Lines:
    return Lines(clock)


def test_without_a_total_at_most_one_line_per_interval(clock, lines):
    progress = Progress("fetch a/b", sink=lines, clock=clock, every_s=10.0)
    for _ in range(1000):  # 100 s of work, a unit every 0.1 s
        clock.now += 0.1
        progress.advance(1, 1000)
    assert 9 <= len(lines) <= 10
    assert all(b - a >= 10.0 - 1e-9 for a, b in zip(lines.times, lines.times[1:]))
    assert all("%" not in line and "left" not in line for line in lines)  # no total: no percentage, no ETA
    assert re.fullmatch(r"fetch a/b: 9\d\d objects, 8\d\d\.\d KiB, 9\.\d KiB/s, 10\.0 objects/s", lines[-1])


def test_a_line_for_each_five_percent_of_a_known_total(clock, lines):
    progress = Progress("convert x region 3 of 8", total_units=200, unit="blocks", sink=lines, clock=clock,
                        every_s=1e9)
    for _ in range(200):
        clock.now += 2.0
        progress.advance(1, 4096)
    assert [re.search(r"(\d+) %", line)[1] for line in lines] == [str(p) for p in range(5, 100, 5)]
    progress.finish()
    assert len(lines) == 20 and lines[-1].startswith("convert x region 3 of 8: done in 6 min 40 s, 200/200 blocks")


def test_fraction_lines_wait_for_the_minimum_interval_and_the_final_line_comes_once(clock, lines):
    progress = Progress("fetch a/b", total_units=20, sink=lines, clock=clock, min_interval_s=1.0)
    for _ in range(20):  # all within the same instant: every 5 % step, but too soon for a line
        progress.advance()
    assert lines == []
    progress.finish()
    progress.finish()
    progress.advance()
    assert lines == ["fetch a/b: done in 0.0 s, 20/20 objects"]


def test_message_says_done_of_total_percentage_rate_and_time_left(clock, lines):
    progress = Progress("fetch openorganelle/jrc", total_units=400, total_bytes=400 * MiB, sink=lines, clock=clock)
    clock.now += 1.0
    progress.advance(0, 0)  # the clock starts at construction, since totals were given
    clock.now += 9.0
    progress.advance(100, 100 * MiB)  # 100 MiB in 10 s
    assert lines == ["fetch openorganelle/jrc: 100/400 objects, 100.0 MiB of 400.0 MiB, 25 %, 10.0 MiB/s, "
                     "10.0 objects/s, about 30 s left"]
    clock.now += 10.0
    progress.advance(200, 100 * MiB)  # the rate is the one since the last line: the current speed
    assert lines[-1] == ("fetch openorganelle/jrc: 300/400 objects, 200.0 MiB of 400.0 MiB, 50 %, 10.0 MiB/s, "
                         "20.0 objects/s, about 20 s left")
    progress.finish()
    assert lines[-1] == ("fetch openorganelle/jrc: done in 20 s, 300/400 objects, 200.0 MiB of 400.0 MiB, "
                         "10.0 MiB/s, 15.0 objects/s")


def test_skipped_work_is_done_but_not_part_of_the_rate(clock, lines):
    progress = Progress("fetch a/b", sink=lines, clock=clock, done_word="fetched", skipped_word="unchanged")
    progress.expect(312, 312 * MiB)
    progress.skip(300, 300 * MiB)  # past 95 %, but a line waits for the minimum interval
    clock.now += 4.0
    progress.advance(2, 8 * MiB)
    assert lines == ["fetch a/b: 302/312 objects (2 fetched, 300 unchanged), 308.0 MiB of 312.0 MiB, 99 %, "
                     "2.0 MiB/s, 0.5 objects/s, about 2.0 s left"]


def test_percentage_is_in_units_until_every_expected_size_is_known(clock, lines):
    progress = Progress("fetch a/b", sink=lines, clock=clock)
    progress.expect(4, None)  # four files whose sizes a HEAD will tell
    progress.sized(100 * MiB)
    progress.advance(1, 100 * MiB)
    assert progress.line().startswith("fetch a/b: 1/4 objects, 100.0 MiB, 25 %")
    for _ in range(3):
        progress.sized(10 * MiB)
    assert progress.line().startswith("fetch a/b: 1/4 objects, 100.0 MiB of 130.0 MiB, 77 %")


def test_a_failed_piece_of_work_says_so(clock, lines):
    with pytest.raises(RuntimeError), Progress("fetch a/b", total_units=3, sink=lines, clock=clock) as progress:
        progress.advance()
        raise RuntimeError("boom")
    assert lines == ["fetch a/b: failed in 0.0 s, 1/3 objects"]


def test_concurrent_advances_are_all_counted_and_lines_arrive_in_order():
    lines: list[str] = []
    progress = Progress("convert x", total_units=4 * 50_000, unit="blocks", sink=lines.append,
                        every_s=0.001, min_interval_s=0.0)
    start = threading.Barrier(4)

    def work() -> None:
        start.wait()
        for _ in range(50_000):
            progress.advance(1, 3)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert progress.done == (200_000, 600_000)
    progress.finish()
    assert len(lines) >= 2
    counts = [int(re.match(r"convert x: (?:done in \S+ \S+, )?(\d+)/200000 blocks", line)[1]) for line in lines]
    assert counts == sorted(counts) and counts[-1] == 200_000


def test_human_units():
    assert [human_bytes(n) for n in (0, 1023, 1536, 3.4 * 1024**3)] == ["0 B", "1023 B", "1.5 KiB", "3.4 GiB"]
    assert [human_duration(s) for s in (0.44, 9.96, 59, 192, 7500)] == ["0.4 s", "10 s", "59 s", "3 min 12 s", "2 h 05 min"]


# ---- a fetch through the raw store ----------------------------------------------------------------------
@pytest.fixture
def server():
    with ReplicaHTTPServer("test") as srv:
        srv.add_file("/files/big.bin", DATA)
        yield srv


def test_one_large_download_reports_its_bytes_while_it_runs(server, tmp_path, clock, lines):
    server.faults.cut_after_bytes, server.faults.cuts = 300_000, 1  # and a resume does not count bytes twice
    progress = Progress("fetch test/k", sink=lines, clock=clock, every_s=0.0)  # a line for every report
    store = RawStore(tmp_path, "test", "k", HttpClient(FAST), progress=progress)
    entry = store.fetch(server.url + "/files/big.bin", "big.bin")
    progress.finish()
    during = [line for line in lines if line.startswith("fetch test/k: 0/1 objects")]
    assert len(during) >= 10, lines  # the 64 KiB blocks of the one object, before it is done
    assert "64.0 KiB of 1.0 MiB, 6 %" in during[0]
    assert progress.done == (1, len(DATA))
    assert lines[-1].startswith("fetch test/k: done in 0.0 s, 1/1 objects, 1.0 MiB of 1.0 MiB")
    store.commit([entry], {})

    lines.clear()
    again = fetch_progress("test", "k", lines)
    RawStore(tmp_path, "test", "k", HttpClient(FAST), progress=again).fetch(server.url + "/files/big.bin", "big.bin")
    again.finish()
    assert re.fullmatch(r"fetch test/k: done in \S+ s, 1/1 objects \(0 fetched, 1 unchanged\), 1\.0 MiB of 1\.0 MiB",
                        lines[-1])


def test_an_ftp_download_tells_the_bytes_it_holds_as_they_arrive(replicas, tmp_path):
    from em_ingest.replicas.empiar import TREE

    empiar = replicas["empiar"]
    url = f"{empiar.ftp_url}{TREE}/90001/data/tomograms/tomo_01.rec"  # about 1.5 MB
    client = FtpClient(FAST)
    remote = client.stat(url)
    held: list[int] = []
    empiar.ftp_faults.cut_after_bytes, empiar.ftp_faults.cuts = 500_000, 1
    try:
        download = client.fetch(url, tmp_path / "tomo_01.rec", expected=remote, on_bytes=held.append)
        resumed_at = list(empiar.ftp_faults.rest_offsets)
    finally:
        empiar.ftp_faults.clear()
    assert len(resumed_at) == 1 and 0 < resumed_at[0] <= 500_000
    # Several reports on the way (recv sizes vary), and the resumed transfer continues from what it held.
    assert len(held) >= 3 and held[0] < remote.size and held == sorted(held)
    assert held[-1] == download.size == remote.size


def test_progress_lines_reach_the_run_log_of_the_raw_step(workspace):
    ws = workspace("epfl")
    key = "hippocampus-training"  # training.tif and its mask, training_groundtruth.tif

    def progress_lines(result: dg.ExecuteInProcessResult) -> list[tuple[str | None, str]]:
        return [(entry.step_key, entry.user_message) for entry in ws.instance.all_logs(result.run_id)
                if entry.user_message.startswith(f"fetch epfl/{key}:")]

    first = progress_lines(ws.materialize("epfl", key, steps=("raw",)))
    assert len(first) == 1, first
    step, line = first[0]
    assert step == "epfl__raw"
    assert re.match(rf"fetch epfl/{key}: done in [\d.]+ s, 2/2 objects, [\d.]+ KiB of [\d.]+ KiB, .* objects/s$", line)

    again = progress_lines(ws.materialize("epfl", key, steps=("raw",)))
    assert re.match(rf"fetch epfl/{key}: done in [\d.]+ s, 2/2 objects \(0 fetched, 2 unchanged\), ", again[0][1])
