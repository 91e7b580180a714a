"""The node's result SR in the real OHIF viewer (npm ``@ohif/app`` 3.13, its built ``dist/``).

A study goes the way it goes at a site: the CT is stored in the PACS (Orthanc), Orthanc
forwards the stable study to the node (``deploy/orthanc/forward-to-spine-triage.lua``), a
reader's ROI is posted, the worker runs, and the node stores the SR and its sagittal review
series in the PACS by C-STORE. OHIF, served by the same Orthanc (ServeFolders, one origin with
DICOMweb), opens the study in headless Chromium; the SR's thumbnail is double-clicked and the
test asserts what OHIF drew: one region per measurement group, on the review image of the
group's slice position, at the patient coordinates of the ROI, labelled with the probability,
and green pixels on the screenshot along the box's edges. Screenshots go to the test's
folder; ``docs/ohif-sr-review.png`` is the automatic job's (rewritten when
``SPINE_TRIAGE_TEST_UPDATE_DOCS`` is set).

The round trip a radiologist makes is here too: a rectangle drawn on the review series with
OHIF's RectangleROI tool, saved as an SR ("Create SR": STOW-RS to Orthanc), forwarded to the
node and run as the reader's ROI.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from sqlalchemy import select

from dicom_node.archive.schema import AnnotationState, RoiAnnotation, TriageResult
from tests.deploy.files import DEPLOY
from tests.services import Orthanc
from tests.system import System, case_files
from tests.viewer.ohif import prepare_site, require_viewer, run_driver, start_viewer_orthanc

LUA = DEPLOY / "orthanc" / "forward-to-spine-triage.lua"
SR_SERIES_NUMBER = 9901
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "ohif-sr-review.png"
UPDATE_DOCS = "SPINE_TRIAGE_TEST_UPDATE_DOCS"  # set: the docs' screenshot is rewritten
GREEN_MIN, OTHER_MAX = 160, 110  # the SR overlay's colour: rgb(0, 255, 0), anti-aliased


@pytest.fixture(scope="module")
def viewer_pacs() -> Iterator[Orthanc]:
    """One Orthanc for the module: DICOMweb, OHIF under /ohif, the deploy Lua forwarding."""
    require_viewer()
    folder = Path(tempfile.mkdtemp(prefix="st-ohif-"))
    site = prepare_site(folder / "site")
    server = start_viewer_orthanc(
        folder / "orthanc", site, modalities={}, lua=LUA.read_text(), stable_age_s=1
    )
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory, demo_checkpoint: Path) -> dict[str, Any]:
    """A held-out malignant and benign synthetic study the model calls right from the
    reader's ROI, as the end-to-end test; two more for the reader and automatic cases."""
    from model.synthetic.cases import make_case
    from tests.answers import case_called_right

    folder = tmp_path_factory.mktemp("ohif-cases")
    made = {
        label: case_called_right(
            folder, demo_checkpoint, patient_id=f"OHIF-{label}", label=label, mode="reader"
        )
        for label in ("malignant", "benign")
    }
    made["reader"] = make_case(folder, patient_id="OHIF-reader", label="malignant", seed=4244)
    made["automatic"] = make_case(folder, patient_id="OHIF-auto", label="malignant", seed=4245)
    return made


def processed_study(
    system_factory: Callable[..., System],
    pacs: Orthanc,
    case: Any,
    checkpoint: Path,
    tmp_path: Path,
    *,
    automatic: bool = False,
) -> tuple[System, TriageResult]:
    """The node and a worker behind ``pacs``; ``case`` stored in the PACS, forwarded, its
    ROI posted (``automatic``: none, the automatic job's result), the result delivered back
    (SR, review series, key image). Returns the running system and the result."""
    system = system_factory(
        auto_roi="always" if automatic else "off",
        database_url=f"sqlite:///{tmp_path / 'viewer.db'}",
        model_checkpoint=checkpoint,
        destinations=json.dumps(
            [
                {
                    "name": "pacs",
                    "kind": "cstore",
                    "ae_title": pacs.aet,
                    "host": "127.0.0.1",
                    "port": pacs.dicom_port,
                }
            ]
        ),
        allowed_calling_aes=pacs.aet,
    )
    with pacs.client() as client:
        answer = client.put(
            "/modalities/spine-triage",
            json={"AET": "SPINE_TRIAGE", "Host": "127.0.0.1", "Port": system.node.dicom_address[1]},
        )
        assert answer.status_code == 200, answer.text
        system.start_worker()
        for path in case_files(case):
            assert client.post("/instances", content=path.read_bytes()).status_code == 200
    if automatic:
        chosen = TriageResult.auto_job_id.is_not(None)
    else:
        annotation = system.post_roi(case.roi.to_json())
        chosen = TriageResult.annotation_id == annotation

    def delivered() -> TriageResult | None:
        with system.node.sessions() as session:
            result = session.scalars(select(TriageResult).where(chosen)).one_or_none()
        return result if result is not None and system.deliveries_delivered() >= 1 else None

    system.wait_until(
        lambda: delivered() is not None,
        timeout=180,
        what="the result in the PACS (the study forwarded by Orthanc, the job run)",
    )
    result = delivered()
    assert result is not None
    return system, result


