"""Vertebra labels and their SNOMED CT concepts (finding site of an ROI, both ways)."""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code


def _vertebra_codes() -> dict[str, Code]:
    table: dict[str, Code] = {}
    for prefix, count in (("C", 7), ("T", 12), ("L", 5)):
        for level in range(1, count + 1):
            table[f"{prefix}{level}"] = getattr(codes.SCT, f"{prefix}{level}Vertebra")
    table["SACRUM"] = codes.SCT.Sacrum
    table["COCCYX"] = codes.SCT.Coccyx
    return table


VERTEBRA_CODES: dict[str, Code] = _vertebra_codes()
"""Vertebra label → SNOMED CT concept (C1–C7, T1–T12, L1–L5, sacrum, coccyx)."""

_VERTEBRA_ALIASES = {f"S{level}": "SACRUM" for level in range(1, 6)} | {
    "S": "SACRUM",
    "CO": "COCCYX",
    "CO1": "COCCYX",
}
_LABEL_FOR_CODE = {(c.value, c.scheme_designator): label for label, c in VERTEBRA_CODES.items()}


def vertebra_code(label: str) -> Code | None:
    """SNOMED CT concept for a vertebra label ("L1", "t12", "S1" → sacrum), None if unknown."""
    key = label.strip().upper()
    key = _VERTEBRA_ALIASES.get(key, key)
    return VERTEBRA_CODES.get(key)


def vertebra_label(concept: Code | hd.sr.CodedConcept) -> str | None:
    """Label ("L1", "sacrum", "coccyx") of a vertebra concept, None if it is not one."""
    label = _LABEL_FOR_CODE.get((concept.value, concept.scheme_designator))
    if label in ("SACRUM", "COCCYX"):
        return label.lower()
    return label
