"""Training by the paper's protocol, laid out like torchvision's reference trainer.

``load_data`` stacks the precomputed inputs of every ROI into one slice set; ``train_one_epoch``
runs one pass over the training slices repeated ``augmentation_factor`` times, each repeat
with a fresh random affine; ``evaluate`` gives the loss and probabilities under
``torch.inference_mode()``; ``fit`` repeats them with early stopping on the lowest validation
loss; ``main`` trains on a cohort and writes the checkpoint and its configuration.

Defaults are the paper's: 20× augmentation (translation, scaling, rotation), binary cross
entropy on the logit, L2 regularisation (Adam's weight decay, i.e. a penalty added to the
gradient), Adam with learning rate 1e-4 and betas (0.5, 0.999), batch 32, up to 100 epochs.
CUDA with bf16 autocast when present, the CPU (float32) otherwise.

The checkpoint's task (:mod:`model.serving.checkpoint`) follows from the cohort: ``automatic``
when it holds ROIs on normal vertebral bodies (the model then learns malignant vs benign or
normal), ``reader-roi`` otherwise. Splits are by patient, so all ROIs of a patient are on one
side.

At the end ``main`` describes the training domain for the out-of-domain guard
(:mod:`model.serving.domain`): Gaussians over the training slices' features, the threshold
from the in-domain ROIs (validation patients and training ROIs), stored in the checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from model.serving.checkpoint import TASK_AUTOMATIC, TASK_READER_ROI, save_checkpoint
from model.serving.domain import FEATURE_LAYERS, DomainModel, fit_domain
from model.serving.network import (
    PretrainedWeightsUnavailable,
    build_resnet50,
    features_and_logits,
)
from model.training.augment import augment_batch
from model.training.cohort import RoiInputs, has_normals, patient_labels, rois_by_patient
from model.training.config import EarlyStopping, TrainConfig, with_overrides  # noqa: F401
from model.training.folds import carve_validation
from model.training.metrics import auroc, confusion_matrix

logger = logging.getLogger(__name__)


INTENDED_USE = (
    "Computer-aided triage: raises the reading priority of spine CT studies with a likely "
    "malignant vertebral fracture. Never a diagnosis; every result is reviewed by a radiologist."
)


@dataclass(frozen=True, eq=False)
class SliceSet:
    """All slices of some patients: inputs (N, 3, H, W), labels (N,), their patients."""

    inputs: torch.Tensor
    labels: torch.Tensor
    patient_ids: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    validation_loss: float | None
    seconds: float


@dataclass(frozen=True)
class EvaluationPass:
    loss: float | None  # None for an empty set
    probabilities: np.ndarray


@dataclass(frozen=True, eq=False)
class FitResult:
    model: nn.Module  # with the weights of the best epoch, in eval mode
    state_dict: dict[str, torch.Tensor]  # the same weights, on the CPU
    history: tuple[EpochRecord, ...]
    best_epoch: int
    best_validation_loss: float | None
    stopped_early: bool
    init_used: str  # "imagenet" or "random"
    initialisation: str  # one plain sentence for reports
    device: str
    seconds: float
    averaged_epochs: int = 0  # > 0: the weights are the average of the last N epochs'

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    def summary(self) -> dict[str, Any]:
        return {
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "best_validation_loss": self.best_validation_loss,
            "averaged_epochs": self.averaged_epochs,
            "stopped_early": self.stopped_early,
            "init_used": self.init_used,
            "initialisation": self.initialisation,
            "device": self.device,
            "seconds": round(self.seconds, 1),
            "history": [asdict(record) for record in self.history],
        }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(init: str) -> tuple[nn.Module, str, str]:
    """ResNet50 with a one-logit head; returns (model, init used, a sentence saying which)."""
    if init == "imagenet":
        try:
            return (
                build_resnet50("imagenet"),
                "imagenet",
                "ImageNet weights (torchvision ResNet50, from the local cache).",
            )
        except PretrainedWeightsUnavailable as exc:
            logger.warning("ImageNet weights unavailable, training from random init: %s", exc)
            return (
                build_resnet50("random"),
                "random",
                "random — ImageNet initialisation was requested, but the weights are not "
                f"available offline ({exc}).",
            )
    return build_resnet50("random"), "random", "random (as requested)."


def load_data(patients: Sequence[RoiInputs], device: torch.device) -> SliceSet:
    """Stack the ROIs' slices into one set, on ``device``."""
    if not patients:
        return SliceSet(torch.zeros(0, 3, 1, 1, device=device), torch.zeros(0), ())
    inputs = torch.from_numpy(np.concatenate([p.inputs for p in patients]).astype(np.float32))
    labels = torch.tensor([float(p.label) for p in patients for _ in p.x_mm])
    patient_ids = tuple(p.patient_id for p in patients for _ in p.x_mm)
    return SliceSet(inputs.to(device), labels.to(device), patient_ids)


