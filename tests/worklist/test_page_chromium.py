"""The worklist page in headless Chromium against the real node HTTP service.

The reader signs in through the page's form; the page loads, the flagged study with the
highest probability is the first row, and the detail view (``/#study=UID``) shows its
per-slice probabilities and the picture of what the model saw (an <img> whose URL answers 200
with a PNG).
"""

from __future__ import annotations

import io
import json
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_node.archive.db import make_engine, make_session_factory, transaction
from dicom_node.archive.migrate import upgrade
from dicom_node.archive.schema import AnnotationState, DeliveryState, StudyState
from dicom_node.web.access import api_token
from dicom_node.web.app import HttpServer, start_http
from model.serving.preprocess import build_inputs, load_roi_volume
from model.synthetic.cases import make_case
from tests.support import free_port, require_binary
from tests.worklist.browser import PAGE_READY, add_reader, browser, signed_in_dom
from tests.worklist.conftest import make_settings
from tests.worklist.dom import Element
from tests.worklist.rows import Seeder
from worker.preview import render_preview_png, sagittal_context

# Per-slice probabilities of the flagged study, in slice order (as many as its ROI has slices).
FLAGGED_PROBABILITIES = (0.41, 0.88, 0.93, 0.67, 0.35, 0.22, 0.18)


@dataclass
class RunningPage:
    base_url: str
    flagged_uid: str
    second_uid: str
    routine_uid: str
    result_id: int
    slices_x_mm: tuple[float, ...]
    probabilities: tuple[float, ...]
    login: tuple[str, str]
    token: str


def dump_dom(url: str, login: tuple[str, str]) -> Element:
    """The page at ``url`` once rendered, signed in through its form with ``login``."""
    return signed_in_dom(url, *login)


def _preview_png(folder: Path) -> tuple[bytes, tuple[float, ...], tuple[float, ...]]:
    """The picture the pipeline makes, from a synthetic malignant phantom's real inputs."""
    case = make_case(folder, patient_id="PAGE1", label="malignant", seed=3)
    volume = load_roi_volume(sorted(case.series_dir.iterdir()), case.roi, margin_mm=30.0)
    context, box = sagittal_context(volume, case.roi)
    xs = case.roi.slices_x_mm
    probabilities = FLAGGED_PROBABILITIES[: len(xs)]
    png = render_preview_png(
        build_inputs(volume, case.roi),
        xs,
        probabilities,
        context=context,
        box_px=box,
        threshold=0.5,
    )
    return png, xs, probabilities


@pytest.fixture
def running_page(tmp_path: Path) -> Iterator[RunningPage]:
    require_binary("chromium")  # before any set-up: fails under CI=true, skips elsewhere
    url = f"sqlite:///{tmp_path / 'page.db'}"
    upgrade(url)
    settings = make_settings(tmp_path, url, http_host="127.0.0.1", http_port=free_port())
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    preview = "previews/flagged.png"
    (settings.resolved_storage_dir / "previews").mkdir(parents=True)
    png, xs, probabilities = _preview_png(tmp_path / "synth")
    (settings.resolved_storage_dir / preview).write_bytes(png)
    with transaction(sessions) as session:
        seed = Seeder(session)
        routine = seed.study(name="MOREAU^LUC", patient_id="PT-1031", accession="ACC1031", minute=0)
        second = seed.study(name="NOVAK^EVA", patient_id="PT-1017", accession="ACC1017", minute=1)
        waiting = seed.study(name="SILVA^ANA", patient_id="PT-1044", accession="ACC1044", minute=3)
        flagged = seed.study(
            name="OKAFOR^JAMES", patient_id="PT-1052", accession="ACC1052", minute=4
        )
        seed.study(name="BERG^INGRID", patient_id="PT-1060", state=StudyState.RECEIVING, minute=5)
        failed = seed.study(name="TANAKA^KEN", patient_id="PT-1023", accession="ACC1023", minute=2)
        seed.study(name="DUBOIS^MARIE", patient_id="PT-1071", accession="ACC1071", minute=6)
        routine_id = seed.done(routine, (0.12, 0.21, 0.18), demonstration=True)
        second_id = seed.done(second, (0.58, 0.71, 0.64), demonstration=True)
        annotation = seed.annotation(flagged, state=AnnotationState.DONE, minute=5, vertebra="L3")
        result_id = seed.result(
            annotation,
            probabilities,
            minute=6,
            slices_x_mm=xs,
            demonstration=True,
            preview_path=preview,
        )
        seed.annotation(waiting, state=AnnotationState.PROCESSING)
        seed.annotation(
            failed,
            state=AnnotationState.FAILED,
            failure_reason="series does not meet the selection rule 'Modality=CT'",
        )
        for rid in (routine_id, second_id, result_id):
            seed.delivery(rid, "pacs", DeliveryState.DELIVERED)
        seed.delivery(result_id, "ris", DeliveryState.PENDING, kind="hl7")
    login = add_reader(sessions)
    server: HttpServer = start_http(settings, sessions, None)
    try:
        yield RunningPage(
            base_url=f"http://127.0.0.1:{server.port}",
            flagged_uid=flagged,
            second_uid=second,
            routine_uid=routine,
            result_id=result_id,
            slices_x_mm=xs,
            probabilities=probabilities,
            login=login,
            token=api_token(settings),
        )
    finally:
        server.stop()
        engine.dispose()


def _rows(dom: Element) -> list[Element]:
    [body] = dom.by_id("worklist").find_all("tbody")
    return body.find_all("tr")


