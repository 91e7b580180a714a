"""``spine-triage classify`` and ``validate`` on the command line: their help, and a clear
message with exit code 2 for each kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from model.synthetic.cases import SynthCase, make_case
from worker.cli import main


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> SynthCase:
    return make_case(tmp_path_factory.mktemp("cli-case"), patient_id="CLI1", label="benign", seed=5)


@pytest.mark.parametrize("command", ["classify", "validate"])
def test_help_reads_like_a_manual(command: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", command, "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Exit codes" in done.stdout and "examples:" in done.stdout
    if command == "classify":
        for flag in ("--roi", "--auto", "--checkpoint", "--sr", "--json", "patient_probability"):
            assert flag in done.stdout
    else:
        assert "predictions.csv" in done.stdout and "--auto" in done.stdout


def test_roi_or_auto_is_required(capsys: pytest.CaptureFixture[str], case: SynthCase) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["classify", str(case.series_dir)])
    assert exit_.value.code == 2
    assert "--roi" in capsys.readouterr().err


def _error(capsys: pytest.CaptureFixture[str], *arguments: str) -> str:
    capsys.readouterr()
    assert main(["classify", *arguments]) == 2
    return capsys.readouterr().err


def test_bad_inputs_are_named(
    tmp_path: Path,
    case: SynthCase,
    demo_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SPINE_TRIAGE_VAR_DIR", str(tmp_path / "var"))
    model = ["--checkpoint", str(demo_checkpoint)]
    roi = ["--roi", str(case.roi_path)]
    series = str(case.series_dir)

    assert "not a folder" in _error(capsys, str(tmp_path / "nowhere"), *roi, *model)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not DICOM")
    assert "no files of series" in _error(capsys, str(empty), *roi, *model)
    assert "no CT series" in _error(capsys, str(empty), "--auto", *model)

    not_json = tmp_path / "roi.json"
    not_json.write_text("{")
    assert "not JSON" in _error(capsys, series, "--roi", str(not_json), *model)
    bad = tmp_path / "bad-roi.json"
    bad.write_text(json.dumps({**case.roi.to_json(), "slices_x_mm": [0.0] * 9}))
    assert "not a valid ROI" in _error(capsys, series, "--roi", str(bad), *model)
    assert "no such file" in _error(capsys, series, "--roi", str(tmp_path / "none.json"), *model)
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({**case.roi.to_json(), "slices_x_mm": [900.0, 903.0, 906.0]}))
    assert "outside" in _error(capsys, series, "--roi", str(outside), *model)

    assert "no such checkpoint" in _error(
        capsys, series, *roi, "--checkpoint", str(tmp_path / "none.pt")
    )
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint\n")
    assert "not a spine-triage checkpoint" in _error(
        capsys, series, *roi, "--checkpoint", str(damaged)
    )
