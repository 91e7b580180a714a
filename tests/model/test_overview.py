"""A series' overview at reduced resolution (what the localiser reads): JPEG 2000 decoded
directly at 1/2^reduce and thinned to every k-th slice, other codecs averaged over blocks;
the grid's spacing and origin put every structure where the full-resolution volume has it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.io.volume import Volume, load_volume, read_series_geometry
from model.serving.overview import OverviewPlan, overview_plan
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


def test_a_thinned_overview_keeps_every_kth_slice_where_it_lies(tmp_path: Path) -> None:
    geometry = _geometry(tmp_path, "j2k")
    full = load_volume(geometry)
    overview = load_volume(geometry, reduce=1, slice_step=2)
    assert overview.shape[0] == -(-full.shape[0] // 2)
    assert overview.spacing[0] == pytest.approx(2 * full.spacing[0])
    assert overview.sop_instance_uids == full.sop_instance_uids[::2]
    # slice k of the overview is slice 2k of the series, at the same patient position
    k = overview.shape[0] // 2
    assert np.allclose(
        overview.index_to_patient(np.array([k, 0.0, 0.0]))[2],
        full.index_to_patient(np.array([2 * k, 0.0, 0.0]))[2],
    )
    assert np.allclose(overview.voxels[k], load_volume(geometry, reduce=1).voxels[2 * k])
    with pytest.raises(ValueError, match="slice_step"):
        load_volume(geometry, reduce=1, slice_step=0)


@pytest.mark.parametrize(
    ("syntax", "slice_mm", "pixel_mm", "plan"),
    [
        ("j2k", 1.0, 0.8, OverviewPlan(reduce=1, slice_step=2)),
        ("j2k", 0.5, 0.5, OverviewPlan(reduce=2, slice_step=4)),
        ("j2k", 0.8, 0.9, OverviewPlan(reduce=1, slice_step=2)),
        ("j2k", 1.25, 0.7, OverviewPlan(reduce=1, slice_step=1)),
        ("j2k", 3.0, 1.2, OverviewPlan(reduce=0, slice_step=1)),
        ("explicit", 1.0, 0.5, OverviewPlan(reduce=0, slice_step=1)),
    ],
)
def test_the_overview_plan_keeps_the_grid_at_most_2_mm(
    tmp_path: Path, syntax: str, slice_mm: float, pixel_mm: float, plan: OverviewPlan
) -> None:
    case = make_case(
        tmp_path,
        patient_id="PLAN",
        label="benign",
        seed=3,
        transfer_syntax=syntax,
        slice_spacing_mm=slice_mm,
        pixel_spacing_mm=pixel_mm,
    )
    geometry = read_series_geometry(sorted(Path(case.series_dir).rglob("*.dcm")))
    assert overview_plan(geometry) == plan
    grid = (
        geometry.spacing[0] * plan.slice_step,
        geometry.spacing[1] * (1 << plan.reduce),
        geometry.spacing[2] * (1 << plan.reduce),
    )
    assert max(grid) <= 2.0 + 1e-6 or plan.is_full_resolution
