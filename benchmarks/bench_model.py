"""Benchmark: files on disk → patient probability for one 300-slice 512×512 study with an ROI.

Times, for the study stored uncompressed and as JPEG 2000 lossless:

- series load for the ROI (headers of all 300 files, geometry checks, decoding of the slices
  and of the part of each slice that the ROI needs),
- input building (5 slices × 3 slabs × 7 trilinear samples on a 64×64 grid),
- ResNet50 inference for the 5 inputs (CPU; CUDA too when present),

with medians of several runs (warm page cache; model loaded once, as a worker does). A full
decode of the whole series is timed once for comparison. The synthetic studies are written
once to ``--data`` (default ``var/bench-model``) and reused.

    python benchmarks/bench_model.py [--runs 5] [--data DIR] [--json results.json]
        [--torch-threads N] [--decode-threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SLICES = 300
SIDE = 512
SLICE_SPACING_MM = 1.0
PIXEL_SPACING_MM = 0.7
ROI_SLICES = 5
SEED = 2024


def prepare_study(data: Path, encoding: str) -> tuple[list[Path], Any]:
    """The benchmark study in one encoding (same phantom, same ROI for every encoding)."""
    from model.serving.roi import Roi
    from model.synthetic.cases import make_case

    case_dir = data / encoding
    roi_path = case_dir / "BENCH" / "roi.json"
    if not roi_path.exists():
        print(f"writing the {encoding} study ({SLICES} slices {SIDE}x{SIDE}) to {case_dir} ...")
        make_case(
            case_dir,
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
    roi = Roi.from_json(json.loads(roi_path.read_text()))
    if len(roi.slices_x_mm) != ROI_SLICES:  # the benchmark classifies five slice positions
        centre = sum(roi.slices_x_mm) / len(roi.slices_x_mm)
        positions = tuple(centre + 3.0 * (i - 2) for i in range(ROI_SLICES))
        roi = Roi.from_json({**roi.to_json(), "slices_x_mm": list(positions)})
    return sorted((case_dir / "BENCH" / "ct").glob("*.dcm")), roi


def prepare_checkpoint(data: Path) -> Path:
    """A ResNet50 checkpoint with random weights: timing does not depend on the weights."""
    import torch

    from model.serving.checkpoint import save_checkpoint
    from model.serving.network import build_resnet50
    from model.serving.preprocess import PreprocessParams

    path = data / "bench-model.pt"
    if not path.exists():
        torch.manual_seed(0)
        meta = {
            "name": "benchmark-resnet50",
            "version": "0",
            "device_uid": "1.2.826.0.1.3680043.8.498.1",
            "preprocessing": PreprocessParams().to_json(),
            "threshold": 0.5,
            "training": {},
            "demonstration": True,
            "intended_use": "benchmark only",
        }
        save_checkpoint(path, build_resnet50("random").state_dict(), meta)
    return path


def time_study(
    classifier: Any, paths: list[Path], roi: Any, runs: int, decode_threads: int | None
) -> dict[str, Any]:
    """Median wall-clock and CPU seconds (all threads of this process) per stage."""
    from model.io.volume import read_series_geometry
    from model.serving.preprocess import build_inputs

    stages = ("headers", "load", "inputs", "inference", "total")
    wall: dict[str, list[float]] = {name: [] for name in stages}
    cpu: dict[str, list[float]] = {name: [] for name in stages}
    volume = None
    for run in range(runs + 1):  # the first run warms caches and is not counted
        marks = [(time.perf_counter(), time.process_time())]
        read_series_geometry(paths)  # timed alone: load_series reads the headers again
        marks.append((time.perf_counter(), time.process_time()))
        volume = classifier.load_volume(paths, roi, workers=decode_threads)
        marks.append((time.perf_counter(), time.process_time()))
        inputs = build_inputs(volume, roi, classifier.preprocess)
        marks.append((time.perf_counter(), time.process_time()))
        patient = float(max(classifier.predict_inputs(inputs)))
        marks.append((time.perf_counter(), time.process_time()))
        assert 0.0 <= patient <= 1.0
        if run == 0:
            continue
        for i, name in enumerate(stages[:4]):
            wall[name].append(marks[i + 1][0] - marks[i][0])
            cpu[name].append(marks[i + 1][1] - marks[i][1])
        wall["total"].append(marks[4][0] - marks[1][0])  # files on disk → patient probability
        cpu["total"].append(marks[4][1] - marks[1][1])
    assert volume is not None
    return {
        "wall_s": {name: statistics.median(values) for name, values in wall.items()},
        "cpu_s": {name: statistics.median(values) for name, values in cpu.items()},
        "decoded_slices": volume.shape[0],
        "decoded_shape": volume.shape,
    }


def time_full_decode(paths: list[Path]) -> float:
    from model.io.volume import load_series

    start = time.perf_counter()
    load_series(paths)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--data", type=Path, default=Path("var/bench-model"), help="study cache")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--skip-full-decode", action="store_true", help="skip the comparison")
    parser.add_argument(
        "--torch-threads", type=int, help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument(
        "--decode-threads", type=int, help="threads decoding compressed slices (default: CPUs)"
    )
    args = parser.parse_args(argv)

    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    from model.serving.inference import Classifier

    args.data.mkdir(parents=True, exist_ok=True)
    checkpoint = prepare_checkpoint(args.data)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results: dict[str, Any] = {
        "torch_threads": torch.get_num_threads(),
        "decode_threads": args.decode_threads or os.cpu_count(),
        "study": f"{SLICES} slices {SIDE}x{SIDE}, {SLICE_SPACING_MM} mm slices",
        "cases": [],
        "load_average_before": os.getloadavg(),
    }
    for encoding in ("explicit", "j2k"):
        paths, roi = prepare_study(args.data, encoding)
        box = roi.square_box_yz()
        for device in devices:
            classifier = Classifier.load(checkpoint, device=device)
            classifier.predict_inputs(torch.zeros(ROI_SLICES, 3, 64, 64).numpy())  # warm-up
            timing = time_study(classifier, paths, roi, args.runs, args.decode_threads)
            timing.update(encoding=encoding, device=device, roi_box_side_mm=round(box.side, 1))
            if not args.skip_full_decode and device == "cpu":
                timing["full_series_decode_s"] = time_full_decode(paths)
            results["cases"].append(timing)
            m, c = timing["wall_s"], timing["cpu_s"]
            print(
                f"{encoding:8s} {device:4s} total {m['total'] * 1000:5.0f} ms (cpu "
                f"{c['total'] * 1000:5.0f}) = load {m['load'] * 1000:5.0f} (cpu "
                f"{c['load'] * 1000:5.0f}; headers alone {m['headers'] * 1000:4.0f}) + inputs "
                f"{m['inputs'] * 1000:4.0f} + inference {m['inference'] * 1000:4.0f} (cpu "
                f"{c['inference'] * 1000:4.0f}); decoded {timing['decoded_slices']}/{SLICES} "
                f"slices, region {timing['decoded_shape']}"
                + (
                    f"; whole-series decode {timing['full_series_decode_s']:.2f} s"
                    if "full_series_decode_s" in timing
                    else ""
                )
            )
    results["load_average_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