def _forward(model: nn.Module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    batch = batch.contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(batch).float().reshape(-1)
    return model(batch).reshape(-1)


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: SliceSet,
    config: TrainConfig,
    *,
    generator: torch.Generator,
    device: torch.device,
) -> float:
    """One epoch: every training slice ``augmentation_factor`` times, shuffled; mean loss."""
    model.train()
    repeated = torch.arange(len(data)).repeat(config.augmentation_factor)
    order = repeated[torch.randperm(repeated.numel(), generator=generator)]
    total, count = 0.0, 0
    for start in range(0, order.numel(), config.batch_size):
        index = order[start : start + config.batch_size].to(data.inputs.device)
        batch = augment_batch(data.inputs[index], config.augment, generator=generator)
        targets = data.labels[index]
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(_forward(model, batch, device), targets)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * index.numel()
        count += index.numel()
    return total / max(count, 1)


def recalibrate_batchnorm(
    model: nn.Module, data: SliceSet, *, device: torch.device, batch_size: int = 64
) -> None:
    """Replace BatchNorm running statistics by their average over ``data`` (weights unchanged).

    After a short, fast-moving training the exponential running averages lag behind the
    weights; evaluation then sees statistics of earlier weights.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers or len(data) == 0:
        return
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            _forward(model, data.inputs[start : start + batch_size], device)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum


def evaluate(
    model: nn.Module,
    criterion: nn.Module,
    data: SliceSet,
    *,
    device: torch.device,
    batch_size: int = 64,
) -> EvaluationPass:
    """Mean loss and slice probabilities, without augmentation, in eval mode."""
    model.eval()
    if len(data) == 0:
        return EvaluationPass(loss=None, probabilities=np.zeros(0))
    logits: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            logits.append(_forward(model, data.inputs[start : start + batch_size], device))
        all_logits = torch.cat(logits).float()
        loss = float(criterion(all_logits, data.labels.float()))
        probabilities = torch.sigmoid(all_logits).cpu().numpy().astype(np.float64)
    return EvaluationPass(loss=loss, probabilities=probabilities)


def fit(
    train_patients: Sequence[RoiInputs],
    validation_patients: Sequence[RoiInputs],
    config: TrainConfig,
    *,
    progress: bool = False,
    description: str = "training",
    keep_progress_bar: bool = True,
) -> FitResult:
    """Train from scratch; keep the weights of the epoch with the lowest validation loss, or
    with ``config.average_last`` the average of the last epochs' weights (BatchNorm statistics
    re-estimated on the training slices; its validation loss is the one reported).

    Without validation patients the training loss is monitored instead (said in the summary).
    """
    if not train_patients:
        raise ValueError("no training patients")
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = resolve_device(config.device)
    model, init_used, initialisation = build_model(config.init)
    model = model.to(device).to(memory_format=torch.channels_last)
    criterion = nn.BCEWithLogitsLoss()
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=config.learning_rate,
        betas=(config.beta1, config.beta2),
        weight_decay=config.weight_decay,
    )
    train_set = load_data(train_patients, device)
    validation_set = load_data(validation_patients, device)
    history: list[EpochRecord] = []
    stopping = EarlyStopping(config.patience)
    best_state: dict[str, torch.Tensor] = {}
    averaged = AveragedModel(model) if config.average_last else None
    epochs = tqdm(range(1, config.epochs + 1), desc=description, unit="epoch", disable=not progress)
    for epoch in epochs:
        epoch_start = time.perf_counter()
        train_loss = train_one_epoch(
            model, criterion, optimizer, train_set, config, generator=generator, device=device
        )
        if config.recalibrate_batchnorm:
            recalibrate_batchnorm(model, train_set, device=device)
        validation_loss = evaluate(model, criterion, validation_set, device=device).loss
        history.append(
            EpochRecord(epoch, train_loss, validation_loss, time.perf_counter() - epoch_start)
        )
        monitored = train_loss if validation_loss is None else validation_loss
        if not np.isfinite(monitored):
            raise FloatingPointError(
                f"{description}: loss is {monitored} at epoch {epoch}; training diverged "
                "(try a lower learning rate)"
            )
        epochs.set_postfix(train=f"{train_loss:.4f}", val=f"{validation_loss or 0.0:.4f}")
        elapsed = time.perf_counter() - started
        logger.info(
            "%s: epoch %d/%d, train loss %.4f, validation loss %s, %.0f s so far, "
            "at most %.0f s left",
            description,
            epoch,
            config.epochs,
            train_loss,
            "-" if validation_loss is None else f"{validation_loss:.4f}",
            elapsed,
            elapsed / epoch * (config.epochs - epoch),
        )
        improved = stopping.update(epoch, monitored)
        if averaged is not None:  # every epoch runs; the last ones are averaged
            if epoch > config.epochs - config.average_last:
                averaged.update_parameters(model)
        elif improved:
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        elif stopping.should_stop:
            break
    best_epoch, best_loss = stopping.best_epoch, stopping.best_loss
    if averaged is None:
        model.load_state_dict(best_state)
    else:
        model = averaged.module
        recalibrate_batchnorm(model, train_set, device=device)
        validation_loss = evaluate(model, criterion, validation_set, device=device).loss
        best_epoch = len(history)
        best_loss = train_loss if validation_loss is None else validation_loss
        best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        logger.info(
            "%s: weights averaged over epochs %d-%d, %s loss %.4f",
            description,
            len(history) - config.average_last + 1,
            len(history),
            "training" if validation_loss is None else "validation",
            best_loss,
        )
    model.eval()
    seconds = time.perf_counter() - started
    logger.info(
        "%s: %d epoch(s) in %.0f s, best epoch %d (%s loss %.4f), init %s, device %s",
        description,
        len(history),
        seconds,
        best_epoch,
        "training" if not validation_patients else "validation",
        best_loss,
        init_used,
        device,
    )
    return FitResult(
        model=model,
        state_dict={k: v.contiguous() for k, v in best_state.items()},
        history=tuple(history),
        best_epoch=best_epoch,
        best_validation_loss=best_loss if validation_patients else None,
        stopped_early=len(history) < config.epochs,
        init_used=init_used,
        initialisation=initialisation,
        device=str(device),
        seconds=seconds,
        averaged_epochs=config.average_last,
    )


def predict_rois(
    model: nn.Module, patients: Sequence[RoiInputs], *, device: torch.device | str
) -> list[np.ndarray]:
    """Slice probabilities of each ROI, in the order given."""
    device = torch.device(device)
    data = load_data(patients, device)
    probabilities = evaluate(model, nn.BCEWithLogitsLoss(), data, device=device).probabilities
    result: list[np.ndarray] = []
    start = 0
    for patient in patients:
        result.append(probabilities[start : start + len(patient.x_mm)])
        start += len(patient.x_mm)
    return result


def roi_features(
    model: nn.Module,
    rois: Sequence[RoiInputs],
    *,
    device: torch.device | str,
    layers: Sequence[str] = FEATURE_LAYERS,
    batch_size: int = 64,
) -> list[dict[str, np.ndarray]]:
    """Each ROI's features per layer (layer → (slices, channels)), without augmentation."""
    device = torch.device(device)
    data = load_data(rois, device)
    model.eval()
    parts: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            batch = data.inputs[start : start + batch_size].contiguous(
                memory_format=torch.channels_last
            )
            if device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    stages, _ = features_and_logits(model, batch)
            else:
                stages, _ = features_and_logits(model, batch)
            for name in layers:
                parts[name].append(stages[name].float().cpu().numpy())
    stacked = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    result, start = [], 0
    for roi in rois:
        end = start + len(roi.x_mm)
        result.append({name: array[start:end] for name, array in stacked.items()})
        start = end
    return result


