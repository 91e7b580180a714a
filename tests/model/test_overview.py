"""A series' overview at reduced resolution (what the localiser reads): JPEG 2000 decoded
directly at 1/2^reduce and thinned to every k-th slice, uncompressed series read straight from
the files as the localiser's own block means, other codecs averaged over blocks; the grid's
spacing and origin put every structure where the full-resolution volume has it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from model.io.pixels import read_native_rows
from model.io.volume import PatientBox, Volume, load_binned, load_volume, read_series_geometry
from model.serving.localiser.grid import to_lps_grid
from model.serving.overview import OverviewPlan, load_overview, overview_plan
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
        ("rle", 1.0, 0.5, OverviewPlan(reduce=0, slice_step=1)),
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


@pytest.mark.parametrize(
    ("options", "bins"),
    [
        ({"slice_spacing_mm": 1.0, "pixel_spacing_mm": 0.5}, (2, 4, 4)),
        ({"slice_spacing_mm": 1.0, "pixel_spacing_mm": 0.9, "feet_first": True}, (2, 2, 2)),
        ({"slice_spacing_mm": 3.0, "pixel_spacing_mm": 0.6, "reverse_order": True}, (1, 3, 3)),
        ({"multiframe": True, "pixel_spacing_mm": 0.7}, (1, 3, 3)),
    ],
)
def test_an_uncompressed_overview_is_the_localisers_own_grid(
    tmp_path: Path, options: dict[str, Any], bins: tuple[int, int, int]
) -> None:
    """The block means read straight from the files are the grid the localiser averages the
    whole volume to (same shape, origin, spacing and values), in every orientation; the
    localiser then averages nothing more."""
    case = make_case(tmp_path, patient_id="BIN", label="malignant", seed=8, **options)
    geometry = read_series_geometry(sorted(Path(case.series_dir).rglob("*.dcm")))
    plan = overview_plan(geometry)
    assert plan.bins == bins
    overview = load_overview(geometry)
    whole = to_lps_grid(load_volume(geometry))
    grid = to_lps_grid(overview)
    assert grid.hu.shape == whole.hu.shape
    assert grid.origin_mm == pytest.approx(whole.origin_mm)
    assert grid.spacing_mm == pytest.approx(whole.spacing_mm)
    np.testing.assert_allclose(grid.hu, whole.hu, atol=1e-3)
    assert grid.hu.size == overview.voxels.size  # nothing averaged twice


def test_binned_samples_are_block_means_at_their_centres(tmp_path: Path) -> None:
    geometry = _geometry(tmp_path, "explicit")
    full = load_volume(geometry)
    binned = load_binned(geometry, (2, 3, 3), (1, 2, 0))
    n, rows, columns = full.shape
    assert binned.shape == ((n - 1) // 2, (rows - 2) // 3, columns // 3)
    assert binned.voxels[4, 5, 6] == pytest.approx(
        float(full.voxels[9:11, 17:20, 18:21].mean()), abs=1e-3
    )
    assert np.allclose(
        binned.index_to_patient(np.array([4.0, 5.0, 6.0])),
        full.index_to_patient(np.array([9.5, 18.0, 19.0])),
    )
    assert binned.sop_instance_uids == full.sop_instance_uids[1 : 1 + 2 * binned.shape[0]]
    with pytest.raises(ValueError, match="do not fit"):
        load_binned(geometry, (n + 1, 1, 1))


def _rewrite(path: Path, change: Callable[[Dataset], None], **write: Any) -> None:
    dataset = pydicom.dcmread(path)
    change(dataset)
    dataset.save_as(path, enforce_file_format=True, **write)


def _implicit(dataset: Dataset) -> None:
    dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian


def _trailing_padding(dataset: Dataset) -> None:
    dataset.DataSetTrailingPadding = b"\0" * 8  # (FFFC,FFFC): after the Pixel Data


def _garbage_above_bits_stored(dataset: Dataset) -> None:
    # 12 bits stored, unsigned, with the unused high bits set: kept as stored, as pydicom does
    values = dataset.pixel_array.astype(np.int32) + 1024
    dataset.PixelRepresentation = 0
    dataset.BitsStored, dataset.HighBit = 12, 11
    dataset.PixelData = (np.clip(values, 0, 4095).astype(np.uint16) | 0xF000).tobytes()


@pytest.mark.parametrize(
    ("change", "direct"),
    [(_implicit, True), (_trailing_padding, False), (_garbage_above_bits_stored, True)],
)
def test_uncompressed_slices_read_straight_from_the_file_are_what_pydicom_decodes(
    tmp_path: Path, change: Callable[[Dataset], None], direct: bool
) -> None:
    """Rows of a slice read from the file (only the Pixel Data checked: tag, VR, length,
    last in the file) are pydicom's values; a file laid out otherwise goes to pydicom."""
    case = make_case(tmp_path, patient_id="DIRECT", label="benign", seed=4)
    paths = sorted(Path(case.series_dir).rglob("*.dcm"))
    for path in paths:
        _rewrite(path, change)
    geometry = read_series_geometry(paths)
    frame = geometry.frames[len(paths) // 2]
    rows = read_native_rows(frame, (10, 30))
    expected = pydicom.dcmread(frame.path).pixel_array
    if direct:
        assert rows is not None
        np.testing.assert_array_equal(rows, expected[10:30])
    else:
        assert rows is None
    region = load_volume(geometry, region=PatientBox((-20.0, 20.0), (-30.0, 30.0), (-9.0, 9.0)))
    k0, r0, c0 = region.source_offset
    k1, r1, c1 = (a + b for a, b in zip(region.source_offset, region.shape, strict=True))
    reference = np.stack(
        [pydicom.dcmread(f.path).pixel_array[r0:r1, c0:c1] for f in geometry.frames[k0:k1]]
    ).astype(np.float32) * np.float32(frame.rescale_slope) + np.float32(frame.rescale_intercept)
    np.testing.assert_array_equal(region.voxels, reference)
    binned = load_binned(geometry, (1, 2, 2))
    plane = load_volume(geometry).voxels[3]
    h, w = plane.shape[0] // 2 * 2, plane.shape[1] // 2 * 2
    means = plane[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(binned.voxels[3], means, atol=1e-3)
