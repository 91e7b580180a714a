"""The documents say what the code does: generated settings, existing commands and settings,
the SOP classes, transfer syntaxes and codes the code really uses, working links."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pydicom
import pytest

from dicom_node.archive.schema import AnnotationState, DeliveryState
from dicom_node.dicom.ingest import STORAGE_SOP_CLASSES
from dicom_node.dicom.scp import TRANSFER_SYNTAXES, VERIFICATION
from dicom_node.dicom.vertebrae import VERTEBRA_CODES
from model.synthetic.demo import DEMO_RECIPE
from tests.deploy.files import DEPLOY, DOCS, REPO, SETTING_VARIABLES, parse_cli, setting_names_in
from tests.findings import make_finding
from tests.sr.synthetic_ct import axial_series, new_study
from worker.commands.settings_reference import render_settings_markdown
from worker.key_image import KEY_IMAGE_SOP_CLASS
from worker.sr import AlgorithmInfo, build_triage_sr, sr_to_bytes

GUIDE = DOCS / "operator-guide.md"
CONFORMANCE = DOCS / "conformance-statement.md"
MODEL_CARD = DOCS / "model-card.md"
DOCUMENTS = (GUIDE, CONFORMANCE, MODEL_CARD, DOCS / "settings.md")
# "spine-triage" where it is no command: the Manufacturer the result SR carries
NOT_COMMANDS = (AlgorithmInfo(name="m", version="1", device_uid="1.2.3").manufacturer,)
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
DEVICE_UID = "1.2.826.0.1.3680043.8.498.4711"


def test_settings_reference_is_generated_from_the_settings_model() -> None:
    assert (DOCS / "settings.md").read_text() == render_settings_markdown(), (
        "docs/settings.md is stale; regenerate it with: "
        "spine-triage config settings-doc > docs/settings.md"
    )


def test_settings_reference_example_destinations_are_valid() -> None:
    import json

    from dicom_node.settings import Settings

    line = next(
        text
        for text in (DOCS / "settings.md").read_text().splitlines()
        if text.startswith("SPINE_TRIAGE_DESTINATIONS=")
    )
    destinations = json.loads(line.split("=", 1)[1])
    settings = Settings(_env_file=None, destinations=destinations)  # type: ignore[call-arg]
    assert [d.kind for d in settings.destinations] == ["cstore", "hl7"]


@pytest.mark.parametrize("path", [*DOCUMENTS, *sorted(p for p in DEPLOY.rglob("*") if p.is_file())])
def test_documents_and_deploy_files_name_only_settings_that_exist(path: Path) -> None:
    names = setting_names_in(path.read_text())
    assert names <= SETTING_VARIABLES, f"{path.name}: unknown {sorted(names - SETTING_VARIABLES)}"


def _code_texts(markdown: str) -> list[str]:
    """The lines of fenced code blocks and the inline code spans of a Markdown text."""
    texts: list[str] = []
    in_block = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            texts.append(line.strip())
        else:
            texts.extend(re.findall(r"`([^`]+)`", line))
    return texts


def _commands(markdown: str) -> list[list[str]]:
    """spine-triage command lines: at the start of a code text, after a path's bin/ or after
    `... exec SERVICE`; up to a comment."""
    found = []
    for text in _code_texts(markdown):
        for match in re.finditer(r"(?:^|/bin/|exec \w+ )spine-triage ([a-z][^#'\"]*)", text):
            words = shlex.split(match.group(1))
            if f"spine-triage {' '.join(words)}" not in NOT_COMMANDS:
                found.append(words)
    return found


@pytest.mark.parametrize("path", [GUIDE, MODEL_CARD, CONFORMANCE])
def test_every_command_line_in_the_documents_parses(path: Path) -> None:
    commands = _commands(path.read_text())
    if path is not CONFORMANCE:
        assert commands, f"{path.name}: no command found (is the extraction broken?)"
    for words in commands:
        parse_cli(words)


def test_the_guide_shows_the_failure_commands_and_every_state() -> None:
    text = GUIDE.read_text()
    commands = [" ".join(words) for words in _commands(text)]
    for expected in (
        "annotations list --state failed",
        "deliveries list --state failed",
        "deliveries retry",
        "db upgrade",
        "worker --queues triage",
        "worker --queues delivery",
    ):
        assert expected in commands, f"the operator guide lacks `spine-triage {expected}`"
    for state in [*AnnotationState, *DeliveryState]:
        assert f"| `{state.value}` |" in text, f"the guide does not explain state {state.value}"


def test_documented_metrics_exist() -> None:
    source = (REPO / "dicom_node" / "web" / "metrics.py").read_text()
    source += (REPO / "dicom_node" / "audit" / "trail.py").read_text()  # its counters
    names = set(re.findall(r"\bspine_triage_[a-z_]+", GUIDE.read_text()))
    assert names, "the guide names no metric"
    for name in names:
        base = name.removeprefix("spine_triage_").removesuffix("_total")
        assert f'f"{{PREFIX}}_{base}"' in source, (
            f"{name} is not a metric of dicom_node.web.metrics"
        )


def test_relative_links_resolve() -> None:
    for path in DOCUMENTS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#([^)]+))?\)", path.read_text()):
            file, anchor = target
            linked = (path.parent / file).resolve()
            assert linked.is_file(), f"{path.name} links to missing {file}"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.MULTILINE)
                slugs = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
                assert anchor in slugs, f"{path.name}: no heading #{anchor} in {file}"


def test_conformance_statement_lists_exactly_the_sop_classes_and_transfer_syntaxes() -> None:
    text = CONFORMANCE.read_text()
    sr_syntax = "1.2.840.10008.1.2.1"  # the result SR is written in Explicit VR Little Endian
    known = {str(uid) for uid in STORAGE_SOP_CLASSES} | set(TRANSFER_SYNTAXES)
    known |= {str(VERIFICATION), APPLICATION_CONTEXT, sr_syntax}
    known.add(str(KEY_IMAGE_SOP_CLASS))  # written by the worker (SCU only): the key image
    for uid in known:
        assert uid in text, f"the conformance statement does not list {uid}"
    mentioned = set(re.findall(r"\b1\.2\.840\.10008(?:\.\d+)+\b", text))
    assert mentioned <= known, f"listed but not in the code: {sorted(mentioned - known)}"


def test_conformance_statement_lists_every_c_store_status_the_node_answers() -> None:
    from dicom_node.dicom import ingest

    text = CONFORMANCE.read_text()
    statuses = {value for name, value in vars(ingest).items() if name.startswith("STATUS_")}
    assert len(statuses) >= 4
    for status in statuses:
        assert f"| 0x{status:04X} " in text, f"C-STORE status 0x{status:04X} is not documented"


def _result_sr_codes(label: str) -> set[tuple[str, str]]:
    study_uid, frame_uid = new_study()
    images = axial_series(study_uid, frame_uid)
    malignant = label == "malignant"
    finding = make_finding(
        polygon_yz_mm=((-5.0, -95.0), (5.0, -95.0), (5.0, -85.0), (-5.0, -85.0)),
        slices_x_mm=(-3.0, 0.0, 3.0),
        slice_probabilities=(0.4, 0.9 if malignant else 0.3, 0.2),
        patient_probability=0.9 if malignant else 0.4,
        label=label,  # type: ignore[arg-type]
        priority="HIGH" if malignant else "ROUTINE",
        threshold=0.5,
        vertebra="L1",
    )
    algorithm = AlgorithmInfo(name="resnet50", version="1", device_uid=DEVICE_UID)
    sr = build_triage_sr(images, finding, algorithm, annotation_key=label)
    dataset = pydicom.dcmread(pydicom.filebase.DicomBytesIO(sr_to_bytes(sr)))
    found: set[tuple[str, str]] = set()

    def walk(items: pydicom.Dataset) -> None:
        for element in items:
            if element.VR == "SQ":
                for item in element.value:
                    if "CodeValue" in item and "CodingSchemeDesignator" in item:
                        found.add((str(item.CodeValue), str(item.CodingSchemeDesignator)))
                    walk(item)

    walk(dataset)
    return found


@pytest.mark.parametrize("label", ["malignant", "benign"])
def test_conformance_statement_names_every_code_the_result_sr_uses(label: str) -> None:
    text = CONFORMANCE.read_text()
    codes = _result_sr_codes(label)
    assert ("111047", "DCM") in codes
    vertebrae = {code.value for code in VERTEBRA_CODES.values()}
    for value, scheme in sorted(codes):
        if scheme == "DCM":
            mentioned = re.search(rf"\b{value}\b", text) is not None
        elif value in vertebrae:
            mentioned = re.search(rf"\b[A-Za-z0-9]+ {value}\b", text) is not None
        else:
            mentioned = f"{value}, {scheme}" in text
        assert mentioned, f"code ({value}, {scheme}) of the result SR is not in the statement"


def test_conformance_statement_lists_every_vertebra_code() -> None:
    text = CONFORMANCE.read_text()
    for label, code in VERTEBRA_CODES.items():
        assert re.search(rf"\b{label}\b {code.value}\b", text, flags=re.IGNORECASE), label


def test_model_card_states_the_demonstration_recipe() -> None:
    text = MODEL_CARD.read_text()
    assert f"**{DEMO_RECIPE.patients} synthetic phantoms**" in text
    assert f"{DEMO_RECIPE.train.epochs} epochs" in text
    assert DEMO_RECIPE.train.init == "random" and "random initialisation" in text
    assert "spine-triage-demo" in text
