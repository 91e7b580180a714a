"""A series' overview at reduced resolution (what the localiser reads): JPEG 2000 decoded
directly at 1/2^reduce, other codecs averaged over blocks; the grid's spacing and origin put
every structure where the full-resolution volume has it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.io.volume import Volume, load_volume, read_series_geometry
from model.synthetic.cases import make_case


def _geometry(tmp_path: Path, syntax: str):  # type: ignore[no-untyped-def]
    case = make_case(
        tmp_path, patient_id=f"OV-{syntax}", label="malignant", seed=5, transfer_syntax=syntax
    )
    return read_series_geometry(sorted(Path(case.series_dir).rglob("*.dcm")))


def _centroid(volume: Volume) -> np.ndarray:
    """Patient position (mm) of the centroid of the density above air (HU + 1000): linear
    in the voxels, so any average of neighbours keeps it where it is."""
    weights = np.clip(volume.voxels.astype(np.float64) + 1000.0, 0.0, None)
    grids = np.indices(weights.shape, dtype=np.float64)
    centre = np.array([(grid * weights).sum() for grid in grids]) / weights.sum()
    return volume.index_to_patient(centre)


@pytest.mark.parametrize("syntax", ["explicit", "j2k"])
@pytest.mark.parametrize("reduce", [1, 2])
def test_an_overview_keeps_every_slice_and_puts_the_spine_where_it_is(
    tmp_path: Path, syntax: str, reduce: int
) -> None:
    geometry = _geometry(tmp_path, syntax)
    full = load_volume(geometry)
    overview = load_volume(geometry, reduce=reduce)
    step = 1 << reduce
    n, rows, columns = full.shape
    assert overview.shape == (n, -(-rows // step), -(-columns // step))
    assert overview.spacing == pytest.approx(
        (full.spacing[0], full.spacing[1] * step, full.spacing[2] * step)
    )
    assert overview.sop_instance_uids == full.sop_instance_uids
    shift = np.linalg.norm(_centroid(overview) - _centroid(full))
    assert shift < 0.2 * full.spacing[1], f"the density's centroid moved {shift:.2f} mm"
    # Same tissue: the overview's values are those of the full volume, smoothed.
    assert np.median(overview.voxels) == pytest.approx(np.median(full.voxels), abs=15.0)


def test_a_block_mean_overview_is_the_mean_of_its_blocks(tmp_path: Path) -> None:
    geometry = _geometry(tmp_path, "explicit")
    full = load_volume(geometry)
    overview = load_volume(geometry, reduce=1)
    assert np.allclose(overview.voxels[:, 3, 4], full.voxels[:, 6:8, 8:10].mean(axis=(1, 2)))
    assert np.allclose(
        overview.index_to_patient(np.array([0.0, 0.0, 0.0])),
        full.index_to_patient(np.array([0.0, 0.5, 0.5])),
    )


def test_an_overview_is_of_the_whole_series(tmp_path: Path) -> None:
    from model.io.volume import PatientBox

    geometry = _geometry(tmp_path, "explicit")
    box = PatientBox(x_mm=(-5.0, 5.0), y_mm=(-5.0, 5.0), z_mm=(-5.0, 5.0))
    with pytest.raises(ValueError, match="whole series"):
        load_volume(geometry, region=box, reduce=1)
    with pytest.raises(ValueError, match="reduce"):
        load_volume(geometry, reduce=9)
