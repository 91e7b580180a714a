"""The automatic job's steps: a JPEG 2000 series localised on a reduced-resolution overview,
an uncompressed one on the localiser's block means read straight from the files, then only
the region every proposed ROI needs decoded at full resolution — and the bodies get the same
answers as from the whole volume decoded at full resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.io.headers import read_headers
from model.io.volume import load_volume, read_series_geometry
from model.serving.inference import Classifier
from model.serving.overview import OverviewPlan, overview_plan
from model.synthetic.cases import make_case
from worker.automatic import (
    classify_bodies,
    load_bodies,
    load_overview,
    localise_bodies,
    propose,
)
from worker.series import Series


def _series(tmp_path: Path, syntax: str) -> Series:
    case = make_case(
        tmp_path,
        patient_id=f"STEPS-{syntax}",
        label="malignant",
        seed=31,
        transfer_syntax=syntax,
        pixel_spacing_mm=0.5,
    )
    paths = sorted(Path(case.series_dir).rglob("*.dcm"))
    headers = read_headers(paths)
    geometry = read_series_geometry(paths, headers)
    return Series(
        case.roi.study_instance_uid,
        case.roi.series_instance_uid,
        tuple(paths),
        tuple(headers),
        geometry,
    )


def test_jpeg2000_is_localised_on_an_overview_and_classified_on_full_resolution(
    tmp_path: Path, checkpoint_path: Path
) -> None:
    classifier = Classifier.load(checkpoint_path, device="cpu")
    series = _series(tmp_path, "j2k")
    # 0.5 mm pixels → 2 mm for the localiser; the phantom's slices are already 2 mm or more
    assert overview_plan(series.geometry).reduce == 2
    overview = load_overview(series)
    assert overview.spacing[1:] == pytest.approx((2.0, 2.0))
    proposals = propose(localise_bodies(overview), overview)
    assert len(proposals) >= 3
    volume = load_bodies(classifier, series, overview, proposals)
    assert volume.is_partial and volume.spacing == series.geometry.spacing
    bodies = classify_bodies(classifier, volume, proposals)
    reference = classify_bodies(classifier, load_volume(series.geometry), proposals)
    assert [b.roi for b in bodies] == [b.roi for b in reference]
    assert np.allclose(
        [b.prediction.slice_probabilities for b in bodies],
        [b.prediction.slice_probabilities for b in reference],
        atol=1e-4,
    )
    probabilities = [b.prediction.patient_probability for b in bodies]
    assert probabilities == sorted(probabilities, reverse=True)  # most suspicious first


def test_an_uncompressed_series_is_localised_on_its_block_means_and_classified_on_regions(
    tmp_path: Path, checkpoint_path: Path
) -> None:
    """The overview is the localiser's own 2 mm block means, read straight from the files:
    the localiser finds exactly what it finds on the whole volume, the classifier's region is
    read from the files again, and the bodies get the whole volume's answers."""
    classifier = Classifier.load(checkpoint_path, device="cpu")
    series = _series(tmp_path, "explicit")
    plan = overview_plan(series.geometry)
    assert plan.bins is not None and plan.bins[1:] == (4, 4)  # 0.5 mm pixels → 2 mm
    overview = load_overview(series)
    whole = load_volume(series.geometry)
    assert overview.voxels.nbytes * 16 <= whole.voxels.nbytes
    found = localise_bodies(overview)
    assert found.bodies == localise_bodies(whole).bodies
    proposals = propose(found, overview)
    volume = load_bodies(classifier, series, overview, proposals)
    assert volume.is_partial and volume.spacing == series.geometry.spacing
    bodies = classify_bodies(classifier, volume, proposals)
    reference = classify_bodies(classifier, whole, proposals)
    assert [b.roi for b in bodies] == [b.roi for b in reference]
    assert np.allclose(
        [b.prediction.slice_probabilities for b in bodies],
        [b.prediction.slice_probabilities for b in reference],
        atol=1e-5,
    )


def test_other_codecs_are_decoded_once_at_full_resolution(tmp_path: Path) -> None:
    series = _series(tmp_path, "rle")
    assert overview_plan(series.geometry) == OverviewPlan(reduce=0, slice_step=1)
    overview = load_overview(series)
    assert overview.spacing == series.geometry.spacing and not overview.is_partial
