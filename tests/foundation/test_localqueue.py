"""The embedded broker never shows a consumer a message that is still being written."""

from __future__ import annotations

from pathlib import Path

import pytest
from kombu import Connection, Exchange, Queue

from dicom_node.broker import localqueue


def test_a_message_appears_under_its_name_only_once_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "queue"
    folder.mkdir()
    options = {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(tmp_path / "control"),
    }
    exchange = Exchange("jobs", type="direct")
    queue = Queue("jobs", exchange, routing_key="jobs")
    visible_while_writing: list[list[str]] = []
    encode = localqueue.str_to_bytes

    def watching_encode(text: str) -> bytes:
        # called by _put just before the bytes are written
        visible_while_writing.append(sorted(p.name for p in folder.glob("*.msg")))
        return encode(text)

    monkeypatch.setattr(localqueue, "str_to_bytes", watching_encode)
    with Connection(f"{localqueue.SCHEME}://", transport_options=options) as conn:
        conn.Producer().publish({"id": 7}, exchange=exchange, routing_key="jobs", declare=[queue])
        assert visible_while_writing == [[]]  # no consumer could have taken it half-written
        simple = conn.SimpleQueue(queue)
        message = simple.get(block=True, timeout=5)
        assert message.payload == {"id": 7}
        message.ack()
    assert not [p for p in folder.iterdir() if p.name.startswith(".partial-")]
