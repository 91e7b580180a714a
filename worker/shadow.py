"""Shadow mode: a candidate checkpoint run beside the live one on every job.

A site names the candidate (``CANDIDATE_CHECKPOINT``, pinned by
``CANDIDATE_CHECKPOINT_SHA256``). After a job's live result is recorded and its deliveries
are on their way, the job runs the candidate on the same ROI (or the same proposed bodies)
and the same decoded volume, and records its result under the candidate's version with role
``shadow``: its SR and preview are stored on the node for review — never delivered, never
sent to a flag sink, never counted as the study's flag or shown as its result. Whatever
goes wrong with the candidate (refused, not trained for the task, an error) is logged and
recorded on the live result (``shadow_failure``); the live job is done regardless.

``spine-triage models compare`` reads what this records. Promotion is a setting change:
the candidate becomes ``MODEL_CHECKPOINT`` (and every SR already names model and version).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import update

from dicom_node.archive.db import transaction
from dicom_node.archive.schema import TriageResult
from model.serving.inference import Classifier
from worker.errors import describe_error
from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)


def run_candidate(
    rt: WorkerRuntime, live_result_id: int, what: str, step: Callable[[Classifier], int]
) -> int | None:
    """Run ``step`` (which records the candidate's result and returns its id) when a candidate
    is configured; None when none is, or when it failed (logged and recorded). Never raises."""
    if rt.settings.candidate_checkpoint is None:
        return None
    name = str(rt.settings.candidate_checkpoint)
    try:
        candidate = rt.candidate
        if candidate is None:
            return None
        name = f"{candidate.name} {candidate.version}"
        result_id = step(candidate)
    except Exception as exc:  # the candidate never fails the live job: logged and recorded
        reason = describe_error(exc)
        log.warning("%s: shadow candidate %s failed: %s", what, name, reason, exc_info=True)
        record_failure(rt, live_result_id, f"{name}: {reason}")
        return None
    log.info("%s: shadow candidate %s recorded as result %d", what, name, result_id)
    return result_id


def record_failure(rt: WorkerRuntime, live_result_id: int, reason: str) -> None:
    """Note on the live result why its candidate could not run (a database outage only
    logged: the live result stands)."""
    try:
        with transaction(rt.sessions) as session:
            session.execute(
                update(TriageResult)
                .where(TriageResult.id == live_result_id)
                .values(shadow_failure=reason[:2000])
            )
    except Exception:  # the failure is already logged; the live job must not fail here
        log.exception("result %d: could not record the shadow candidate's failure", live_result_id)
