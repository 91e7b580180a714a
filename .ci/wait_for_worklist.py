"""Wait until the worklist at URL shows N finished studies (flagged, routine or not analysed).

Reads as the node's API token: SPINE_TRIAGE_API_TOKEN, else var/api-token of the current
folder (embedded mode writes it on start). Exits 1 when the process PID ends first or after
the timeout (seconds, default 600).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def api_token() -> str:
    token = os.environ.get("SPINE_TRIAGE_API_TOKEN", "")
    path = Path(os.environ.get("SPINE_TRIAGE_VAR_DIR", "var")) / "api-token"
    if not token and path.exists():
        token = path.read_text().strip()
    return token


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(url: str, expected: int, pid: int, timeout_s: float = 600.0) -> int:
    deadline = time.monotonic() + timeout_s
    states: list[str] = []
    while time.monotonic() < deadline:
        if not alive(pid):
            print("the run command ended before the worklist filled")
            return 1
        try:
            request = urllib.request.Request(
                f"{url}/worklist", headers={"Authorization": f"Bearer {api_token()}"}
            )
            with urllib.request.urlopen(request, timeout=5) as answer:
                states = [item["state"] for item in json.load(answer)["items"]]
        except (urllib.error.URLError, OSError, ValueError):
            states = []
        if sum(state in ("flagged", "routine", "not_analysed") for state in states) >= expected:
            print(f"worklist: {states}")
            return 0
        time.sleep(2)
    print(f"worklist did not fill within {timeout_s:.0f} s: {states}")
    return 1


if __name__ == "__main__":
    arguments = sys.argv[1:]
    sys.exit(main(arguments[0], int(arguments[1]), int(arguments[2]), *map(float, arguments[3:])))
