"""``spine-triage models``: the configured checkpoints, and shadow mode's live-vs-candidate
comparison.

``models show`` names each configured checkpoint (live, and the shadow candidate) by name,
version and sha256 and says whether it matches its pin. ``models compare`` pairs, job by
job, the live result with the candidate's result on the same job (shadow mode,
:mod:`worker.shadow`), and reports per study (the patient): both probabilities (the maximum
over the study's jobs, as the paper takes the patient's), whether the flags agree, the flags
that would change on promotion, and each model's AUROC where labels are given. Studies are
named by their Study Instance UID, never by patient name or ID.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.archive.schema import RoiAnnotation, TriageResult
from dicom_node.settings import load_settings
from model.serving.checkpoint import CheckpointError
from model.training.metrics import auroc
from worker.commands import COMMANDS, database_session
from worker.runtime import CheckpointRefused, check_pin, identify_checkpoint

POSITIVE = {"malignant", "1", "true", "yes", "positive"}
NEGATIVE = {"benign", "normal", "0", "false", "no", "negative"}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "models",
        help=COMMANDS["models"].help,
        description=(
            "The models a site serves. Each configured checkpoint is identified by name, "
            "version and sha256 (pin it with SPINE_TRIAGE_MODEL_CHECKPOINT_SHA256). Shadow "
            "mode (SPINE_TRIAGE_CANDIDATE_CHECKPOINT) runs a candidate beside the live model "
            "on every job and records its results without delivering or flagging anything; "
            "`models compare` reports how the two agree. Promotion is a setting change: make "
            "the candidate SPINE_TRIAGE_MODEL_CHECKPOINT (and its sha256 the pin)."
        ),
    )
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="the configured checkpoints: name, version, sha256, pin")
    show.set_defaults(handler=_show)
    compare = sub.add_parser(
        "compare", help="shadow mode: live vs candidate, per study, flag changes, AUROC"
    )
    compare.add_argument(
        "--candidate", metavar="VERSION", help="the candidate's version (default: the newest)"
    )
    compare.add_argument(
        "--since", type=date.fromisoformat, metavar="YYYY-MM-DD", help="results from this day"
    )
    compare.add_argument(
        "--labels",
        type=Path,
        metavar="CSV",
        help="labels per study: columns study_instance_uid and label (malignant, or "
        "benign / normal; 1 / 0); each model's AUROC over the labelled studies",
    )
    compare.add_argument("--json", action="store_true", help="machine-readable output")
    compare.set_defaults(handler=_compare)


# --- show ----------------------------------------------------------------------------------


def _show(args: argparse.Namespace) -> int:
    settings = load_settings()
    status = 0
    for role in ("live", "shadow"):
        try:
            identity = identify_checkpoint(settings, role)
        except (CheckpointError, OSError) as exc:
            print(f"{role}: cannot read the checkpoint: {exc}")
            status = 1
            continue
        if identity is None:
            print(f"{role}: none configured")
            continue
        try:
            check_pin(role, identity.path, identity.sha256, identity.pinned_sha256)
            pin = "matches its pin" if identity.pinned_sha256 else "not pinned"
        except CheckpointRefused as exc:
            pin, status = f"REFUSED: {exc}", 1
        demo = " (demonstration)" if identity.demonstration else ""
        print(f"{role}: {identity.name} {identity.version}{demo}")
        print(f"  path    {identity.path}")
        print(f"  sha256  {identity.sha256}  ({pin})")
    return status


# --- compare -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyComparison:
    """One study's live and candidate answers (maxima over its jobs with both)."""

    study_instance_uid: str
    jobs: int
    live_probability: float
    live_priority: str
    candidate_probability: float
    candidate_priority: str
    label: int | None

    @property
    def agree(self) -> bool:
        return self.live_priority == self.candidate_priority


@dataclass(frozen=True)
class Comparison:
    live_models: list[str]
    candidate: str | None
    jobs: int
    studies: list[StudyComparison]
    candidate_failures: list[str]
    auroc_live: float | None
    auroc_candidate: float | None
    labelled_studies: int

    @property
    def agreement(self) -> float | None:
        if not self.studies:
            return None
        return sum(s.agree for s in self.studies) / len(self.studies)

    @property
    def newly_flagged(self) -> list[str]:
        return [
            s.study_instance_uid
            for s in self.studies
            if s.live_priority != "HIGH" and s.candidate_priority == "HIGH"
        ]

    @property
    def no_longer_flagged(self) -> list[str]:
        return [
            s.study_instance_uid
            for s in self.studies
            if s.live_priority == "HIGH" and s.candidate_priority != "HIGH"
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "live": self.live_models,
            "candidate": self.candidate,
            "jobs": self.jobs,
            "studies": [{**asdict(s), "agree": s.agree} for s in self.studies],
            "agreement": self.agreement,
            "flag_changes": {
                "newly_flagged": self.newly_flagged,
                "no_longer_flagged": self.no_longer_flagged,
            },
            "candidate_failures": self.candidate_failures,
            "auroc": {
                "live": self.auroc_live,
                "candidate": self.auroc_candidate,
                "labelled_studies": self.labelled_studies,
            },
        }


