"""Every route of the OpenAPI schema, walked without credentials and then with each role.

Without a credential every route that carries patient data answers 401 (the API) or sends
the browser to the sign-in page (the page), and no answer holds the patient's name or ID.
With each role (a signed-in user, and tokens scoped to roles) exactly the routes of the
table below work; a route added to the app without a line here fails the walk.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi.testclient import TestClient

from dicom_node.web.auth import ADMIN, ANNOTATOR, READER
from tests.signin.conftest import PATIENT_ID, PATIENT_NAME, Node

PUBLIC = {("GET", "/health"), ("GET", "/metrics"), ("POST", "/login")}
# (method, path) -> the role it needs; None: any signed-in caller.
ROUTE_ROLES: dict[tuple[str, str], str | None] = {
    ("GET", "/"): READER,
    ("GET", "/studies"): READER,
    ("GET", "/worklist"): READER,
    ("GET", "/worklist/{study_instance_uid}"): READER,
    ("GET", "/results/{result_id}/preview.png"): READER,
    ("GET", "/annotations"): READER,
    ("GET", "/annotations/{annotation_id}"): READER,
    ("GET", "/deliveries"): READER,
    ("POST", "/annotations"): ANNOTATOR,
    ("POST", "/dicomweb/studies"): ANNOTATOR,
    ("POST", "/deliveries/{delivery_id}/retry"): ADMIN,
    ("POST", "/annotations/{annotation_id}/retry"): ADMIN,
    ("GET", "/admin/users"): ADMIN,
    ("GET", "/admin/tokens"): ADMIN,
    ("POST", "/admin/tokens"): ADMIN,
    ("DELETE", "/admin/tokens/{token_id}"): ADMIN,
    ("GET", "/session"): None,
    ("POST", "/logout"): None,
}
PAGES = {"/"}  # HTML, not in the schema


def _routes(node: Node) -> set[tuple[str, str]]:
    spec = node.app.openapi()
    found = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    return found | {("GET", page) for page in PAGES}


def _fill(node: Node, path: str, token_id: int) -> str:
    values = {
        "study_instance_uid": node.study_uid,
        "result_id": node.result_id,
        "annotation_id": node.failed_annotation_id,
        "delivery_id": node.delivery_id,
        "token_id": token_id,
    }

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in values, f"no test value for path parameter {name}"
        return str(values[name])

    return re.sub(r"\{(\w+)\}", value, path)


def _body(node: Node, method: str, path: str, serial: int) -> dict[str, Any]:
    if (method, path) == ("POST", "/annotations"):
        return {
            "json": {
                "study_instance_uid": node.study_uid,
                "series_instance_uid": "1.2.826.0.1.3680043.8.498.1",
                "slices_x_mm": [-3.0, 0.0, 3.0],
                "polygon_yz_mm": [[0, 0], [10, 0], [10, 10], [0, 10]],
            }
        }
    if (method, path) == ("POST", "/admin/tokens"):
        return {"json": {"name": f"walk-{serial}", "roles": [READER]}}
    return {}


def test_every_route_of_the_schema_is_in_the_role_table(node: Node) -> None:
    assert _routes(node) == set(ROUTE_ROLES) | PUBLIC


def test_without_credentials_no_route_answers_with_patient_data(node: Node) -> None:
    client = node.client()
    token_id, _ = node.token_with_id("spare", READER)
    for method, path in sorted(_routes(node)):
        url = _fill(node, path, token_id)
        answer = client.request(method, url, **_body(node, method, path, 0))
        assert PATIENT_NAME.split("^")[0] not in answer.text, (method, path)
        assert PATIENT_ID not in answer.text, (method, path)
        if (method, path) in PUBLIC:
            continue
        if path in PAGES:
            assert answer.status_code == 303, (method, path)
            assert answer.headers["location"] == "/login"
        else:
            assert answer.status_code == 401, (method, path, answer.status_code)
            assert answer.headers["www-authenticate"].startswith("Bearer")
    # The sign-in page and the page's code are public; they hold no patient data either.
    for public in ("/login", "/static/worklist.js", "/static/worklist.css", "/metrics"):
        answer = client.get(public)
        assert answer.status_code == 200, public
        assert PATIENT_NAME.split("^")[0] not in answer.text
    # A wrong or malformed credential is no better than none.
    for header in ("Bearer not-a-token", "Bearer st_unknown", "Basic YWRtaW46YWRtaW4="):
        answer = client.get("/worklist", headers={"Authorization": header})
        assert answer.status_code == 401 and PATIENT_ID not in answer.text
    answer = client.get("/worklist", cookies={"spine_triage_session": "forged"})
    assert answer.status_code == 401


def _walk(node: Node, client: TestClient, csrf: str | None) -> dict[tuple[str, str], int]:
    """The status of each route for one caller (writes with the CSRF header when a browser)."""
    statuses = {}
    headers = {"X-CSRF-Token": csrf} if csrf else {}
    routes = sorted(set(ROUTE_ROLES) - {("POST", "/logout")})
    for serial, (method, path) in enumerate(routes):
        token_id, _ = node.token_with_id(f"victim-{len(node.tokens)}", READER)
        url = _fill(node, path, token_id)
        answer = client.request(method, url, headers=headers, **_body(node, method, path, serial))
        statuses[(method, path)] = answer.status_code
    return statuses


def _allowed(roles: set[str], needed: str | None) -> bool:
    return needed is None or needed in roles


def test_each_role_reaches_exactly_its_routes(node: Node) -> None:
    callers: dict[str, tuple[TestClient, str | None, set[str]]] = {}
    # Users: a role includes those below it.
    for role, roles in (
        (READER, {READER}),
        (ANNOTATOR, {READER, ANNOTATOR}),
        (ADMIN, {READER, ANNOTATOR, ADMIN}),
    ):
        client, csrf = node.signed_in(role)
        callers[f"user {role}"] = (client, csrf, roles)
    # Tokens: exactly the roles they were made with.
    for name, roles in (
        ("reader-only", {READER}),
        ("stow-only", {ANNOTATOR}),
        ("admin-only", {ADMIN}),
    ):
        callers[f"token {name}"] = (node.client(node.token(name, *roles)), None, roles)
    callers["site API token"] = (
        node.client("the-sites-api-token"),
        None,
        {READER, ANNOTATOR, ADMIN},
    )

    for who, (client, csrf, roles) in callers.items():
        statuses = _walk(node, client, csrf)
        for route, status in statuses.items():
            if _allowed(roles, ROUTE_ROLES[route]):
                assert status not in (401, 403), (who, route, status)
                assert status < 500 or route == ("POST", "/dicomweb/studies"), (who, route)
            else:
                assert status == 403, (who, route, status)
    # What a reader sees is the patient's data (the walk above reached real content).
    reader, _, _ = callers["user reader"]
    assert PATIENT_NAME in reader.get("/worklist").text
    assert reader.get(f"/results/{node.result_id}/preview.png").content.startswith(b"\x89PNG")
