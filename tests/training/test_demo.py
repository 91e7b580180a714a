"""The demonstration model: trained once on synthetic phantoms, cached, keyed by its recipe."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from model.serving.checkpoint import load_checkpoint
from model.serving.inference import Classifier
from model.serving.preprocess import load_roi_volume
from model.serving.roi import Roi
from model.synthetic.cases import make_cohort
from model.synthetic.demo import (
    DEMO_RECIPE,
    DemoRecipe,
    demo_checkpoint_path,
    ensure_demo_checkpoint,
)
from model.training.metrics import auroc
from tests.answers import automatic_answer
from worker.cli import main

# The automatic path on fresh phantoms: shares of the malignant studies flagged (at least)
# and of the benign ones (at most), on the maximum over every body the localiser finds.
AUTOMATIC_MALIGNANT_FLAGGED = 0.75
AUTOMATIC_BENIGN_FLAGGED = 0.5

TINY = DemoRecipe(
    patients=4,
    train=replace(DEMO_RECIPE.train, epochs=1, augmentation_factor=1, average_last=0),
    threads=1,
)


def test_demo_checkpoint_is_cached_and_keyed_by_recipe(tmp_path: Path) -> None:
    path = ensure_demo_checkpoint(tmp_path, recipe=TINY)
    assert path == demo_checkpoint_path(tmp_path, TINY)
    _, meta = load_checkpoint(path)
    assert meta["name"] == "spine-triage-demo"
    assert meta["version"] == TINY.version
    assert meta["demonstration"] is True
    assert "not for clinical use" in meta["intended_use"].lower()
    assert "synthetic" in meta["intended_use"].lower()
    assert meta["training"]["config"] == TINY.train.to_json()
    assert meta["task"] == "automatic"  # trained with normal bodies: serves automatic jobs
    assert meta["training"]["cohort"]["normal_rois"] > 0
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [path.name]

    # second call: the cached file is used as is
    stamp = path.stat().st_mtime_ns
    started = time.perf_counter()
    assert ensure_demo_checkpoint(tmp_path, recipe=TINY) == path
    assert time.perf_counter() - started < 5.0
    assert path.stat().st_mtime_ns == stamp

    # a changed recipe is a new version: trained anew beside the old one
    changed = replace(TINY, train=replace(TINY.train, seed=1))
    assert changed.version != TINY.version
    other = ensure_demo_checkpoint(tmp_path, recipe=changed)
    assert other != path and other.is_file()
    assert load_checkpoint(other)[1]["version"] == changed.version

    # a damaged cached file is replaced, not served
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert ensure_demo_checkpoint(tmp_path, recipe=TINY) == path
    assert load_checkpoint(path)[1]["version"] == TINY.version


def test_recipe_version_is_stable() -> None:
    assert DemoRecipe().version == DEMO_RECIPE.version
    assert DEMO_RECIPE.version.startswith("demo-")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_model_separates_held_out_synthetic_patients(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real recipe, through the command line, then served on fresh phantoms."""
    started = time.perf_counter()
    assert main(["demo-model", "--cache-dir", str(tmp_path / "models"), "--no-progress"]) == 0
    seconds = time.perf_counter() - started
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path == demo_checkpoint_path(tmp_path / "models")
    assert seconds < 900, f"demonstration model took {seconds:.0f} s"

    classifier = Classifier.load(path, device="cpu")
    assert classifier.meta["demonstration"] is True
    assert classifier.meta["task"] == "automatic"
    # held-out patients: another seed than the recipe's cohort, through the serving path
    cases = make_cohort(tmp_path / "held-out", patients=16, seed=777, normals=3)
    labels, scores, normal_scores, all_rois = [], [], [], []
    for case in cases:
        files = sorted(p for p in case.series_dir.iterdir() if p.is_file())

        def score(roi: Roi, files: list[Path] = files) -> float:
            return classifier.predict(load_roi_volume(files, roi), roi).patient_probability

        labels.append(1 if case.label == "malignant" else 0)
        scores.append(score(case.roi))
        bodies = [score(body.roi) for body in case.body_rois]
        normal_scores += [
            s for s, b in zip(bodies, case.body_rois, strict=True) if b.label == "normal"
        ]
        all_rois.append(max([scores[-1], *bodies]))
    area = auroc(labels, scores)
    correct = sum((s >= 0.5) == bool(y) for s, y in zip(scores, labels, strict=True))
    print(f"demo model: trained in {seconds:.0f} s, held-out AUROC {area:.3f}, {correct}/16")
    pairs = [(y, round(s, 3)) for y, s in zip(labels, scores, strict=True)]
    print("held-out (label, probability):", pairs)
    assert area is not None and area >= 0.9
    assert correct >= 14
    # the automatic path: normal bodies stay below the threshold, so the maximum over a
    # patient's bodies does not flag every study
    specificity = sum(s < 0.5 for s in normal_scores) / len(normal_scores)
    flagged_right = sum((s >= 0.5) == bool(y) for s, y in zip(all_rois, labels, strict=True))
    print(
        f"normal bodies {len(normal_scores)}: specificity {specificity:.2f}; "
        f"max over all ROIs {flagged_right}/16 correct"
    )
    assert specificity >= 0.85
    assert flagged_right >= 12

    # what an automatic job answers: the localiser's bodies, the maximum over all of them
    flagged = {"malignant": 0, "benign": 0}
    for case in cases:
        bodies = automatic_answer(path, case)
        flagged[case.label] += bodies[0].prediction.priority == "HIGH"
    malignant = sum(case.label == "malignant" for case in cases)
    benign = len(cases) - malignant
    print(
        f"automatic: {flagged['malignant']}/{malignant} malignant and "
        f"{flagged['benign']}/{benign} benign studies flagged"
    )
    assert flagged["malignant"] >= AUTOMATIC_MALIGNANT_FLAGGED * malignant
    assert flagged["benign"] <= AUTOMATIC_BENIGN_FLAGGED * benign
