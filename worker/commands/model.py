"""``spine-triage synth`` and ``spine-triage preprocess``: synthetic studies and network inputs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from model.io.volume import SeriesError, group_paths_by_series
from model.serving.checkpoint import CheckpointError, load_checkpoint
from model.serving.preprocess import PreprocessParams, build_inputs, load_roi_volume
from model.serving.roi import Roi, RoiError
from model.synthetic.cases import make_cohort
from worker.commands import COMMANDS

logger = logging.getLogger(__name__)

SYNTH_DESCRIPTION = """\
Write synthetic spine CT studies (no patient data) so that the whole system can be exercised:
per patient an axial CT series as DICOM files (CT Image Storage, or one Enhanced CT instance
with --multiframe), the ROI a radiologist would draw on the fractured vertebra (roi.json, the
JSON the REST API accepts) and the label with the features the phantom shows (label.json).
With --normals N each case also gets the ROIs an automatic localiser would propose: on the
fractured body (roi-body.json) and on up to N normal bodies (roi-normal-1.json, ...): drawn
from the phantom's truth, or with --body-rois-from localiser the localiser's own proposals on
the written series (what an automatic job classifies). A manifest.csv
(patient_id,label,series_dir,roi,roi_source; one row per ROI, label normal on a normal body)
lists them for training and evaluation.

Phantoms have 5-7 vertebral bodies with cortex and cancellous bone, discs, rough posterior
elements, muscles, fat, air and noise. Benign cases show compression, a sclerotic fracture
line and cortical interruption; malignant cases lytic destruction reaching the cortex and a
paravertebral soft-tissue mass (after Table 1 of Li et al., Eur Radiol 2021). The same seed
gives the same studies, UIDs included.
"""

SYNTH_EPILOG = """\
examples:
  spine-triage synth --out var/synthetic --patients 20 --seed 1
  spine-triage synth --out /tmp/big --patients 1 --seed 7 --size full --slices 300 \\
      --slice-spacing 1 --pixel-spacing 0.7 --transfer-syntax j2k
"""

PREPROCESS_DESCRIPTION = """\
Build the network inputs for an ROI exactly as the classifier sees them and save them to an
.npz file with arrays 'inputs' (n, 3, 64, 64) float32 and 'x_mm' (n,): one z-scored 3-channel
tensor per lateral slice position of the ROI (sagittal slabs of 3 mm at x-3, x, x+3 mm,
superior at row 0, anterior at column 0; see METHOD.md).

STUDY_DIR holds DICOM files (searched recursively); the series named by the ROI's
series_instance_uid is used. ROI.json is the JSON the REST API accepts:
{"study_instance_uid", "series_instance_uid", "slices_x_mm": [...],
 "polygon_yz_mm": [[y, z], ...], "vertebra": "L1"} (coordinates in LPS millimetres).
