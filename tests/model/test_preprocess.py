"""ROI → network inputs, as METHOD.md specifies: where things land, and invariance to layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.io.volume import load_series
from model.serving.preprocess import (
    PreprocessParams,
    PreprocessParamsError,
    RoiOutsideVolumeError,
    build_inputs,
    load_roi_volume,
)
from model.serving.roi import Roi
from tests.model.series_factory import square_roi, write_blob_series, write_oriented_series

# Box centred at (y, z) = (2, -3) mm, side 32 mm: cells of 0.5 mm.
CENTER_YZ = (2.0, -3.0)
SIDE = 32.0
SLICE_X = 1.0


def cell_center(row: int, column: int) -> tuple[float, float]:
    """(y, z) of a grid cell's centre: row 0 superior (largest z), column 0 anterior."""
    y = CENTER_YZ[0] - SIDE / 2 + (column + 0.5) * SIDE / 64
    z = CENTER_YZ[1] + SIDE / 2 - (row + 0.5) * SIDE / 64
    return y, z


# A marker 3 mm to the patient's left of the slice (channel 2), superior and anterior.
MARKER_ROW, MARKER_COLUMN = 12, 9
_y, _z = cell_center(MARKER_ROW, MARKER_COLUMN)
MARKER = (SLICE_X + 3.0, _y, _z)


def _inputs(folder: Path, **layout: object) -> tuple[np.ndarray, Roi]:
    paths, identity = write_blob_series(folder, [MARKER], **layout)  # type: ignore[arg-type]
    roi = square_roi(identity, center_yz=CENTER_YZ, side=SIDE, slices_x_mm=(SLICE_X, SLICE_X + 3))
    return build_inputs(load_roi_volume(paths, roi), roi), roi


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    inputs, _ = _inputs(tmp_path_factory.mktemp("reference"))
    return inputs


def test_marker_lands_in_the_expected_row_column_and_channel(reference: np.ndarray) -> None:
    assert reference.shape == (2, 3, 64, 64)
    assert reference.dtype == np.float32
    first = reference[0]
    channel, row, column = np.unravel_index(np.argmax(first), first.shape)
    assert (channel, row, column) == (2, MARKER_ROW, MARKER_COLUMN)
    # For the second slice (x + 3 mm) the marker sits in its middle channel.
    second = reference[1]
    assert np.unravel_index(np.argmax(second), second.shape) == (1, MARKER_ROW, MARKER_COLUMN)


def test_each_input_is_z_scored_over_all_channels(reference: np.ndarray) -> None:
    for tensor in reference:
        assert float(tensor.mean()) == pytest.approx(0.0, abs=1e-5)
        assert float(tensor.std()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    "layout",
    [
        {"reverse_order": True},
        {"feet_first": True},
        {"feet_first": True, "reverse_order": True},
        {"pixel_spacing_mm": 0.55, "rows": 120, "columns": 120},
        {"slice_spacing_mm": 0.8, "slices": 60},
        {"multiframe": True},
        {"transfer_syntax": "j2k"},
    ],
    ids=lambda layout: "-".join(f"{k}={v}" for k, v in layout.items()),
)
def test_same_tensor_whatever_the_series_layout(
    tmp_path: Path, reference: np.ndarray, layout: dict[str, object]
) -> None:
    inputs, _ = _inputs(tmp_path, **layout)
    resampled = "pixel_spacing_mm" in layout or "slice_spacing_mm" in layout
    # Same samples give the same tensor. Other spacings differ by the error of trilinear
    # interpolation only: a few per cent of the marker's peak (a Gaussian of σ 1.5 mm sampled
    # every 0.55-1 mm), far less on average.
    tolerance = 0.08 * float(np.abs(reference).max()) if resampled else 1e-4
    np.testing.assert_allclose(inputs, reference, atol=tolerance)
    if resampled:
        assert float(np.abs(inputs - reference).mean()) < 0.01
        assert np.unravel_index(np.argmax(inputs[0]), inputs[0].shape) == (
            2,
            MARKER_ROW,
            MARKER_COLUMN,
        )