def read_labels(path: Path) -> dict[str, int]:
    """Study Instance UID → 1 (malignant) / 0 (benign or normal); ValueError for a bad row."""
    labels: dict[str, int] = {}
    with path.open(newline="") as stream:
        reader = csv.DictReader(stream)
        missing = {"study_instance_uid", "label"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        for number, row in enumerate(reader, start=2):
            value = (row["label"] or "").strip().lower()
            if value not in POSITIVE | NEGATIVE:
                raise ValueError(f"{path}, line {number}: unknown label {row['label']!r}")
            labels[(row["study_instance_uid"] or "").strip()] = int(value in POSITIVE)
    return labels


def compare_models(
    session: Session,
    *,
    candidate: str | None = None,
    since: date | None = None,
    labels: dict[str, int] | None = None,
) -> Comparison:
    """Pair each job's newest live result with the candidate's result on the same job."""
    query = select(TriageResult, RoiAnnotation.study_instance_uid).join(
        RoiAnnotation, TriageResult.annotation_id == RoiAnnotation.id
    )
    if since is not None:
        query = query.where(TriageResult.created_at >= datetime.combine(since, time(), UTC))
    rows = session.execute(query.order_by(TriageResult.id)).all()
    shadows = [(r, uid) for r, uid in rows if r.role == "shadow"]
    if candidate is None and shadows:
        candidate = shadows[-1][0].model_version
    live: dict[tuple[str, int], tuple[TriageResult, str]] = {}
    for result, uid in rows:
        if result.role == "live":
            live[_job_key(result)] = (result, uid)  # ordered by id: the newest wins
    pairs = [
        (live[_job_key(shadow)], shadow)
        for shadow, _ in shadows
        if shadow.model_version == candidate and _job_key(shadow) in live
    ]
    by_study: dict[str, list[tuple[TriageResult, TriageResult]]] = {}
    for (live_result, uid), shadow in pairs:
        by_study.setdefault(uid, []).append((live_result, shadow))
    labels = labels or {}
    studies = [
        StudyComparison(
            study_instance_uid=uid,
            jobs=len(jobs),
            live_probability=max(a.patient_probability for a, _ in jobs),
            live_priority=_flag(a.priority for a, _ in jobs),
            candidate_probability=max(b.patient_probability for _, b in jobs),
            candidate_priority=_flag(b.priority for _, b in jobs),
            label=labels.get(uid),
        )
        for uid, jobs in sorted(by_study.items())
    ]
    labelled = [s for s in studies if s.label is not None]
    truth = [int(s.label) for s in labelled if s.label is not None]
    return Comparison(
        live_models=sorted({f"{a.model_name} {a.model_version}" for (a, _), _ in pairs}),
        candidate=candidate,
        jobs=len(pairs),
        studies=studies,
        candidate_failures=sorted(
            {r.shadow_failure for r, _ in live.values() if r.shadow_failure is not None}
        ),
        auroc_live=auroc(truth, [s.live_probability for s in labelled]) if labelled else None,
        auroc_candidate=(
            auroc(truth, [s.candidate_probability for s in labelled]) if labelled else None
        ),
        labelled_studies=len(labelled),
    )


def _job_key(result: TriageResult) -> tuple[str, int]:
    if result.auto_job_id is not None:
        return ("automatic", result.auto_job_id)
    return ("reader", result.annotation_id)


def _flag(priorities: Any) -> str:
    return "HIGH" if "HIGH" in set(priorities) else "ROUTINE"


def _compare(args: argparse.Namespace) -> int:
    try:
        labels = read_labels(args.labels) if args.labels else None
    except (OSError, ValueError) as exc:
        print(f"models compare: {exc}")
        return 2
    with database_session() as session:
        comparison = compare_models(
            session, candidate=args.candidate, since=args.since, labels=labels
        )
    if args.json:
        print(json.dumps(comparison.to_json(), indent=2))
    else:
        print_comparison(comparison)
    return 0


def print_comparison(comparison: Comparison) -> None:
    if comparison.candidate is None:
        print("no shadow results: name a candidate with SPINE_TRIAGE_CANDIDATE_CHECKPOINT")
        return
    print(
        f"live {', '.join(comparison.live_models) or '—'} vs candidate {comparison.candidate}: "
        f"{comparison.jobs} job(s) on {len(comparison.studies)} study(ies)"
    )
    if comparison.studies:
        agree = sum(s.agree for s in comparison.studies)
        print(
            f"flags agree on {agree}/{len(comparison.studies)} studies "
            f"({100 * (comparison.agreement or 0):.1f}%)"
        )
    print(_changes("newly flagged (ROUTINE → HIGH)", comparison.newly_flagged))
    print(_changes("no longer flagged (HIGH → ROUTINE)", comparison.no_longer_flagged))
    if comparison.labelled_studies:
        print(
            f"AUROC over {comparison.labelled_studies} labelled study(ies): "
            f"live {_number(comparison.auroc_live)}, "
            f"candidate {_number(comparison.auroc_candidate)}"
        )
    for failure in comparison.candidate_failures:
        print(f"candidate failed: {failure}")
    if comparison.studies:
        print()
        print(f"{'STUDY':<64} {'LIVE':>6} {'FLAG':<7} {'CAND.':>6} {'FLAG':<7} LABEL")
        for s in comparison.studies:
            label = {None: "", 1: "malignant", 0: "benign"}[s.label]
            print(
                f"{s.study_instance_uid:<64} {s.live_probability:>6.3f} {s.live_priority:<7} "
                f"{s.candidate_probability:>6.3f} {s.candidate_priority:<7} {label}"
            )


def _changes(what: str, uids: Sequence[str]) -> str:
    return f"{what}: {len(uids)}" + "".join(f"\n  {uid}" for uid in uids)


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"
