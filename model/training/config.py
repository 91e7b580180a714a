"""The settings of a training run and the early-stopping rule.

Defaults are the paper's protocol (Li et al., Eur Radiol 2021): 20× augmentation by random
affine transforms, binary cross-entropy with L2 regularisation (Adam's coupled weight decay,
a penalty added to the gradient), Adam with learning rate 1e-4 and betas (0.5, 0.999), batch
32, up to 100 epochs, early stopping on the lowest validation loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from model.training.augment import AugmentParams


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run; written beside the outputs and into the checkpoint."""

    epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.999
    weight_decay: float = 1e-4  # L2 penalty coefficient (Adam's coupled weight decay)
    augmentation_factor: int = 20  # each training slice is seen this many times per epoch
    augment: AugmentParams = field(default_factory=AugmentParams)
    patience: int = 10  # epochs without a new lowest validation loss; 0 = run all epochs
    validation_fraction: float = 0.1  # of the training patients, carved out per label
    init: str = "imagenet"  # "imagenet" (falls back to random when not cached) or "random"
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    # after each epoch, re-estimate BatchNorm statistics on the (unaugmented) training slices
    # with the epoch's final weights ("precise BN"); not in the paper, off by default
    recalibrate_batchnorm: bool = False
    # > 0: the weights averaged over the last N epochs instead of the best epoch's
    # (stochastic weight averaging, Izmailov et al., UAI 2018), BatchNorm statistics then
    # re-estimated; needs patience 0 (every epoch run). Not in the paper, off by default
    average_last: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.augmentation_factor < 1:
            raise ValueError("epochs, batch size and augmentation factor must be at least 1")
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise ValueError("learning rate must be positive and weight decay not negative")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError("Adam betas must lie in [0, 1)")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError("validation fraction must lie in [0, 1)")
        if self.patience < 0:
            raise ValueError("patience must be 0 (off) or positive")
        if not 0 <= self.average_last <= self.epochs:
            raise ValueError(f"average_last must lie in 0..{self.epochs} (the epochs)")
        if self.average_last and self.patience:
            raise ValueError("average_last needs patience 0: every epoch is run and averaged")
        if self.init not in ("imagenet", "random"):
            raise ValueError(f"init must be 'imagenet' or 'random', not {self.init!r}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["augment"] = self.augment.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        values = dict(data)
        values["augment"] = AugmentParams.from_json(values.get("augment", {}))
        return cls(**values)


class EarlyStopping:
    """Tracks the lowest monitored loss; says when ``patience`` epochs brought no new low."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_loss = float("inf")
        self.best_epoch = 0
        self.stale_epochs = 0

    def update(self, epoch: int, loss: float) -> bool:
        """Record an epoch's loss; True when it is the new lowest (keep these weights)."""
        if loss < self.best_loss:
            self.best_loss, self.best_epoch, self.stale_epochs = loss, epoch, 0
            return True
        self.stale_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.stale_epochs >= self.patience


def with_overrides(config: TrainConfig, **changes: Any) -> TrainConfig:
    """``config`` with the given fields replaced (None values are ignored)."""
    return replace(config, **{k: v for k, v in changes.items() if v is not None})
