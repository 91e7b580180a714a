"""The out-of-domain guard: how far an input lies from the slices the model was trained on.

Method: Mahalanobis distances of an input's intermediate features from class-independent
Gaussians fitted to the training slices' features, combined over layers — the "feature
ensemble" of Lee, Lee, Lee & Shin, *A simple unified framework for detecting
out-of-distribution samples and adversarial attacks* (NeurIPS 2018), without their input
perturbation and with equal layer weights (their weights are fitted on known outliers, which a
training cohort does not have). The features are the global averages of the outputs of
ResNet50's first two residual stages (``layer1``, 256 channels; ``layer2``, 512): measured on
the demonstration model, the deeper stages of a network trained on a few dozen phantoms map a
real CT close to the phantoms, while the early stages, which describe texture and edges,
keep them apart (docs/model-card.md gives the figures).

A cohort has a few hundred training slices for hundreds of feature dimensions, so a full
covariance is singular. Each layer's covariance is estimated by probabilistic PCA (Tipping &
Bishop, J R Stat Soc B 1999): the ``k`` leading principal axes with their variances, the
remaining variance spread evenly over every other direction. A slice's distance in one layer
is ``sqrt(Σ_i (v_i·(f − m))² / λ_i + (‖f − m‖² − Σ_i (v_i·(f − m))²) / σ²)``; it is divided by
the median distance of the training slices in that layer, and the layers are combined by the
root mean square. A slice's **score** is that number (about 1 for a typical training slice).

An ROI's score is the **maximum** over its slices, as its probability is: one slice unlike the
training data is enough to make the ROI's probability untrustworthy, and the maximum is what
the call is made on. The threshold is chosen at training time as the 99th percentile of the
scores of in-domain ROIs: those of the held-out (validation) patients pooled with the training
ROIs — with few held-out patients their percentile alone is close to their maximum, and the
early layers' features of training slices are hardly tighter than those of held-out ones
(measured). An ROI scoring above the threshold is *outside the model's training domain*:
its result is shown as such and never flagged.

Pure numpy. The arrays travel in the checkpoint as tensors, their description (layers, sizes,
threshold, method, a sha256 of the arrays) in its meta; :meth:`DomainModel.from_checkpoint`
refuses any inconsistency between the two.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

METHOD = "mahalanobis-feature-ensemble-ppca"
REFERENCE = (
    "Lee K, Lee K, Lee H, Shin J. A simple unified framework for detecting out-of-distribution "
    "samples and adversarial attacks. NeurIPS 2018 (Mahalanobis distance, feature ensemble); "
    "covariance by probabilistic PCA, Tipping ME, Bishop CM. J R Stat Soc B 1999"
)
FEATURE_LAYERS = ("layer1", "layer2")
DEFAULT_COMPONENTS = 8
DEFAULT_PERCENTILE = 99.0
ARRAY_KINDS = ("mean", "components", "variances")


class DomainError(ValueError):
    """A domain description is incomplete, inconsistent with its arrays, or invalid."""


@dataclass(frozen=True)
class DomainVerdict:
    """One ROI's place relative to the training domain."""

    score: float  # the maximum of its slices' scores
    threshold: float
    in_domain: bool


