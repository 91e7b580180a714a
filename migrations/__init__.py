"""Alembic migrations: the only way the schema is created or changed."""

from __future__ import annotations

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parent
