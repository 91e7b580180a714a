"""A job reads each file of its series' headers once: the series is one value
(:class:`worker.series.Series`) that the selection rules, the volume and the SR's evidence
share; and it decodes each slice at most once, for the classifier, the review series and the
key image alike. Counted as file opens for reading (``open`` and ``os.open``) while a real job
runs in-process (SQLite, no broker)."""

from __future__ import annotations

import builtins
import os
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dicom_node.archive import lifecycle
from dicom_node.archive.db import transaction, writer_lock
from dicom_node.archive.migrate import upgrade
from dicom_node.dicom.ingest import StoreContext, store_instance
from dicom_node.settings import Settings
from tests.system import case_files
from worker.pipeline import Outcome, run_triage
from worker.runtime import WorkerRuntime


@pytest.mark.parametrize(
    ("review_series", "key_image"), [(False, False), (False, True), (True, True)]
)
def test_a_job_reads_each_header_once_and_decodes_only_the_slices_it_needs(
    review_series: bool,
    key_image: bool,
    tmp_path: Path,
    checkpoint_path: Path,
    synthetic_cases: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"sqlite:///{tmp_path / 'reads.db'}"
    upgrade(url)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        var_dir=tmp_path / "var",
        database_url=url,
        model_checkpoint=checkpoint_path,
        review_series=review_series,
        key_image=key_image,
    )
    rt = WorkerRuntime.from_settings(settings)
    case = synthetic_cases[0]
    context = StoreContext(store=rt.store, sessions=rt.sessions, writer_lock=writer_lock(rt.engine))
    for path in case_files(case):
        assert store_instance(context, path.read_bytes(), transfer_syntax=None, source="test").ok
    now = datetime.now(UTC)
    with transaction(rt.sessions) as session:
        lifecycle.complete_quiet_studies(session, quiet_period_s=0, now=now + timedelta(seconds=1))
        annotation_id = lifecycle.create_annotation(session, case.roi, source="rest", now=now).id
    assert rt.classifier is not None  # loaded before counting: not part of the series

    opened: Counter[str] = Counter()
    real_open = builtins.open

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file).endswith(".dcm") and "/storage/" in str(file):
            opened[Path(file).name] += 1
        return real_open(file, *args, **kwargs)

    real_os_open = os.open

    def counting_os_open(file: Any, flags: int, *args: Any, **kwargs: Any) -> Any:
        # uncompressed pixels are read with os.open (model.io.pixels.read_native_rows)
        reading = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) == 0
        if reading and str(file).endswith(".dcm") and "/storage/" in str(file):
            opened[Path(file).name] += 1
        return real_os_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(os, "open", counting_os_open)
    outcome = run_triage(rt, annotation_id)
    monkeypatch.undo()
    rt.close()

    assert outcome.outcome is Outcome.DONE, outcome.reason
    assert len(opened) == len(case_files(case)), "every stored file of the series is read"
    assert max(opened.values()) == 2, opened  # its header once, then its pixels if needed
    decoded = [name for name, count in opened.items() if count == 2]
    if review_series or key_image:  # review images span the whole series: each slice once
        assert len(decoded) == len(case_files(case))
    else:
        assert 0 < len(decoded) < len(case_files(case)), "pixels only of the slices the ROI needs"