def review_images(system: System, result: TriageResult) -> dict[str, pydicom.Dataset]:
    """The review series of ``result`` (headers), by SOP Instance UID."""
    root = system.settings.resolved_storage_dir
    paths = result.review_paths or []
    headers = [pydicom.dcmread(root / path, stop_before_pixels=True) for path in paths]
    return {str(ds.SOPInstanceUID): ds for ds in headers}


def sop_of(image_id: str) -> str:
    """The SOP Instance UID in a WADO-RS image id (``.../instances/UID/frames/1``)."""
    parts = image_id.split("/")
    return parts[parts.index("instances") + 1]


def green_fraction(screenshot: Path, polygon: list[list[float]]) -> tuple[float, float]:
    """(share of samples along the polygon's edges, share inside it away from the edges)
    that are the overlay's green, within 2 pixels."""
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    height, width, _ = pixels.shape

    def green_near(x: float, y: float) -> bool:
        col, row = round(x), round(y)
        rows = slice(max(row - 2, 0), min(row + 3, height))
        patch = pixels[rows, max(col - 2, 0) : min(col + 3, width)]
        red, green, blue = patch[..., 0], patch[..., 1], patch[..., 2]
        return bool(((green >= GREEN_MIN) & (red <= OTHER_MAX) & (blue <= OTHER_MAX)).any())

    points = np.asarray(polygon, dtype=float)
    edge_hits = []
    for start, end in itertools.pairwise(points):
        for t in np.linspace(0.1, 0.9, 17):
            x, y = start + t * (end - start)
            edge_hits.append(green_near(x, y))
    centre = points[:-1].mean(axis=0)
    inside_hits = [green_near(*(centre + 0.4 * (corner - centre))) for corner in points[:-1]]
    return float(np.mean(edge_hits)), float(np.mean(inside_hits))


@pytest.mark.parametrize("label", ["malignant", "benign"])
def test_ohif_draws_the_node_sr_on_its_review_series(
    label: str,
    system_factory: Callable[..., System],
    viewer_pacs: Orthanc,
    cases: dict[str, Any],
    demo_checkpoint: Path,
    tmp_path: Path,
) -> None:
    case = cases[label]
    system, result = processed_study(system_factory, viewer_pacs, case, demo_checkpoint, tmp_path)
    assert result.priority == ("HIGH" if label == "malignant" else "ROUTINE"), (
        f"{label} phantom scored {result.patient_probability:.3f}"
    )
    images = review_images(system, result)
    assert len(images) == len(case.roi.slices_x_mm)

    screenshot = tmp_path / f"ohif-sr-{label}.png"
    run = run_driver(
        viewer_pacs,
        {
            "action": "sr",
            "study": case.roi.study_instance_uid,
            "srSeries": SR_SERIES_NUMBER,
            "screenshot": str(screenshot),
        },
    )
    drawn = run.result
    (tmp_path / "ohif-driver.json").write_text(json.dumps(drawn, indent=1))
    assert "error" not in drawn, drawn
    assert not [line for line in drawn["log"] if line.startswith("pageerror")], drawn["log"]

    # One drawn region per slice position, each a closed polyline on its own review image.
    # (OHIF merges the groups of one tracking UID: the ROI group and its slice groups' twins
    # make 1 + slices measurements.)
    annotations = drawn["annotations"]
    assert len(annotations) == 1 + len(case.roi.slices_x_mm), annotations
    polygon = np.asarray(case.roi.polygon_yz_mm)
    for annotation in annotations:
        assert annotation["graphicType"] == "POLYLINE", annotation
        image = images[sop_of(annotation["referencedImageId"])]
        x = float(image.ImagePositionPatient[0])
        points = np.asarray(annotation["points"], dtype=float)
        assert np.allclose(points[0], points[-1]), "the polyline is closed"
        assert np.allclose(points[:, 0], x, atol=0.01), "on the review image's plane"
        # the region OHIF drew lies at the ROI's patient coordinates (float32 in the SR)
        assert np.allclose(points[:-1, 1:], polygon, atol=0.01), (points, polygon)
        probability = float(annotation["label"].split()[0])
        assert 0.0 <= probability <= 1.0
    shown = [a for a in annotations if a["shown"]]
    assert shown, "OHIF shows the image of the first measurement"
    top = max(float(a["label"].split()[0]) for a in annotations)
    assert top == pytest.approx(result.patient_probability, abs=0.006)

    # ...and it is on the screen: the overlay's green along the box's edges, not inside it.
    along, inside = green_fraction(screenshot, shown[0]["page"])
    assert along >= 0.5, f"only {along:.0%} of the box's edge is drawn"
    assert inside <= 0.25, f"{inside:.0%} of the inside is overlay green"


