"""The Celery application of the workers (configuration shared with the node's sender)."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from dicom_node.broker.app import celery_config
from dicom_node.settings import Settings, load_settings
from worker.runtime import reset_runtime

log = logging.getLogger(__name__)


def make_app(settings: Settings | None = None) -> Celery:
    """The worker app for ``settings`` (default: from the environment), with its tasks."""
    app = Celery("spine_triage")
    app.conf.update(celery_config(settings or load_settings()))
    app.conf.include = ["worker.tasks"]
    return app


@worker_process_init.connect
def _fresh_runtime_per_process(**_: Any) -> None:
    """A forked pool process makes its own engine (and loads the model) on first use."""

    reset_runtime()