@dataclass(frozen=True, eq=False)
class LayerGaussian:
    """One layer's features: mean, ``k`` principal axes and variances, the rest's variance,
    and the training slices' median distance (the layer's unit)."""

    layer: str
    mean: np.ndarray  # (p,)
    components: np.ndarray  # (k, p), orthonormal rows
    variances: np.ndarray  # (k,)
    residual_variance: float
    median_distance: float

    def __post_init__(self) -> None:
        p = self.mean.shape[0] if self.mean.ndim == 1 else 0
        if p == 0 or self.components.ndim != 2 or self.components.shape[1] != p:
            raise DomainError(f"domain.{self.layer}: mean and components differ in size")
        if self.variances.shape != (self.components.shape[0],):
            raise DomainError(f"domain.{self.layer}: one variance per component is required")
        if not all(np.isfinite(a).all() for a in (self.mean, self.components, self.variances)):
            raise DomainError(f"domain.{self.layer}: arrays hold non-finite values")
        if not (self.variances > 0).all():
            raise DomainError(f"domain.{self.layer}: variances must be positive")
        for name in ("residual_variance", "median_distance"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise DomainError(f"domain.{self.layer}.{name}: expected a positive number")

    @classmethod
    def fit(cls, layer: str, features: np.ndarray, components: int) -> LayerGaussian:
        array = np.asarray(features, dtype=np.float64)
        if array.ndim != 2 or array.shape[0] <= components:
            raise ValueError(f"{layer}: more training slices than components are needed")
        mean = array.mean(axis=0)
        _, singular, vt = np.linalg.svd(array - mean, full_matrices=False)
        eigenvalues = singular**2 / array.shape[0]
        rest = eigenvalues[components:]
        floor = float(eigenvalues[0]) * 1e-9 + 1e-12
        residual = max(float(rest.sum()) / max(array.shape[1] - components, 1), floor)
        provisional = cls(
            layer, mean, vt[:components], np.maximum(eigenvalues[:components], floor), residual, 1.0
        )
        median = float(np.median(provisional.distances(array)))
        return cls(
            layer, mean, vt[:components], provisional.variances, residual, max(median, 1e-12)
        )

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance (n,) of feature vectors (n, p), in units of the median."""
        array = np.asarray(features, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"{self.layer} features: expected (n, {self.mean.shape[0]}), got {array.shape}"
            )
        centred = array - self.mean
        projected = centred @ self.components.T
        along = (projected**2 / self.variances).sum(axis=1)
        rest = np.maximum((centred**2).sum(axis=1) - (projected**2).sum(axis=1), 0.0)
        distance: np.ndarray = np.sqrt(along + rest / self.residual_variance)
        return distance / self.median_distance


@dataclass(frozen=True, eq=False)
class DomainModel:
    """The training domain: one Gaussian per layer, and the threshold on the ROI score."""

    layers: tuple[LayerGaussian, ...]
    threshold: float
    percentile: float
    summary: Mapping[str, Any]  # the in-domain ROI scores the threshold was chosen on

    def __post_init__(self) -> None:
        if not self.layers:
            raise DomainError("domain: at least one layer is required")
        if not math.isfinite(self.threshold) or self.threshold <= 0:
            raise DomainError(f"domain.threshold: expected a positive number: {self.threshold!r}")
        if not 0.0 < self.percentile <= 100.0:
            raise DomainError(f"domain.percentile: expected (0, 100], got {self.percentile!r}")

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(g.layer for g in self.layers)

    def scores(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """Each slice's score (n,): root mean square over layers of its median-scaled distance."""
        squares = [g.distances(features[g.layer]) ** 2 for g in self.layers]
        score: np.ndarray = np.sqrt(np.mean(squares, axis=0))
        return score

    def verdict(self, slice_scores: Sequence[float]) -> DomainVerdict:
        """An ROI's verdict: the maximum of its slices' scores against the threshold."""
        score = float(max(slice_scores))
        return DomainVerdict(score, self.threshold, score <= self.threshold)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays to store (float32), named ``<layer>.<kind>``."""
        return {
            f"{g.layer}.{kind}": np.asarray(getattr(g, kind), dtype=np.float32)
            for g in self.layers
            for kind in ARRAY_KINDS
        }

    def to_meta(self) -> dict[str, Any]:
        """The plain-JSON description for the checkpoint's meta, the arrays' sha256 included."""
        return {
            "method": METHOD,
            "reference": REFERENCE,
            "roi_score": "maximum over the ROI's slices",
            "threshold": float(self.threshold),
            "percentile": float(self.percentile),
            "layers": [
                {
                    "layer": g.layer,
                    "features": int(g.mean.shape[0]),
                    "components": int(g.components.shape[0]),
                    "residual_variance": float(g.residual_variance),
                    "median_distance": float(g.median_distance),
                }
                for g in self.layers
            ],
            "summary": dict(self.summary),
            "arrays_sha256": arrays_sha256(self.arrays()),
        }

    @classmethod
    def from_checkpoint(
        cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
    ) -> DomainModel:
        """Rebuild from a checkpoint's ``meta["domain"]`` and its arrays. :class:`DomainError`
        when anything is missing, of another size, or does not match the recorded sha256."""
        if not isinstance(meta, Mapping):
            raise DomainError("meta.domain: expected a dict")
        if meta.get("method") != METHOD:
            raise DomainError(f"meta.domain.method: unknown method {meta.get('method')!r}")
        plain = {name: np.asarray(value, dtype=np.float32) for name, value in arrays.items()}
        try:
            described = list(meta["layers"])
            expected = {f"{d['layer']}.{kind}" for d in described for kind in ARRAY_KINDS}
            if set(plain) != expected:
                raise DomainError(
                    "domain: the checkpoint's arrays "
                    f"({', '.join(sorted(plain)) or 'none'}) are not those meta.domain "
                    f"describes ({', '.join(sorted(expected))})"
                )
            if arrays_sha256(plain) != meta["arrays_sha256"]:
                raise DomainError("domain: the arrays do not match meta.domain.arrays_sha256")
            layers = []
            for d in described:
                gaussian = LayerGaussian(
                    layer=str(d["layer"]),
                    mean=plain[f"{d['layer']}.mean"].astype(np.float64),
                    components=plain[f"{d['layer']}.components"].astype(np.float64),
                    variances=plain[f"{d['layer']}.variances"].astype(np.float64),
                    residual_variance=float(d["residual_variance"]),
                    median_distance=float(d["median_distance"]),
                )
                if gaussian.mean.shape[0] != int(d["features"]) or gaussian.components.shape[
                    0
                ] != int(d["components"]):
                    raise DomainError(
                        f"meta.domain.{gaussian.layer}: sizes differ from the arrays' "
                        f"({d['features']} × {d['components']} described)"
                    )
                layers.append(gaussian)
            return cls(
                layers=tuple(layers),
                threshold=float(meta["threshold"]),
                percentile=float(meta["percentile"]),
                summary=dict(meta.get("summary", {})),
            )
        except DomainError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise DomainError(f"meta.domain: incomplete or invalid ({exc!r})") from exc


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over the arrays' names, shapes and little-endian float32 bytes, by name."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(np.asarray(arrays[name], dtype="<f4"))
        digest.update(f"{name}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def fit_domain(
    training_slices: Mapping[str, np.ndarray],
    in_domain_rois: Sequence[Mapping[str, np.ndarray]],
    *,
    held_out_rois: int,
    components: int = DEFAULT_COMPONENTS,
    percentile: float = DEFAULT_PERCENTILE,
    layers: Sequence[str] = FEATURE_LAYERS,
) -> DomainModel:
    """Fit one Gaussian per layer on the training slices' features (layer → (n, p)); the
    threshold is the ``percentile`` of the scores of ``in_domain_rois`` (each layer →
    (slices, p), scored by its maximum), the first ``held_out_rois`` of which are held out."""
    slices = int(next(iter(training_slices.values())).shape[0])
    components = max(1, min(components, slices - 1))
    gaussians = tuple(LayerGaussian.fit(name, training_slices[name], components) for name in layers)
    provisional = DomainModel(gaussians, 1.0, percentile, {})
    if not in_domain_rois:
        raise ValueError("in-domain ROIs are needed to choose the threshold")
    roi_scores = np.array([provisional.scores(roi).max() for roi in in_domain_rois])
    threshold = float(np.percentile(roi_scores, percentile))
    held_out = roi_scores[:held_out_rois]
    summary: dict[str, Any] = {
        "rois": int(roi_scores.size),
        "held_out_rois": int(held_out.size),
        "median": round(float(np.median(roi_scores)), 4),
        "max": round(float(roi_scores.max()), 4),
        "held_out_max": round(float(held_out.max()), 4) if held_out.size else None,
        "training_slices": slices,
    }
    return DomainModel(gaussians, threshold, percentile, summary)