"""


def register(subparsers: Any) -> None:
    synth = subparsers.add_parser(
        "synth",
        help=COMMANDS["synth"].help,
        description=SYNTH_DESCRIPTION,
        epilog=SYNTH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    synth.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    synth.add_argument("--patients", type=int, required=True, metavar="N", help="how many")
    synth.add_argument("--seed", type=int, required=True, metavar="S", help="random seed")
    synth.add_argument(
        "--size",
        choices=["small", "full"],
        default="small",
        help="small: 160x160, 2.5-3 mm slices (fast; the default); full: 512x512, 1-3 mm",
    )
    synth.add_argument(
        "--malignant-fraction",
        type=float,
        default=0.5,
        metavar="F",
        help="share of malignant cases (default 0.5)",
    )
    synth.add_argument(
        "--normals",
        type=int,
        default=0,
        metavar="N",
        help="also write localiser-like ROIs: on the fractured body and on up to N normal "
        "bodies per case (default 0: the reader's ROI only)",
    )
    synth.add_argument(
        "--body-rois-from",
        choices=["phantom", "localiser"],
        default="phantom",
        help="with --normals: the body ROIs drawn from the phantom's truth (default) or the "
        "localiser's own proposals on the written series",
    )
    synth.add_argument(
        "--transfer-syntax",
        choices=["explicit", "j2k", "rle"],
        default="explicit",
        help="explicit VR little endian (default), JPEG 2000 lossless or RLE lossless",
    )
    synth.add_argument(
        "--slices", type=int, metavar="N", help="slice count (default: 5-7 vertebrae)"
    )
    synth.add_argument("--slice-spacing", type=float, metavar="MM", help="slice spacing in mm")
    synth.add_argument("--pixel-spacing", type=float, metavar="MM", help="pixel spacing in mm")
    position = synth.add_mutually_exclusive_group()
    position.add_argument(
        "--feet-first", action="store_true", help="every series feet-first (default: mixed)"
    )
    position.add_argument(
        "--head-first", action="store_true", help="every series head-first (default: mixed)"
    )
    synth.add_argument(
        "--multiframe", action="store_true", help="one Enhanced CT instance per series"
    )
    synth.set_defaults(handler=run_synth)

    preprocess = subparsers.add_parser(
        "preprocess",
        help=COMMANDS["preprocess"].help,
        description=PREPROCESS_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    preprocess.add_argument("study_dir", type=Path, metavar="STUDY_DIR", help="DICOM folder")
    preprocess.add_argument("--roi", type=Path, required=True, metavar="ROI.json", help="the ROI")
    preprocess.add_argument(
        "--out", type=Path, required=True, metavar="inputs.npz", help="output file"
    )
    preprocess.add_argument(
        "--checkpoint",
        type=Path,
        metavar="MODEL.pt",
        help="use the preprocessing parameters stored in this checkpoint (default: METHOD.md's)",
    )
    preprocess.set_defaults(handler=run_preprocess)


def run_synth(args: argparse.Namespace) -> int:

    if args.patients < 1:
        print("synth: --patients must be at least 1", file=sys.stderr)
        return 2
    if args.normals < 0:
        print("synth: --normals must be 0 or more", file=sys.stderr)
        return 2
    options: dict[str, Any] = {"size": args.size, "transfer_syntax": args.transfer_syntax}
    for name, value in (
        ("slices", args.slices),
        ("slice_spacing_mm", args.slice_spacing),
        ("pixel_spacing_mm", args.pixel_spacing),
    ):
        if value is not None:
            options[name] = value
    if args.feet_first or args.head_first:
        options["feet_first"] = bool(args.feet_first)
    if args.multiframe:
        options["multiframe"] = True
    try:
        cases = make_cohort(
            args.out,
            patients=args.patients,
            seed=args.seed,
            malignant_fraction=args.malignant_fraction,
            normals=args.normals,
            body_rois_from=args.body_rois_from,
            **options,
        )
    except ValueError as exc:
        print(f"synth: {exc}", file=sys.stderr)
        return 2
    malignant = sum(case.label == "malignant" for case in cases)
    normals = sum(len(case.normal_rois) for case in cases)
    print(
        f"wrote {len(cases)} synthetic studies ({malignant} malignant, "
        f"{len(cases) - malignant} benign"
        + (f"; {normals} ROIs on normal bodies" if args.normals else "")
        + f") to {args.out}; manifest: {args.out / 'manifest.csv'}"
    )
    return 0


def run_preprocess(args: argparse.Namespace) -> int:
    import numpy as np

    try:
        roi = Roi.from_json(json.loads(args.roi.read_text()))
    except (OSError, json.JSONDecodeError, RoiError) as exc:
        print(f"preprocess: {args.roi}: {exc}", file=sys.stderr)
        return 2
    params = PreprocessParams()
    if args.checkpoint is not None:
        try:
            params = PreprocessParams.from_json(
                load_checkpoint(args.checkpoint)[1]["preprocessing"]
            )
        except (OSError, CheckpointError) as exc:
            print(f"preprocess: {args.checkpoint}: {exc}", file=sys.stderr)
            return 2
    if not args.study_dir.is_dir():
        print(f"preprocess: {args.study_dir}: not a folder", file=sys.stderr)
        return 2
    files = sorted(p for p in args.study_dir.rglob("*") if p.is_file())
    series = group_paths_by_series(files)
    paths = series.get(roi.series_instance_uid)
    if not paths:
        print(
            f"preprocess: no files of series {roi.series_instance_uid} in {args.study_dir} "
            f"(found {len(series)} other series)",
            file=sys.stderr,
        )
        return 2
    try:
        volume = load_roi_volume(paths, roi, lateral_reach_mm=params.lateral_reach_mm)
        inputs = build_inputs(volume, roi, params)
    except SeriesError as exc:
        print(f"preprocess: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("wb") as stream:
        np.savez(stream, inputs=inputs, x_mm=np.asarray(roi.slices_x_mm, dtype=np.float64))
    print(f"wrote inputs {tuple(inputs.shape)} for x = {list(roi.slices_x_mm)} mm to {args.out}")
    return 0
