"""The result SR's regions on the review images (:mod:`worker.derived`): what a viewer draws.

Viewers such as OHIF 3 draw a TID 1410 group's region only when it is a 2D SCOORD on an
image they display; the node's groups place the ROI as a SCOORD3D polygon in the CT's frame
of reference, and the CT the PACS holds is axial. TID 1410 allows exactly one region per
group (SCOORD or SCOORD3D, PS3.16), so each group gets a twin: the same tracking identifier
and tracking UID (the same ROI), the same finding, finding site, algorithm identification,
measurements and evaluations, and as its region the ROI as a closed SCOORD POLYLINE on the
review image of the group's slice position. The SCOORD3D groups stay for viewers that do 3D.

The twins come first in the report (:func:`worker.sr.build_triage_sr`,
:func:`worker.sr_automatic.build_automatic_sr`). OHIF 3 (its dicom-sr extension) merges the
groups that share a tracking UID into one measurement and draws the first SCOORD or SCOORD3D
of the merged content: with the SCOORD3D group first, it drew nothing ("Unsupported
GraphicType: POLYGON") and its SR viewport failed jumping to a region on no image. With the
twin first it draws the ROI on the review image, labelled with the group's measurements
(each shown twice, once per group). ``tests/viewer/test_ohif_sr.py`` checks this in OHIF.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import highdicom as hd
import numpy as np

from worker.derived import ReviewSeries

ImageGroup = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations


def review_groups(groups: Sequence[ImageGroup], review: ReviewSeries) -> list[ImageGroup]:
    """One twin per SCOORD3D group of ``groups``, its region on the review image at the
    group's slice position (groups with another kind of region get none)."""
    return [twin for twin in (_twin(group, review) for group in groups) if twin is not None]


def review_region(
    review: ReviewSeries, x_mm: float, polygon_yz_mm: Sequence[tuple[float, float]]
) -> hd.sr.ImageRegion:
    """The polygon at slice position ``x_mm`` as a closed POLYLINE on its review image."""
    image = review.image_at(x_mm)
    points = [(float(y), float(z)) for y, z in polygon_yz_mm]
    if points[0] != points[-1]:
        points.append(points[0])
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=image.graphic_coordinates(points),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(image.dataset.SOPClassUID),
            referenced_sop_instance_uid=image.sop_instance_uid,
        ),
    )


def _twin(group: ImageGroup, review: ReviewSeries) -> ImageGroup | None:
    container = group[0]
    items = list(container.ContentSequence)
    found = [i for i, item in enumerate(items) if item.ValueType == "SCOORD3D"]
    if len(found) != 1:
        return None
    xyz = np.asarray(items[found[0]].GraphicData, dtype=np.float64).reshape(-1, 3)
    region = review_region(review, float(xyz[0, 0]), [(y, z) for _, y, z in xyz])
    twin = copy.deepcopy(group)
    twin[0].ContentSequence[found[0] : found[0] + 1] = [region]  # (a Dataset is iterable)
    return twin
