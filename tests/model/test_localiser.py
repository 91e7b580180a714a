"""The vertebra localiser on phantoms (every acquisition variant), on the real CT, on volumes
without an analysable spine, and the ``propose`` command.

Truth for a phantom is the :class:`~model.synthetic.phantom.SpinePhantom` that
:func:`model.synthetic.cases.make_case` rendered (``SynthCase.phantom``, ``slice_z_mm``). A
body is *fully visible* when its endplates lie at least 2 mm inside the first and last slice;
each such body must be found once with its centre within 5 mm (z and y); a body found
elsewhere is an extra. The fractured body (``abnormal_index``) is the one the triage must not
miss.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.io.volume import Volume, load_series
from model.serving.localiser import (
    LOCALISER_NAME,
    LOCALISER_VERSION,
    Localisation,
    localise,
    propose_rois,
)
from model.serving.roi import Roi
from model.synthetic.cases import make_case
from model.synthetic.phantom import SpinePhantom
from tests.phantom_variants import VARIANTS
from tests.real_ct import REAL_CT_PATIENT_ID, write_real_ct_series
from worker.cli import main

CENTRE_TOLERANCE_MM = 5.0
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.2"


@dataclass(frozen=True)
class Score:
    expected: int
    found: int
    extras: int
    max_error_mm: float
    fractured_found: bool = True


def score(localisation: Localisation, phantom: SpinePhantom, zs: np.ndarray) -> Score:
    visible = [
        v for v in phantom.vertebrae if v.z_bottom - 2.0 >= zs[0] and v.z_top + 2.0 <= zs[-1]
    ]
    fractured = phantom.vertebrae[phantom.abnormal_index]
    fractured_found = False
    truths = [
        (
            (v.z_bottom + v.z_top) / 2.0,
            float(phantom.center_y_at(np.array((v.z_bottom + v.z_top) / 2))),
        )
        for v in visible
    ]
    matched, errors = 0, [0.0]
    used: set[int] = set()
    for z, y in truths:
        hits = [
            i
            for i, b in enumerate(localisation.bodies)
            if abs(b.centre_mm[2] - z) <= CENTRE_TOLERANCE_MM
            and abs(b.centre_mm[1] - y) <= CENTRE_TOLERANCE_MM
        ]
        if len(hits) == 1:
            matched += 1
            used.add(hits[0])
            body = localisation.bodies[hits[0]]
            errors.append(max(abs(body.centre_mm[2] - z), abs(body.centre_mm[1] - y)))
            fractured_found |= z == (fractured.z_bottom + fractured.z_top) / 2.0
    extras = sum(
        1
        for i, b in enumerate(localisation.bodies)
        if i not in used
        and not any(
            abs(b.centre_mm[2] - (v.z_bottom + v.z_top) / 2) <= CENTRE_TOLERANCE_MM
            for v in phantom.vertebrae
            if v not in visible
        )
    )
    return Score(len(truths), matched, extras, max(errors), fractured_found)


def _case(
    tmp: Path, patient_id: str, label: str, seed: int, **options: Any
) -> tuple[Volume, Score]:
    case = make_case(tmp, patient_id=patient_id, label=label, seed=seed, **options)
    volume = load_series(sorted(case.series_dir.iterdir()))
    localisation = localise(volume)
    assert localisation.unanalysable is None, localisation.unanalysable
    _check_bodies(localisation)
    return volume, score(localisation, case.phantom, np.asarray(case.slice_z_mm))


def _check_bodies(localisation: Localisation) -> None:
    zs = [b.centre_mm[2] for b in localisation.bodies]
    assert zs == sorted(zs)
    for body in localisation.bodies:
        assert 0.0 <= body.confidence <= 1.0
        assert body.x_range_mm[0] < body.centre_mm[0] < body.x_range_mm[1]
        assert len(body.outline_yz_mm) >= 3
        assert body.label is None  # phantoms have no sacrum: no anchor, no labels


def test_phantoms_of_every_variant(tmp_path: Path) -> None:
    """Over two seeds of every variant: the fractured body and nearly every visible body found.

    Measured on these 20 phantoms: 89 of 89 visible bodies found, the fractured body in all
    20, 1 extra (a complete body within 2 mm of the last slice), largest centre error 3.1 mm
    (version 1.0 as first measured: 77 of 89, 7 extras). On 60 development phantoms (seeds
    100-159, half malignant, varied options): 285 of 285, fractured 60/60, 4 extras; on 40
    held-out phantoms (seeds 500-539): 174 of 177, fractured 39/40, 4 extras. With the column
    followed past the canal's ends and sectioned perpendicular to itself: 89 of 89, fractured
    20/20, no extra, largest error 3.1 mm; on 100 further phantoms (seeds 100-159 and 500-539,
    one variant of this list drawn per seed): 466 of 474, fractured 98/100, 8 extras (before
    the change 466 of 474, 98/100, 11 extras), none labelled.
    """
    totals = Score(0, 0, 0, 0.0)
    fractured_missed = 0
    lines = []
    for i, options in enumerate(VARIANTS):
        for seed in (1, 2):
            label = "malignant" if (i + seed) % 2 else "benign"
            _, s = _case(tmp_path, f"V{i}S{seed}", label, seed, **options)
            lines.append(f"{options} seed {seed}: {s}")
            fractured_missed += not s.fractured_found
            totals = Score(
                totals.expected + s.expected,
                totals.found + s.found,
                totals.extras + s.extras,
                max(totals.max_error_mm, s.max_error_mm),
            )
    report = "\n".join([*lines, f"total: {totals}, fractured body missed {fractured_missed}"])
    assert fractured_missed <= 1, report
    assert totals.found >= 0.97 * totals.expected, report
    assert totals.extras <= 0.05 * totals.expected, report
    assert totals.max_error_mm <= CENTRE_TOLERANCE_MM, report


def test_full_size_phantom(tmp_path: Path) -> None:
    _, s = _case(tmp_path, "FULL", "malignant", 3, size="full", slice_spacing_mm=3.0)
    assert s.fractured_found and s.found >= s.expected - 1 and s.extras == 0, s


def _reoriented(volume: Volume, order: tuple[int, int, int]) -> Volume:
    """The same voxels stored along other axes (a sagittal or coronal acquisition)."""
    steps = [
        (np.asarray(volume.slice_direction), volume.spacing[0]),
        (np.asarray(volume.column_direction), volume.spacing[1]),
        (np.asarray(volume.row_direction), volume.spacing[2]),
    ]
    (n, sn), (c, sc), (r, sr) = (steps[a] for a in order)
    return replace(
        volume,
        voxels=np.ascontiguousarray(np.transpose(volume.voxels, order)),
        slice_direction=n,
        column_direction=c,
        row_direction=r,
        spacing=(sn, sc, sr),
    )


def _rotated_about_z(volume: Volume, degrees: float) -> Volume:
    """The same voxels on in-plane axes turned by ``degrees`` about the voxel grid's centre."""
    angle = math.radians(degrees)
    rotation = np.array(
        [
            [math.cos(angle), -math.sin(angle), 0.0],
            [math.sin(angle), math.cos(angle), 0.0],
            [0, 0, 1],
        ]
    )
    centre = volume.index_to_patient((np.array(volume.voxels.shape) - 1) / 2.0)
    return replace(
        volume,
        origin=centre + rotation @ (np.asarray(volume.origin) - centre),
        row_direction=rotation @ volume.row_direction,
        column_direction=rotation @ volume.column_direction,
        slice_direction=rotation @ volume.slice_direction,
    )


