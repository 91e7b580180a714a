"""What the localiser returns: the vertebral bodies it found, or why it found none."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VertebralBody:
    """One vertebral body in DICOM patient coordinates (LPS, mm).

    ``centre_mm`` is (x, y, z); ``outline_yz_mm`` the body's outline on its mid-sagittal plane
    as (y, z) points; ``x_range_mm`` its lateral extent (min x, max x); ``label`` such as
    ``"L1"`` only when the count is anchored (see :mod:`model.serving.localiser.labels`),
    else None; ``confidence`` 0…1.
    """

    centre_mm: tuple[float, float, float]
    outline_yz_mm: tuple[tuple[float, float], ...]
    x_range_mm: tuple[float, float]
    label: str | None
    confidence: float


@dataclass(frozen=True)
class Localisation:
    """The bodies found, ordered from inferior (lowest z) to superior; when none can be
    analysed, ``unanalysable`` says why (and ``bodies`` is empty)."""

    bodies: tuple[VertebralBody, ...]
    unanalysable: str | None = None
