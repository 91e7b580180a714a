"""A picture of what the model saw, as PNG: the three-channel inputs of each slice and the ROI.

For each ROI slice position x the network sees three sagittal slabs (x − 3, x, x + 3 mm,
``METHOD.md``), z-scored; :func:`render_preview_png` shows them side by side in grey with the
slice's x and probability above, and, when given, a sagittal context image (HU) around the
ROI with the square box drawn in. :func:`sagittal_context` cuts that context image out of a
:class:`model.io.volume.Volume`. Pillow only: rendering five slices takes a few tens of
milliseconds, so the pipeline can afford it on every job.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from model.io.volume import Volume
    from model.serving.roi import Roi

__all__ = ["render_preview_png", "sagittal_context"]

TILE_SCALE = 2  # each 64×64 input is shown at 128×128, nearest neighbour (the real pixels)
GAP = 6
PADDING = 10
CAPTION_HEIGHT = 20
CONTEXT_SIDE = 288
BACKGROUND = (17, 19, 23)
TEXT = (222, 226, 232)
MUTED = (150, 156, 166)
FLAGGED = (255, 110, 90)
BOX = (255, 200, 40)
NO_DATA = (34, 40, 56)  # context pixels outside the loaded volume
# Display window of the context image (HU): a bone window that still shows soft tissue.
CONTEXT_WINDOW_HU = (-450.0, 1350.0)
# Display window of the z-scored inputs: these percentiles of each slice's three channels.
INPUT_WINDOW_PERCENTILES = (1.0, 99.5)


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _check_inputs(
    inputs: np.ndarray, x_mm: Sequence[float], probabilities: Sequence[float]
) -> np.ndarray:
    array = np.asarray(inputs, dtype=np.float32)
    if array.ndim != 4 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(
            f"inputs: expected an array of shape (slices, channels, rows, columns), "
            f"got {array.shape}"
        )
    if len(x_mm) != array.shape[0] or len(probabilities) != array.shape[0]:
        raise ValueError(
            f"{array.shape[0]} input slices but {len(x_mm)} positions and "
            f"{len(probabilities)} probabilities"
        )
    return array


def _window_to_bytes(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly to 0..255 (clipped); NaN becomes 0."""
    span = max(high - low, 1e-6)
    scaled = (np.nan_to_num(values, nan=low) - low) * (255.0 / span)
    return np.clip(scaled, 0.0, 255.0).astype(np.uint8)


def _slice_tiles(slice_inputs: np.ndarray) -> list[Image.Image]:
    """The channels of one slice as grey tiles, windowed together (comparable brightness)."""
    finite = slice_inputs[np.isfinite(slice_inputs)]
    if finite.size:
        low, high = (float(v) for v in np.percentile(finite, INPUT_WINDOW_PERCENTILES))
    else:
        low, high = -1.0, 1.0
    if high - low < 1e-6:
        low, high = low - 1.0, high + 1.0
    tiles = []
    for channel in _window_to_bytes(slice_inputs, low, high):
        tile = Image.fromarray(channel, mode="L")
        size = (channel.shape[1] * TILE_SCALE, channel.shape[0] * TILE_SCALE)
        tiles.append(tile.resize(size, Image.Resampling.NEAREST))
    return tiles


def _channel_labels(channels: int, spacing_mm: float) -> list[str]:
    half = channels // 2
    labels = []
    for k in range(channels):
        offset = (k - half) * spacing_mm
        labels.append("x" if offset == 0 else f"x {'+' if offset > 0 else '-'} {abs(offset):g} mm")
    return labels


def _context_panel(
    context: np.ndarray, box_px: tuple[int, int, int, int] | None
) -> tuple[Image.Image, tuple[float, float, float, float] | None]:
    """The context image in the HU window, scaled to fit the panel; the box scaled with it."""
    image = np.asarray(context, dtype=np.float32)
    if image.ndim != 2 or min(image.shape) < 1:
        raise ValueError(f"context: expected a 2-D image, got shape {image.shape}")
    grey = _window_to_bytes(image, *CONTEXT_WINDOW_HU)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    rgb[~np.isfinite(image)] = NO_DATA
    rows, columns = image.shape
    scale = CONTEXT_SIDE / max(rows, columns)
    size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
    panel = Image.fromarray(rgb, mode="RGB").resize(size, Image.Resampling.BILINEAR)
    if box_px is None:
        return panel, None
    row0, col0, row1, col1 = box_px
    return panel, (col0 * scale, row0 * scale, col1 * scale, row1 * scale)