def describe_domain(
    model: nn.Module,
    train_rois: Sequence[RoiInputs],
    validation_rois: Sequence[RoiInputs],
    *,
    device: torch.device | str,
) -> DomainModel:
    """The out-of-domain guard's description: Gaussians over the training slices' features;
    the threshold from the validation ROIs pooled with the training ROIs."""
    training = roi_features(model, train_rois, device=device)
    held_out = roi_features(model, validation_rois, device=device) if validation_rois else []
    slices = {name: np.concatenate([roi[name] for roi in training]) for name in FEATURE_LAYERS}
    return fit_domain(slices, [*held_out, *training], held_out_rois=len(held_out))


@dataclass(frozen=True)
class TrainingRun:
    checkpoint: Path
    sha256: str
    meta: dict[str, Any]
    fit: FitResult


def default_version() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def cohort_description(rois: Sequence[RoiInputs]) -> dict[str, int]:
    """Patients by fracture label, ROIs (and those on normal bodies), slices."""
    labels = patient_labels(rois)
    return {
        "patients": len(labels),
        "malignant": sum(labels.values()),
        "benign": len(labels) - sum(labels.values()),
        "rois": len(rois),
        "normal_rois": sum(r.normal for r in rois),
        "slices": sum(len(r.x_mm) for r in rois),
    }


