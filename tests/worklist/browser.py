"""Headless Chromium driven over the DevTools protocol (its ``--remote-debugging-pipe``), with
the standard library only: the page is signed in to through its own form, as a person does,
then read (its DOM after the scripts ran) or photographed.

The pipe is two file descriptors (3: commands to Chromium, 4: its answers and events), each
message JSON ending in a NUL byte.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.archive.db import transaction
from dicom_node.web.auth import READER, accounts
from tests.support import require_binary
from tests.worklist.dom import Element, parse_html

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
# The worklist page has rendered: the list's status says how many studies, and a study named
# in the address (#study=UID) has its detail filled, its picture loaded when it has one.
PAGE_READY = """(() => {
  const status = document.getElementById("status");
  if (!status || status.textContent.trim() === "loading…") return false;
  if (document.getElementById("user-name")?.textContent === "") return false;
  if (window.location.hash.startsWith("#study=")) {
    if (document.getElementById("detail").hidden) return false;
    if (document.getElementById("detail-title").textContent === "Study") return false;
  }
  return Array.from(document.images).every((image) => image.complete);
})()"""


class Browser:
    """One Chromium process and one page (tab) in it."""

    def __init__(self, *flags: str, timeout_s: float = 30.0) -> None:
        binary = require_binary("chromium")
        self.timeout_s = timeout_s
        self._profile = tempfile.TemporaryDirectory(prefix="st-chromium-")
        to_chromium, self._commands = os.pipe()
        self._answers, from_chromium = os.pipe()
        self._log = open(Path(self._profile.name) / "stderr.log", "wb")  # noqa: SIM115
        script = f'exec "$0" "$@" 3<&{to_chromium} 4>&{from_chromium}'
        self.process = subprocess.Popen(
            [
                "bash",
                "-c",
                script,
                binary,
                *FLAGS,
                f"--user-data-dir={self._profile.name}",
                "--remote-debugging-pipe",
                *flags,
                "about:blank",
            ],
            pass_fds=(to_chromium, from_chromium),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        os.close(to_chromium)
        os.close(from_chromium)
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._arrived = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)

    def _read(self) -> None:
        buffer = b""
        with os.fdopen(self._answers, "rb", buffering=0) as answers:
            while chunk := answers.read(65536):
                buffer += chunk
                *messages, buffer = buffer.split(b"\0")
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        with self._arrived:
                            self._replies[message["id"]] = message
                            self._arrived.notify_all()

    def call(self, method: str, *, session: bool = False, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        with self._arrived:
            while self._next_id not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    raise AssertionError(f"Chromium did not answer {method}: {self.stderr()}")
                self._arrived.wait(min(left, 0.5))
            reply = self._replies.pop(self._next_id)
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    def evaluate(self, expression: str) -> Any:
        answer = self.call(
            "Runtime.evaluate",
            session=True,
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
        )
        if "exceptionDetails" in answer:
            raise AssertionError(f"script failed: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while time.monotonic() < deadline:
            if self.evaluate(expression):
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what} at {self.evaluate('location.href')}")

    def goto(self, url: str) -> None:
        answer = self.call("Page.navigate", session=True, url=url)
        if answer.get("errorText"):
            raise ConnectionError(f"{url}: {answer['errorText']}")
        self.wait_for("document.readyState === 'complete'", f"{url} to load")

    def sign_in(self, base_url: str, username: str, password: str) -> None:
        """Through the sign-in page's form, as a person would."""
        self.goto(f"{base_url}/login")
        self.evaluate(
            f"document.getElementById('username').value = {json.dumps(username)};"
            f"document.getElementById('password').value = {json.dumps(password)};"
            "document.getElementById('sign-in').click(); true"
        )
        self.wait_for(
            "location.pathname !== '/login' && document.readyState === 'complete'",
            "the sign-in to land on the worklist",
        )

    def dom(self) -> Element:
        return parse_html(self.evaluate("document.documentElement.outerHTML"))

    def screenshot(self, path: Path, width: int, height: int) -> None:
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session=True,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        time.sleep(0.3)  # a frame at the new size
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def stderr(self) -> str:
        self._log.flush()
        return (Path(self._profile.name) / "stderr.log").read_text(errors="replace")[-2000:]

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                self.call("Browser.close")
        except (AssertionError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        os.close(self._commands)
        self._log.close()
        self._profile.cleanup()


@contextmanager
def browser(*flags: str) -> Iterator[Browser]:
    instance = Browser(*flags)
    try:
        yield instance
    finally:
        instance.close()


def signed_in_dom(url: str, username: str, password: str, *flags: str) -> Element:
    """The worklist page at ``url`` (its DOM once rendered), signed in as ``username``."""
    base = url.split("/", 3)
    base_url = "/".join(base[:3])
    with browser(*flags) as page:
        page.sign_in(base_url, username, password)
        page.goto(url)
        page.wait_for(PAGE_READY, "the worklist page to render")
        return page.dom()


READER_LOGIN = ("reader", "a reader's password")


def add_reader(sessions: sessionmaker[Session]) -> tuple[str, str]:
    """A user with the reader role in the database behind ``sessions``; its name and password."""
    with transaction(sessions) as session:
        accounts.add_user(session, *READER_LOGIN, READER, now=datetime.now(UTC))
    return READER_LOGIN