def render_preview_png(
    inputs: np.ndarray,
    x_mm: Sequence[float],
    probabilities: Sequence[float],
    *,
    context: np.ndarray | None = None,
    box_px: tuple[int, int, int, int] | None = None,
    threshold: float | None = None,
    channel_spacing_mm: float = 3.0,
) -> bytes:
    """A PNG of the network inputs (``(slices, channels, 64, 64)``, z-scored) per slice.

    One row per slice: its channels (the slabs at x − 3, x, x + 3 mm) in grey, each slice
    windowed on its own 1st–99.5th percentile, titled with x and the probability (in red when
    ``threshold`` is given and reached). With ``context`` (a 2-D sagittal HU image, row 0
    superior, column 0 anterior), it is shown on the left in a bone window with ``box_px``
    ``(row0, col0, row1, col1)``, the ROI's square box in that image's pixels, drawn in.
    """
    array = _check_inputs(inputs, x_mm, probabilities)
    slices, channels, rows, columns = array.shape
    tile_w, tile_h = columns * TILE_SCALE, rows * TILE_SCALE
    grid_w = channels * tile_w + (channels - 1) * GAP
    row_h = CAPTION_HEIGHT + tile_h + GAP
    grid_h = CAPTION_HEIGHT + slices * row_h

    panel: Image.Image | None = None
    box: tuple[float, float, float, float] | None = None
    if context is not None:
        panel, box = _context_panel(context, box_px)
    left_w = (panel.width + 2 * PADDING) if panel is not None else 0
    left_h = (CAPTION_HEIGHT + panel.height + 2 * CAPTION_HEIGHT) if panel is not None else 0
    width = PADDING + left_w + grid_w + PADDING
    height = PADDING + max(grid_h, left_h) + PADDING

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font, small = _font(13), _font(11)

    if panel is not None:
        x0, y0 = PADDING, PADDING
        draw.text((x0, y0 + 2), "sagittal context (HU)", fill=MUTED, font=small)
        canvas.paste(panel, (x0, y0 + CAPTION_HEIGHT))
        if box is not None:
            b = box
            draw.rectangle(
                (x0 + b[0], y0 + CAPTION_HEIGHT + b[1], x0 + b[2], y0 + CAPTION_HEIGHT + b[3]),
                outline=BOX,
                width=2,
            )
            note = "box: what the network sees"
            draw.text((x0, y0 + CAPTION_HEIGHT + panel.height + 4), note, fill=BOX, font=small)

    gx = PADDING + left_w
    for k, label in enumerate(_channel_labels(channels, channel_spacing_mm)):
        draw.text((gx + k * (tile_w + GAP), PADDING + 2), label, fill=MUTED, font=small)
    for i in range(slices):
        top = PADDING + CAPTION_HEIGHT + i * row_h
        probability = float(probabilities[i])
        reached = threshold is not None and probability >= threshold
        caption = f"x = {float(x_mm[i]):.1f} mm   p = {probability:.3f}"
        draw.text((gx, top + 3), caption, fill=FLAGGED if reached else TEXT, font=font)
        for k, tile in enumerate(_slice_tiles(array[i])):
            canvas.paste(tile, (gx + k * (tile_w + GAP), top + CAPTION_HEIGHT))

    out = io.BytesIO()
    canvas.save(out, format="PNG", compress_level=3)
    return out.getvalue()


def _sample_trilinear(volume: Volume, points: np.ndarray) -> np.ndarray:
    """HU at LPS ``points`` (…, 3); NaN where a point lies outside the loaded voxels."""
    voxels = volume.voxels
    indices = volume.patient_to_index(points).reshape(-1, 3)
    shape = np.array(voxels.shape, dtype=np.float64)
    inside = np.all((indices >= -0.5) & (indices <= shape - 0.5), axis=1)
    clamped = np.clip(indices, 0.0, shape - 1.0)
    base = np.minimum(np.floor(clamped), np.maximum(shape - 2.0, 0.0)).astype(np.int64)
    fraction = (clamped - base).astype(np.float32)
    result = np.zeros(len(clamped), dtype=np.float32)
    for corner in range(8):
        bits = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        if np.any((bits == 1) & (shape < 2)):  # an axis of one voxel has no upper neighbour
            continue
        weight = np.ones(len(clamped), dtype=np.float32)
        for axis in range(3):
            weight *= fraction[:, axis] if bits[axis] else 1.0 - fraction[:, axis]
        neighbour = base + bits
        result += weight * voxels[neighbour[:, 0], neighbour[:, 1], neighbour[:, 2]]
    result[~inside] = np.nan
    return result.reshape(points.shape[:-1])