def test_page_lists_flagged_first_and_shows_the_detail_with_its_picture(
    running_page: RunningPage,
) -> None:
    page = running_page
    dom = dump_dom(f"{page.base_url}/#study={page.flagged_uid}", page.login)

    rows = _rows(dom)
    assert len(rows) == 7
    assert [row.attrs["data-uid"] for row in rows[:2]] == [page.flagged_uid, page.second_uid]
    assert "row-flagged" in (rows[0].attrs["class"] or "")
    top = max(page.probabilities)
    assert "OKAFOR, JAMES" in rows[0].text and f"{top:.3f}" in rows[0].text
    assert "row-flagged" not in (rows[2].attrs["class"] or "")
    assert not dom.by_id("demo-banner").hidden
    assert "DEMONSTRATION MODEL" in dom.by_id("demo-banner").text
    assert "7 studies" in dom.by_id("status").text

    detail = dom.by_id("detail")
    assert not detail.hidden
    assert "OKAFOR, JAMES" in dom.by_id("detail-title").text
    [slice_body] = dom.by_id("slice-table").find_all("tbody")
    cells = [[td.text for td in tr.find_all("td")] for tr in slice_body.find_all("tr")]
    assert cells == [
        [f"{x:.1f}", f"{p:.3f}"] for x, p in zip(page.slices_x_mm, page.probabilities, strict=True)
    ]
    bars = [
        e for e in dom.by_id("slice-chart").iter() if "bar" in (e.attrs.get("class") or "").split()
    ]
    assert len(bars) == len(page.probabilities)
    over = [b for b in bars if "over" in (b.attrs.get("class") or "").split()]
    assert len(over) == sum(p >= 0.5 for p in page.probabilities)

    image = dom.by_id("preview")
    assert not dom.by_id("preview-figure").hidden
    assert image.attrs["src"] == f"/results/{page.result_id}/preview.png"
    assert "L3" in (image.attrs.get("alt") or "")
    picture_request = urllib.request.Request(
        page.base_url + (image.attrs["src"] or ""),
        headers={"Authorization": f"Bearer {page.token}"},
    )
    with urllib.request.urlopen(picture_request) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "image/png"
        picture = Image.open(io.BytesIO(response.read()))
        assert picture.format == "PNG" and picture.height > len(page.slices_x_mm) * 128
    [delivery_body] = dom.by_id("delivery-table").find_all("tbody")
    assert len(delivery_body.find_all("tr")) == 2


def test_page_without_a_study_selected_hides_the_detail(running_page: RunningPage) -> None:
    dom = dump_dom(running_page.base_url + "/", running_page.login)
    assert dom.by_id("detail").hidden
    rows = _rows(dom)
    assert rows[0].attrs["data-uid"] == running_page.flagged_uid
    assert rows[-1].attrs["data-uid"] != running_page.flagged_uid


def test_routine_study_detail_has_no_picture_and_is_not_flagged(running_page: RunningPage) -> None:
    dom = dump_dom(f"{running_page.base_url}/#study={running_page.routine_uid}", running_page.login)
    assert dom.by_id("preview-figure").hidden
    assert not dom.by_id("no-preview").hidden
    assert dom.by_id("detail").attrs.get("data-state") == "routine"


def test_screenshot_shows_the_flagged_row_highlighted(
    running_page: RunningPage, tmp_path: Path
) -> None:
    shot = tmp_path / "worklist.png"
    with browser() as page:
        page.sign_in(running_page.base_url, *running_page.login)
        page.goto(f"{running_page.base_url}/#study={running_page.flagged_uid}")
        page.wait_for(PAGE_READY, "the worklist page to render")
        page.screenshot(shot, 1280, 1500)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1500)
    if os.environ.get("WORKLIST_SCREENSHOT_TO"):  # how docs/worklist.png is made
        image.quantize(colors=128).save(os.environ["WORKLIST_SCREENSHOT_TO"], optimize=True)
    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    # The flagged badge colour (#ff6e5a) is on screen, and the picture was drawn (its ROI box).
    assert np.any(np.all(np.abs(pixels - (255, 110, 90)) <= 3, axis=1))
    assert np.any(np.all(np.abs(pixels - (255, 200, 40)) <= 3, axis=1))


def test_without_signing_in_the_page_shows_the_sign_in_form_and_no_patient(
    running_page: RunningPage,
) -> None:
    """A browser that never signed in, sent to a study's detail: it lands on the sign-in
    page, and nothing it renders or can fetch from there names a patient."""
    with browser() as page:
        page.goto(f"{running_page.base_url}/#study={running_page.flagged_uid}")
        page.wait_for(
            "location.pathname === '/login' && document.readyState === 'complete'",
            "the sign-in page",
        )
        dom = page.dom()
        # What the page's script would fetch, fetched by the signed-out browser from an open
        # page of the same origin (the sign-in page's policy lets it fetch nothing at all).
        page.goto(f"{running_page.base_url}/health")
        answers = page.evaluate(
            "Promise.all(['/worklist', '/studies', "
            f"'/results/{running_page.result_id}/preview.png']"
            ".map(u => fetch(u, {redirect: 'manual'})"
            ".then(r => r.text().then(t => [r.status, r.type, t]))))"
            ".then(JSON.stringify)"
        )
    assert dom.by_id("username").tag == "input" and dom.by_id("password").tag == "input"
    rendered = dom.text
    for name, patient_id in (("OKAFOR", "PT-1052"), ("MOREAU", "PT-1031"), ("NOVAK", "PT-1017")):
        assert name not in rendered and patient_id not in rendered
    for status, kind, body in json.loads(answers):
        assert status == 401 or kind == "opaqueredirect", (status, kind)
        assert "OKAFOR" not in body and "PT-1052" not in body
