"""Signing in and out, sessions that end, CSRF, brute force, API tokens and the commands.

All against the real app on a migrated database (the cookie is what a browser would keep;
the page in Chromium is in test_tls.py and tests/worklist/test_page_chromium.py).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from http.cookies import SimpleCookie
from typing import Any

import pytest
from sqlalchemy import select

from dicom_node.archive.schema import ApiToken, WebSession, WebUser
from dicom_node.web.auth import ADMIN, ANNOTATOR, READER, accounts
from dicom_node.web.auth.accounts import digest
from tests.signin.conftest import PASSWORDS, PATIENT_NAME, Node

ROI = {
    "series_instance_uid": "1.2.826.0.1.3680043.8.498.1",
    "slices_x_mm": [-3.0, 0.0, 3.0],
    "polygon_yz_mm": [[0, 0], [10, 0], [10, 10], [0, 10]],
}


def _set_cookie(answer: Any) -> SimpleCookie:
    cookie: SimpleCookie = SimpleCookie()
    cookie.load(answer.headers["set-cookie"])
    return cookie


def test_sign_in_sets_a_secure_session_cookie_and_opens_the_worklist(node: Node) -> None:
    client = node.client()
    assert client.get("/").headers["location"] == "/login"
    page = client.get("/login")
    assert page.status_code == 200 and 'action="/login"' in page.text
    assert "form-action 'self'" in page.headers["content-security-policy"]

    answer = client.post("/login", data={"username": READER, "password": PASSWORDS[READER]})
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    [morsel] = _set_cookie(answer).values()
    assert morsel.key == "spine_triage_session"
    assert morsel["httponly"] and morsel["samesite"] == "strict" and morsel["path"] == "/"
    assert not morsel["secure"]  # plain HTTP here; over HTTPS it is Secure (test_tls.py)
    # Only the cookie's sha256 is stored.
    with node.sessions() as session:
        stored = session.scalars(select(WebSession.session_sha256)).all()
    assert stored == [digest(morsel.value)]

    assert client.get("/").status_code == 200
    assert PATIENT_NAME in client.get("/worklist").text
    me = client.get("/session").json()
    assert me["name"] == READER and me["kind"] == "user" and me["roles"] == [READER]
    assert me["csrf_token"] and me["expires_at"]


@pytest.mark.parametrize(
    ("username", "password"),
    [
        (READER, "wrong password!"),
        ("nobody", "any password 1"),
        (READER, ""),
        (READER, "overlong secret " * 400),
        ("n" * 500, "any password 1"),
    ],
)
def test_a_wrong_password_or_user_is_refused(node: Node, username: str, password: str) -> None:
    client = node.client()
    answer = client.post("/login", data={"username": username, "password": password})
    assert answer.status_code in (401, 422)
    assert "set-cookie" not in answer.headers
    assert not password or password not in answer.text  # never echoed back
    assert client.get("/worklist").status_code == 401


def test_a_session_ends_when_idle_and_at_its_lifetime(node_factory: Any) -> None:
    idle = node_factory(session_idle_timeout_s=2.0, session_lifetime_s=60.0)
    client, _ = idle.signed_in(READER)
    assert client.get("/worklist").status_code == 200
    time.sleep(1.2)
    assert client.get("/worklist").status_code == 200  # used: the idle expiry moves on
    time.sleep(1.2)
    assert client.get("/worklist").status_code == 200
    time.sleep(2.5)
    assert client.get("/worklist").status_code == 401
    assert client.get("/").headers["location"] == "/login"

    short = node_factory(session_idle_timeout_s=60.0, session_lifetime_s=3.0)
    signed_in_at = time.monotonic()
    client, _ = short.signed_in(READER)
    cookie = client.cookies["spine_triage_session"]
    while time.monotonic() < signed_in_at + 1.5:
        assert client.get("/worklist").status_code == 200
        time.sleep(0.2)
    time.sleep(max(0.0, signed_in_at + 3.2 - time.monotonic()))
    # However busy, it ends: the browser drops the cookie (its Max-Age), and the node refuses
    # it when sent all the same, deleting the session.
    assert client.get("/worklist").status_code == 401
    replay = short.client()
    assert replay.get("/worklist", cookies={"spine_triage_session": cookie}).status_code == 401
    with short.sessions() as session:
        assert session.scalars(select(WebSession)).all() == []


def test_sign_out_ends_the_session_even_for_a_copied_cookie(node: Node) -> None:
    client, csrf = node.signed_in(READER)
    cookie = client.cookies.get("spine_triage_session")
    assert client.post("/logout").status_code == 403  # a write: needs the CSRF header
    answer = client.post("/logout", headers={"X-CSRF-Token": csrf})
    assert answer.status_code == 204
    assert 'spine_triage_session=""' in answer.headers["set-cookie"]
    replay = node.client()
    assert replay.get("/worklist", cookies={"spine_triage_session": cookie}).status_code == 401


def test_writes_from_a_browser_session_need_the_csrf_token_and_the_same_origin(
    node: Node,
) -> None:
    client, csrf = node.signed_in(ANNOTATOR)
    roi = {**ROI, "study_instance_uid": node.study_uid}
    assert client.post("/annotations", json=roi).status_code == 403
    assert client.post("/annotations", json=roi, headers={"X-CSRF-Token": "x"}).status_code == 403
    evil = {"X-CSRF-Token": csrf, "Origin": "https://evil.example"}
    assert client.post("/annotations", json=roi, headers=evil).status_code == 403
    same = {"X-CSRF-Token": csrf, "Origin": "http://testserver"}
    assert client.post("/annotations", json=roi, headers=same).status_code == 201
    # Another session's token is no good either.
    other, other_csrf = node.signed_in(ANNOTATOR)
    del other
    assert (
        client.post("/annotations", json=roi, headers={"X-CSRF-Token": other_csrf}).status_code
        == 403
    )
    # A bearer token is not sent by browsers on their own: no CSRF token needed.
    bearer = node.client(node.token("script", ANNOTATOR))
    assert bearer.post("/annotations", json=roi).status_code == 201
    # A sign-in posted from another site is refused (login CSRF).
    cross = node.client().post(
        "/login",
        data={"username": READER, "password": PASSWORDS[READER]},
        headers={"Origin": "https://evil.example"},
    )
    assert cross.status_code == 403 and "set-cookie" not in cross.headers


def test_failed_sign_ins_are_limited_per_account_and_per_address(node_factory: Any) -> None:
    node = node_factory(login_max_failures=3, login_max_failures_per_address=5, login_lockout_s=8.0)
    client = node.client()

    def sign_in(user: str, password: str) -> Any:
        return client.post("/login", data={"username": user, "password": password})

    for _ in range(3):
        assert sign_in(READER, "wrong password!").status_code == 401
    locked = sign_in(READER, PASSWORDS[READER])  # the right password: still refused
    assert locked.status_code == 429
    assert 1 <= int(locked.headers["retry-after"]) <= 9
    assert "set-cookie" not in locked.headers
    # Another account from the same address still signs in, until the address's limit.
    assert sign_in(ANNOTATOR, PASSWORDS[ANNOTATOR]).status_code == 303
    assert sign_in(ANNOTATOR, "wrong password!").status_code == 401
    assert sign_in("nobody", "wrong password!").status_code == 401  # 5 failures from here
    assert sign_in(ADMIN, PASSWORDS[ADMIN]).status_code == 429
    time.sleep(int(locked.headers["retry-after"]) + 0.5)  # the window has passed
    assert sign_in(READER, PASSWORDS[READER]).status_code == 303


def test_passwords_tokens_and_failed_user_names_never_reach_the_logs(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = node.client()
    client.post("/login", data={"username": "typed-my-password", "password": "hunter2 secret"})
    client.post("/login", data={"username": READER, "password": PASSWORDS[READER]})
    secret = node.token("logged", READER)
    node.client(secret).get("/worklist")
    node.client(secret + "x").get("/worklist")
    node.client("st_" + "guess" * 8).get("/worklist")
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "sign-in failed" in text and "bearer token refused" in text
    for leaked in ("hunter2", PASSWORDS[READER], secret, "typed-my-password", "guessguess"):
        assert leaked not in text


def test_a_revoked_token_is_refused_at_once_and_use_is_recorded(node: Node) -> None:
    admin = node.client("the-sites-api-token")  # the site's token: admin
    made = admin.post("/admin/tokens", json={"name": "qa-script", "roles": [READER]})
    assert made.status_code == 201
    secret, token_id = made.json()["token"], made.json()["id"]
    listing = admin.get("/admin/tokens").json()
    assert all("token" not in item for item in listing)  # shown once, never listed
    with node.sessions() as session:
        row = session.scalars(select(ApiToken).where(ApiToken.id == token_id)).one()
        assert row.token_sha256 == digest(secret) and row.last_used_at is None

    script = node.client(secret)
    assert script.get("/worklist").status_code == 200
    with node.sessions() as session:
        used = session.scalar(select(ApiToken.last_used_at).where(ApiToken.id == token_id))
    assert used is not None and (datetime.now(UTC) - used).total_seconds() < 30
    assert script.post("/admin/tokens", json={"name": "x", "roles": [ADMIN]}).status_code == 403

    assert admin.delete(f"/admin/tokens/{token_id}").json()["revoked_at"]
    assert script.get("/worklist").status_code == 401  # the very next request


def test_disabling_a_user_or_changing_the_password_ends_their_sessions(node: Node) -> None:
    client, _ = node.signed_in(READER)
    with accounts_session(node) as session:
        accounts.set_disabled(session, READER, True)
    assert client.get("/worklist").status_code == 401
    answer = node.client().post("/login", data={"username": READER, "password": PASSWORDS[READER]})
    assert answer.status_code == 401
    with accounts_session(node) as session:
        accounts.set_disabled(session, READER, False)
    client, _ = node.signed_in(READER)
    with accounts_session(node) as session:
        accounts.set_password(session, READER, "a brand new password", now=datetime.now(UTC))
    assert client.get("/worklist").status_code == 401


def accounts_session(node: Node) -> Any:
    from dicom_node.archive.db import transaction

    return transaction(node.sessions)


def _cli(node: Node, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["SPINE_TRIAGE_DATABASE_URL"] = node.settings.resolved_database_url
    env["SPINE_TRIAGE_VAR_DIR"] = str(node.settings.var_dir)
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_the_users_and_tokens_commands(node: Node) -> None:
    for command in (("users", "--help"), ("tokens", "--help"), ("users", "add", "--help")):
        done = _cli(node, *command)
        assert done.returncode == 0 and "role" in done.stdout, done.stderr
    added = _cli(
        node,
        "users",
        "add",
        "carol",
        "--role",
        "annotator",
        "--password-stdin",
        stdin="carol's long password\n",
    )
    assert added.returncode == 0, added.stderr
    short = _cli(
        node, "users", "add", "dave", "--role", "reader", "--password-stdin", stdin="short\n"
    )
    assert short.returncode == 1 and "at least" in short.stderr
    listed = _cli(node, "users", "list")
    assert "carol" in listed.stdout and "annotator" in listed.stdout
    with node.sessions() as session:
        stored = session.scalar(select(WebUser.password_hash).where(WebUser.username == "carol"))
    assert stored is not None and stored.startswith("$argon2id$")

    client = node.client()
    signed = client.post("/login", data={"username": "carol", "password": "carol's long password"})
    assert signed.status_code == 303
    changed = _cli(
        node, "users", "passwd", "carol", "--password-stdin", stdin="carol's newer password\n"
    )
    assert changed.returncode == 0, changed.stderr
    assert client.get("/worklist").status_code == 401
    assert _cli(node, "users", "disable", "carol").returncode == 0
    refused = node.client().post(
        "/login", data={"username": "carol", "password": "carol's newer password"}
    )
    assert refused.status_code == 401

    created = _cli(node, "tokens", "create", "pacs-stow", "--role", "annotator")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("st_")
    pacs = node.client(secret)
    assert pacs.get("/worklist").status_code == 403  # annotator alone reads nothing
    roi = {**ROI, "study_instance_uid": node.study_uid}
    assert pacs.post("/annotations", json=roi).status_code == 201
    listed = _cli(node, "tokens", "list")
    assert "pacs-stow" in listed.stdout and secret not in listed.stdout
    assert _cli(node, "tokens", "revoke", "pacs-stow").returncode == 0
    assert pacs.post("/annotations", json=roi).status_code == 401


def test_the_sites_api_token_is_an_admin_token(node: Node) -> None:
    legacy = node.client("the-sites-api-token")
    assert PATIENT_NAME in legacy.get("/worklist").text
    assert legacy.get("/session").json() == {
        "name": "api-token",
        "kind": "token",
        "roles": sorted([ADMIN, ANNOTATOR, READER]),
        "csrf_token": None,
        "expires_at": None,
    }
    assert legacy.post(f"/deliveries/{node.delivery_id}/retry").json() == {
        "requeued": [node.delivery_id]
    }
    assert accounts.LEGACY_TOKEN_PRINCIPAL.roles == {READER, ANNOTATOR, ADMIN}
