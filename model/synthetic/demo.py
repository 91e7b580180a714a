"""The demonstration model: trained on synthetic phantoms on first use, then cached.

A fresh installation has no checkpoint of its own; the node then serves this one so the whole
path (C-STORE → inference → SR → worklist) can be shown without patient data. It is trained in
a few minutes on a CPU, separates the synthetic benign and malignant phantoms, and says in its
meta (and so in every SR made with it) that it is a demonstration model trained on synthetic
data, not for clinical use. No checkpoint file is shipped: the cached file is keyed by a
version string derived from the recipe, so a changed recipe trains a new one.

It is trained for the ``automatic`` task (malignant vs benign fracture or normal vertebral
body): besides the reader's ROI, every phantom contributes the localiser-like ROI on its
fractured body and up to three on normal bodies, drawn from the phantom's truth by the
localiser's rule, so the one checkpoint serves reader ROIs and automatic jobs (the maximum
over every body of a study) alike. (Training on the localiser's own proposals instead,
``body_rois_from="localiser"``, was measured: no benign study of ten flagged automatically with
two training seeds, but the out-of-domain guard's threshold then rises until the real CT lies
inside it; docs/model-card.md.)

The recipe departs from the paper's protocol to fit in minutes on a CPU: random
initialisation (nothing is downloaded), learning rate 1e-3, 10 epochs without repetition
(each slice seen once per epoch, each time with a fresh random affine), BatchNorm statistics
re-estimated after each epoch, the weights averaged over the last five epochs (stochastic
weight averaging: on a few hundred slices the best epoch by the validation loss of six patients
is a lottery; two models of the previous recipe, trained on the same phantoms but for one ROI,
flagged 0 and 10 of 10 held-out benign studies automatically), and 3 slices on each
localiser-like ROI (the localiser proposes 5 when serving, over the same lateral extent).
It runs on one torch thread: on a 2-core machine shared with other work that is several
times faster than two.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.serving.checkpoint import CheckpointError, load_checkpoint
from model.serving.localiser import AUTOMATIC_MARGIN_MM
from model.serving.preprocess import PreprocessParams
from model.synthetic.cases import BodyRoiSource, make_cohort
from model.training.augment import AugmentParams
from model.training.cohort import load_cohort
from model.training.train import TrainConfig, main

logger = logging.getLogger(__name__)

DEMO_NAME = "spine-triage-demo"
DEMO_INTENDED_USE = (
    "DEMONSTRATION MODEL trained on synthetic phantoms, not on patient data. Not for clinical "
    "use: its probabilities say nothing about real patients. Train and validate a model on "
    "the site's own labelled cases (spine-triage train / evaluate) before relying on triage."
)
RECIPE_REVISION = "4"  # bump when something outside the fields below changes the result


def _demo_training() -> TrainConfig:
    return TrainConfig(
        epochs=10,
        batch_size=32,
        learning_rate=1e-3,
        beta1=0.5,
        beta2=0.999,
        weight_decay=1e-4,
        augmentation_factor=1,
        augment=AugmentParams(max_translation_fraction=0.08, max_rotation_degrees=10.0),
        patience=0,
        validation_fraction=0.15,
        init="random",
        seed=0,
        device="auto",
        recalibrate_batchnorm=True,
        average_last=5,
    )


@dataclass(frozen=True)
class DemoRecipe:
    """How the demonstration model is made; any change gives a new version (and retraining)."""

    patients: int = 40
    cohort_seed: int = 20210
    malignant_fraction: float = 0.5
    normals: int = 3  # localiser-like ROIs on normal bodies per phantom (fewer if absent)
    body_roi_slices: int = 3
    body_roi_margin_mm: float = AUTOMATIC_MARGIN_MM  # the localiser's rule
    body_rois_from: BodyRoiSource = "phantom"  # drawn from the truth (see the docstring)
    train: TrainConfig = field(default_factory=_demo_training)
    threads: int = 1  # on a busy 2-core CPU one torch thread is several times faster than two
    revision: str = RECIPE_REVISION

    def to_json(self) -> dict[str, Any]:
        return {
            "patients": self.patients,
            "cohort_seed": self.cohort_seed,
            "malignant_fraction": self.malignant_fraction,
            "normals": self.normals,
            "body_roi_slices": self.body_roi_slices,
            "body_roi_margin_mm": self.body_roi_margin_mm,
            "body_rois_from": self.body_rois_from,
            "train": self.train.to_json(),
            "threads": self.threads,
            "revision": self.revision,
            "preprocessing": PreprocessParams().to_json(),
        }

    @property
    def version(self) -> str:
        canonical = json.dumps(self.to_json(), sort_keys=True).encode()
        return f"demo-{self.revision}-{hashlib.sha256(canonical).hexdigest()[:10]}"


DEMO_RECIPE = DemoRecipe()


def demo_checkpoint_path(cache_dir: Path, recipe: DemoRecipe = DEMO_RECIPE) -> Path:
    return Path(cache_dir) / f"{DEMO_NAME}-{recipe.version.removeprefix('demo-')}.pt"


def make_synthetic_cohort(
    out_dir: Path,
    *,
    patients: int,
    seed: int,
    malignant_fraction: float = 0.5,
    normals: int = DEMO_RECIPE.normals,
    body_roi_slices: int = DEMO_RECIPE.body_roi_slices,
    body_roi_margin_mm: float = DEMO_RECIPE.body_roi_margin_mm,
    body_rois_from: BodyRoiSource = DEMO_RECIPE.body_rois_from,
) -> Path:
    """Write a synthetic cohort (DICOM series, ROI JSON, manifest.csv); return the manifest.

    By default with the demonstration recipe's ROIs on normal bodies (``normals=0``: the
    reader's ROIs only, the paper's protocol)."""
    make_cohort(
        out_dir,
        patients=patients,
        seed=seed,
        malignant_fraction=malignant_fraction,
        normals=normals,
        body_roi_slices=body_roi_slices,
        body_roi_margin_mm=body_roi_margin_mm,
        body_rois_from=body_rois_from,
    )
    return out_dir / "manifest.csv"


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One process trains at a time; the others wait and then find the cached file."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _usable(path: Path, recipe: DemoRecipe) -> bool:
    if not path.is_file():
        return False
    try:
        _, meta = load_checkpoint(path)
    except CheckpointError as exc:
        logger.warning("cached demonstration model %s is unusable, retraining: %s", path, exc)
        return False
    return meta.get("version") == recipe.version and meta.get("demonstration") is True


def ensure_demo_checkpoint(
    cache_dir: Path,
    *,
    recipe: DemoRecipe = DEMO_RECIPE,
    retrain: bool = False,
    progress: bool = False,
) -> Path:
    """Path of the cached demonstration checkpoint, training it first when needed."""
    path = demo_checkpoint_path(cache_dir, recipe)
    if not retrain and _usable(path, recipe):
        return path
    with _exclusive(Path(cache_dir) / f".{DEMO_NAME}.lock"):
        if not retrain and _usable(path, recipe):  # another process finished meanwhile
            return path
        train_demo_checkpoint(path, recipe, progress=progress)
    return path


def train_demo_checkpoint(
    path: Path, recipe: DemoRecipe = DEMO_RECIPE, *, progress: bool = False
) -> Path:
    """Generate the synthetic cohort, train, and place the checkpoint at ``path`` atomically."""
    started = time.perf_counter()
    logger.info(
        "training the demonstration model %s on %d synthetic phantoms (a few minutes on a CPU)",
        recipe.version,
        recipe.patients,
    )
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=".demo-training-", dir=path.parent))
    try:
        manifest = make_synthetic_cohort(
            workdir / "cohort",
            patients=recipe.patients,
            seed=recipe.cohort_seed,
            malignant_fraction=recipe.malignant_fraction,
            normals=recipe.normals,
            body_roi_slices=recipe.body_roi_slices,
            body_roi_margin_mm=recipe.body_roi_margin_mm,
            body_rois_from=recipe.body_rois_from,
        )
        generated = time.perf_counter()
        params = PreprocessParams()
        patients = load_cohort(manifest, params, workers=1, progress=progress)
        loaded = time.perf_counter()
        run = main(
            patients,
            workdir / "run",
            recipe.train,
            preprocessing=params.to_json(),
            name=DEMO_NAME,
            version=recipe.version,
            demonstration=True,
            intended_use=DEMO_INTENDED_USE,
            source=(
                f"{recipe.patients} synthetic phantoms (seed {recipe.cohort_seed}), up to "
                f"{recipe.normals} normal bodies each; "
                f"recipe {json.dumps(recipe.to_json(), sort_keys=True)}"
            ),
            progress=progress,
        )
        run.checkpoint.replace(path)
        logger.info(
            "demonstration model: phantoms %.0f s, inputs %.0f s, training %.0f s",
            generated - started,
            loaded - generated,
            run.fit.seconds,
        )
    finally:
        torch.set_num_threads(previous_threads)
        shutil.rmtree(workdir, ignore_errors=True)
    logger.info(
        "demonstration model %s ready in %.0f s: %s",
        recipe.version,
        time.perf_counter() - started,
        path,
    )
    return path