def training_task(rois: Sequence[RoiInputs]) -> str:
    """``automatic`` when the cohort holds ROIs on normal bodies, ``reader-roi`` otherwise."""
    return TASK_AUTOMATIC if has_normals(rois) else TASK_READER_ROI


def main(
    patients: Sequence[RoiInputs],
    out_dir: Path,
    config: TrainConfig,
    *,
    preprocessing: dict[str, Any],
    name: str = "spine-triage",
    version: str | None = None,
    demonstration: bool = False,
    intended_use: str = INTENDED_USE,
    source: str = "",
    progress: bool = False,
) -> TrainingRun:
    """Train on the whole cohort (validation patients carved out), write model.pt and
    config.json; ``patients`` are the cohort's ROIs, several per patient allowed."""
    from pydicom.uid import generate_uid

    labels = patient_labels(patients)
    train_ids, validation_ids = carve_validation(
        labels, list(labels), config.validation_fraction, config.seed
    )
    by_patient = rois_by_patient(patients)
    train_rois = [r for i in train_ids for r in by_patient[i]]
    validation_rois = [r for i in validation_ids for r in by_patient[i]]
    result = fit(train_rois, validation_rois, config, progress=progress)
    version = version or default_version()
    validation = validation_metrics(result, validation_rois)
    domain = describe_domain(result.model, train_rois, validation_rois, device=result.device)
    logger.info(
        "training domain: threshold %.3f (%s)", domain.threshold, json.dumps(domain.summary)
    )
    task = training_task(patients)
    training = {
        "config": config.to_json(),
        "cohort": cohort_description(patients),
        "train_patients": len(train_ids),
        "validation_patients": len(validation_ids),
        "source": source,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "validation_metrics": validation,
        **result.summary(),
    }
    meta: dict[str, Any] = {
        "name": name,
        "version": version,
        "device_uid": generate_uid(),
        "preprocessing": preprocessing,
        "threshold": 0.5,
        "task": task,
        "training": training,
        "demonstration": demonstration,
        "intended_use": intended_use,
        "domain": domain.to_meta(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / "model.pt"
    sha256 = save_checkpoint(checkpoint, result.state_dict, meta, domain_arrays=domain.arrays())
    (out_dir / "config.json").write_text(
        json.dumps({**meta, "sha256": sha256}, indent=2) + "\n", encoding="utf-8"
    )
    return TrainingRun(checkpoint=checkpoint, sha256=sha256, meta=meta, fit=result)


def validation_metrics(
    result: FitResult, validation: Sequence[RoiInputs]
) -> dict[str, float | int | None]:
    """Per-patient AUROC and accuracy at 0.5 on the validation patients' reader ROIs (their
    fracture ROIs when they have none); with normal bodies also the share of those scored
    below 0.5. Used for early stopping, so optimistic; the held-out estimate is what
    ``evaluate`` gives."""
    if not validation:
        return {"patients": 0, "auroc": None, "accuracy": None}
    probabilities = predict_rois(result.model, validation, device=result.device)
    scores: dict[str, list[float]] = {}
    fallback: dict[str, list[float]] = {}
    normal_scores: list[float] = []
    for roi, slices in zip(validation, probabilities, strict=True):
        if roi.normal:
            normal_scores.append(float(np.max(slices)))
            continue
        target = scores if roi.source == "reader" else fallback
        target.setdefault(roi.patient_id, []).append(float(np.max(slices)))
    for patient, values in fallback.items():
        scores.setdefault(patient, values)
    labels = patient_labels(validation)
    patients = sorted(scores)
    patient_labels_ = [labels[p] for p in patients]
    patient_scores = [max(scores[p]) for p in patients]
    metrics: dict[str, float | int | None] = {
        "patients": len(patients),
        "auroc": auroc(patient_labels_, patient_scores),
        "accuracy": confusion_matrix(patient_labels_, patient_scores).accuracy,
    }
    if normal_scores:
        metrics["normal_rois"] = len(normal_scores)
        metrics["normal_specificity"] = float(np.mean(np.asarray(normal_scores) < 0.5))
    return metrics
