"""The Dockerfile and its entry point: the roles exist, the entry point really runs them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.deploy.files import (
    DEPLOY,
    DOCKERFILE,
    ENTRYPOINT,
    REPO,
    entrypoint_roles,
    parse_cli,
)

TOOLS = Path(sys.executable).parent


def test_every_role_of_the_entrypoint_is_a_command_that_exists() -> None:
    roles = entrypoint_roles()
    assert {"node", "worker", "migrate"} <= set(roles)
    assert roles["beat"] is None and roles["sweeper"] is None, "no beat/sweeper process"
    for arguments in roles.values():
        if arguments is not None:
            parse_cli(arguments)


def test_dockerfile_runs_the_entrypoint_with_a_known_default_role() -> None:
    text = DOCKERFILE.read_text()
    assert 'ENTRYPOINT ["spine-triage-entrypoint"]' in text
    assert "COPY deploy/docker-entrypoint.sh /usr/local/bin/spine-triage-entrypoint" in text
    default_role = re.search(r'^CMD \["([a-z-]+)"\]', text, flags=re.MULTILINE)
    assert default_role is not None and entrypoint_roles()[default_role.group(1)] is not None


def test_dockerfile_copies_what_exists_and_the_ignore_file_lets_it_through() -> None:
    text = DOCKERFILE.read_text()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.MULTILINE):
        *sources, _target = line.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: missing in the repository"
            allowed = {entry.lstrip("!").rstrip("/") for entry in ignore if entry.startswith("!")}
            assert source.rstrip("/") in allowed or source.split("/")[0] in allowed, source


def test_both_variants_install_the_torch_the_project_allows() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^\s+cpu\)", text, flags=re.MULTILINE)
    assert re.search(r"^\s+cuda\)", text, flags=re.MULTILINE)
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for package in ("torch", "torchvision"):
        (requirement,) = [d for d in dependencies if re.match(rf"{package}\b(?!vision)", d)]
        assert text.count(f'"{requirement}"') == 2, f"Dockerfile must pin {requirement!r}"


def _run_entrypoint(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("SPINE_TRIAGE_")
    }
    environment["PATH"] = f"{TOOLS}{os.pathsep}{environment.get('PATH', '')}"
    environment["SPINE_TRIAGE_VAR_DIR"] = str(tmp_path / "var")
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("role", ["beat", "sweeper"])
def test_entrypoint_refuses_a_beat_role_and_says_why(tmp_path: Path, role: str) -> None:
    run = _run_entrypoint(tmp_path, role)
    assert run.returncode == 64
    assert "the node runs the scheduler and the sweeper" in run.stderr


def test_entrypoint_migrate_brings_the_schema_to_head(tmp_path: Path) -> None:
    assert _run_entrypoint(tmp_path, "migrate").returncode == 0
    current = _run_entrypoint(tmp_path, "db", "current")
    assert current.returncode == 0, current.stdout + current.stderr
    assert "up to date" in current.stdout


@pytest.mark.parametrize("role", ["node", "worker"])
def test_entrypoint_roles_reach_their_subcommand(tmp_path: Path, role: str) -> None:
    run = _run_entrypoint(tmp_path, role, "--help")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"usage: spine-triage {role}")
