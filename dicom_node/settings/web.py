"""The HTTP service: REST API, STOW-RS, worklist page."""

from __future__ import annotations

from pydantic import Field

from dicom_node.settings.base import SettingsGroup


class WebSettings(SettingsGroup):
    """Address and credentials of the HTTP service."""

    http_host: str = Field("127.0.0.1", description="Address of the REST API and worklist page.")
    http_port: int = Field(8080, ge=1, le=65535, description="Port of the REST API and worklist.")
    api_token: str = Field(
        "",
        description="Bearer token required on every write to the REST API. Empty: a random "
        "token is generated at start and written to VAR_DIR/api-token (embedded mode).",
    )
