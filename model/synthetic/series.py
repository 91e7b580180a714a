"""Writing synthetic CT series as valid DICOM: CT Image Storage or Enhanced CT Image Storage.

:func:`write_ct_series` renders any HU function on an axial grid and writes it with every
Type 1 and Type 2 attribute of the CT Image IOD (synthetic patient names and IDs), in
explicit VR little endian, JPEG 2000 lossless or RLE lossless, head-first or feet-first, and
with Instance Numbers running either way along the patient.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from model.synthetic.dicom import (
    TRANSFER_SYNTAXES,
    HuFunction,
    SeriesIdentity,
    SeriesLayout,
    TransferSyntaxName,
    ct_image,
    ds_values,
    encode_pixels,
    stored_pixels,
)
from model.synthetic.enhanced import write_enhanced_ct

_CHUNK_SLICES = 16

__all__ = ["HuFunction", "SeriesIdentity", "SeriesLayout", "TransferSyntaxName", "write_ct_series"]


def _render_slices(
    layout: SeriesLayout, hu_at: HuFunction
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    corner, x, y = layout.in_plane_grid()
    zs = layout.z_positions()
    chunks = [
        hu_at(x, y, zs[start : start + _CHUNK_SLICES]) for start in range(0, len(zs), _CHUNK_SLICES)
    ]
    return corner, zs, chunks


def write_ct_series(
    series_dir: Path,
    hu_at: HuFunction,
    layout: SeriesLayout,
    identity: SeriesIdentity,
    *,
    transfer_syntax: TransferSyntaxName = "explicit",
    multiframe: bool = False,
) -> list[Path]:
    """Render ``hu_at(x, y, z)`` (x, y: (rows, columns) LPS mm; z: (k,) → (k, rows, columns)
    HU) on ``layout`` and write it to ``series_dir``; returns the files written."""
    series_dir.mkdir(parents=True, exist_ok=True)
    syntax = TRANSFER_SYNTAXES[transfer_syntax]
    corner, zs, chunks = _render_slices(layout, hu_at)
    slices = [stored_pixels(plane) for chunk in chunks for plane in chunk]
    if multiframe:
        return [write_enhanced_ct(series_dir, slices, zs, corner, layout, identity, syntax)]
    order = list(range(layout.slices))  # inferior → superior
    if not layout.reverse_order:
        order.reverse()  # Instance Number 1 at the top, as most scanners do
    paths = []
    orientation = [*layout.row_direction.tolist(), *layout.column_direction.tolist()]
    for number, k in enumerate(order, start=1):
        ds = ct_image(
            identity,
            slices[k],
            instance_number=number,
            position=(corner[0], corner[1], zs[k]),
            orientation=orientation,
            pixel_spacing=(layout.pixel_spacing_mm, layout.pixel_spacing_mm),
            slice_thickness=layout.slice_spacing_mm,
            sop_instance_uid=str(generate_uid(entropy_srcs=[identity.series_instance_uid, str(k)])),
            patient_position="FFS" if layout.feet_first else "HFS",
        )
        ds.SliceLocation = ds_values(zs[k])[0]
        encode_pixels(ds, slices[k], syntax)
        path = series_dir / f"CT{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
