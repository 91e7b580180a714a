"""Series → volume: sorting, HU, geometry checks, transfer syntaxes, Enhanced CT, ROI-only."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest

from model.io.volume import (
    DuplicatePositionError,
    EmptySeriesError,
    GantryTiltError,
    InconsistentImageError,
    MissingSliceError,
    MixedOrientationError,
    MixedSeriesError,
    NonUniformSpacingError,
    SeriesError,
    UnreadableSliceError,
    group_paths_by_series,
    load_series,
    read_series_geometry,
)
from model.serving.preprocess import RoiOutsideVolumeError, load_roi_volume
from model.serving.roi import Roi
from tests.model.series_factory import square_roi, write_blob_series

MARKER = (5.0, -4.0, 3.0)
BlobSeries = tuple[list[Path], Roi]


@pytest.fixture(scope="module")
def blob_series(tmp_path_factory: pytest.TempPathFactory) -> BlobSeries:
    folder = tmp_path_factory.mktemp("blob")
    paths, identity = write_blob_series(folder, [MARKER], slices=40, rows=80, columns=80)
    roi = square_roi(identity, center_yz=(0.0, 0.0), side=12.0, slices_x_mm=(2.0, 5.0))
    return paths, roi


def _edit(path: Path, **attributes: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def _copy(paths: list[Path], folder: Path) -> list[Path]:
    folder.mkdir()
    copies = []
    for path in paths:
        target = folder / path.name
        target.write_bytes(path.read_bytes())
        copies.append(target)
    return copies


def _by_position(paths: list[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))


def test_volume_has_hu_geometry_and_slices_sorted_along_the_normal(blob_series: BlobSeries) -> None:
    paths, _ = blob_series
    volume = load_series(list(reversed(paths)))  # file order must not matter
    assert volume.shape == (40, 80, 80)
    assert volume.spacing == pytest.approx((1.0, 0.7, 0.7))
    np.testing.assert_allclose(volume.slice_direction, [0, 0, 1])
    z = [volume.index_to_patient(np.array([k, 0, 0]))[2] for k in range(40)]
    assert np.all(np.diff(z) > 0)
    # The voxel nearest the marker holds its (rescaled) peak, about 1000 HU above background.
    index = np.rint(volume.patient_to_index(np.array(MARKER))).astype(int)
    peak = volume.voxels[tuple(index)]
    assert peak > 800
    assert volume.voxels.dtype == np.float32
    assert volume.voxels.min() > -100  # rescale intercept (-1024) applied
    np.testing.assert_allclose(
        volume.index_to_patient(volume.patient_to_index(np.array([[1.0, 2.0, 3.0]]))),
        [[1.0, 2.0, 3.0]],
        atol=1e-9,
    )
    first = pydicom.dcmread(_by_position(paths)[0])
    assert volume.sop_instance_uids[0] == first.SOPInstanceUID


def test_slice_order_ignores_instance_number(tmp_path: Path, blob_series: BlobSeries) -> None:
    paths = _copy(blob_series[0], tmp_path / "s")
    reference = load_series(blob_series[0])
    for number, path in enumerate(paths):  # scramble Instance Numbers
        _edit(path, InstanceNumber=(number * 7) % len(paths) + 1)
    np.testing.assert_array_equal(load_series(paths).voxels, reference.voxels)


def _error_for(paths: list[Path]) -> SeriesError:
    with pytest.raises(SeriesError) as caught:
        load_series(paths)
    return caught.value


def test_missing_slice_is_reported(tmp_path: Path, blob_series: BlobSeries) -> None:
    paths = _by_position(_copy(blob_series[0], tmp_path / "s"))
    paths[20].unlink()
    error = _error_for(paths[:20] + paths[21:])
    assert type(error) is MissingSliceError
    assert "1 slice(s) missing" in str(error)


def test_non_uniform_spacing_is_reported(tmp_path: Path, blob_series: BlobSeries) -> None:
    paths = _by_position(_copy(blob_series[0], tmp_path / "s"))
    ds = pydicom.dcmread(paths[10])
    position = [float(v) for v in ds.ImagePositionPatient]
    _edit(paths[10], ImagePositionPatient=[position[0], position[1], position[2] + 0.4])
    error = _error_for(paths)
    assert type(error) is NonUniformSpacingError
    assert "slice spacing" in str(error)


def test_duplicate_position_is_reported(tmp_path: Path, blob_series: BlobSeries) -> None:
    paths = _by_position(_copy(blob_series[0], tmp_path / "s"))
    other = pydicom.dcmread(paths[11])
    _edit(paths[10], ImagePositionPatient=list(other.ImagePositionPatient))
    error = _error_for(paths)
    assert type(error) is DuplicatePositionError
    assert "same position" in str(error)


def test_gantry_tilt_is_reported(tmp_path: Path, blob_series: BlobSeries) -> None:
    paths = _by_position(_copy(blob_series[0], tmp_path / "s"))
    shift = math.tan(math.radians(12.0))  # mm of y per mm of z
    for path in paths:
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        _edit(path, ImagePositionPatient=[x, round(y + shift * z, 4), z], GantryDetectorTilt=12)
    error = _error_for(paths)
    assert type(error) is GantryTiltError
    assert "tilt of about 12" in str(error)


def test_mixed_orientation_is_reported(tmp_path: Path, blob_series: BlobSeries) -> None:
    paths = _copy(blob_series[0], tmp_path / "s")
    c, s = math.cos(math.radians(5)), math.sin(math.radians(5))
    _edit(paths[3], ImageOrientationPatient=[1.0, 0.0, 0.0, 0.0, round(c, 6), round(s, 6)])
    error = _error_for(paths)
    assert type(error) is MixedOrientationError
    assert paths[3].name in str(error)


def test_several_series_are_reported(tmp_path: Path, blob_series: BlobSeries) -> None:
    paths = _copy(blob_series[0], tmp_path / "s")
    _edit(paths[5], SeriesInstanceUID="1.2.3.4.5")
    error = _error_for(paths)
    assert type(error) is MixedSeriesError
    assert "2 series" in str(error)
    groups = group_paths_by_series(paths)
    assert sorted(len(v) for v in groups.values()) == [1, len(paths) - 1]


def test_inconsistent_image_size_is_reported(tmp_path: Path, blob_series: BlobSeries) -> None:
    paths = _copy(blob_series[0], tmp_path / "s")
    _edit(paths[2], PixelSpacing=[0.8, 0.8])
    assert type(_error_for(paths)) is InconsistentImageError
    for path in paths:
        _edit(path, PixelSpacing=[0.0, 0.0])
    assert "not positive" in str(_error_for(paths))


def test_empty_and_unreadable_inputs_are_reported(tmp_path: Path, blob_series: BlobSeries) -> None:
    with pytest.raises(EmptySeriesError):
        load_series([])
    paths = _copy(blob_series[0], tmp_path / "s")
    junk = tmp_path / "s" / "notes.txt"
    junk.write_text("not DICOM")
    error = _error_for([*paths, junk])
    assert type(error) is UnreadableSliceError
    assert "notes.txt" in str(error)


def _spoil_pixel_data(path: Path) -> None:
    ds = pydicom.dcmread(path)
    ds.PixelData = b"\x00" * 10  # header intact, pixels undecodable
    ds.save_as(path)


def test_only_the_slices_the_roi_needs_are_decoded(tmp_path: Path, blob_series: BlobSeries) -> None:
    paths, roi = blob_series
    copies = _by_position(_copy(paths, tmp_path / "s"))
    full = load_series(paths)
    partial = load_roi_volume(copies, roi)
    # Box z -6..6 mm on slices 1 mm apart at z = -19.5, -18.5, ...: the slices from the one
    # just below the box to the one just above it (interpolation needs both).
    needed = {
        i
        for i, p in enumerate(copies)
        if abs(float(pydicom.dcmread(p).ImagePositionPatient[2])) < 7.0
    }
    assert len(partial.sop_instance_uids) == len(needed) < len(copies)
    for i, path in enumerate(copies):
        if i not in needed:
            _spoil_pixel_data(path)
    again = load_roi_volume(copies, roi)  # the spoiled files are never decoded
    np.testing.assert_array_equal(again.voxels, partial.voxels)
    assert set(again.sop_instance_uids) == {
        pydicom.dcmread(copies[i]).SOPInstanceUID for i in needed
    }
    with pytest.raises(UnreadableSliceError):
        load_series(copies)  # the whole series needs them
    # The partial volume is the matching block of the full one, at the same patient positions.
    k, r, c = partial.source_offset
    n, rows, columns = partial.shape
    np.testing.assert_array_equal(
        partial.voxels, full.voxels[k : k + n, r : r + rows, c : c + columns]
    )
    np.testing.assert_allclose(
        partial.index_to_patient(np.zeros(3)), full.index_to_patient(np.array([k, r, c]))
    )


def test_geometry_of_whole_series_is_checked_even_for_an_roi(
    tmp_path: Path, blob_series: BlobSeries
) -> None:
    paths, roi = blob_series
    copies = _by_position(_copy(paths, tmp_path / "s"))
    copies[1].unlink()  # far from the ROI
    with pytest.raises(MissingSliceError):
        load_roi_volume(copies[:1] + copies[2:], roi)


def test_roi_of_another_series_is_refused(blob_series: BlobSeries) -> None:
    paths, roi = blob_series
    other = Roi.from_json({**roi.to_json(), "series_instance_uid": "1.2.3"})
    with pytest.raises(MixedSeriesError, match=r"ROI names series 1\.2\.3"):
        load_roi_volume(paths, other)


def test_roi_entirely_outside_the_series_is_refused(blob_series: BlobSeries) -> None:
    paths, roi = blob_series
    far = Roi.from_json({**roi.to_json(), "slices_x_mm": [200.0]})
    with pytest.raises(RoiOutsideVolumeError):
        load_roi_volume(paths, far)


@pytest.mark.parametrize("transfer_syntax", ["j2k", "rle"])
def test_compressed_series_decode_to_the_same_volume(
    tmp_path: Path,
    blob_series: BlobSeries,
    transfer_syntax: str,
) -> None:
    paths, roi = blob_series
    compressed, _ = write_blob_series(
        tmp_path,
        [MARKER],
        slices=40,
        rows=80,
        columns=80,
        transfer_syntax=transfer_syntax,  # type: ignore[arg-type]
    )
    assert pydicom.dcmread(compressed[0]).file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(load_series(compressed).voxels, load_series(paths).voxels)
    np.testing.assert_array_equal(
        load_roi_volume(compressed, roi, workers=2).voxels, load_roi_volume(paths, roi).voxels
    )


def test_jpeg2000_region_decoding_matches_pydicom(tmp_path: Path) -> None:
    from pydicom.encaps import get_frame

    from model.io.j2k_region import decode_j2k_region, region_decoder_available

    assert region_decoder_available()
    paths, _ = write_blob_series(tmp_path, [MARKER], slices=3, transfer_syntax="j2k")
    ds = pydicom.dcmread(paths[1])
    whole = ds.pixel_array
    region = decode_j2k_region(
        get_frame(ds.PixelData, 0, number_of_frames=1), rows=(7, 60), columns=(31, 44)
    )
    assert region.signed
    np.testing.assert_array_equal(region.values, whole[7:60, 31:44])


@pytest.mark.parametrize("transfer_syntax", ["explicit", "j2k"])
def test_enhanced_ct_multiframe_loads_like_classic_ct(
    tmp_path: Path,
    blob_series: BlobSeries,
    transfer_syntax: str,
) -> None:
    paths, roi = blob_series
    (enhanced,), _ = write_blob_series(
        tmp_path,
        [MARKER],
        slices=40,
        rows=80,
        columns=80,
        multiframe=True,
        transfer_syntax=transfer_syntax,  # type: ignore[arg-type]
    )
    assert pydicom.dcmread(enhanced).SOPClassUID.name == "Enhanced CT Image Storage"
    classic = load_series(paths)
    multiframe = load_series([enhanced])
    np.testing.assert_array_equal(multiframe.voxels, classic.voxels)
    np.testing.assert_allclose(multiframe.origin, classic.origin)
    assert multiframe.spacing == pytest.approx(classic.spacing)
    partial = load_roi_volume([enhanced], roi)
    np.testing.assert_array_equal(partial.voxels, load_roi_volume(paths, roi).voxels)


def test_legacy_converted_enhanced_ct_from_highdicom_loads(
    tmp_path: Path, blob_series: BlobSeries
) -> None:
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    paths, _ = blob_series
    datasets = [pydicom.dcmread(p) for p in paths]
    converted = LegacyConvertedEnhancedCTImage(
        legacy_datasets=datasets,
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=99,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    target = tmp_path / "legacy.dcm"
    converted.save_as(target)
    volume = load_series([target])
    np.testing.assert_array_equal(volume.voxels, load_series(paths).voxels)


def test_series_geometry_reads_headers_only(blob_series: BlobSeries) -> None:
    paths, _ = blob_series
    geometry = read_series_geometry(paths)
    assert geometry.shape == (40, 80, 80)
    assert [f.position[2] for f in geometry.frames] == sorted(
        f.position[2] for f in geometry.frames
    )