def test_roi_partly_outside_the_volume_is_an_error(tmp_path: Path) -> None:
    paths, identity = write_blob_series(tmp_path, [MARKER], slices=30)  # z -14.5 .. 14.5 mm
    inside = square_roi(identity, center_yz=(0.0, 0.0), side=24.0, slices_x_mm=(0.0,))
    volume = load_series(paths)
    assert build_inputs(volume, inside).shape == (1, 3, 64, 64)
    over_top = square_roi(identity, center_yz=(0.0, 8.0), side=24.0, slices_x_mm=(0.0,))
    with pytest.raises(RoiOutsideVolumeError, match="slice axis"):
        build_inputs(volume, over_top)
    with pytest.raises(RoiOutsideVolumeError):
        build_inputs(load_roi_volume(paths, over_top), over_top)
    # Slabs reach 4.5 mm to each side of x; the series spans x ±33.25 mm.
    at_edge = square_roi(identity, center_yz=(0.0, 0.0), side=24.0, slices_x_mm=(30.0,))
    with pytest.raises(RoiOutsideVolumeError, match="column axis"):
        build_inputs(volume, at_edge)


def test_partial_volume_without_enough_margin_is_reported(tmp_path: Path) -> None:
    paths, identity = write_blob_series(tmp_path, [MARKER], slices=30)
    roi = square_roi(identity, center_yz=(0.0, 0.0), side=12.0, slices_x_mm=(0.0,))
    narrow = load_roi_volume(paths, roi, lateral_reach_mm=0.0, margin_mm=0.0)
    with pytest.raises(RoiOutsideVolumeError, match="larger margin"):
        build_inputs(narrow, roi)


def test_transform_moves_the_sampling_grid(tmp_path: Path, reference: np.ndarray) -> None:
    paths, identity = write_blob_series(tmp_path, [MARKER])
    roi = square_roi(identity, center_yz=CENTER_YZ, side=SIDE, slices_x_mm=(SLICE_X,))
    volume = load_series(paths)
    identity_transform = np.eye(3)
    np.testing.assert_allclose(
        build_inputs(volume, roi, transform=identity_transform), reference[:1], atol=1e-5
    )
    # Sampling 2 mm further anterior (dy = -2) moves the marker 4 cells toward column 63.
    shifted = build_inputs(volume, roi, transform=np.array([[1, 0, -2.0], [0, 1, 0], [0, 0, 1]]))
    assert np.unravel_index(np.argmax(shifted[0]), shifted[0].shape) == (
        2,
        MARKER_ROW,
        MARKER_COLUMN + 4,
    )


def test_params_round_trip_and_refuse_unknown_preprocessing() -> None:
    params = PreprocessParams()
    assert PreprocessParams.from_json(params.to_json()) == params
    assert params.lateral_reach_mm == 4.5
    with pytest.raises(PreprocessParamsError, match="unknown"):
        PreprocessParams.from_json({**params.to_json(), "window": [0, 100]})
    with pytest.raises(PreprocessParamsError, match="method"):
        PreprocessParams.from_json({**params.to_json(), "method": "something-else"})
    with pytest.raises(PreprocessParamsError, match="slab_thickness_mm"):
        PreprocessParams(slab_thickness_mm=0.0)


@pytest.mark.parametrize(
    ("row_direction", "column_direction"),
    [
        ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),  # sagittal
        ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),  # coronal
        ((0.9659, 0.2588, 0.0), (-0.2588, 0.9659, 0.1)),  # oblique
    ],
    ids=["sagittal", "coronal", "oblique"],
)
def test_same_tensor_from_a_series_in_another_orientation(
    tmp_path: Path,
    reference: np.ndarray,
    row_direction: tuple[float, float, float],
    column_direction: tuple[float, float, float],
) -> None:
    column = np.asarray(column_direction) - np.dot(column_direction, row_direction) * np.asarray(
        row_direction
    )  # make the oblique pair orthogonal
    paths, identity = write_oriented_series(
        tmp_path,
        [MARKER],
        row_direction=row_direction,
        column_direction=tuple(column),
        center=(2.0, 0.0, 0.0),
    )
    roi = square_roi(identity, center_yz=CENTER_YZ, side=SIDE, slices_x_mm=(SLICE_X, SLICE_X + 3))
    inputs = build_inputs(load_roi_volume(paths, roi), roi)
    np.testing.assert_allclose(inputs, reference, atol=0.08 * float(np.abs(reference).max()))
    assert float(np.abs(inputs - reference).mean()) < 0.01
    assert np.unravel_index(np.argmax(inputs[0]), inputs[0].shape) == (
        2,
        MARKER_ROW,
        MARKER_COLUMN,
    )
