"""The worker's tasks: one automatic job at a time per worker process (it holds a whole
series in memory), while reader-ROI jobs and deliveries still run beside it; a second
automatic job goes back to the broker instead of holding a thread."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from celery.exceptions import Retry

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
    first = threading.Thread(target=tasks.triage_study, args=(1,))
    first.start()
    while recorder.active["automatic"] == 0:
        time.sleep(0.01)
    reader_job = threading.Thread(target=tasks.triage_annotation, args=(9,))
    reader_job.start()
    # A second automatic job does not hold a thread waiting for the slot (the running job's
    # deliveries would wait behind it): it goes back to the broker at once, to come again.
    begin = time.perf_counter()
    with pytest.raises(Retry):
        tasks.triage_study(2)
    assert time.perf_counter() - begin < 0.1
    for thread in (first, reader_job):
        thread.join(timeout=10)
        assert not thread.is_alive()
    assert tasks.triage_study(3) == Outcome.DONE.value  # the slot is free again
    assert max(automatic for automatic, _ in recorder.overlap) == 1
    # the reader-ROI job started while an automatic job was running
    assert any(automatic == 1 and reader == 1 for automatic, reader in recorder.overlap)