def docs_picture(screenshot: Path, target: Path) -> Path:
    """The docs' picture of a screenshot: the whole window at 60 %, 128 colours."""
    image = Image.open(screenshot).convert("RGB")
    small = image.resize((image.width * 3 // 5, image.height * 3 // 5), Image.Resampling.LANCZOS)
    small.quantize(colors=128).save(target, optimize=True)
    return target


def test_a_reader_draws_an_roi_in_ohif_and_the_node_runs_it(
    system_factory: Callable[..., System],
    viewer_pacs: Orthanc,
    cases: dict[str, Any],
    demo_checkpoint: Path,
    tmp_path: Path,
) -> None:
    """The round trip: a rectangle drawn with OHIF's RectangleROI tool on the review image,
    saved with "Create SR" (STOW-RS to Orthanc), forwarded by Orthanc's Lua to the node, taken
    as the reader's ROI (same patient coordinates, the CT series, three slabs centred on the
    image), and the job runs."""
    case = cases["reader"]
    tool = "RectangleROI"
    system, first = processed_study(system_factory, viewer_pacs, case, demo_checkpoint, tmp_path)
    images = sorted(
        review_images(system, first).values(), key=lambda ds: ds.ImagePositionPatient[0]
    )
    image = images[len(images) // 2]
    y0, z0 = float(image.ImagePositionPatient[1]), float(image.ImagePositionPatient[2])
    spacing = float(image.PixelSpacing[0])
    ys, zs = zip(*case.roi.polygon_yz_mm, strict=True)
    # the ROI's bounding box in the image's (column, row) coordinates (SCOORD convention)
    start = [(min(ys) - y0) / spacing + 0.5, (z0 - max(zs)) / spacing + 0.5]
    end = [(max(ys) - y0) / spacing + 0.5, (z0 - min(zs)) / spacing + 0.5]

    run = run_driver(
        viewer_pacs,
        {
            "action": "draw",
            "study": case.roi.study_instance_uid,
            "imageSeries": int(image.SeriesNumber),
            "sop": str(image.SOPInstanceUID),
            "tool": tool,
            "path": [start, end],
            "reportName": "Reader ROI",
            "screenshot": str(tmp_path / "ohif-drawn.png"),
        },
    )
    drawn = run.result
    (tmp_path / "ohif-driver.json").write_text(json.dumps(drawn, indent=1))
    assert "error" not in drawn, drawn
    assert drawn["stowStatus"] == 200, drawn
    [measurement] = drawn["measurements"]
    assert measurement["toolName"] == tool
    assert measurement["sop"] == image.SOPInstanceUID
    corners = np.asarray(measurement["points"], dtype=float)  # patient coordinates (LPS)

    def reader_annotation() -> RoiAnnotation | None:
        with system.node.sessions() as session:
            return session.scalars(
                select(RoiAnnotation).where(RoiAnnotation.source == "sr")
            ).one_or_none()

    system.wait_until(
        lambda: (found := reader_annotation()) is not None and found.state is AnnotationState.DONE,
        timeout=120,
        what="the reader's ROI from OHIF to be analysed (forwarded by Orthanc)",
    )
    annotation = reader_annotation()
    assert annotation is not None
    assert annotation.study_instance_uid == case.roi.study_instance_uid
    assert annotation.series_instance_uid == case.roi.series_instance_uid, "the CT, not 9902"
    x = float(image.ImagePositionPatient[0])
    slab = float(image.SliceThickness)
    assert annotation.slices_x_mm == pytest.approx([x - slab, x, x + slab], abs=1e-3)
    polygon = np.asarray(annotation.polygon_yz_mm, dtype=float)
    # the node's polygon is OHIF's rectangle, at the same patient coordinates
    assert polygon.min(axis=0) == pytest.approx(corners[:, 1:].min(axis=0), abs=0.01)
    assert polygon.max(axis=0) == pytest.approx(corners[:, 1:].max(axis=0), abs=0.01)
    # ...which is the box the reader was shown, to a pixel of the screen
    box = np.array([[min(ys), min(zs)], [max(ys), max(zs)]])
    assert np.abs(polygon.min(axis=0) - box[0]).max() <= 2 * spacing
    assert np.abs(polygon.max(axis=0) - box[1]).max() <= 2 * spacing
    with system.node.sessions() as session:
        result = session.scalars(
            select(TriageResult).where(TriageResult.annotation_id == annotation.id)
        ).one()
    assert result.priority in ("HIGH", "ROUTINE")
    assert result.slice_x_mm == pytest.approx(annotation.slices_x_mm)
    # ...and the worklist shows it: the study's reader result is the one of OHIF's ROI
    items = httpx.get(
        f"{system.api}/worklist",
        headers={"Authorization": f"Bearer {system.token}"},
        timeout=30,
    ).json()["items"]
    [item] = [i for i in items if i["study_instance_uid"] == case.roi.study_instance_uid]
    assert item["reader"]["result_id"] == result.id, item


def test_ohif_draws_every_body_of_an_automatic_job(
    system_factory: Callable[..., System],
    viewer_pacs: Orthanc,
    cases: dict[str, Any],
    demo_checkpoint: Path,
    tmp_path: Path,
) -> None:
    """The automatic SR (one group per body, each with its twin on the review image at the
    body's central slice): OHIF draws every body's box there, the most suspicious first."""
    case = cases["automatic"]
    system, result = processed_study(
        system_factory, viewer_pacs, case, demo_checkpoint, tmp_path, automatic=True
    )
    assert result.bodies
    with system.node.sessions() as session:
        bodies = [
            session.get(RoiAnnotation, int(str(body["annotation_id"]))) for body in result.bodies
        ]
    images = review_images(system, result)

    screenshot = tmp_path / "ohif-sr-automatic.png"
    drawn = run_driver(
        viewer_pacs,
        {
            "action": "sr",
            "study": case.roi.study_instance_uid,
            "srSeries": SR_SERIES_NUMBER,
            "screenshot": str(screenshot),
        },
    ).result
    (tmp_path / "ohif-driver.json").write_text(json.dumps(drawn, indent=1))
    assert "error" not in drawn, drawn
    assert not [line for line in drawn["log"] if line.startswith("pageerror")], drawn["log"]
    annotations = drawn["annotations"]
    assert len(annotations) == len(bodies), (len(annotations), len(bodies))

    def body_of(annotation: dict[str, Any]) -> int:
        """The body whose box OHIF drew (at its central slice, at its patient coordinates)."""
        points = np.asarray(annotation["points"], dtype=float)
        for index, body in enumerate(bodies):
            assert body is not None
            central = sorted(body.slices_x_mm)[(len(body.slices_x_mm) - 1) // 2]
            polygon = np.asarray(body.polygon_yz_mm)
            if np.allclose(points[:, 0], central, atol=0.01) and np.allclose(
                points[:-1, 1:], polygon, atol=0.01
            ):
                image = images[sop_of(annotation["referencedImageId"])]
                assert float(image.ImagePositionPatient[0]) == pytest.approx(central, abs=0.01)
                return index
        raise AssertionError(f"OHIF drew a box that is no body's: {annotation}")

    matched = [body_of(annotation) for annotation in annotations]
    assert sorted(matched) == list(range(len(bodies))), "every body drawn once"
    for annotation, index in zip(annotations, matched, strict=True):
        assert float(annotation["label"].split()[0]) == pytest.approx(
            float(str(result.bodies[index]["probability"])), abs=0.006
        )
    # OHIF opens on the first group's image: the most suspicious body's central slice (the
    # bodies at the same position are drawn there too)
    top = [a for a in annotations if a["shown"] and body_of(a) == 0]
    assert top, "OHIF opens on the most suspicious body"
    along, _ = green_fraction(screenshot, top[0]["page"])
    assert along >= 0.5, f"only {along:.0%} of the first body's box is drawn"
    small = docs_picture(screenshot, tmp_path / DOCS_SCREENSHOT.name)
    if os.environ.get(UPDATE_DOCS):
        shutil.copyfile(small, DOCS_SCREENSHOT)