def test_sagittal_coronal_and_oblique_storage_give_the_same_bodies(tmp_path: Path) -> None:
    case = make_case(tmp_path, patient_id="ORIENT", label="benign", seed=11, feet_first=False)
    axial = load_series(sorted(case.series_dir.iterdir()))
    reference = [b.centre_mm for b in localise(axial).bodies]
    assert reference
    for order in ((2, 0, 1), (1, 0, 2), (2, 1, 0)):  # sagittal, coronal, sagittal transposed
        other = [b.centre_mm for b in localise(_reoriented(axial, order)).bodies]
        np.testing.assert_allclose(other, reference, atol=1e-3)
    rotated = localise(_rotated_about_z(axial, 12.0))
    assert len(rotated.bodies) == len(reference)
    for body, centre in zip(rotated.bodies, reference, strict=True):
        assert abs(body.centre_mm[2] - centre[2]) <= CENTRE_TOLERANCE_MM


# Read off the real CT by eye: sagittal reformats through the column (NIfTI column i = 58,
# three columns averaged, bone and soft-tissue windows, 7-12x enlarged with a y/z grid drawn
# in, rendered to PNG with Pillow), checked against the median HU along the body column.
# The disc levels lie at NIfTI slice k ≈ 56, 67.5, 79.5, 91 and 103 (z = 94.3 + 3 k mm, LPS
# z = NIfTI z); the bodies between them, with y read at their middle (LPS y = -(11.3 + 3 j)),
# are below. L5 is tilted about 20° (lumbosacral curve), between the tilted L4/L5 disc and the
# steeply tilted L5/S1 disc: its corners read at (y, z) ≈ (-168, 249) anterior-superior,
# (-130, 258) posterior-superior, (-120, 233) posterior-inferior, (-150, 222)
# anterior-inferior, centre ≈ (-142, 240). Below it the sacrum: its alae reach the iliac bones
# at z ≈ 205-220. Axial planes show no rib-bearing body below k ≈ 103, so the bodies are L5 …
# L1 (a transitional count cannot be excluded from this image alone). Above the T12/L1 disc
# (z ≈ 404) T12 runs to the last slice (z 427.3) with no upper endplate in view: it is cut and
# no body is expected there; no thoracic body is fully in view.
REAL_CT_BODIES = {  # label: (z mm, rough y mm)
    "L5": (240.0, -142.0),
    "L4": (280.3, -140.0),
    "L3": (314.8, -140.0),
    "L2": (349.3, -136.0),
    "L1": (385.3, -128.0),
}
REAL_CT_Z_TOLERANCE_MM = 8.0


