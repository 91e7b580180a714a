"""Strict pydicom validation for every SR test, as highdicom's own tests do."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydicom import config


@pytest.fixture(autouse=True)
def strict_pydicom_validation() -> Iterator[None]:
    settings = config.settings
    previous = (settings.reading_validation_mode, settings.writing_validation_mode)
    settings.reading_validation_mode = config.RAISE
    settings.writing_validation_mode = config.RAISE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = previous
