"""The model the workers serve and the series it may be given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from dicom_node.settings.base import CommaList, SettingsGroup, split_list


class ModelSettings(SettingsGroup):
    """Checkpoint, threshold, inference device, series selection."""

    model_checkpoint: Path | None = Field(
        None,
        description=(
            "Checkpoint the workers serve. Empty: the demonstration model (trained on synthetic "
            "data on first use and cached under VAR_DIR/models; not for clinical use)."
        ),
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

    @field_validator("series_selection", mode="before")
    @classmethod
    def _selection_from_env(cls, value: Any) -> Any:
        return split_list(value)
