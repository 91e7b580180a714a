"""The worker's tasks: one automatic job at a time per worker process (it holds a whole
series in memory), while reader-ROI jobs and deliveries still run beside it."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from worker import tasks
from worker.automatic import AutomaticOutcome
from worker.pipeline import Outcome


class _Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: dict[str, int] = {"automatic": 0, "reader": 0}
        self.overlap: list[tuple[int, int]] = []

    def run(self, kind: str, job_id: int, result: Any) -> Any:
        with self.lock:
            self.active[kind] += 1
            self.overlap.append((self.active["automatic"], self.active["reader"]))
        time.sleep(0.3)
        with self.lock:
            self.active[kind] -= 1
        return result


def test_automatic_jobs_run_one_at_a_time_beside_reader_jobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = _Recorder()
    monkeypatch.setattr(tasks, "get_runtime", lambda: None)
    monkeypatch.setattr(
        tasks,
        "run_automatic",
        lambda rt, job_id: recorder.run(
            "automatic", job_id, AutomaticOutcome(Outcome.DONE, job_id)
        ),
    )

    class _Triage:
        outcome = Outcome.DONE
        retry_in_s = None

    monkeypatch.setattr(
        tasks,
        "run_triage",
        lambda rt, annotation_id: recorder.run("reader", annotation_id, _Triage),
    )
    threads = [threading.Thread(target=tasks.triage_study, args=(job,)) for job in (1, 2, 3)]
    threads.append(threading.Thread(target=tasks.triage_annotation, args=(9,)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert all(not thread.is_alive() for thread in threads)
    assert max(automatic for automatic, _ in recorder.overlap) == 1
    # the reader-ROI job started while an automatic job was running
    assert any(automatic == 1 and reader == 1 for automatic, reader in recorder.overlap)
