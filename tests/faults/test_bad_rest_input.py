"""Bad input at the HTTP door: writes without the token, bad JSON, malformed STOW-RS parts.
Each is refused with its reason and nothing of it is stored."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.archive.db import make_engine, make_session_factory
from dicom_node.archive.migrate import upgrade
from dicom_node.archive.schema import RoiAnnotation
from dicom_node.dicom.ingest import StoreContext
from dicom_node.node import make_store
from dicom_node.settings import Settings
from dicom_node.web.app import start_http
from tests.faults.malformed import cut, encoded, part10, patient_slice, without_pixels
from tests.support import free_port

TOKEN = "bad-input-token"
GOOD_ROI: dict[str, Any] = {
    "study_instance_uid": "1.2.826.0.1.3680043.8.498.1",
    "series_instance_uid": "1.2.826.0.1.3680043.8.498.2",
    "slices_x_mm": [-3.0, 0.0, 3.0],
    "polygon_yz_mm": [[0.0, 0.0], [20.0, 0.0], [20.0, 20.0], [0.0, 20.0]],
}


@dataclass(frozen=True)
class Api:
    url: str
    app: Any
    sessions: sessionmaker[Session]

    def post(self, path: str, content: bytes, **headers: str) -> httpx.Response:
        headers.setdefault("Content-Type", "application/json")
        return httpx.post(f"{self.url}{path}", content=content, headers=headers, timeout=10)

    def annotations_stored(self) -> int:
        with self.sessions() as session:
            return int(session.scalar(select(func.count(RoiAnnotation.id))) or 0)


@pytest.fixture
def api(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Api]:
    """The real HTTP service (uvicorn on loopback) over a migrated SQLite database.

    Its error log is off: Python 3.11 formats a traceback with ``ast``, which is not thread
    safe (CPython gh-106905), and a server thread formatting a 500 while pytest formats the
    expected failure of an ``xfail`` test can abort the run (pytest-dev/pytest#10763).
    """
    url = f"sqlite:///{tmp_path / 'api.db'}"
    upgrade(url)
    settings = Settings(
        _env_file=None,
        var_dir=tmp_path / "var",
        database_url=url,
        http_host="127.0.0.1",
        http_port=free_port(),
        api_token=TOKEN,
    )
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    context = StoreContext(store=make_store(settings), sessions=sessions)
    server = start_http(settings, sessions, None, store_context=context)
    caplog.set_level(logging.CRITICAL + 1, logger="uvicorn.error")
    try:
        yield Api(f"http://127.0.0.1:{server.port}", server.server.config.app, sessions)
    finally:
        server.stop()
        engine.dispose()


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong-token", f"Bearer {TOKEN}x", f"Basic {TOKEN}"],
    ids=["absent", "empty", "no token", "wrong token", "token and more", "basic scheme"],
)
def test_writes_without_the_token_are_refused(api: Api, authorization: str | None) -> None:
    writes = sorted(
        (method, route.path)
        for route in api.app.routes
        for method in getattr(route, "methods", set()) & {"POST", "PUT", "PATCH", "DELETE"}
        if route.path != "/login"  # the one write without a credential: signing in
    )
    assert ("POST", "/annotations") in writes and ("POST", "/dicomweb/studies") in writes
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in writes:
        answer = httpx.request(
            method, f"{api.url}{path}", content=json.dumps(GOOD_ROI), headers=headers, timeout=10
        )
        assert answer.status_code == 401, (method, path, answer.text)
        assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert api.annotations_stored() == 0
    good = api.post("/annotations", json.dumps(GOOD_ROI).encode(), Authorization=f"Bearer {TOKEN}")
    assert good.status_code == 201 and api.annotations_stored() == 1


def test_an_unauthenticated_write_with_a_malformed_body_is_refused_as_such(api: Api) -> None:
    assert api.post("/annotations", b"{not json").status_code == 401


def _roi(**changes: Any) -> bytes:
    return json.dumps({**GOOD_ROI, **changes}).encode()


REQUIRED = ("study_instance_uid", "series_instance_uid", "slices_x_mm", "polygon_yz_mm")
# body, the locations of the errors expected, a word in every error's message
BAD_BODIES = [
    pytest.param(b'{"study_instance_uid": "1.2",', {("body", 29)}, "JSON", id="malformed JSON"),
    pytest.param(b"", {("body",)}, "required", id="empty body"),
    pytest.param(json.dumps([GOOD_ROI]).encode(), {("body",)}, "dictionary", id="a list"),
    pytest.param(_roi(study_instance_uid="1.2.03"), {("body", "study_instance_uid")}, "UID"),
    pytest.param(_roi(series_instance_uid="../../etc"), {("body", "series_instance_uid")}, "UID"),
    pytest.param(
        _roi(slices_x_mm=[float("nan"), 0.0, 3.0]), {("body", "slices_x_mm")}, "finite", id="NaN"
    ),
    pytest.param(
        _roi(polygon_yz_mm=[[0.0, 0.0], [float("inf"), 0.0], [0.0, 9.0]]),
        {("body", "polygon_yz_mm")},
        "finite",
        id="Infinity",
    ),
    pytest.param(_roi(slices_x_mm=["left", 0, 3]), {("body", "slices_x_mm", 0)}, "number"),
    pytest.param(_roi(polygon_yz_mm=[]), {("body", "polygon_yz_mm")}, "at least 3", id="empty"),
    pytest.param(
        _roi(polygon_yz_mm=[[0, 0], [5, 5], [10, 10]]),
        {("body", "polygon_yz_mm")},
        "no area",
        id="degenerate polygon",
    ),
    pytest.param(_roi(slices_x_mm=list(range(8))), {("body", "slices_x_mm")}, "at most 7"),
    pytest.param(_roi(slices_x_mm=[1, 1, 3]), {("body", "slices_x_mm")}, "distinct"),
    pytest.param(_roi(colour="red"), {("body", "colour")}, "Extra", id="unknown field"),
    pytest.param(
        b'{"vertebra": "L1"}', {("body", field) for field in REQUIRED}, "required", id="missing"
    ),
    pytest.param(
        _roi(study_instance_uid="x", polygon_yz_mm=[], colour="red"),
        {("body", "study_instance_uid"), ("body", "polygon_yz_mm"), ("body", "colour")},
        "",
        id="three errors at once",
    ),
]


@pytest.mark.parametrize(("body", "locations", "word"), BAD_BODIES)
def test_bad_json_is_refused_with_an_error_per_field(
    api: Api, body: bytes, locations: set[tuple[Any, ...]], word: str
) -> None:
    answer = api.post("/annotations", body, Authorization=f"Bearer {TOKEN}")
    assert answer.status_code == 422, answer.text
    errors = answer.json()["detail"]
    assert {tuple(error["loc"]) for error in errors} == locations
    assert all(word in error["msg"] for error in errors), errors
    assert api.annotations_stored() == 0


def test_stow_rs_refuses_malformed_images_per_instance(api: Api) -> None:
    """The HTTP door shares the ingest path: the same refusals, one per instance."""
    parts = []
    for build in (encoded, cut(lambda b: len(b) - 1000), without_pixels):
        ds = patient_slice()
        parts.append(part10(ds.SOPInstanceUID, build(ds), ExplicitVRLittleEndian))
    boundary = "bad-input"
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
        for part in parts
    )
    answer = api.post(
        "/dicomweb/studies",
        body + f"--{boundary}--\r\n".encode(),
        **{
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Authorization": f"Bearer {TOKEN}",
        },
    )
    assert answer.status_code == 202, answer.text
    failed = answer.json()["00081198"]["Value"]
    assert sorted(item["00081197"]["Value"][0] for item in failed) == [0xA900, 0xC210]
    assert len(answer.json()["00081199"]["Value"]) == 1