@pytest.fixture(scope="module")
def real_ct_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    series_dir = tmp_path_factory.mktemp("real-ct") / REAL_CT_PATIENT_ID
    write_real_ct_series(series_dir)
    return series_dir


def test_real_ct(real_ct_dir: Path) -> None:
    volume = load_series(sorted(real_ct_dir.iterdir()))
    localisation = localise(volume)
    assert localisation.unanalysable is None
    proposals = propose_rois(
        localisation,
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid,
    )
    assert len(proposals) == len(localisation.bodies)
    remaining = dict(REAL_CT_BODIES)
    for body, proposal in zip(localisation.bodies, proposals, strict=True):
        near = [
            name
            for name, (z, _) in remaining.items()
            if abs(body.centre_mm[2] - z) <= REAL_CT_Z_TOLERANCE_MM
        ]
        assert len(near) == 1, f"body at z {body.centre_mm[2]:.1f} matches {near}"
        z, y = remaining.pop(near[0])
        assert body.label == near[0], (body.label, near[0])  # counted from the sacrum
        assert abs(body.centre_mm[1] - y) <= 12.0
        box = proposal.roi.square_box_yz()
        assert box.z_range[0] <= z <= box.z_range[1] and box.y_range[0] <= y <= box.y_range[1]
        assert 15.0 <= box.side <= 70.0
        assert -25.0 <= body.centre_mm[0] <= 30.0  # on the midline column, not beside it
    assert not remaining, f"not found: {sorted(remaining)}"


def _volume(voxels: np.ndarray, spacing: float = 2.0) -> Volume:
    return Volume(
        voxels=voxels.astype(np.float32),
        origin=np.zeros(3),
        row_direction=np.array([1.0, 0.0, 0.0]),
        column_direction=np.array([0.0, 1.0, 0.0]),
        slice_direction=np.array([0.0, 0.0, 1.0]),
        spacing=(spacing, spacing, spacing),
        series_instance_uid=SERIES_UID,
        study_instance_uid=STUDY_UID,
        frame_of_reference_uid="1.2.3",
        sop_instance_uids=(),
    )


def test_a_head_like_sphere_has_no_spine() -> None:
    k, r, c = np.mgrid[:60, :90, :90]
    distance = np.sqrt((k - 30) ** 2 + (r - 45) ** 2 + (c - 45) ** 2)
    voxels = np.where(distance < 40, 1200.0, -1000.0)
    voxels[distance < 36] = 30.0
    result = localise(_volume(voxels))
    assert result.bodies == () and result.unanalysable == "no spine in the field of view"


def test_air_and_short_series_are_unanalysable() -> None:
    air = localise(_volume(np.full((40, 64, 64), -1000.0)))
    assert air.bodies == () and air.unanalysable == "no spine in the field of view"
    short = localise(_volume(np.zeros((5, 64, 64))))
    assert short.bodies == () and short.unanalysable == "too few slices (5) for localisation"


