from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dicom_node.archive.migrate import upgrade
from dicom_node.node import Node, start_node
from dicom_node.settings import Settings
from tests.support import free_port


@dataclass
class RecordingSender:
    """Stands in for the broker: records the task messages the node publishes."""

    messages: list[tuple[str, list[int], str]] = field(default_factory=list)

    def __call__(self, task_name: str, args: Any, queue: str) -> None:
        self.messages.append((task_name, list(args), queue))


@dataclass
class RunningNode:
    node: Node
    settings: Settings
    sender: RecordingSender

    @property
    def port(self) -> int:
        return self.node.dicom_address[1]

    @property
    def storage(self) -> Path:
        return self.settings.resolved_storage_dir


@pytest.fixture
def node_factory(tmp_path: Path, database_url: str) -> Iterator[Callable[..., RunningNode]]:
    upgrade(database_url)
    running: list[RunningNode] = []

    def start(*, scheduler: bool = False, **overrides: Any) -> RunningNode:
        values: dict[str, Any] = {
            "var_dir": tmp_path / "var",
            "database_url": database_url,
            "dicom_host": "127.0.0.1",
            "dicom_port": free_port(),
            "min_free_disk_mb": 0,
            "quiet_period_s": 30.0,
        }
        values.update(overrides)
        settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
        sender = RecordingSender()
        node = start_node(settings, send=sender, run_scheduler=scheduler)
        handle = RunningNode(node, settings, sender)
        running.append(handle)
        return handle

    yield start
    for handle in running:
        handle.node.stop()
