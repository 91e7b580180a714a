"""Fixtures shared by the training tests: small synthetic cohorts, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """Two shared cores on the development machine: keep each test to one torch thread."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic patients (3 malignant, 3 benign); returns the manifest path."""
    from model.synthetic.cases import make_cohort

    out = tmp_path_factory.mktemp("tiny-cohort")
    make_cohort(out, patients=6, seed=11)
    return out / "manifest.csv"


@pytest.fixture(scope="session")
def tiny_cohort_with_normals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic patients with localiser-like ROIs: on the fractured body and on up to
    two normal bodies each; returns the manifest path."""
    from model.synthetic.cases import make_cohort

    out = tmp_path_factory.mktemp("tiny-cohort-normals")
    make_cohort(out, patients=6, seed=11, normals=2, body_roi_slices=3)
    return out / "manifest.csv"
