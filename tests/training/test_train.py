"""The training loop: early stopping keeps the best epoch, seeds reproduce, init is honest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from model.training.augment import AugmentParams
from model.training.cohort import RoiInputs
from model.training.train import (
    EarlyStopping,
    TrainConfig,
    build_model,
    evaluate,
    fit,
    load_data,
    recalibrate_batchnorm,
)

NO_AUGMENT = AugmentParams(
    max_translation_fraction=0.0, min_scale=1.0, max_scale=1.0, max_rotation_degrees=0.0
)


def _quick(**changes: Any) -> TrainConfig:
    """A few fast epochs on the code-made inputs: no augmentation, random weights."""
    settings: dict[str, Any] = {
        "learning_rate": 3e-3,
        "augmentation_factor": 1,
        "augment": NO_AUGMENT,
        "init": "random",
        "batch_size": 8,
    }
    return TrainConfig(**{**settings, **changes})


def _patients(count: int, seed: int) -> list[RoiInputs]:
    """Inputs made by code: malignant ones carry a dark blob, benign ones a bright bar."""
    rng = np.random.default_rng(seed)
    patients = []
    for i in range(count):
        label = i % 2
        inputs = rng.normal(size=(2, 3, 64, 64)).astype(np.float32)
        if label:
            inputs[:, :, 20:40, 20:40] -= 2.0
        else:
            inputs[:, :, 30:33, 8:56] += 3.0
        patients.append(RoiInputs(f"P{i}", label, inputs, (-1.5, 1.5)))
    return patients


def test_early_stopping_tracks_the_lowest_loss() -> None:
    stopping = EarlyStopping(patience=2)
    decisions = [stopping.update(e, loss) for e, loss in enumerate([0.9, 0.7, 0.8, 0.6], 1)]
    assert decisions == [True, True, False, True]
    assert (stopping.best_epoch, stopping.best_loss) == (4, 0.6)
    assert not stopping.should_stop
    stopping.update(5, 0.65)
    assert not stopping.should_stop
    stopping.update(6, 0.6)  # equal is not lower
    assert stopping.should_stop
    never = EarlyStopping(patience=0)
    for epoch in range(1, 20):
        never.update(epoch, 1.0)
    assert not never.should_stop and never.best_epoch == 1


def test_fit_returns_the_weights_of_the_best_validation_epoch() -> None:
    patients = _patients(10, seed=0)
    config = _quick(epochs=4, patience=2)
    result = fit(patients[:8], patients[8:], config)
    losses = [r.validation_loss for r in result.history if r.validation_loss is not None]
    assert len(losses) == len(result.history)
    assert result.best_epoch == int(np.argmin(losses)) + 1
    assert result.best_validation_loss == pytest.approx(min(losses))
    if result.stopped_early:
        assert len(result.history) == result.best_epoch + config.patience
    else:
        assert len(result.history) == config.epochs
    # the returned model is that epoch's model: its validation loss is the recorded one
    again = evaluate(
        result.model,
        nn.BCEWithLogitsLoss(),
        load_data(patients[8:], torch.device("cpu")),
        device=torch.device("cpu"),
    )
    assert again.loss == pytest.approx(result.best_validation_loss, rel=1e-5)
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(tensor, result.state_dict[name]), name


def test_weight_averaging_returns_the_mean_of_the_last_epochs() -> None:
    """``average_last=2``: each parameter is the mean of the last two epochs' (the same seed
    retraced to epoch 2 and to epoch 3), BatchNorm statistics re-estimated, and the reported
    validation loss is the averaged model's."""
    patients = _patients(8, seed=2)

    def run(epochs: int, average_last: int) -> Any:
        config = _quick(epochs=epochs, patience=0, average_last=average_last)
        return fit(patients[:6], patients[6:], config)

    second, third, averaged = run(2, 1), run(3, 1), run(3, 2)
    parameters = dict(averaged.model.named_parameters())
    assert parameters
    for name, value in parameters.items():
        mean = (second.state_dict[name] + third.state_dict[name]) / 2
        assert torch.allclose(value.detach(), mean, atol=1e-6), name
    assert averaged.summary()["averaged_epochs"] == 2 and averaged.best_epoch == 3
    again = evaluate(
        averaged.model,
        nn.BCEWithLogitsLoss(),
        load_data(patients[6:], torch.device("cpu")),
        device=torch.device("cpu"),
    )
    assert again.loss == pytest.approx(averaged.best_validation_loss, rel=1e-5)
    with pytest.raises(ValueError, match="patience"):
        TrainConfig(epochs=3, patience=2, average_last=2)
    with pytest.raises(ValueError, match="average_last"):
        TrainConfig(epochs=3, patience=0, average_last=4)


def test_same_seed_same_model_on_cpu() -> None:
    patients = _patients(6, seed=1)
    config = TrainConfig(epochs=1, augmentation_factor=2, init="random", batch_size=8)
    first = fit(patients[:5], patients[5:], config)
    second = fit(patients[:5], patients[5:], config)
    other = fit(patients[:5], patients[5:], TrainConfig(**{**config.__dict__, "seed": 1}))
    assert all(torch.equal(first.state_dict[k], second.state_dict[k]) for k in first.state_dict)
    assert not torch.equal(first.state_dict["fc.weight"], other.state_dict["fc.weight"])
    assert first.history[0].train_loss == second.history[0].train_loss


def test_batchnorm_recalibration_replaces_stale_statistics_only() -> None:
    model, _, _ = build_model("random")
    data = load_data(_patients(4, seed=2), torch.device("cpu"))
    bn = model.bn1
    bn.running_mean.fill_(100.0)  # stale statistics from "earlier weights"
    weights = {k: v.clone() for k, v in model.named_parameters()}
    recalibrate_batchnorm(model, data, device=torch.device("cpu"), batch_size=3)
    first = bn.running_mean.clone()
    assert float(first.abs().max()) < 50.0
    recalibrate_batchnorm(model, data, device=torch.device("cpu"), batch_size=3)
    assert torch.allclose(bn.running_mean, first, atol=1e-5)  # no memory of what came before
    assert bn.momentum == 0.1
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())


def test_imagenet_init_falls_back_to_random_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    _, used, sentence = build_model("imagenet")
    assert used == "random"
    assert sentence.startswith("random") and "not available offline" in sentence


def test_imagenet_init_uses_the_local_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.models import resnet50

    from model.serving.network import imagenet_weights_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(123)
    cached = resnet50(weights=None).state_dict()  # stands in for the downloaded file
    path = Path(imagenet_weights_path())
    path.parent.mkdir(parents=True)
    torch.save(cached, path)
    model, used, sentence = build_model("imagenet")
    assert used == "imagenet" and "ImageNet" in sentence
    assert torch.equal(model.state_dict()["conv1.weight"], cached["conv1.weight"])
    assert model.state_dict()["fc.weight"].shape == (1, 2048)


def test_config_round_trips_and_refuses_nonsense() -> None:
    config = TrainConfig(epochs=3, augment=AugmentParams(max_rotation_degrees=5.0))
    assert TrainConfig.from_json(config.to_json()) == config
    defaults = TrainConfig()
    assert (defaults.learning_rate, defaults.beta1, defaults.beta2) == (1e-4, 0.5, 0.999)
    assert (defaults.batch_size, defaults.epochs, defaults.augmentation_factor) == (32, 100, 20)
    with pytest.raises(ValueError):
        TrainConfig(init="pretrained")
    with pytest.raises(ValueError):
        TrainConfig(epochs=0)
