"""Broken series at inference time: a missing slice and a tilted slice fail their annotation
with the reason while a good study in the same run is done."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pydicom

from dicom_node.archive.schema import AnnotationState
from tests.system import System, case_files


def _drop_middle_slice(files: list[Path]) -> None:
    def height(path: Path) -> float:
        return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])

    sorted(files, key=height)[len(files) // 2].unlink()


def _tilt_one_slice(files: list[Path]) -> None:
    """One slice's Image Orientation (Patient) turned 10° in plane: a mixed series."""
    path = files[len(files) // 2]
    ds = pydicom.dcmread(path)
    c, s = np.cos(np.radians(10.0)), np.sin(np.radians(10.0))
    ds.ImageOrientationPatient = [round(float(v), 6) for v in (c, s, 0.0, -s, c, 0.0)]
    ds.save_as(path, enforce_file_format=True)


def test_broken_series_fail_with_their_reason_while_a_good_study_is_done(
    system_factory: Callable[..., System], tmp_path: Path
) -> None:
    from model.synthetic.cases import make_case

    cases = {
        name: make_case(tmp_path / "cases", patient_id=name, label="malignant", seed=5)
        for name in ("GOOD", "GAP", "TILT")
    }
    _drop_middle_slice(case_files(cases["GAP"]))
    _tilt_one_slice(case_files(cases["TILT"]))
    system = system_factory(database_url=f"sqlite:///{tmp_path / 'broken.db'}")
    system.start_worker()
    for case in cases.values():
        system.send_study(case_files(case))
    ids = {name: system.post_roi(cases[name].roi.to_json()) for name in ("GAP", "TILT", "GOOD")}
    ends = (AnnotationState.DONE, AnnotationState.FAILED)
    system.wait_until(
        lambda: all(system.annotation_states().get(i) in ends for i in ids.values()),
        timeout=180,
        what="every annotation to reach its end state",
    )
    views = {
        name: httpx.get(
            f"{system.api}/annotations/{annotation}",
            headers={"Authorization": f"Bearer {system.token}"},
            timeout=10,
        ).json()
        for name, annotation in ids.items()
    }
    assert views["GOOD"]["state"] == "done" and len(views["GOOD"]["results"]) == 1
    assert views["GAP"]["failure_reason"].startswith("MissingSliceError: ")
    assert "1 slice(s) missing" in views["GAP"]["failure_reason"]
    assert views["TILT"]["failure_reason"].startswith("MixedOrientationError: ")
    for name in ("GAP", "TILT"):
        assert views[name]["state"] == "failed" and views[name]["results"] == []
        assert views[name]["attempts"] == 1  # a permanent failure is not retried
    assert system.results_per_annotation() == {ids["GOOD"]: 1}
