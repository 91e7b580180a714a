"""Benchmark: vertebra localisation on a 300-slice 512×512 study and on the real CT.

Times, for the synthetic study stored uncompressed and as JPEG 2000 lossless, what the
automatic job does before it can propose an ROI:

- headers: the series' headers read and its geometry validated,
- overview: the series read as the localiser reads it (:func:`model.serving.overview.
  load_overview`: an uncompressed series as the localiser's own 2 mm block means straight from
  the files, JPEG 2000 at reduced resolution and slice density),
- localise: :func:`model.serving.localiser.localise` on the overview,
- localisation: the three together (issue #14's target: < 1 s),
- and, for comparison, the whole series decoded at full resolution and localised,

with medians of wall-clock and CPU seconds (all threads) over several runs (warm page cache),
and the bodies found. The real CT (``shared/data/real-ct``, written as DICOM once) is timed the
same way. ``--preview PNG`` also writes the real CT's sagittal overview with the proposed
boxes (this is how ``docs/real-ct-proposals.png`` is made).

    python benchmarks/bench_localiser.py [--runs 5] [--data DIR] [--json results.json]
        [--preview docs/real-ct-proposals.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SLICES = 300
SLICE_SPACING_MM = 1.0
PIXEL_SPACING_MM = 0.7
SEED = 2024


def prepare_study(data: Path, encoding: str) -> list[Path]:
    from model.synthetic.cases import make_case

    series_dir = data / encoding / "BENCH" / "ct"
    if not series_dir.is_dir():
        print(f"writing the {encoding} study ({SLICES} slices 512x512) to {series_dir} ...")
        make_case(
            data / encoding,
            patient_id="BENCH",
            label="malignant",
            seed=SEED,
            size="full",
            slices=SLICES,
            slice_spacing_mm=SLICE_SPACING_MM,
            pixel_spacing_mm=PIXEL_SPACING_MM,
            transfer_syntax=encoding,
            feet_first=False,
        )
    return sorted(series_dir.glob("*.dcm"))


def prepare_real_ct(data: Path) -> list[Path] | None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.real_ct import REAL_CT_PATH, write_real_ct_series

    if not REAL_CT_PATH.is_file():
        print(f"real CT not found at {REAL_CT_PATH}; skipped")
        return None
    series_dir = data / "real-ct"
    if not series_dir.is_dir():
        write_real_ct_series(series_dir)
    return sorted(series_dir.glob("*.dcm"))


def _timed(function: Any, *args: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def time_series(paths: list[Path], runs: int) -> dict[str, Any]:
    from model.io.headers import read_headers
    from model.io.volume import load_volume, read_series_geometry
    from model.serving.localiser import localise
    from model.serving.overview import load_overview, overview_plan

    def geometry_of() -> Any:
        return read_series_geometry(paths, read_headers(paths))

    stages = ("headers", "overview", "localise", "localisation", "decode_full", "localise_full")
    wall: dict[str, list[float]] = {name: [] for name in stages}
    cpu: dict[str, list[float]] = {name: [] for name in stages}
    result = None
    for run in range(runs + 1):  # the first run warms caches and is not counted
        geometry, w0, c0 = _timed(geometry_of)
        small, w1, c1 = _timed(load_overview, geometry)
        result, w2, c2 = _timed(localise, small)
        volume, w3, c3 = _timed(load_volume, geometry)
        _, w4, c4 = _timed(localise, volume)
        del volume
        if run == 0:
            continue
        for name, w, c in (
            ("headers", w0, c0),
            ("overview", w1, c1),
            ("localise", w2, c2),
            ("localisation", w0 + w1 + w2, c0 + c1 + c2),
            ("decode_full", w3, c3),
            ("localise_full", w4, c4),
        ):
            wall[name].append(w)
            cpu[name].append(c)
    assert result is not None
    return {
        "wall_s": {name: round(statistics.median(v), 4) for name, v in wall.items()},
        "cpu_s": {name: round(statistics.median(v), 4) for name, v in cpu.items()},
        "shape": list(geometry.shape),
        "plan": repr(overview_plan(geometry)),
        "overview_shape": list(small.shape),
        "unanalysable": result.unanalysable,
        "bodies": [
            {"z_mm": b.centre_mm[2], "label": b.label, "confidence": b.confidence}
            for b in result.bodies
        ],
    }


def write_preview(paths: list[Path], target: Path) -> None:
    from model.io.volume import load_series
    from model.serving.localiser import localise, propose_rois
    from worker.preview import render_overview_png

    volume = load_series(paths)
    proposals = propose_rois(
        localise(volume),
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(render_overview_png(volume, [(p.roi, None) for p in proposals]))
    print(f"wrote {target} ({len(proposals)} boxes)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--data", type=Path, default=Path("var/bench-localiser"), help="cache")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--preview", type=Path, metavar="PNG", help="real CT overview to write")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    for encoding in ("explicit", "j2k"):
        paths = prepare_study(args.data, encoding)
        results[f"phantom-{encoding}"] = time_series(paths, args.runs)
    real = prepare_real_ct(args.data)
    if real is not None:
        results["real-ct"] = time_series(real, args.runs)
        if args.preview is not None:
            write_preview(real, args.preview)
    for name, result in results.items():
        print(f"{name}: {result['shape']} -> overview {result['overview_shape']} {result['plan']}")
        for stage, seconds in result["wall_s"].items():
            print(f"  {stage:26s} wall {seconds:7.3f} s  cpu {result['cpu_s'][stage]:7.3f} s")
        bodies = ", ".join(f"{b['z_mm']:.0f} mm ({b['label'] or '-'})" for b in result["bodies"])
        print(f"  bodies: {bodies or result['unanalysable']}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
