"""worker.preview: the picture of what the model saw, and the sagittal context around the ROI."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.io.volume import Volume
from model.serving.preprocess import build_inputs, load_roi_volume
from model.serving.roi import Roi
from model.synthetic.cases import make_case
from worker.preview import BOX, FLAGGED, render_preview_png, sagittal_context

STUDY = "1.2.826.0.1.3680043.8.498.61.1"
SERIES = "1.2.826.0.1.3680043.8.498.61.2"


def _decode(png: bytes) -> Image.Image:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(png))
    image.load()
    return image.convert("RGB")


def _has_colour(image: Image.Image, colour: tuple[int, int, int]) -> bool:
    pixels = np.asarray(image).reshape(-1, 3)
    return bool(np.any(np.all(pixels == np.array(colour, dtype=np.uint8), axis=1)))


def _gradient_inputs(slices: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    inputs = rng.normal(size=(slices, 3, 64, 64)).astype(np.float32)
    return inputs


def test_one_row_per_slice_and_threshold_marks_the_flagged_titles() -> None:
    three = _decode(render_preview_png(_gradient_inputs(3), [-3, 0, 3], [0.1, 0.2, 0.3]))
    five = _decode(render_preview_png(_gradient_inputs(5), range(5), [0.1, 0.2, 0.3, 0.4, 0.5]))
    assert five.width == three.width
    assert five.height > three.height + 2 * 128  # two more rows of 128-pixel tiles
    assert not _has_colour(three, FLAGGED)
    flagged = _decode(
        render_preview_png(_gradient_inputs(3), [-3, 0, 3], [0.1, 0.7, 0.3], threshold=0.5)
    )
    assert _has_colour(flagged, FLAGGED)
    routine = _decode(
        render_preview_png(_gradient_inputs(3), [-3, 0, 3], [0.1, 0.4, 0.3], threshold=0.5)
    )
    assert not _has_colour(routine, FLAGGED)


def test_channels_are_shown_in_order_with_their_brightness() -> None:
    inputs = np.zeros((1, 3, 64, 64), dtype=np.float32)
    inputs[0, 0] = -1.0  # dark: the slab at x − 3 mm
    inputs[0, 1] = 0.0
    inputs[0, 2] = 1.0  # bright: the slab at x + 3 mm
    image = np.asarray(_decode(render_preview_png(inputs, [0.0], [0.5])).convert("L"))
    middle_of_tiles = image[image.shape[0] - 10 - 6 - 64]  # bottom padding, gap, half a tile
    background = int(middle_of_tiles[0])
    runs = [int(v) for v in middle_of_tiles if int(v) != background]
    shown = list(dict.fromkeys(runs))  # distinct levels, left to right
    assert shown == sorted(shown) and len(shown) == 3, shown  # dark, mid, bright
    assert shown[0] < 20 and shown[2] > 235


def test_context_with_box_is_drawn_beside_the_tiles() -> None:
    inputs = _gradient_inputs(3)
    plain = _decode(render_preview_png(inputs, [-3, 0, 3], [0.2, 0.3, 0.4]))
    context = np.full((96, 96), 40.0, dtype=np.float32)
    context[:, :10] = np.nan  # outside the loaded volume
    with_context = _decode(
        render_preview_png(
            inputs, [-3, 0, 3], [0.2, 0.3, 0.4], context=context, box_px=(30, 30, 66, 66)
        )
    )
    assert with_context.width > plain.width + 200
    assert _has_colour(with_context, BOX)
    assert not _has_colour(plain, BOX)
    # The box sits where box_px says: its left edge at column 30 of 96, scaled to the panel.
    pixels = np.asarray(with_context)[30 : 30 + 288]  # the panel, below its title
    box_columns = np.nonzero(np.all(pixels == np.array(BOX, dtype=np.uint8), axis=2).any(axis=0))[0]
    panel_scale = 288 / 96
    assert abs(box_columns.min() - (10 + 30 * panel_scale)) <= 2


def test_mismatched_lengths_and_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="3 input slices"):
        render_preview_png(_gradient_inputs(3), [0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="shape"):
        render_preview_png(np.zeros((3, 64, 64), dtype=np.float32), [0, 1, 2], [0, 0, 0])
    with pytest.raises(ValueError, match="2-D"):
        render_preview_png(
            _gradient_inputs(1), [0], [0.1], context=np.zeros((2, 2, 2), dtype=np.float32)
        )


def test_five_slices_with_context_render_in_well_under_a_third_of_a_second() -> None:
    inputs = _gradient_inputs(5)
    context = np.random.default_rng(1).normal(300, 200, size=(192, 192)).astype(np.float32)
    args = (inputs, [-6, -3, 0, 3, 6], [0.1, 0.5, 0.9, 0.4, 0.2])
    render_preview_png(*args, context=context, box_px=(56, 56, 136, 136))  # warm the font
    times = []
    for _ in range(5):
        start = time.perf_counter()
        render_preview_png(*args, context=context, box_px=(56, 56, 136, 136), threshold=0.5)
        times.append(time.perf_counter() - start)
    assert sorted(times)[2] < 0.3, f"median {sorted(times)[2]:.3f} s"


def _axial_volume(marker: tuple[float, float, float]) -> Volume:
    """1 mm voxels, axial (x along columns, y along rows, z along slices), centred on 0."""
    n = 81
    grid = np.arange(n, dtype=np.float64) - 40.0
    z, y, x = np.meshgrid(grid, grid, grid, indexing="ij")
    d2 = (x - marker[0]) ** 2 + (y - marker[1]) ** 2 + (z - marker[2]) ** 2
    voxels = (40.0 + 1000.0 * np.exp(-d2 / (2 * 2.0**2))).astype(np.float32)
    return Volume(
        voxels=voxels,
        origin=np.array([-40.0, -40.0, -40.0]),
        row_direction=np.array([1.0, 0.0, 0.0]),
        column_direction=np.array([0.0, 1.0, 0.0]),
        slice_direction=np.array([0.0, 0.0, 1.0]),
        spacing=(1.0, 1.0, 1.0),
        series_instance_uid=SERIES,
        study_instance_uid=STUDY,
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.61.3",
        sop_instance_uids=tuple(f"1.2.826.0.1.3680043.8.498.61.4.{i}" for i in range(n)),
    )


def test_sagittal_context_is_superior_up_anterior_left_with_the_box_in_pixels() -> None:
    # A marker anterior (small y) and superior (large z) of the box centre.
    volume = _axial_volume(marker=(0.0, -12.0, 12.0))
    roi = Roi(
        study_instance_uid=STUDY,
        series_instance_uid=SERIES,
        slices_x_mm=(-3.0, 0.0, 3.0),
        polygon_yz_mm=((-10.0, -10.0), (10.0, -10.0), (10.0, 10.0), (-10.0, 10.0)),
    )
    image, box = sagittal_context(volume, roi, margin_mm=10.0, size_px=80)
    assert image.shape == (80, 80)
    # 40 mm across 80 pixels: the 20 mm box starts 10 mm (20 px) in.
    assert box == (20, 20, 60, 60)
    row, column = np.unravel_index(int(np.nanargmax(image)), image.shape)
    # Superior 12 mm → 8 mm below the top edge (z 20) = row 16; y −12 → 8 mm from the left.
    assert abs(row - 16) <= 1 and abs(column - 16) <= 1
    # Reaching past the volume gives NaN, never a clamped copy of the edge.
    wide, _ = sagittal_context(volume, roi, margin_mm=40.0, size_px=100)
    assert np.isnan(wide[0, 0]) and np.isfinite(wide[50, 50])


def test_context_box_matches_what_the_network_saw_on_a_phantom(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    case = make_case(tmp_path, patient_id="PREVIEW1", label="malignant", seed=11)
    volume = load_roi_volume(sorted(case.series_dir.iterdir()), case.roi, margin_mm=30.0)
    inputs = build_inputs(volume, case.roi)
    xs = case.roi.slices_x_mm
    middle = sorted(range(len(xs)), key=lambda i: xs[i])[len(xs) // 2]  # the middle slice
    x = xs[middle]
    image, (row0, col0, row1, col1) = sagittal_context(volume, case.roi, x_mm=x, size_px=192)
    assert np.isfinite(image).all()
    crop = Image.fromarray(image[row0:row1, col0:col1]).resize((64, 64), Image.Resampling.BILINEAR)
    seen = inputs[middle, 1]  # the centre channel: the slab at x itself
    correlation = np.corrcoef(np.asarray(crop).ravel(), seen.ravel())[0, 1]
    assert correlation > 0.9, correlation
    png = render_preview_png(
        inputs,
        case.roi.slices_x_mm,
        [0.3] * len(case.roi.slices_x_mm),
        context=image,
        box_px=(row0, col0, row1, col1),
    )
    assert len(png) < 400_000
