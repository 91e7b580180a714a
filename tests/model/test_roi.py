"""ROI annotation: validation at construction, JSON round trip, the square box."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from model.serving.roi import MAX_SLICES, Roi, RoiError

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.2"


def roi_json(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "study_instance_uid": STUDY,
        "series_instance_uid": SERIES,
        "slices_x_mm": [-3.0, 0.0, 3.0],
        "polygon_yz_mm": [[-20.0, 10.0], [10.0, 10.0], [10.0, 30.0], [-20.0, 30.0]],
        "vertebra": "L1",
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not ...}


def test_json_round_trip_gives_an_equal_roi() -> None:
    roi = Roi.from_json(roi_json())
    again = Roi.from_json(json.loads(json.dumps(roi.to_json())))
    assert again == roi
    assert roi.slices_x_mm == (-3.0, 0.0, 3.0)
    assert roi.polygon_yz_mm[1] == (10.0, 10.0)


def test_vertebra_is_optional() -> None:
    roi = Roi.from_json(roi_json(vertebra=...))
    assert roi.vertebra is None
    assert "vertebra" not in roi.to_json()


def test_square_box_is_the_smallest_square_around_the_bounding_box() -> None:
    # Bounding box y -20..10 (30 mm wide), z 10..30 (20 mm high): side 30, centred.
    box = Roi.from_json(roi_json()).square_box_yz()
    assert (box.center_y, box.center_z, box.side) == (-5.0, 20.0, 30.0)
    assert box.y_range == (-20.0, 10.0)
    assert box.z_range == (5.0, 35.0)


def test_square_box_of_a_tall_polygon_takes_its_height() -> None:
    polygon = [[0.0, 0.0], [8.0, 2.0], [4.0, 40.0]]
    box = Roi.from_json(roi_json(polygon_yz_mm=polygon)).square_box_yz()
    assert (box.center_y, box.center_z, box.side) == (4.0, 20.0, 40.0)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"slices_x_mm": []}, "slices_x_mm"),
        ({"slices_x_mm": [float(i) for i in range(MAX_SLICES + 1)]}, "slices_x_mm"),
        ({"slices_x_mm": [0.0, 0.0]}, "slices_x_mm"),
        ({"slices_x_mm": [0.0, math.nan]}, "slices_x_mm[1]"),
        ({"slices_x_mm": [0.0, "3"]}, "slices_x_mm[1]"),
        ({"slices_x_mm": [True]}, "slices_x_mm[0]"),
        ({"slices_x_mm": 3.0}, "slices_x_mm"),
        ({"polygon_yz_mm": [[0, 0], [1, 1]]}, "polygon_yz_mm"),
        ({"polygon_yz_mm": [[0, 0], [1, 1], [2, 2]]}, "degenerate"),
        ({"polygon_yz_mm": [[0, 0], [10, 0], [20, 0], [5, 0]]}, "degenerate"),
        ({"polygon_yz_mm": [[0, 0], [1, math.inf], [2, 5]]}, "polygon_yz_mm[1][1]"),
        ({"polygon_yz_mm": [[0, 0], [1], [2, 5]]}, "polygon_yz_mm[1]"),
        ({"study_instance_uid": "not a uid"}, "study_instance_uid"),
        ({"series_instance_uid": "1.2.03"}, "series_instance_uid"),
        ({"series_instance_uid": "1." + "2" * 70}, "series_instance_uid"),
        ({"vertebra": ""}, "vertebra"),
        ({"slices_x_mm": ...}, "slices_x_mm"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_roi_is_refused_naming_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(RoiError, match=field.replace("[", r"\[").replace("]", r"\]")):
        Roi.from_json(roi_json(**changes))


def test_constructor_validates_too() -> None:
    with pytest.raises(RoiError, match="slices_x_mm"):
        Roi(STUDY, SERIES, (), ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0)))
    roi = Roi(STUDY, SERIES, [1, 2], [[0, 0], [1, 0], [0, 1]])  # type: ignore[arg-type]
    assert roi.slices_x_mm == (1.0, 2.0)
    assert roi.polygon_yz_mm == ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0))


def test_up_to_seven_slices_are_accepted() -> None:
    roi = Roi.from_json(roi_json(slices_x_mm=[float(i) for i in range(MAX_SLICES)]))
    assert len(roi.slices_x_mm) == MAX_SLICES
    single = Roi.from_json(roi_json(slices_x_mm=[2.5]))
    assert single.slices_x_mm == (2.5,)


def test_roi_is_frozen() -> None:
    roi = Roi.from_json(roi_json())
    with pytest.raises(AttributeError):
        roi.vertebra = "L2"  # type: ignore[misc]
