"""The automatic job's steps on one 300-slice 512×512 study, uncompressed and JPEG 2000
lossless: read the headers, decode the volume, localise every vertebral body, classify them
all (one batch) — what the flag waits for (``to_flag_wall_s``) — then build the review series
(one image per distinct central slice position of the bodies, the columns it needs read after
the flag), the key image, the SR and the sagittal preview — wall and CPU seconds (median of
``--runs``) and the process's peak resident memory. For the ratio, the review series is also
built the former way (an image at every slice position of every body) in the same run.

    python benchmarks/bench_automatic.py [--runs 3] [--slices 300] [--checkpoint model.pt]
        [--json out.json]

Targets on a 2-core CPU (issue #14): localisation < 1 s, whole job < 3 s, RSS < 1.5 GiB. The
steps are the worker's own functions (:mod:`worker.automatic`), run in this process without a
database, a broker or a PACS.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.io.headers import read_headers  # noqa: E402
from model.io.volume import read_series_geometry  # noqa: E402
from model.serving.inference import Classifier  # noqa: E402
from model.serving.localiser import LOCALISER_NAME, LOCALISER_VERSION  # noqa: E402
from model.synthetic.cases import make_case  # noqa: E402
from worker.automatic import (  # noqa: E402
    classify_bodies,
    load_bodies,
    load_overview,
    localise_bodies,
    propose,
    review_positions,
)
from worker.derived import make_review_series, slice_positions  # noqa: E402
from worker.key_image import KeyFinding, build_key_image, headline  # noqa: E402
from worker.preview import render_overview_png  # noqa: E402
from worker.series import Series  # noqa: E402
from worker.sr import AlgorithmInfo, TriageFinding, sr_to_bytes  # noqa: E402
from worker.sr_automatic import LocaliserInfo, build_automatic_sr  # noqa: E402

T = TypeVar("T")

# What the flag waits for (the worker sends it after these; the report comes after it).
FLAG_STEPS = ("headers", "geometry", "decode_overview", "localise", "decode_bodies", "classify")


def timed(step: Callable[[], T], into: dict[str, list[tuple[float, float]]], name: str) -> T:
    wall, cpu = time.perf_counter(), time.process_time()
    value = step()
    into.setdefault(name, []).append((time.perf_counter() - wall, time.process_time() - cpu))
    return value


def one_run(
    paths: list[Path], classifier: Classifier, into: dict[str, Any], every_position: bool
) -> int:
    headers = timed(lambda: read_headers(paths), into, "headers")
    geometry = timed(lambda: read_series_geometry(paths, headers), into, "geometry")
    series = Series("bench", "bench", tuple(paths), tuple(headers), geometry)
    overview = timed(lambda: load_overview(series), into, "decode_overview")
    proposals = timed(lambda: propose(localise_bodies(overview), overview), into, "localise")
    volume = timed(
        lambda: load_bodies(classifier, series, overview, proposals), into, "decode_bodies"
    )
    bodies = timed(lambda: classify_bodies(classifier, volume, proposals), into, "classify")
    params = classifier.preprocess
    positions = review_positions([b.roi for b in bodies])
    review = timed(
        lambda: make_review_series(series, positions, params, job_key="bench", volume=volume),
        into,
        "review_series",
    )
    if every_position:  # the former layout, for the ratio: every slice position of every body
        every = slice_positions([b.roi.slices_x_mm for b in bodies])
        timed(
            lambda: make_review_series(series, every, params, job_key="bench", volume=volume),
            into,
            "review_series_every_position",
        )
        into.setdefault("images", []).append((len(positions), len(every)))
    top = bodies[0]
    key_image = timed(
        lambda: build_key_image(
            headers[0],
            review.image_at(top.roi.central_slice_x_mm),
            [
                KeyFinding(
                    b.roi.polygon_yz_mm,
                    b.prediction.patient_probability,
                    b.prediction.priority == "HIGH",
                    b.roi.vertebra,
                )
                for b in bodies
            ],
            result_line=headline(
                top.prediction.patient_probability, top.prediction.priority, top.roi.vertebra
            ),
            job_key="bench",
            model_version=classifier.version,
        ),
        into,
        "key_image",
    )

    def report() -> bytes:
        algorithm = AlgorithmInfo(
            name=classifier.name, version=classifier.version, device_uid=classifier.device_uid
        )
        sr = build_automatic_sr(
            headers,
            [TriageFinding(roi=b.roi, prediction=b.prediction) for b in bodies],
            algorithm,
            LocaliserInfo(LOCALISER_NAME, LOCALISER_VERSION),
            job_key="bench",
            review=review,
            key_image=key_image,
        )
        render_overview_png(overview, [(b.roi, b.prediction.patient_probability) for b in bodies])
        return sr_to_bytes(sr)

    timed(report, into, "sr_and_preview")
    return len(bodies)


def write_studies(folder: Path, slices: int) -> None:
    for syntax in ("explicit", "j2k"):
        make_case(
            folder / syntax,
            patient_id=f"BENCH-{syntax}",
            label="malignant",
            seed=7,
            size="full",
            slices=slices,
            slice_spacing_mm=1.0,
            transfer_syntax=syntax,  # type: ignore[arg-type]
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--checkpoint", type=Path, help="default: the demonstration model")
    parser.add_argument(
        "--no-every-position",
        dest="every_position",
        action="store_false",
        help="do not also time the review series at every slice position of every body "
        "(the former layout, kept for the ratio)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    checkpoint = args.checkpoint
    if checkpoint is None:
        from model.synthetic.demo import ensure_demo_checkpoint

        checkpoint = ensure_demo_checkpoint(ROOT / "var" / "models")
    figures: dict[str, Any] = {"runs": args.runs, "slices": args.slices}
    with tempfile.TemporaryDirectory() as folder:
        # The studies are written by a child process, so this process's peak memory is the
        # job's (model, volumes, inputs), not the phantom renderer's.
        writer = multiprocessing.get_context("fork").Process(
            target=write_studies, args=(Path(folder), args.slices)
        )
        writer.start()
        writer.join()
        if writer.exitcode != 0:
            raise SystemExit("writing the benchmark studies failed")
        classifier = Classifier.load(checkpoint, device="cpu")
        for syntax in ("explicit", "j2k"):
            paths = sorted((Path(folder) / syntax).rglob("*.dcm"))
            steps: dict[str, list[tuple[float, float]]] = {}
            one_run(paths, classifier, {}, False)  # warm-up: page cache, torch
            count = 0
            for _ in range(args.runs):
                count = one_run(paths, classifier, steps, args.every_position)
            images = steps.pop("images", [(0, 0)])[-1]
            every = steps.pop("review_series_every_position", None)
            walls = [sum(run[0] for run in runs) for runs in zip(*steps.values(), strict=True)]
            to_flag = [sum(steps[name][i][0] for name in FLAG_STEPS) for i in range(args.runs)]
            cpus = [sum(run[1] for run in runs) for runs in zip(*steps.values(), strict=True)]
            if every is not None:
                review = steps["review_series"]
                figures[f"{syntax}_review_images"] = {
                    "shared_central_positions": images[0],
                    "every_position_of_every_body": images[1],
                    "wall_s": round(statistics.median(w for w, _ in review), 3),
                    "every_position_wall_s": round(statistics.median(w for w, _ in every), 3),
                    "cpu_s": round(statistics.median(c for _, c in review), 3),
                    "every_position_cpu_s": round(statistics.median(c for _, c in every), 3),
                }
            figures[syntax] = {
                "bodies": count,
                "steps_wall_s": {
                    k: round(statistics.median(w for w, _ in v), 3) for k, v in steps.items()
                },
                "steps_cpu_s": {
                    k: round(statistics.median(c for _, c in v), 3) for k, v in steps.items()
                },
                "to_flag_wall_s": round(statistics.median(to_flag), 3),
                "job_wall_s": round(statistics.median(walls), 3),
                "job_cpu_s": round(statistics.median(cpus), 3),
            }
    figures["job_peak_rss_mib"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
    )
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