def test_metal_over_the_spine(tmp_path: Path) -> None:
    case = make_case(tmp_path, patient_id="METAL", label="benign", seed=4)
    volume = load_series(sorted(case.series_dir.iterdir()))
    localisation = localise(volume)
    assert localisation.bodies
    body = localisation.bodies[len(localisation.bodies) // 2]
    centre = volume.patient_to_index(np.array(body.centre_mm))
    voxels = volume.voxels.copy()
    _k, r, c = (round(v) for v in centre)
    voxels[:, r - 12 : r - 4, c - 3 : c + 3] = 3000.0  # a rod along the column (pedicle screws)
    result = localise(replace(volume, voxels=voxels))
    assert result.bodies == () and result.unanalysable == "metal over the spine"


def test_field_of_view_cutting_every_body(tmp_path: Path) -> None:
    case = make_case(tmp_path, patient_id="CUT", label="benign", seed=6)
    volume = load_series(sorted(case.series_dir.iterdir()))
    # 12 planes (about 33 mm): one body at most, never with both its discs.
    body = localise(volume).bodies[0]
    k = round(float(volume.patient_to_index(np.array(body.centre_mm))[0]))
    part = replace(
        volume,
        voxels=volume.voxels[k - 3 : k + 9].copy(),
        origin=volume.index_to_patient(np.array([k - 3, 0, 0])),
    )
    result = localise(part)
    assert result.unanalysable is not None and result.bodies == ()


def test_proposals_are_valid_rois(tmp_path: Path) -> None:
    case = make_case(tmp_path, patient_id="PROP", label="malignant", seed=8)
    volume = load_series(sorted(case.series_dir.iterdir()))
    localisation = localise(volume)
    for slices in (3, 4, 5):
        proposals = propose_rois(
            localisation,
            study_instance_uid=volume.study_instance_uid,
            series_instance_uid=volume.series_instance_uid,
            slices=slices,
        )
        assert len(proposals) == len(localisation.bodies) > 0
        for body, proposal in zip(localisation.bodies, proposals, strict=True):
            roi = proposal.roi
            assert Roi.from_json(roi.to_json()) == roi
            assert len(roi.slices_x_mm) == slices
            assert all(body.x_range_mm[0] < x < body.x_range_mm[1] for x in roi.slices_x_mm)
            assert _inside(roi.polygon_yz_mm, body.centre_mm[1], body.centre_mm[2])
            box = roi.square_box_yz()
            assert box.side >= max(p[0] for p in roi.polygon_yz_mm) - min(
                p[0] for p in roi.polygon_yz_mm
            )
            assert proposal.confidence == body.confidence
    with pytest.raises(ValueError):
        propose_rois(
            localisation, study_instance_uid=STUDY_UID, series_instance_uid=SERIES_UID, slices=0
        )
    assert LOCALISER_NAME == "spine-triage-localiser" and LOCALISER_VERSION == "1.0"


def _inside(polygon: tuple[tuple[float, float], ...], y: float, z: float) -> bool:
    inside = False
    for (y0, z0), (y1, z1) in zip(polygon, polygon[1:] + polygon[:1], strict=True):
        if (z0 > z) != (z1 > z) and y < y0 + (z - z0) * (y1 - y0) / (z1 - z0):
            inside = not inside
    return inside


def test_propose_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = make_case(tmp_path, patient_id="CLI", label="benign", seed=9)
    preview = tmp_path / "overview.png"
    assert main(["propose", str(case.series_dir), "--preview", str(preview)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines and all("confidence" in line for line in lines)
    assert preview.read_bytes().startswith(b"\x89PNG")
    assert main(["propose", str(case.series_dir), "--json"]) == 0
    proposals = json.loads(capsys.readouterr().out)
    assert len(proposals) == len(lines)
    for item in proposals:
        confidence = item.pop("confidence")
        assert 0.0 <= confidence <= 1.0
        assert Roi.from_json(item).series_instance_uid == case.roi.series_instance_uid
    assert main(["propose", str(tmp_path / "missing")]) == 2
    assert "propose:" in capsys.readouterr().err
    empty = tmp_path / "not-dicom"
    empty.mkdir()
    (empty / "README").write_text("no images")
    assert main(["propose", str(empty)]) == 2


def test_overview_colours_boxes_by_probability(tmp_path: Path) -> None:
    from io import BytesIO

    from PIL import Image

    from worker.preview import render_overview_png

    case = make_case(tmp_path, patient_id="PNG", label="benign", seed=12)
    volume = load_series(sorted(case.series_dir.iterdir()))
    rois = [
        p.roi
        for p in propose_rois(
            localise(volume), study_instance_uid=STUDY_UID, series_instance_uid=SERIES_UID
        )
    ]
    assert rois
    image = Image.open(BytesIO(render_overview_png(volume, [(rois[0], 0.0), (rois[-1], 1.0)])))
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colours = {tuple(int(v) for v in pixel) for pixel in np.unique(pixels, axis=0)}
    assert (0, 200, 60) in colours and (255, 0, 60) in colours  # green (p = 0), red (p = 1)
    assert render_overview_png(volume, []).startswith(b"\x89PNG")
