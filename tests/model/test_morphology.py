"""The localiser's box morphology gives exactly what scipy's binary morphology gives."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from model.serving.localiser.morphology import closing, dilate, erode, opening

SIZES = [(1, 2, 2), (1, 3, 3), (2, 1, 1), (3, 1, 1), (4, 1, 1), (5, 1, 1), (6, 1, 1), (9, 2, 3)]


@pytest.mark.parametrize("sizes", [*SIZES, (3, 3), (2, 5), (3,), (4,), (40, 1, 1)])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_box_morphology_equals_scipy(sizes: tuple[int, ...], density: float) -> None:
    rng = np.random.default_rng(len(sizes) * 100 + sum(sizes))
    shape = (17, 23, 29)[: len(sizes)]
    mask = rng.random(shape) < density
    structure = np.ones(sizes, bool)
    assert np.array_equal(dilate(mask, sizes), ndimage.binary_dilation(mask, structure))
    assert np.array_equal(erode(mask, sizes), ndimage.binary_erosion(mask, structure))
    assert np.array_equal(opening(mask, sizes), ndimage.binary_opening(mask, structure))
    assert np.array_equal(closing(mask, sizes), ndimage.binary_closing(mask, structure))


def test_the_input_is_left_alone_and_bad_sizes_are_refused() -> None:
    mask = np.zeros((4, 5), bool)
    mask[2, 2] = True
    before = mask.copy()
    assert dilate(mask, (3, 3)).sum() == 9
    assert np.array_equal(mask, before)
    with pytest.raises(ValueError, match="sizes"):
        dilate(mask, (3,))
    with pytest.raises(ValueError, match="sizes"):
        erode(mask, (0, 1))
