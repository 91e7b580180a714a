from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from dicom_node.settings import Settings
from worker.commands.settings_reference import render_env_example

ROOT = Path(__file__).resolve().parents[2]


def test_env_example_lists_every_setting_and_is_current() -> None:
    text = render_env_example()
    for name in Settings.model_fields:
        assert f"SPINE_TRIAGE_{name.upper()}=" in text
    assert (ROOT / ".env.example").read_text() == text + "\n", (
        "regenerate with: spine-triage config env-example > .env.example"
    )


def test_defaults_are_embedded_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.resolved_database_url.startswith("sqlite:///")
    assert settings.resolved_database_url.endswith("var/spine-triage.db")
    assert settings.resolved_storage_dir == (tmp_path / "var" / "storage").resolve()
    assert settings.is_embedded and settings.resolved_broker_url == "spinefs://"


def test_environment_overrides_and_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPINE_TRIAGE_ALLOWED_CALLING_AES", "PACS1, CT_SCANNER")
    monkeypatch.setenv("SPINE_TRIAGE_DICOM_PORT", "104")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.allowed_calling_aes == ["PACS1", "CT_SCANNER"]
    assert settings.dicom_port == 104


@pytest.mark.parametrize(
    "overrides",
    [
        {"ae_title": "A_TITLE_LONGER_THAN_16"},
        {"ae_title": "BACK\\SLASH"},
        {"dicom_port": 0},
        {"tls_certificate": "/x.pem"},  # without its key
        {"threshold": 1.5},
    ],
)
def test_invalid_settings_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(_env_file=None, **overrides)  # type: ignore[call-arg]
