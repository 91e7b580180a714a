"""The one real spine CT the tests have, as a DICOM CT series.

``shared/data/real-ct/example_ct.nii.gz`` (beside the repository; see its README: NIfTI-1,
RAS, 3 mm isotropic, HU, lower thoracic spine to sacrum, from the TotalSegmentator project's
test files, Apache-2.0) is read with nibabel and written as CT Image Storage files with the
project's CT writer, keeping its geometry: NIfTI RAS → DICOM LPS by negating x and y, stored
as int16 with Rescale Slope 1 and Intercept 0. It is never copied into the repository.

A missing file or a missing nibabel fails the test under ``CI=true`` and skips it otherwise
(:func:`tests.support.missing_component`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from model.synthetic.dicom import SeriesIdentity, ct_image
from tests.support import missing_component

_BESIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-ct"
# Beside the repository; else where the team's machines keep the shared data.
REAL_CT_DIR = next((p for p in (_BESIDE, Path("/work/shared/data/real-ct")) if p.is_dir()), _BESIDE)
REAL_CT_PATH = REAL_CT_DIR / "example_ct.nii.gz"
REAL_CT_PATIENT_ID = "REALCT"
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def require_real_ct() -> Path:
    """The NIfTI file, or fail (CI) / skip (elsewhere) when it or nibabel is missing."""
    try:
        import nibabel  # noqa: F401
    except ImportError:
        missing_component("nibabel (pip install nibabel), to read the real CT")
    if not REAL_CT_PATH.is_file():
        missing_component(f"the real CT {REAL_CT_PATH}")
    return REAL_CT_PATH


def load_real_ct() -> tuple[np.ndarray, np.ndarray]:
    """HU voxels ``[i, j, k]`` (int16) and the 4×4 affine index → LPS mm."""
    import nibabel

    image = nibabel.load(require_real_ct())
    hu = np.asarray(image.dataobj)
    affine = np.asarray(image.affine, dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :] = _RAS_TO_LPS @ affine[:3, :]
    return np.clip(hu, -32768, 32767).astype(np.int16), lps


def write_real_ct_series(series_dir: Path) -> list[Path]:
    """Write the real CT as axial CT Image Storage files (one per NIfTI k plane)."""
    hu, affine = load_real_ct()
    columns_axis, rows_axis = affine[:3, 0], affine[:3, 1]  # i runs along a row, j down a column
    column_spacing, row_spacing = (
        float(np.linalg.norm(columns_axis)),
        float(np.linalg.norm(rows_axis)),
    )
    slice_spacing = float(np.linalg.norm(affine[:3, 2]))
    orientation = [
        *(columns_axis / column_spacing).tolist(),
        *(rows_axis / row_spacing).tolist(),
    ]
    identity = SeriesIdentity.derived(REAL_CT_PATIENT_ID, 0)
    series_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(hu.shape[2]):
        position = (affine @ np.array([0.0, 0.0, float(k), 1.0]))[:3]
        ds = ct_image(
            identity,
            np.ascontiguousarray(hu[:, :, k].T),
            instance_number=k + 1,
            position=position.tolist(),
            orientation=orientation,
            pixel_spacing=(row_spacing, column_spacing),
            slice_thickness=slice_spacing,
            sop_instance_uid=str(generate_uid(entropy_srcs=[identity.series_instance_uid, str(k)])),
        )
        ds.RescaleIntercept = 0.0
        ds.RescaleSlope = 1.0
        ds.SeriesDescription = "Real CT (TotalSegmentator example), converted from NIfTI"
        path = series_dir / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
