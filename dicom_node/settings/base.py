"""What every group of settings shares: the environment prefix and how values are read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "SPINE_TRIAGE_"

CommaList = Annotated[list[str], NoDecode]


def split_list(value: Any) -> Any:
    """Accept ``A,B,C`` (or a JSON list) for list settings given in the environment."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class SettingsGroup(BaseSettings):
    """One concern's settings, read from the environment (and ``.env``) with the prefix."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    var_dir: Path = Field(
        Path("var"),
        description="Folder for embedded-mode state: SQLite database, storage, broker, caches.",
    )
