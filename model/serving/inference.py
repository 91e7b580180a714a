"""Serving: a checkpoint loaded once per process, ROI → per-slice and per-patient probability.

The device is chosen automatically: CUDA when present (channels_last memory format and bf16
autocast there), else CPU (channels_last, float32, ``inference_mode``; deterministic: the same
inputs give bit-identical probabilities). Inputs are run in batches.

When the checkpoint describes its training domain (:mod:`model.serving.domain`), the same
forward pass also gives each slice's domain score, and every prediction carries the verdict.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.io.volume import SeriesGeometry, Volume
from model.serving.checkpoint import DEFAULT_THRESHOLD, CheckpointError, read_checkpoint
from model.serving.domain import DomainModel
from model.serving.network import build_resnet50, features_and_logits
from model.serving.prediction import Prediction, prediction_from_probabilities
from model.serving.preprocess import PreprocessParams, build_inputs, load_roi_volume
from model.serving.roi import Roi

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True, eq=False)
class SliceScores:
    """Per slice: the malignancy probability and (with a domain description) the domain score."""

    probabilities: np.ndarray  # (n,) float32
    domain_scores: np.ndarray | None  # (n,) float64


@dataclass(frozen=True)
class Classification:
    """What the model saw for one ROI (the network inputs, n × 3 × size × size) and its answer."""

    inputs: np.ndarray
    prediction: Prediction


def choose_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Classifier:
    """A loaded checkpoint ready to classify ROIs. Build with :meth:`load` (or :meth:`shared`)."""

    def __init__(
        self,
        network: torch.nn.Module,
        meta: dict[str, Any],
        *,
        device: torch.device,
        threshold: float | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        domain: DomainModel | None = None,
    ) -> None:
        self.meta = meta
        self.domain = domain
        self.name: str = str(meta["name"])
        self.version: str = str(meta["version"])
        self.device_uid: str = str(meta["device_uid"])
        self.sha256: str = str(meta.get("sha256", ""))
        self.threshold: float = float(
            threshold if threshold is not None else meta.get("threshold", DEFAULT_THRESHOLD)
        )
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold: expected a number in (0, 1), got {self.threshold}")
        self.preprocess = PreprocessParams.from_json(meta["preprocessing"])
        self.device = device
        self.batch_size = batch_size
        self._network = network.to(device).to(memory_format=torch.channels_last).eval()
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls, path: Path, *, device: str | None = None, threshold: float | None = None
    ) -> Classifier:
        """Load and verify a checkpoint; ``threshold`` overrides the checkpoint's (site policy)."""
        loaded = read_checkpoint(Path(path))
        state_dict, meta = loaded.state_dict, loaded.meta
        network = build_resnet50("random")
        try:
            network.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{Path(path).name}: weights do not fit ResNet50 ({exc})"
            ) from exc
        chosen = choose_device(device)
        logger.info(
            "loaded model %s %s (sha256 %s…) on %s",
            meta["name"],
            meta["version"],
            meta["sha256"][:12],
            chosen,
        )
        return cls(network, meta, device=chosen, threshold=threshold, domain=loaded.domain)

    @classmethod
    def shared(
        cls, path: Path, *, device: str | None = None, threshold: float | None = None
    ) -> Classifier:
        """The process-wide classifier for a checkpoint: loaded on first use, then reused."""
        resolved = Path(path).resolve()
        stat = resolved.stat()
        key = (str(resolved), stat.st_mtime_ns, stat.st_size, device, threshold)
        with _shared_lock:
            classifier = _shared.get(key)
            if classifier is None:
                classifier = cls.load(resolved, device=device, threshold=threshold)
                _shared[key] = classifier
            return classifier

    def predict_inputs(self, inputs: np.ndarray) -> np.ndarray:
        """Malignancy probabilities (n,) float32 for inputs of shape (n, 3, size, size)."""
        return self.score_inputs(inputs).probabilities

    def score_inputs(self, inputs: np.ndarray) -> SliceScores:
        """Probabilities and domain scores for inputs of shape (n, 3, size, size), one pass."""
        array = np.asarray(inputs, dtype=np.float32)
        size = self.preprocess.input_size
        expected = (self.preprocess.channels, size, size)
        if array.ndim != 4 or array.shape[1:] != expected:
            raise ValueError(f"inputs: expected shape (n, {expected}), got {array.shape}")
        cuda = self.device.type == "cuda"
        probabilities: list[np.ndarray] = []
        features: dict[str, list[np.ndarray]] = {}
        wanted = self.domain.layer_names if self.domain is not None else ()
        with self._lock, torch.inference_mode():
            for start in range(0, len(array), self.batch_size):
                batch = torch.from_numpy(array[start : start + self.batch_size])
                batch = batch.to(self.device, non_blocking=cuda).contiguous(
                    memory_format=torch.channels_last
                )
                if cuda:
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        stages, logits = features_and_logits(self._network, batch)
                else:
                    stages, logits = features_and_logits(self._network, batch)
                probabilities.append(torch.sigmoid(logits.float()).reshape(-1).cpu().numpy())
                for name in wanted:
                    features.setdefault(name, []).append(stages[name].float().cpu().numpy())
        if not probabilities:
            empty = np.zeros(0, dtype=np.float32)
            return SliceScores(empty, None if self.domain is None else empty.astype(np.float64))
        domain_scores = None
        if self.domain is not None:
            domain_scores = self.domain.scores(
                {name: np.concatenate(parts) for name, parts in features.items()}
            )
        return SliceScores(np.concatenate(probabilities).astype(np.float32), domain_scores)

    def prediction(
        self,
        x_mm: Sequence[float],
        probabilities: Sequence[float],
        domain_scores: Sequence[float] | None,
    ) -> Prediction:
        """The ROI's prediction from its slices' probabilities and domain scores."""
        verdict = None
        if self.domain is not None and domain_scores is not None:
            verdict = self.domain.verdict(domain_scores)
        return prediction_from_probabilities(
            x_mm, list(probabilities), self.threshold, domain=verdict
        )

    def classify(self, volume: Volume, roi: Roi) -> Classification:
        """Classify an ROI of a loaded volume: the network inputs and the answer for them."""
        inputs = build_inputs(volume, roi, self.preprocess)
        scores = self.score_inputs(inputs)
        prediction = self.prediction(
            roi.slices_x_mm,
            scores.probabilities.tolist(),
            None if scores.domain_scores is None else scores.domain_scores.tolist(),
        )
        return Classification(inputs=inputs, prediction=prediction)

    def predict(self, volume: Volume, roi: Roi) -> Prediction:
        """Classify an ROI of a loaded volume."""
        return self.classify(volume, roi).prediction

    def load_volume(
        self,
        series: Sequence[Path] | SeriesGeometry,
        roi: Roi,
        *,
        workers: int | None = None,
    ) -> Volume:
        """Load the part of a series this model needs for an ROI."""
        return load_roi_volume(
            series, roi, workers=workers, lateral_reach_mm=self.preprocess.lateral_reach_mm
        )

    def predict_files(
        self, paths: Sequence[Path], roi: Roi, *, workers: int | None = None
    ) -> Prediction:
        """Files of one series on disk → prediction (decodes only what the ROI needs)."""
        return self.predict(self.load_volume(paths, roi, workers=workers), roi)


_shared_lock = threading.Lock()
_shared: dict[tuple[Any, ...], Classifier] = {}
