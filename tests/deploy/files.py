"""Readers for the deployment files, shared by the deploy tests (no Docker engine needed)."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from dicom_node.settings import ENV_PREFIX, Settings
from worker.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCS = REPO / "docs"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
ENTRYPOINT = DEPLOY / "docker-entrypoint.sh"
ENV_EXAMPLE = DEPLOY / "env.example"
SYSTEMD = DEPLOY / "systemd"

SETTING_VARIABLES = frozenset(f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields)
SETTING_NAME = re.compile(rf"\b{ENV_PREFIX}[A-Z0-9_]*[A-Z0-9]\b")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:[:?\-][^}]*)?\}")


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def setting_names_in(text: str) -> set[str]:
    """Every SPINE_TRIAGE_* name a text mentions (assignments, references, prose)."""
    return set(SETTING_NAME.findall(text))


def entrypoint_roles() -> dict[str, list[str] | None]:
    """Role → the spine-triage arguments it runs (None: a role the script refuses)."""
    roles: dict[str, list[str] | None] = {}
    text = ENTRYPOINT.read_text()
    for match in re.finditer(r"^\s+([a-z|]+)\)\n(.*?);;", text, flags=re.MULTILINE | re.DOTALL):
        labels, body = match.group(1).split("|"), match.group(2)
        run = re.search(r'exec spine-triage (.*?) "\$@"', body)
        for label in labels:
            roles[label] = shlex.split(run.group(1)) if run else None
    return roles


def cli_arguments_for(container_command: list[str]) -> list[str]:
    """The spine-triage arguments a container command (entrypoint role + args) runs."""
    role, *rest = container_command
    roles = entrypoint_roles()
    if role not in roles:  # the entrypoint passes unknown roles to the command line
        return [role, *rest]
    target = roles[role]
    assert target is not None, f"role {role!r} is refused by the entrypoint"
    return [*target, *rest]


def parse_cli(arguments: list[str]) -> argparse.Namespace:
    """Parse like the console script does; a wrong command or option fails the test."""
    parser = build_parser()
    try:
        return parser.parse_args(arguments)
    except SystemExit as exc:
        raise AssertionError(f"spine-triage {' '.join(arguments)} does not parse") from exc


def systemd_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as section → key → values (keys may repeat, as systemd allows)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def env_assignments(text: str) -> list[tuple[str, str]]:
    """NAME=value lines of an env file, commented-out examples included (quotes removed)."""
    values: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.strip().lstrip("#").strip()
        match = re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line)
        if match:
            value = match.group(2)
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values.append((match.group(1), value))
    return values
