"""The settings reference, rendered from the settings' own descriptions: ``.env.example`` and
``docs/settings.md`` (``spine-triage config env-example`` / ``config settings-doc``). Tests
compare the committed files with these texts, so the documents cannot drift from the code."""

from __future__ import annotations

import textwrap
from typing import Any

from dicom_node.settings import DESTINATION_KINDS, ENV_PREFIX, Settings


def render_env_example() -> str:
    """The text of ``.env.example``: every setting, its default and its meaning."""
    lines = [
        "# spine-triage settings. Every variable is optional; the defaults run embedded mode",
        "# (SQLite, storage and a local broker under ./var/). Generated from",
        "# the settings by `spine-triage config env-example`; do not edit by hand.",
        "",
    ]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list) and name == "destinations":
            shown = "[]"
        elif isinstance(default, list):
            shown = ",".join(str(item) for item in default)
        elif default is None:
            shown = ""
        elif isinstance(default, bool):
            shown = "true" if default else "false"
        else:
            shown = str(default)
        for text_line in _wrap(field.description or ""):
            lines.append(f"# {text_line}")
        lines.append(f"#{ENV_PREFIX}{name.upper()}={shown}")
        lines.append("")
    return "\n".join(lines)


def _wrap(text: str, width: int = 92) -> list[str]:
    return textwrap.wrap(text, width=width) or [""]


def render_settings_markdown() -> str:
    """The text of ``docs/settings.md``: every setting and every destination field.

    Generated from this model so the operator guide's reference cannot drift from the code;
    a test compares the committed file with this text.
    """
    lines = [
        "# Settings reference",
        "",
        "<!-- Generated from the settings by `spine-triage config settings-doc`; "
        "do not edit by hand. -->",
        "",
        "Every setting is an environment variable with the prefix `SPINE_TRIAGE_` (or a line "
        "of a `.env` file in the working directory of the process). All are optional: the "
        "defaults run the embedded mode (SQLite, storage and a local broker under `VAR_DIR`). "
        "The node and every worker must be given the same values for the settings they share "
        "(database, broker, storage, AE title, destinations, model). `spine-triage config "
        "show` prints the values a process would use (secrets hidden); `spine-triage config "
        "env-example` prints them all as a commented `.env` file.",
        "",
        "| Variable | Type | Default | Meaning |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        lines.append(
            f"| `{ENV_PREFIX}{name.upper()}` | {_markdown_type(field)} | "
            f"{_markdown_default(name, field)} | {_markdown_cell(field.description or '')} |"
        )
    lines += [
        "",
        "## Destinations",
        "",
        f"`{ENV_PREFIX}DESTINATIONS` is a JSON list of objects; `kind` selects one of the "
        "forms below and `name` must be unique. Every result gets one delivery per "
        "destination. Example:",
        "",
        "```",
        f"{ENV_PREFIX}DESTINATIONS="
        '[{"kind": "cstore", "name": "pacs", "ae_title": "PACS", "host": "pacs.example", '
        '"port": 104}, {"kind": "hl7", "name": "ris", "host": "ris.example", "port": 2575}]',
        "```",
    ]
    for kind_class in DESTINATION_KINDS:
        kind = kind_class.model_fields["kind"].default
        lines += [
            "",
            f"### `{kind}`",
            "",
            _markdown_cell((kind_class.__doc__ or "").strip()),
            "",
            "| Field | Type | Default | Meaning |",
            "|---|---|---|---|",
        ]
        for field_name, field in kind_class.model_fields.items():
            if field_name == "kind":
                continue
            default = "required" if field.is_required() else _markdown_default(field_name, field)
            lines.append(
                f"| `{field_name}` | {_markdown_type(field)} | {default} | "
                f"{_markdown_cell(field.description or _destination_note(kind, field_name))} |"
            )
    lines.append("")
    return "\n".join(lines)


_DESTINATION_FIELD_NOTES = {
    "ae_title": "Called AE title of the PACS.",
    "host": "Host name or address of the peer.",
    "port": "TCP port of the peer.",
    "calling_ae_title": "Calling AE title; empty: the node's AE_TITLE.",
    "tls": "Use DICOM TLS (TLS 1.2 or newer; the peer's certificate is verified).",
    "tls_ca_certificates": "PEM CA bundle that signed the peer's certificate "
    "(default: the system's CAs).",
    "tls_certificate": "PEM client certificate, when the peer asks for one.",
    "tls_private_key": "PEM private key of the client certificate.",
    "timeout_s": "Connection and response timeout (s).",
    "username": "HTTP basic auth user.",
    "password": "HTTP basic auth password.",
    "bearer_token": "HTTP bearer token (instead of basic auth).",
    "ca_certificates": "PEM CA bundle for an https URL (default: the system's CAs).",
    "sending_application": "MSH-3 sending application.",
    "sending_facility": "MSH-4 sending facility.",
    "receiving_application": "MSH-5 receiving application.",
    "receiving_facility": "MSH-6 receiving facility.",
    "path": "Folder that receives a copy of every SR.",
}


_DESTINATION_URL_NOTES = {
    "stow": "DICOMweb base URL, e.g. https://pacs.example/dicom-web.",
    "orthanc": "Orthanc REST root, e.g. http://orthanc:8042.",
    "webhook": "URL the signed JSON is posted to.",
}


def _destination_note(kind: str, field_name: str) -> str:
    if field_name == "url":
        return _DESTINATION_URL_NOTES.get(kind, "")
    return _DESTINATION_FIELD_NOTES.get(field_name, "")


def _markdown_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _markdown_default(name: str, field: Any) -> str:
    default = field.get_default(call_default_factory=True)
    if default is None or default == "":
        return "empty"
    if isinstance(default, list):
        return f"`{','.join(str(item) for item in default)}`" if default else "empty"
    if isinstance(default, bool):
        return "`true`" if default else "`false`"
    return f"`{default}`"


def _markdown_type(field: Any) -> str:
    annotation = str(field.annotation)
    for marker, label in (
        ("DestinationSettings", "JSON list"),
        ("Destination", "JSON list"),
        ("list", "list"),
        ("bool", "boolean"),
        ("Path", "path"),
        ("float", "number"),
        ("int", "integer"),
        ("Literal", "text"),
        ("str", "text"),
    ):
        if marker in annotation:
            kind = label
            break
    else:
        kind = annotation
    bounds = []
    for constraint in field.metadata:
        for attribute, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(constraint, attribute, None)
            if value is not None:
                bounds.append(f"{symbol} {value}")
    return f"{kind} ({', '.join(bounds)})" if bounds else kind
