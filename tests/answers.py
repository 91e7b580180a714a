"""What the model answers on a synthetic case, offline, through the worker's own steps; and
held-out cases it gets right, for the end-to-end tests.

A demonstration model trained on a CPU is not the same network on every machine (floating
point differs between CPU kernels, and ten epochs amplify it), so a test of the pipeline must
not depend on one model's call on one phantom. The pipeline tests compare what the node
records with what the model answers here, offline, on the same series, and take as their
flagged (or routine) study a held-out phantom the model calls right. Whether the model calls
enough phantoms right is the demonstration model's own test (``tests/training/test_demo.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Literal

import pydicom
import pytest

from model.io.volume import read_series_geometry
from model.serving.inference import Classifier
from model.serving.prediction import Prediction
from model.serving.preprocess import load_roi_volume
from model.synthetic.cases import SynthCase, make_case
from tests.system import case_files
from worker.automatic import (
    Body,
    classify_bodies,
    load_bodies,
    load_overview,
    localise_bodies,
    propose,
)
from worker.series import Series

# Held-out seeds: the demonstration model never trained on these phantoms.
HELD_OUT_SEEDS = tuple(range(4242, 4262))

Mode = Literal["reader", "automatic"]


@cache
def classifier(checkpoint: Path) -> Classifier:
    return Classifier.load(checkpoint, device="cpu")


def reader_answer(checkpoint: Path, case: SynthCase) -> Prediction:
    """The model's answer on the case's reader ROI."""
    return classifier(checkpoint).predict(load_roi_volume(case_files(case), case.roi), case.roi)


def automatic_answer(checkpoint: Path, case: SynthCase) -> list[Body]:
    """What an automatic job answers on the case: every proposed body, most suspicious first."""
    files = case_files(case)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    series = Series(
        case.roi.study_instance_uid,
        case.roi.series_instance_uid,
        tuple(files),
        tuple(headers),
        read_series_geometry(files, headers),
    )
    overview = load_overview(series)
    proposals = propose(localise_bodies(overview), overview)
    model = classifier(checkpoint)
    return classify_bodies(model, load_bodies(model, series, overview, proposals), proposals)


def priority(checkpoint: Path, case: SynthCase, mode: Mode) -> str:
    if mode == "reader":
        return reader_answer(checkpoint, case).priority
    return automatic_answer(checkpoint, case)[0].prediction.priority


def case_called_right(
    folder: Path,
    checkpoint: Path,
    *,
    patient_id: str,
    label: Literal["malignant", "benign"],
    mode: Mode,
    seeds: Iterable[int] = HELD_OUT_SEEDS,
) -> SynthCase:
    """The first held-out phantom of ``label`` the model calls right (HIGH when malignant,
    ROUTINE when benign) from the reader's ROI or automatically; the test fails when the
    model calls none of them right."""
    wanted = "HIGH" if label == "malignant" else "ROUTINE"
    tried = []
    for seed in seeds:
        case = make_case(folder / f"seed-{seed}", patient_id=patient_id, label=label, seed=seed)
        if priority(checkpoint, case, mode) == wanted:
            return case
        tried.append(seed)
    pytest.fail(
        f"the demonstration model calls no held-out {label} phantom {wanted} ({mode} mode; "
        f"seeds {tried[0]}..{tried[-1]}): the model, not the pipeline, is at fault"
    )