def sagittal_context(
    volume: Volume,
    roi: Roi,
    *,
    x_mm: float | None = None,
    margin_mm: float = 30.0,
    size_px: int = 192,
    slab_mm: float = 3.0,
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A sagittal HU image around the ROI and its square box in that image's pixels.

    The image is the mean of a ``slab_mm`` slab centred at ``x_mm`` (default: the ROI's middle
    slice), spanning the square box widened by ``margin_mm`` on each side, ``size_px`` pixels
    square: row 0 is the most superior, column 0 the most anterior, as the network's input.
    Pixels outside the volume's loaded voxels are NaN (a volume loaded for an ROI holds only
    the box plus its loading margin; load with ``margin_mm`` ≥ this one for a full context).
    Returns ``(image, (row0, col0, row1, col1))``, the box's corners (end exclusive).
    """
    if size_px < 8:
        raise ValueError(f"size_px: expected at least 8, got {size_px}")
    box = roi.square_box_yz()
    if x_mm is None:
        ordered = sorted(roi.slices_x_mm)
        x_mm = ordered[len(ordered) // 2]
    extent = box.side + 2.0 * margin_mm
    pixel_mm = extent / size_px
    y_start = box.y_range[0] - margin_mm
    z_top = box.z_range[1] + margin_mm
    centres = (np.arange(size_px, dtype=np.float64) + 0.5) * pixel_mm
    samples = max(1, math.ceil(slab_mm / 1.0))
    slab_offsets = ((np.arange(samples) + 0.5) / samples - 0.5) * slab_mm
    points = np.empty((samples, size_px, size_px, 3), dtype=np.float64)
    points[..., 0] = x_mm + slab_offsets[:, None, None]
    points[..., 1] = (y_start + centres)[None, None, :]
    points[..., 2] = (z_top - centres)[None, :, None]
    image = _sample_trilinear(volume, points).mean(axis=0)
    row0 = round((z_top - box.z_range[1]) / pixel_mm)
    col0 = round((box.y_range[0] - y_start) / pixel_mm)
    side = round(box.side / pixel_mm)
    return image.astype(np.float32), (row0, col0, row0 + side, col0 + side)


OVERVIEW_PIXEL_MM = 1.0
OVERVIEW_MARGIN_MM = 25.0
NEUTRAL_BOX = (90, 170, 255)


def _probability_colour(probability: float) -> tuple[int, int, int]:
    """Green at 0, yellow at 0.5, red at 1."""
    p = min(max(float(probability), 0.0), 1.0)
    if p < 0.5:
        return (round(510 * p), 200, 60)
    return (255, round(200 * (2.0 - 2.0 * p)), 60)


def render_overview_png(volume: Volume, boxes: Sequence[tuple[Roi, float | None]]) -> bytes:
    """A PNG of the sagittal overview with each ROI's square box drawn in.

    The image is the mid-sagittal plane of the column (the median of the boxes' central
    slice positions; the volume's middle when there are no boxes), a 3 mm slab at 1 mm
    pixels, bone window, superior at the top and anterior on the left, spanning the volume's
    y and z. Each box is drawn green→red by its probability, or in a neutral blue when the
    probability is None, with the ROI's vertebra label beside it when it has one.
    """
    corners = np.array(
        [
            [i, j, k]
            for i in (0, volume.shape[0] - 1)
            for j in (0, volume.shape[1] - 1)
            for k in (0, volume.shape[2] - 1)
        ],
        dtype=np.float64,
    )
    extent = volume.index_to_patient(corners)
    low, high = extent.min(axis=0), extent.max(axis=0)
    if boxes:
        x_mm = float(np.median([roi.central_slice_x_mm for roi, _ in boxes]))
    else:
        x_mm = float((low[0] + high[0]) / 2.0)
    y_start, z_top = float(low[1]), float(high[2])
    columns = max(8, math.ceil((high[1] - low[1]) / OVERVIEW_PIXEL_MM))
    rows = max(8, math.ceil((high[2] - low[2]) / OVERVIEW_PIXEL_MM))
    offsets = np.array([-1.0, 0.0, 1.0])
    points = np.empty((len(offsets), rows, columns, 3), dtype=np.float64)
    points[..., 0] = x_mm + offsets[:, None, None]
    points[..., 1] = (y_start + (np.arange(columns) + 0.5) * OVERVIEW_PIXEL_MM)[None, None, :]
    points[..., 2] = (z_top - (np.arange(rows) + 0.5) * OVERVIEW_PIXEL_MM)[None, :, None]
    image = _sample_trilinear(volume, points).mean(axis=0)
    grey = _window_to_bytes(image, *CONTEXT_WINDOW_HU)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    rgb[~np.isfinite(image)] = NO_DATA
    canvas = Image.new(
        "RGB", (columns + 2 * PADDING + 40, rows + 2 * PADDING + CAPTION_HEIGHT), BACKGROUND
    )
    canvas.paste(Image.fromarray(rgb, mode="RGB"), (PADDING, PADDING + CAPTION_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    draw.text(
        (PADDING, PADDING + 2),
        f"sagittal overview, x = {x_mm:.1f} mm, {len(boxes)} ROI(s)",
        fill=MUTED,
        font=_font(11),
    )
    top = PADDING + CAPTION_HEIGHT
    for roi, probability in boxes:
        box = roi.square_box_yz()
        colour = NEUTRAL_BOX if probability is None else _probability_colour(probability)
        left = PADDING + (box.y_range[0] - y_start) / OVERVIEW_PIXEL_MM
        right = PADDING + (box.y_range[1] - y_start) / OVERVIEW_PIXEL_MM
        upper = top + (z_top - box.z_range[1]) / OVERVIEW_PIXEL_MM
        lower = top + (z_top - box.z_range[0]) / OVERVIEW_PIXEL_MM
        draw.rectangle((left, upper, right, lower), outline=colour, width=2)
        caption = roi.vertebra or ""
        if probability is not None:
            caption = f"{caption} {probability:.2f}".strip()
        if caption:
            draw.text((right + 3, upper), caption, fill=colour, font=_font(11))
    out = io.BytesIO()
    canvas.save(out, format="PNG", compress_level=3)
    return out.getvalue()
