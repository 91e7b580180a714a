"""``spine-triage synth`` and ``spine-triage preprocess`` end to end."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.io.volume import load_series
from model.serving.preprocess import build_inputs
from model.serving.roi import Roi
from worker.cli import main


def test_synth_then_preprocess(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synthetic"
    assert main(["synth", "--out", str(out), "--patients", "2", "--seed", "5"]) == 0
    assert "wrote 2 synthetic studies" in capsys.readouterr().out
    with (out / "manifest.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 2
    case_dir = out / rows[0]["patient_id"]
    roi_path = out / rows[0]["roi"]
    npz = tmp_path / "inputs.npz"
    assert main(["preprocess", str(case_dir), "--roi", str(roi_path), "--out", str(npz)]) == 0
    with np.load(npz) as saved:
        inputs, x_mm = saved["inputs"], saved["x_mm"]
    roi = Roi.from_json(json.loads(roi_path.read_text()))
    assert inputs.dtype == np.float32 and inputs.shape == (len(roi.slices_x_mm), 3, 64, 64)
    np.testing.assert_array_equal(x_mm, roi.slices_x_mm)
    expected = build_inputs(load_series(sorted((out / rows[0]["series_dir"]).glob("*"))), roi)
    np.testing.assert_allclose(inputs, expected, atol=1e-6)


def test_preprocess_picks_the_roi_series_among_several(tmp_path: Path) -> None:
    out = tmp_path / "s"
    assert main(["synth", "--out", str(out), "--patients", "2", "--seed", "8"]) == 0
    study = tmp_path / "mixed"
    study.mkdir()
    for case in ("SYN0001", "SYN0002"):
        for path in (out / case / "ct").iterdir():
            (study / f"{case}_{path.name}").write_bytes(path.read_bytes())
    (study / "README").write_text("not DICOM")
    npz = tmp_path / "second.npz"
    roi = out / "SYN0002" / "roi.json"
    assert main(["preprocess", str(study), "--roi", str(roi), "--out", str(npz)]) == 0
    direct = tmp_path / "direct.npz"
    assert main(["preprocess", str(out / "SYN0002"), "--roi", str(roi), "--out", str(direct)]) == 0
    with np.load(npz) as mixed, np.load(direct) as single:
        np.testing.assert_array_equal(mixed["inputs"], single["inputs"])


def test_preprocess_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s"
    assert main(["synth", "--out", str(out), "--patients", "1", "--seed", "2"]) == 0
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "study_instance_uid": "1.2",
                "series_instance_uid": "1.3",
                "slices_x_mm": [],
                "polygon_yz_mm": [[0, 0], [1, 0], [0, 1]],
            }
        )
    )
    code = main(["preprocess", str(out), "--roi", str(bad), "--out", str(tmp_path / "x.npz")])
    assert code == 2
    assert "slices_x_mm" in capsys.readouterr().err
    other = json.loads((out / "SYN0001" / "roi.json").read_text())
    other["series_instance_uid"] = "1.2.3.4"
    bad.write_text(json.dumps(other))
    code = main(["preprocess", str(out), "--roi", str(bad), "--out", str(tmp_path / "x.npz")])
    assert code == 2
    assert "no files of series 1.2.3.4" in capsys.readouterr().err


def test_console_script_help_reads_like_a_manual() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "preprocess", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "inputs.npz" in result.stdout and "x_mm" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "synth", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "--transfer-syntax" in result.stdout
