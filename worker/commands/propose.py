"""``spine-triage propose``: where the vertebral bodies of a series are, as ROI proposals."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from model.io.volume import SeriesError, group_paths_by_series, read_series_geometry
from model.serving.localiser import LOCALISER_NAME, LOCALISER_VERSION, localise, propose_rois
from model.serving.overview import load_overview
from worker.commands import COMMANDS
from worker.preview import render_overview_png

DESCRIPTION = f"""\
Localise the vertebral bodies of one CT series ({LOCALISER_NAME} {LOCALISER_VERSION}: classical
image analysis, no trained weights; spinal canal tracking and partition of the body column at
the discs after Burns, Yao & Summers, Radiology 2017) and propose, for each body, the ROI of
METHOD.md: the body's outline rectangle widened by 8 mm in front and behind (where a
paravertebral or epidural mass would show) as the polygon, and 3-5 sagittal slice positions
over the central 60 % of its lateral extent. The node's automatic jobs propose the same ROIs.

SERIES_DIR holds the DICOM files of the series (searched recursively; when it holds several
series, the one with the most files is used and named on stderr).

Output: one line per body, inferior to superior: label (or '-' when the count is not anchored
on the sacrum), centre (x, y, z in LPS mm) and confidence (0..1). With --json, a JSON array of
ROI objects as the REST API accepts them (study_instance_uid, series_instance_uid,
slices_x_mm, polygon_yz_mm, vertebra when labelled) with a "confidence" member added.

When the series cannot be analysed (no spine in the field of view, too few slices, the field
of view cuts every body, metal over the spine) the reason is printed (on stderr with --json,
where stdout is then an empty array) and the exit code is 0. An unreadable folder or series
exits with code 2.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "propose",
        help=COMMANDS["propose"].help,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("series_dir", type=Path, metavar="SERIES_DIR", help="DICOM folder")
    parser.add_argument("--json", action="store_true", help="print the ROIs as a JSON array")
    parser.add_argument(
        "--slices",
        type=int,
        default=5,
        metavar="N",
        help="sagittal slices per ROI (3-5; default 5)",
    )
    parser.add_argument(
        "--preview",
        type=Path,
        metavar="PNG",
        help="write the sagittal overview (bone window) with every proposed square box drawn",
    )
    parser.set_defaults(handler=run_propose)


def run_propose(args: argparse.Namespace) -> int:
    if not 3 <= args.slices <= 5:
        print("propose: --slices must be 3, 4 or 5", file=sys.stderr)
        return 2
    if not args.series_dir.is_dir():
        print(f"propose: {args.series_dir}: not a folder", file=sys.stderr)
        return 2
    files = sorted(p for p in args.series_dir.rglob("*") if p.is_file())
    series = group_paths_by_series(files)
    if not series:
        print(f"propose: {args.series_dir}: no DICOM series found", file=sys.stderr)
        return 2
    uid, paths = max(series.items(), key=lambda item: len(item[1]))
    if len(series) > 1:
        print(f"propose: {len(series)} series; using {uid} ({len(paths)} files)", file=sys.stderr)
    try:
        # read as the automatic job reads it (model.serving.overview), so the same proposals
        volume = load_overview(read_series_geometry(paths))
    except SeriesError as exc:
        print(f"propose: {exc}", file=sys.stderr)
        return 2
    localisation = localise(volume)
    proposals = propose_rois(
        localisation,
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid,
        slices=args.slices,
    )
    if args.preview is not None:
        args.preview.parent.mkdir(parents=True, exist_ok=True)
        args.preview.write_bytes(render_overview_png(volume, [(p.roi, None) for p in proposals]))
    if args.json:
        print(json.dumps([{**p.roi.to_json(), "confidence": p.confidence} for p in proposals]))
        if localisation.unanalysable:
            print(f"propose: not analysable: {localisation.unanalysable}", file=sys.stderr)
        return 0
    if localisation.unanalysable:
        print(f"not analysable: {localisation.unanalysable}")
        return 0
    for body in localisation.bodies:
        x, y, z = body.centre_mm
        print(
            f"{body.label or '-':>4}  centre x {x:7.1f}  y {y:7.1f}  z {z:7.1f} mm  "
            f"confidence {body.confidence:.2f}"
        )
    return 0
