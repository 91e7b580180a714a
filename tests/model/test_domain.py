"""The out-of-domain guard with the demonstration model: held-out phantoms lie inside its
training domain, the real CT's series outside it (most of its bodies); a checkpoint whose
domain description was changed is refused; a model without one still serves, unguarded;
outside the domain nothing is flagged."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model.io.volume import load_series
from model.serving.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from model.serving.domain import DomainVerdict
from model.serving.inference import Classifier
from model.serving.prediction import (
    Prediction,
    outside_domain,
    prediction_from_probabilities,
    series_outside_domain,
)
from model.synthetic.cases import make_case
from tests.real_ct import REAL_CT_PATIENT_ID, write_real_ct_series
from worker.automatic import classify_bodies, localise_bodies, propose

HELD_OUT_SEED = 4242  # the demonstration model never trained on these phantoms


@pytest.fixture(scope="module")
def classifier(demo_checkpoint: Path) -> Classifier:
    return Classifier.load(demo_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def real_ct_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    series_dir = tmp_path_factory.mktemp("real-ct") / REAL_CT_PATIENT_ID
    write_real_ct_series(series_dir)
    return series_dir


def test_the_demonstration_model_describes_its_training_domain(classifier: Classifier) -> None:
    domain = classifier.domain
    assert domain is not None
    described = classifier.meta["domain"]
    assert "Lee" in described["reference"] and "NeurIPS 2018" in described["reference"]
    assert described["percentile"] == 99.0
    assert domain.threshold == described["threshold"] > 1.0
    assert described["summary"]["held_out_rois"] > 0


def test_held_out_phantoms_lie_inside_the_training_domain(
    classifier: Classifier, tmp_path: Path
) -> None:
    scores = []
    for index, label in enumerate(("malignant", "benign", "malignant", "benign")):
        case = make_case(
            tmp_path, patient_id=f"HELD-{index}", label=label, seed=HELD_OUT_SEED + index
        )
        prediction = classifier.predict_files(sorted(case.series_dir.rglob("*.dcm")), case.roi)
        assert prediction.domain_score is not None and prediction.in_domain is True, (
            label,
            prediction.domain_score,
            prediction.domain_threshold,
        )
        assert prediction.priority == ("HIGH" if prediction.label == "malignant" else "ROUTINE")
        scores.append(prediction.domain_score)
        assert not series_outside_domain(_body_predictions(classifier, case.series_dir))
    assert max(scores) <= classifier.meta["domain"]["threshold"]


def _body_predictions(classifier: Classifier, series_dir: Path) -> list[Prediction]:
    """What the automatic job's own steps answer on every body found in ``series_dir``
    (a body cut by the field of view left out, the series rule applied)."""
    volume = load_series(sorted(p for p in series_dir.rglob("*") if p.is_file()))
    bodies = classify_bodies(classifier, volume, propose(localise_bodies(volume), volume))
    return [body.prediction for body in bodies]


def test_the_real_ct_series_lies_outside_the_demonstration_models_domain(
    classifier: Classifier, real_ct_dir: Path
) -> None:
    predictions = _body_predictions(classifier, real_ct_dir)
    assert len(predictions) >= 4
    threshold = classifier.meta["domain"]["threshold"]
    scores = [p.domain_score for p in predictions]
    assert all(score is not None for score in scores)
    above = [score for score in scores if score is not None and score > threshold]
    assert len(above) * 2 > len(scores), (scores, threshold)  # most of its bodies
    assert series_outside_domain(predictions)
    for prediction in predictions:  # what the automatic job reports
        assert prediction.in_domain is False and prediction.priority == "ROUTINE"


def test_a_series_is_outside_the_domain_when_most_of_its_bodies_are() -> None:
    def body(score: float | None, threshold: float | None = 1.5) -> Prediction:
        verdict = None
        if score is not None and threshold is not None:
            verdict = DomainVerdict(score, threshold, score <= threshold)
        return prediction_from_probabilities([0.0], [0.9], 0.5, domain=verdict)

    assert series_outside_domain([body(1.2), body(1.6), body(1.7)])
    assert not series_outside_domain([body(1.2), body(1.3), body(1.7)])  # one body's tail
    assert not series_outside_domain([body(1.2), body(1.6)])  # the median is 1.4
    assert not series_outside_domain([body(None), body(None)])  # no guard
    assert not series_outside_domain([body(1.6), body(1.7, threshold=2.0)])  # two models
    flagged = body(1.4)
    assert flagged.priority == "HIGH"
    moved = outside_domain(flagged)
    assert moved.priority == "ROUTINE" and moved.in_domain is False
    assert moved.domain_score == flagged.domain_score == 1.4  # kept as measured
    assert moved.patient_probability == flagged.patient_probability
    assert moved.domain_basis == "series" and flagged.domain_basis == "roi"
    with pytest.raises(ValueError, match="series-level"):
        dataclasses.replace(moved, in_domain=True, priority="HIGH")


def _sealed(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` as a checkpoint whose sha256 matches: only the meta check can refuse."""
    buffer = io.BytesIO()
    torch.save(content, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    path.write_bytes(f"spine-triage-checkpoint v1 sha256:{digest}\n".encode() + payload)


def _content(checkpoint: Path) -> dict[str, Any]:
    payload = checkpoint.read_bytes().split(b"\n", 1)[1]
    content: dict[str, Any] = torch.load(io.BytesIO(payload), weights_only=True)
    return content


def test_a_perturbed_domain_description_is_refused(demo_checkpoint: Path, tmp_path: Path) -> None:
    original = _content(demo_checkpoint)
    path = tmp_path / "perturbed.pt"

    def refused(content: dict[str, Any]) -> str:
        _sealed(path, content)
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(path)
        with pytest.raises(CheckpointError):
            Classifier.load(path, device="cpu")
        return str(caught.value)

    def with_meta(change: Any) -> dict[str, Any]:
        meta = json.loads(json.dumps(original["meta"]))
        change(meta["domain"])
        return {**original, "meta": meta}

    # the description no longer matches the arrays it was written for
    assert "out-of-domain guard" in refused(with_meta(lambda d: d.update(arrays_sha256="0" * 64)))
    assert "out-of-domain guard" in refused(
        with_meta(lambda d: d["layers"][0].update(features=d["layers"][0]["features"] + 1))
    )
    assert "out-of-domain guard" in refused(with_meta(lambda d: d.update(threshold=-1.0)))
    assert "out-of-domain guard" in refused(with_meta(lambda d: d.update(method="energy")))
    assert "out-of-domain guard" in refused(with_meta(lambda d: d.pop("layers")))
    # arrays changed, missing, or without a description
    arrays = dict(original["domain"])
    name = sorted(arrays)[0]
    arrays[name] = arrays[name] * 1.01
    assert "sha256" in refused({**original, "domain": arrays})
    assert "out-of-domain guard" in refused({k: v for k, v in original.items() if k != "domain"})
    meta = {k: v for k, v in original["meta"].items() if k != "domain"}
    assert "without a meta.domain" in refused({**original, "meta": meta})
    # and a description that does not fit its arrays is never written in the first place
    bad = json.loads(json.dumps(original["meta"]))
    bad["domain"]["arrays_sha256"] = "0" * 64
    with pytest.raises(CheckpointError, match="out-of-domain guard"):
        save_checkpoint(
            tmp_path / "never.pt",
            original["state_dict"],
            bad,
            domain_arrays={k: v.numpy() for k, v in original["domain"].items()},
        )
    assert not (tmp_path / "never.pt").exists()


def test_a_model_without_a_domain_description_serves_unguarded(
    demo_checkpoint: Path, tmp_path: Path
) -> None:
    loaded = read_checkpoint(demo_checkpoint)
    meta = {k: v for k, v in loaded.meta.items() if k not in ("domain", "sha256")}
    older = tmp_path / "older.pt"
    save_checkpoint(older, loaded.state_dict, meta)
    assert read_checkpoint(older).domain is None
    unguarded = Classifier.load(older, device="cpu")
    inputs = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    scores = unguarded.score_inputs(inputs)
    assert scores.domain_scores is None
    prediction = unguarded.prediction((-3.0, 0.0, 3.0), scores.probabilities.tolist(), None)
    assert (prediction.domain_score, prediction.domain_threshold, prediction.in_domain) == (
        None,
        None,
        None,
    )
    guarded = Classifier.load(demo_checkpoint, device="cpu").score_inputs(inputs)
    np.testing.assert_array_equal(guarded.probabilities, scores.probabilities)  # one pass, same


def test_outside_the_domain_nothing_is_flagged() -> None:
    outside = DomainVerdict(score=4.0, threshold=2.0, in_domain=False)
    prediction = prediction_from_probabilities([0.0, 3.0], [0.97, 0.99], 0.5, domain=outside)
    assert prediction.label == "malignant" and prediction.priority == "ROUTINE"
    assert prediction.outside_domain and prediction.domain_score == 4.0
    inside = DomainVerdict(score=1.0, threshold=2.0, in_domain=True)
    assert prediction_from_probabilities([0.0], [0.99], 0.5, domain=inside).priority == "HIGH"
    common: dict[str, Any] = {
        "x_mm": (0.0,),
        "slice_probabilities": (0.99,),
        "patient_probability": 0.99,
        "label": "malignant",
        "threshold": 0.5,
    }
    with pytest.raises(ValueError, match="priority"):
        Prediction(
            **common, priority="HIGH", domain_score=4.0, domain_threshold=2.0, in_domain=False
        )
    with pytest.raises(ValueError, match="verdict"):
        Prediction(
            **common, priority="HIGH", domain_score=4.0, domain_threshold=2.0, in_domain=True
        )
    with pytest.raises(ValueError, match="together"):
        Prediction(**common, priority="HIGH", domain_score=4.0)
