"""The model the workers serve and the series it may be given."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, field_validator

from dicom_node.settings.base import CommaList, SettingsGroup, split_list


def _sha256(value: str) -> str:
    text = value.strip().lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError("expected a sha256: 64 hexadecimal digits")
    return text


Sha256 = Annotated[str, AfterValidator(_sha256)]


class ModelSettings(SettingsGroup):
    """Checkpoint, threshold, inference device, series selection."""

    model_checkpoint: Path | None = Field(
        None,
        description=(
            "Checkpoint the workers serve. Empty: the demonstration model (trained on synthetic "
            "data on first use and cached under VAR_DIR/models; not for clinical use)."
        ),
    )
    model_checkpoint_sha256: Sha256 | None = Field(
        None,
        description="The sha256 the live checkpoint must carry (its identity beside its name "
        "and version; `spine-triage models show` prints it). A worker refuses to start with, "
        "or to load, a checkpoint whose sha256 differs. Empty: not pinned.",
    )
    candidate_checkpoint: Path | None = Field(
        None,
        description="Shadow mode: a candidate checkpoint run beside the live one on every job. "
        "Its results are recorded with its version (role shadow) for `spine-triage models "
        "compare`; it delivers nothing, flags nothing and its failure never fails a job. Its "
        "version must differ from the live model's. Promotion: make it MODEL_CHECKPOINT. "
        "Empty: no shadow.",
    )
    candidate_checkpoint_sha256: Sha256 | None = Field(
        None,
        description="The sha256 the candidate checkpoint must carry (as MODEL_CHECKPOINT_SHA256 "
        "for the live one). Empty: not pinned.",
    )
    threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Patient probability at or above which a study is flagged HIGH. Empty: the "
        "threshold stored in the checkpoint (0.5 unless the site chose another).",
    )
    torch_threads: int = Field(
        1,
        ge=0,
        description="CPU threads a worker process gives PyTorch for inference (0: PyTorch's "
        "default, one per core). One is fastest beside other work on a small CPU; scale with "
        "worker processes instead.",
    )
    inference_device: str = Field(
        "auto", description="auto (CUDA when present, else CPU), cpu, or cuda[:N]."
    )
    series_selection: CommaList = Field(
        default_factory=lambda: ["Modality=CT"],
        description="Rules a series must meet to be used as the CT of an ROI, KEY=REGEX pairs "
        "matched case-insensitively against DICOM attributes.",
    )

    @field_validator("model_checkpoint_sha256", "candidate_checkpoint_sha256", mode="before")
    @classmethod
    def _empty_is_unpinned(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("series_selection", mode="before")
    @classmethod
    def _selection_from_env(cls, value: Any) -> Any:
        return split_list(value)
