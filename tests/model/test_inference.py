"""Network and classifier: one-logit ResNet50, offline ImageNet, deterministic CPU inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.io.volume import load_series
from model.serving.checkpoint import CheckpointError, save_checkpoint
from model.serving.inference import Classifier
from model.serving.network import (
    PretrainedWeightsUnavailable,
    build_resnet50,
    imagenet_weights_path,
)
from model.serving.prediction import prediction_from_probabilities
from model.serving.preprocess import PreprocessParams, build_inputs
from model.synthetic.cases import make_case

torch.set_num_threads(1)


def _meta(**changes: object) -> dict[str, object]:
    data: dict[str, object] = {
        "name": "test-resnet50",
        "version": "0.0.1",
        "device_uid": "1.2.826.0.1.3680043.8.498.5",
        "preprocessing": PreprocessParams().to_json(),
        "threshold": 0.5,
        "training": {},
        "demonstration": True,
        "intended_use": "tests",
    }
    data.update(changes)
    return data


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    network = build_resnet50("random")
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, network.state_dict(), _meta())
    return path


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return make_case(tmp_path_factory.mktemp("case"), patient_id="INF1", label="malignant", seed=9)


def test_resnet50_has_a_single_logit_head() -> None:
    network = build_resnet50("random").eval()
    assert isinstance(network.fc, torch.nn.Linear) and network.fc.out_features == 1
    with torch.inference_mode():
        assert network(torch.zeros(2, 3, 64, 64)).shape == (2, 1)


def test_imagenet_weights_missing_offline_give_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = imagenet_weights_path()
    assert expected.startswith(str(tmp_path))
    with pytest.raises(PretrainedWeightsUnavailable, match="not in the local torchvision cache"):
        build_resnet50("imagenet")


def test_imagenet_weights_are_read_from_the_local_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Put a ResNet50 state dict where torchvision's cache keeps the ImageNet file.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    donor = build_resnet50("random")
    donor.fc = torch.nn.Linear(2048, 1000)
    cached = Path(imagenet_weights_path())
    cached.parent.mkdir(parents=True)
    torch.save(donor.state_dict(), cached)
    network = build_resnet50("imagenet")
    assert torch.equal(network.state_dict()["conv1.weight"], donor.state_dict()["conv1.weight"])
    assert network.state_dict()["fc.weight"].shape == (1, 2048)


def test_prediction_is_deterministic_on_cpu(checkpoint: Path, case) -> None:  # type: ignore[no-untyped-def]
    classifier = Classifier.load(checkpoint, device="cpu")
    volume = classifier.load_volume(sorted(case.series_dir.glob("*.dcm")), case.roi)
    first = classifier.predict(volume, case.roi)
    second = classifier.predict(volume, case.roi)
    assert first == second  # bit-identical probabilities
    other = Classifier.load(checkpoint, device="cpu").predict(volume, case.roi)
    assert other == first
    assert len(first.slice_probabilities) == len(case.roi.slices_x_mm)
    assert first.x_mm == case.roi.slices_x_mm
    assert first.patient_probability == max(first.slice_probabilities)
    assert all(0.0 <= p <= 1.0 for p in first.slice_probabilities)


def test_predict_matches_the_network_run_by_hand(checkpoint: Path, case) -> None:  # type: ignore[no-untyped-def]
    classifier = Classifier.load(checkpoint, device="cpu")
    paths = sorted(case.series_dir.glob("*.dcm"))
    inputs = build_inputs(load_series(paths), case.roi)
    network = build_resnet50("random").eval()
    from model.serving.checkpoint import load_checkpoint

    network.load_state_dict(load_checkpoint(checkpoint)[0])
    with torch.inference_mode():
        expected = torch.sigmoid(network(torch.from_numpy(inputs))).reshape(-1).numpy()
    np.testing.assert_allclose(classifier.predict_inputs(inputs), expected, atol=1e-5)
    prediction = classifier.predict_files(paths, case.roi)  # decodes only what the ROI needs
    np.testing.assert_allclose(prediction.slice_probabilities, expected, atol=1e-5)


def test_batches_give_the_same_probabilities(checkpoint: Path) -> None:
    classifier = Classifier.load(checkpoint, device="cpu")
    inputs = np.random.default_rng(0).normal(size=(5, 3, 64, 64)).astype(np.float32)
    whole = classifier.predict_inputs(inputs)
    classifier.batch_size = 2
    np.testing.assert_allclose(classifier.predict_inputs(inputs), whole, atol=1e-5)
    with pytest.raises(ValueError, match="expected shape"):
        classifier.predict_inputs(inputs[:, :2])


def test_threshold_label_and_priority() -> None:
    high = prediction_from_probabilities([1.0, 4.0], [0.2, 0.5], 0.5)
    assert (high.patient_probability, high.label, high.priority) == (0.5, "malignant", "HIGH")
    low = prediction_from_probabilities([1.0, 4.0], [0.2, 0.49], 0.5)
    assert (low.label, low.priority) == ("benign", "ROUTINE")
    site = prediction_from_probabilities([1.0], [0.3], 0.25)
    assert site.priority == "HIGH" and site.threshold == 0.25


def test_classifier_exposes_model_identity_and_site_threshold(checkpoint: Path) -> None:
    classifier = Classifier.load(checkpoint, device="cpu", threshold=0.3)
    assert classifier.name == "test-resnet50"
    assert classifier.version == "0.0.1"
    assert classifier.device_uid == "1.2.826.0.1.3680043.8.498.5"
    assert classifier.threshold == 0.3
    assert classifier.preprocess == PreprocessParams()
    assert len(classifier.sha256) == 64
    assert Classifier.shared(checkpoint, device="cpu") is Classifier.shared(
        checkpoint, device="cpu"
    )


def test_weights_of_another_network_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "small.pt"
    save_checkpoint(path, torch.nn.Linear(4, 1).state_dict(), _meta())
    with pytest.raises(CheckpointError, match="do not fit ResNet50"):
        Classifier.load(path, device="cpu")
