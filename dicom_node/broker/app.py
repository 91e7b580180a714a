"""Celery configuration shared by the node (which only sends) and the workers.

Embedded mode uses kombu's filesystem transport under ``VAR_DIR/broker`` (no server);
production uses Redis. Either way a message carries ids only and the database stays the
source of truth (see :mod:`dicom_node.broker.wake`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Celery

from dicom_node.broker import localqueue
from dicom_node.broker.wake import (
    AUTO_TRIAGE_TASK,
    DELIVER_TASK,
    DELIVERY_QUEUE,
    TRIAGE_QUEUE,
    TRIAGE_TASK,
)
from dicom_node.settings import Settings


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for ``settings``' broker; the same for producers and workers."""
    config: dict[str, Any] = {
        "broker_url": settings.resolved_broker_url,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": TRIAGE_QUEUE,
        "task_routes": {
            TRIAGE_TASK: {"queue": TRIAGE_QUEUE},
            AUTO_TRIAGE_TASK: {"queue": TRIAGE_QUEUE},
            DELIVER_TASK: {"queue": DELIVERY_QUEUE},
        },
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "enable_utc": True,
        # A broker that is down must not stall the node: give up quickly, the sweep re-sends.
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        "broker_connection_timeout": 2.0,
    }
    if settings.is_embedded:
        config["broker_url"] = f"{localqueue.SCHEME}://"
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        config["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": 0.05,
        }
    else:
        config["broker_transport_options"] = {
            "visibility_timeout": settings.broker_visibility_timeout_s,
        }
    return config


def make_celery(settings: Settings, name: str = "spine_triage") -> Celery:
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


class TaskSender:
    """Publishes task messages by name (the node never imports the worker's tasks)."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def __call__(self, task_name: str, args: Sequence[int], queue: str) -> None:
        self.app.send_task(task_name, args=list(args), queue=queue)

    def close(self) -> None:
        self.app.close()
