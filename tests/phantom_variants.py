"""The phantom generator's orientation, slice-order, encoding and spacing variants that tests
run their checks on (``make_case(**options)`` for each)."""

from __future__ import annotations

from typing import Any

VARIANTS: list[dict[str, Any]] = [
    {"feet_first": False, "reverse_order": False},
    {"feet_first": True, "reverse_order": False},
    {"feet_first": False, "reverse_order": True},
    {"feet_first": True, "reverse_order": True},
    {"multiframe": True},
    {"transfer_syntax": "j2k"},
    {"transfer_syntax": "rle", "feet_first": True},
    {"slice_spacing_mm": 1.0, "pixel_spacing_mm": 0.9},
    {"slice_spacing_mm": 3.0, "pixel_spacing_mm": 0.6},
    {"slice_spacing_mm": 2.0, "pixel_spacing_mm": 0.75},
]
