"""Vertebra localiser: where the vertebral bodies of a spine CT are, without trained weights.

Classical image analysis on an LPS-aligned working grid of about 2 mm (:mod:`.grid`), after
Burns, Yao & Summers, *Vertebral body compression fractures and bone density: automated
detection and classification on CT images*, Radiology 2017;284(3):788-797, who find the spinal
canal, track it along the spine and partition the column of vertebral bodies in front of it at
the intervertebral discs:

1. :mod:`.canal` — the spinal canal: soft-tissue voxels with bone on both sides and a dense
   column in front, joined across the disc levels into the longest tube along z;
2. :mod:`.column` — the body column half a body depth in front of the canal, its density
   profile along z, and the discs: the profile's minima that best fit a regular pitch;
3. :mod:`.bodies` — each body between two discs: endplate to endplate, its mid-sagittal
   outline, its lateral extent and a confidence (contrast against the discs, regularity);
4. :mod:`.labels` — labels only when anchored on the sacrum (L5 upwards), else None;
5. :mod:`.proposals` — the paper's ROI (``METHOD.md``) for each body.

A volume without a usable spine is not an error: :func:`localise` returns a
:class:`Localisation` without bodies whose ``unanalysable`` says why.
"""

from __future__ import annotations

from model.serving.localiser.grid import working_bins
from model.serving.localiser.pipeline import MIN_SLICES, localise
from model.serving.localiser.proposals import (
    AUTOMATIC_MARGIN_MM,
    Proposal,
    automatic_polygon,
    propose_rois,
)
from model.serving.localiser.results import Localisation, VertebralBody

LOCALISER_NAME = "spine-triage-localiser"
LOCALISER_VERSION = "1.0"

__all__ = [
    "AUTOMATIC_MARGIN_MM",
    "LOCALISER_NAME",
    "LOCALISER_VERSION",
    "MIN_SLICES",
    "Localisation",
    "Proposal",
    "VertebralBody",
    "automatic_polygon",
    "localise",
    "propose_rois",
    "working_bins",
]
