"""Binary morphology with box structuring elements, as shifted logical ORs and ANDs.

``scipy.ndimage.binary_*`` with an all-ones structure visits every element of the structure
for every voxel through a general neighbourhood iterator; a box is separable, and the
localiser's boxes are a few voxels long, so OR-ing (dilation) or AND-ing (erosion) a few
shifted views along each axis in turn gives the same result several times faster on its
volumes. Every function here returns exactly what its ``scipy.ndimage.binary_*`` counterpart
returns for ``structure=np.ones(sizes, bool)`` with the default border (outside is 0) and
origin; the tests compare them on random masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _along(mask: np.ndarray, axis: int, size: int, dilate: bool) -> np.ndarray:
    """One axis: out[i] = OR (dilation) or AND (erosion) of mask[i + lo … i + lo + size - 1]."""
    # scipy centres a box of even size differently for the two operations (a dilation
    # reflects the structure): windows [-(size-1)//2, size//2] and [-(size//2), (size-1)//2].
    lo = -((size - 1) // 2) if dilate else -(size // 2)
    n = mask.shape[axis]
    out = mask.copy()
    moved = np.moveaxis(out, axis, 0)
    source = np.moveaxis(mask, axis, 0)
    for k in range(lo, lo + size):
        if k == 0:
            continue
        start, stop = max(0, -k), min(n, n - k)  # i such that 0 <= i + k < n
        if dilate:
            if start < stop:
                moved[start:stop] |= source[start + k : stop + k]
        else:
            if start < stop:
                moved[start:stop] &= source[start + k : stop + k]
            moved[: min(start, n)] = False  # the window reaches outside, which is 0
            moved[max(stop, 0) :] = False
    return out


def _box(mask: np.ndarray, sizes: Sequence[int], dilate: bool) -> np.ndarray:
    out = np.asarray(mask, dtype=bool)
    if len(sizes) != out.ndim:
        raise ValueError(f"sizes: expected {out.ndim} values, got {len(sizes)}")
    if any(size < 1 for size in sizes):
        raise ValueError(f"sizes: expected positive values, got {list(sizes)}")
    for axis, size in enumerate(sizes):
        if size > 1:
            out = _along(out, axis, size, dilate)
    return out


def dilate(mask: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """``ndimage.binary_dilation(mask, np.ones(sizes, bool))``."""
    return _box(mask, sizes, dilate=True)


def erode(mask: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """``ndimage.binary_erosion(mask, np.ones(sizes, bool))`` (outside the array is 0)."""
    return _box(mask, sizes, dilate=False)


def opening(mask: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """``ndimage.binary_opening(mask, np.ones(sizes, bool))``."""
    return dilate(erode(mask, sizes), sizes)


def closing(mask: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """``ndimage.binary_closing(mask, np.ones(sizes, bool))``."""
    return erode(dilate(mask, sizes), sizes)
