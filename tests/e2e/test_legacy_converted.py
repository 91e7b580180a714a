"""Legacy Converted Enhanced CT end to end: a phantom's classic CT slices converted by
highdicom into one multi-frame instance, sent by DCMTK ``storescu`` to the running node,
stored, indexed, and judged by a real worker exactly as the classic series it came from."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom.uid import LegacyConvertedEnhancedCTImageStorage, generate_uid
from sqlalchemy import select

from dicom_node.archive.schema import AnnotationState, Instance, Series, TriageResult
from tests.support import dcmtk_env, require_dcmtk
from tests.system import System, case_files

SystemFactory = Callable[..., System]


def _convert(files: list[Path], target: Path) -> pydicom.Dataset:
    """The classic slices as one Legacy Converted Enhanced CT instance (a new series)."""
    converted = LegacyConvertedEnhancedCTImage(
        legacy_datasets=[pydicom.dcmread(path) for path in files],
        series_instance_uid=generate_uid(),
        series_number=901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    converted.save_as(target)
    return converted


def _storescu(port: int, *files: Path) -> None:
    done = subprocess.run(
        [
            require_dcmtk("storescu"),
            "-aet",
            "MODALITY",
            "-aec",
            "SPINE_TRIAGE",
            # propose the files' own SOP classes: storescu's default list (the short list of
            # common storage classes) lacks Legacy Converted Enhanced CT
            "--required",
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No presentation context" not in done.stdout + done.stderr


def test_legacy_converted_enhanced_ct_is_stored_indexed_and_judged_like_its_source(
    system_factory: SystemFactory, synthetic_cases: list[Any], tmp_path: Path
) -> None:
    case = synthetic_cases[0]
    classic = case_files(case)
    converted_path = tmp_path / "legacy-converted.dcm"
    converted = _convert(classic, converted_path)
    assert converted.SOPClassUID == LegacyConvertedEnhancedCTImageStorage
    assert int(converted.NumberOfFrames) == len(classic)
    assert converted.StudyInstanceUID == case.roi.study_instance_uid

    system = system_factory(database_url=f"sqlite:///{tmp_path / 'legacy.db'}", auto_roi="off")
    _storescu(system.node.dicom_address[1], *classic, converted_path)

    with system.node.sessions() as session:
        row = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == converted.SOPInstanceUID)
        ).one()
        assert row.sop_class_uid == LegacyConvertedEnhancedCTImageStorage
        assert row.series.series_instance_uid == converted.SeriesInstanceUID
        assert row.series.study.study_instance_uid == case.roi.study_instance_uid
        stored = system.settings.resolved_storage_dir / row.path
        series_uids = set(session.scalars(select(Series.series_instance_uid)))
    assert series_uids == {case.roi.series_instance_uid, converted.SeriesInstanceUID}
    on_disk = pydicom.dcmread(stored)
    assert on_disk.SOPClassUID == LegacyConvertedEnhancedCTImageStorage
    assert on_disk.PixelData == converted.PixelData

    system.start_worker()
    roi = case.roi.to_json()
    from_classic = system.post_roi(roi)
    from_converted = system.post_roi({**roi, "series_instance_uid": converted.SeriesInstanceUID})
    system.wait_until(
        lambda: all(
            system.annotation_states().get(a) is AnnotationState.DONE
            for a in (from_classic, from_converted)
        ),
        what="both annotations to be done",
    )
    with system.node.sessions() as session:
        results = {r.annotation_id: r for r in session.scalars(select(TriageResult)).all()}
    assert set(results) == {from_classic, from_converted}
    expected, actual = results[from_classic], results[from_converted]
    assert len(actual.slice_probabilities) == len(case.roi.slices_x_mm)
    assert actual.slice_probabilities == pytest.approx(expected.slice_probabilities, abs=1e-6)
    assert actual.patient_probability == pytest.approx(expected.patient_probability, abs=1e-6)
