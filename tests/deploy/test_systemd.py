"""The systemd units start commands that exist, with options that parse."""

from __future__ import annotations

import re
import shlex

import pytest

from dicom_node.broker.wake import DELIVERY_QUEUE, TRIAGE_QUEUE
from tests.deploy.files import SETTING_VARIABLES, SYSTEMD, parse_cli, systemd_unit

UNITS = {
    "spine-triage-node.service": "run_node",
    "spine-triage-worker@.service": "run_worker",
}


def _command_line(unit: dict[str, dict[str, list[str]]], instance: str) -> list[str]:
    """ExecStart as systemd would run it: Environment= defaults, %i and %H expanded."""
    service = unit["Service"]
    environment = dict(
        pair.split("=", 1) for line in service.get("Environment", []) for pair in [line]
    )
    (exec_start,) = service["ExecStart"]
    expanded = re.sub(r"\$\{(\w+)\}", lambda m: environment[m.group(1)], exec_start)
    expanded = expanded.replace("%i", instance).replace("%H", "host.example")
    return shlex.split(expanded)


@pytest.mark.parametrize(("name", "handler"), sorted(UNITS.items()))
def test_unit_runs_an_existing_subcommand(name: str, handler: str) -> None:
    unit = systemd_unit(SYSTEMD / name)
    program, *arguments = _command_line(unit, "gpu0")
    assert program == "/opt/spine-triage/venv/bin/spine-triage"
    assert parse_cli(arguments).handler.__name__ == handler
    service = unit["Service"]
    assert service["User"] == ["spine-triage"]
    assert service["Restart"] == ["on-failure"]
    assert "/etc/spine-triage/spine-triage.env" in service["EnvironmentFile"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("name", sorted(UNITS))
def test_units_name_only_settings_that_exist(name: str) -> None:
    text = (SYSTEMD / name).read_text()
    names = set(re.findall(r"\bSPINE_TRIAGE_[A-Z0-9_]*[A-Z0-9]\b", text))
    assert names <= SETTING_VARIABLES, names - SETTING_VARIABLES


def test_worker_unit_defaults_to_both_queues_and_names_the_instance() -> None:
    unit = systemd_unit(SYSTEMD / "spine-triage-worker@.service")
    args = parse_cli(_command_line(unit, "delivery")[1:])
    assert set(args.queues.split(",")) == {TRIAGE_QUEUE, DELIVERY_QUEUE}
    assert args.hostname == "delivery@host.example"
    assert "-/etc/spine-triage/worker-%i.env" in unit["Service"]["EnvironmentFile"]
