"""Automatic triage: when the node analyses a study without waiting for a reader's ROI."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dicom_node.settings.base import SettingsGroup

AutoRoiPolicy = Literal["always", "fallback", "off"]


class TriageSettings(SettingsGroup):
    """Site policy for automatic analysis (the localiser proposes an ROI on every body)."""

    auto_roi: AutoRoiPolicy = Field(
        "always",
        description=(
            "Automatic analysis of complete studies: 'always' (every complete study, at once: "
            "what lets the flag come before anyone opens the study), 'fallback' (only when no "
            "reader's ROI arrived within AUTO_ROI_FALLBACK_S of completion) or 'off' (only "
            "readers' ROIs are analysed). A reader's ROI always makes its own job."
        ),
    )
    auto_roi_fallback_s: float = Field(
        300.0,
        ge=0,
        description="With AUTO_ROI=fallback: how long after completion a study waits for a "
        "reader's ROI before it is analysed automatically (s).",
    )
