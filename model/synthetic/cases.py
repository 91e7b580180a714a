"""Synthetic spine CT cases: DICOM series, ROI JSON and label, reproducible by seed.

Each case is a folder ``<out>/<patient_id>/`` holding ``ct/`` (the axial series),
``roi.json`` (the reader's ROI as the REST API accepts it) and ``label.json`` (the label and
which Table 1 features the phantom shows). With ``normals=N`` a case also holds the ROIs an
automatic localiser would propose (:mod:`model.synthetic.body_rois`): ``roi-body.json`` on the
fractured body (the case's label) and ``roi-normal-1.json`` … ``roi-normal-N.json`` on normal
bodies (fewer when the series holds fewer normal bodies). :func:`make_cohort` adds
``manifest.csv`` (the columns of :mod:`model.training.cohort`; paths relative to the
manifest), one row per ROI.

The returned :class:`SynthCase` carries the phantom and the slice positions of the written
series, so every body's truth (position, size, which one is fractured) can be read back.

Two sizes: ``small`` (default; 160×160 pixels, 2.5–3 mm slices, about 50–85 slices, a few
tenths of a second per case) for tests and training, and ``full`` (512×512, 1–3 mm slices)
like a clinical series. Any option can be fixed; what is left open is drawn from the seed.
"""

from __future__ import annotations

import csv
import json
import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from model.serving.localiser import AUTOMATIC_MARGIN_MM
from model.serving.roi import Roi
from model.synthetic.body_rois import body_roi, localised_body_rois, normal_bodies
from model.synthetic.design import design_phantom, design_roi
from model.synthetic.phantom import Label, SpinePhantom
from model.synthetic.series import SeriesIdentity, SeriesLayout, TransferSyntaxName, write_ct_series

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ("patient_id", "label", "series_dir", "roi", "roi_source")
SERIES_FOLDER = "ct"
_VERTEBRA_PITCH_MM = 30.0


@dataclass(frozen=True)
class SynthOptions:
    """What a case looks like; ``None`` means drawn from the seed."""

    size: Literal["small", "full"] = "small"
    rows: int | None = None
    columns: int | None = None
    slices: int | None = None
    pixel_spacing_mm: float | None = None
    slice_spacing_mm: float | None = None
    transfer_syntax: TransferSyntaxName = "explicit"
    feet_first: bool | None = None
    reverse_order: bool | None = None
    multiframe: bool = False

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any]) -> SynthOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown synth option(s): {', '.join(unknown)}")
        resolved = cls(**dict(options))
        if resolved.size not in ("small", "full"):
            raise ValueError(f"size: expected 'small' or 'full', got {resolved.size!r}")
        return resolved

    def layout(self, rng: np.random.Generator, center_xy: tuple[float, float]) -> SeriesLayout:
        small = self.size == "small"
        side = 160 if small else 512
        pixel = self.pixel_spacing_mm or float(
            np.round(rng.uniform(0.6, 0.9) if small else rng.uniform(0.5, 0.9), 3)
        )
        spacing = self.slice_spacing_mm or float(
            np.round(rng.uniform(2.5, 3.0) if small else rng.uniform(1.0, 3.0), 2)
        )
        vertebrae = int(rng.integers(5, 8))
        slices = self.slices or int(np.ceil(vertebrae * _VERTEBRA_PITCH_MM / spacing))
        return SeriesLayout(
            rows=self.rows or side,
            columns=self.columns or side,
            slices=slices,
            pixel_spacing_mm=pixel,
            slice_spacing_mm=spacing,
            center=(center_xy[0], center_xy[1], float(np.round(rng.uniform(-200, 200), 1))),
            feet_first=bool(rng.random() < 0.3) if self.feet_first is None else self.feet_first,
            reverse_order=bool(rng.random() < 0.5)
            if self.reverse_order is None
            else self.reverse_order,
        )


@dataclass(frozen=True)
class BodyRoi:
    """A localiser-like ROI written beside a case: on the fractured body or a normal one."""

    label: Literal["benign", "malignant", "normal"]
    roi: Roi
    path: Path
    vertebra_index: int  # into ``SynthCase.phantom.vertebrae``


@dataclass(frozen=True)
class SynthCase:
    """One synthetic patient on disk, with the phantom it was rendered from."""

    patient_id: str
    label: Literal["benign", "malignant"]
    series_dir: Path
    roi: Roi  # the reader's ROI on the fractured body (the paper's protocol)
    roi_path: Path
    phantom: SpinePhantom
    slice_z_mm: tuple[float, ...]  # the written series' slice positions, inferior first
    features: Mapping[str, bool] = field(default_factory=dict)
    body_rois: tuple[BodyRoi, ...] = ()  # with ``normals``: the fractured body first

    @property
    def normal_rois(self) -> tuple[BodyRoi, ...]:
        return tuple(b for b in self.body_rois if b.label == "normal")


def _patient_rng(seed: int, patient_id: str, stream: int = 0) -> np.random.Generator:
    """The case's generator; stream 1 draws the body ROIs, so asking for them changes
    nothing else of the case."""
    key = [seed, zlib.crc32(patient_id.encode())]
    return np.random.default_rng(key if stream == 0 else [*key, stream])


def _write_roi(path: Path, roi: Roi) -> Path:
    path.write_text(json.dumps(roi.to_json(), indent=2) + "\n")
    return path


BodyRoiSource = Literal["phantom", "localiser"]


def _body_rois(
    case_dir: Path,
    phantom: SpinePhantom,
    roi: Roi,
    slice_z_mm: tuple[float, ...],
    normals: int,
    rng: np.random.Generator,
    label: Label,
    slices: int,
    margin_mm: float,
    source: BodyRoiSource,
) -> tuple[BodyRoi, ...]:
    """The fractured body's localiser ROI and up to ``normals`` on normal bodies: drawn from
    the phantom's truth, or (``source="localiser"``) the localiser's own proposals on the
    written series, the truth's ROI standing in for a fractured body it missed."""
    proposed: dict[int, Roi] = {}
    if source == "localiser":
        proposed = localised_body_rois(
            case_dir / SERIES_FOLDER,
            phantom,
            study_instance_uid=roi.study_instance_uid,
            series_instance_uid=roi.series_instance_uid,
            slices=slices,
            margin_mm=margin_mm,
        )

    def make(index: int) -> Roi:
        if index in proposed:
            return proposed[index]
        return body_roi(
            phantom,
            index,
            rng,
            study_instance_uid=roi.study_instance_uid,
            series_instance_uid=roi.series_instance_uid,
            slice_z_mm=slice_z_mm,
            slices=slices,
            margin_mm=margin_mm,
        )

    fractured = make(phantom.abnormal_index)
    written = [
        BodyRoi(
            label,
            fractured,
            _write_roi(case_dir / "roi-body.json", fractured),
            phantom.abnormal_index,
        )
    ]
    candidates = normal_bodies(phantom, slice_z_mm, margin_mm=margin_mm)
    if source == "localiser":
        candidates = tuple(i for i in candidates if i in proposed)
    count = min(normals, len(candidates))
    chosen = sorted(int(i) for i in rng.choice(candidates, size=count, replace=False))
    for number, index in enumerate(chosen, start=1):
        normal = make(index)
        path = _write_roi(case_dir / f"roi-normal-{number}.json", normal)
        written.append(BodyRoi("normal", normal, path, index))
    if count < normals:
        logger.debug(
            "case %s: %d normal bodies in the series, %d asked for", case_dir.name, count, normals
        )
    return tuple(written)


def make_case(
    out_dir: Path,
    *,
    patient_id: str,
    label: str,
    seed: int,
    normals: int = 0,
    body_roi_slices: int = 5,
    body_roi_margin_mm: float = AUTOMATIC_MARGIN_MM,
    body_rois_from: BodyRoiSource = "phantom",
    **options: Any,
) -> SynthCase:
    """Write one synthetic case under ``out_dir/patient_id``; see :class:`SynthOptions`.

    ``normals`` > 0 also writes the localiser-like ROIs (the fractured body's and up to
    ``normals`` normal bodies'), each with ``body_roi_slices`` slices and the localiser's
    margin ``body_roi_margin_mm`` in front and behind; the series and the reader's ROI are the
    same as without them. ``body_rois_from="localiser"``: those ROIs are the localiser's own
    proposals on the written series (:func:`model.synthetic.body_rois.localised_body_rois`)
    rather than drawn from the phantom's truth.
    """
    if label not in ("benign", "malignant"):
        raise ValueError(f"label: expected 'benign' or 'malignant', got {label!r}")
    if normals < 0:
        raise ValueError(f"normals: expected 0 or more, got {normals}")
    if body_rois_from not in ("phantom", "localiser"):
        raise ValueError(
            f"body_rois_from: expected 'phantom' or 'localiser', got {body_rois_from!r}"
        )
    if not patient_id or "/" in patient_id or patient_id.startswith("."):
        raise ValueError(f"patient_id: not usable as a folder name: {patient_id!r}")
    settings = SynthOptions.from_kwargs(options)
    rng = _patient_rng(seed, patient_id)
    case_label: Label = "benign" if label == "benign" else "malignant"
    draft = settings.layout(rng, (0.0, 0.0))
    zs = draft.z_positions()
    phantom = design_phantom(rng, case_label, float(zs[0]), float(zs[-1]))
    center_y = phantom.spine_y - 6.0 + rng.uniform(-3.0, 3.0)
    layout = replace(draft, center=(rng.uniform(-4.0, 4.0), center_y, draft.center[2]))
    identity = SeriesIdentity.derived(patient_id, seed)
    case_dir = Path(out_dir) / patient_id
    series_dir = case_dir / SERIES_FOLDER
    render_seed = int(rng.integers(0, 2**31))
    write_ct_series(
        series_dir,
        lambda x, y, z: phantom.render(x, y, z, seed=render_seed + int(z[0] * 1000) % 9973),
        layout,
        identity,
        transfer_syntax=settings.transfer_syntax,
        multiframe=settings.multiframe,
    )
    xs, polygon = design_roi(phantom, rng)
    vertebra = phantom.vertebrae[phantom.abnormal_index].name
    roi = Roi(
        study_instance_uid=identity.study_instance_uid,
        series_instance_uid=identity.series_instance_uid,
        slices_x_mm=xs,
        polygon_yz_mm=polygon,
        vertebra=vertebra,
    )
    roi_path = _write_roi(case_dir / "roi.json", roi)
    slice_z_mm = tuple(float(z) for z in sorted(layout.z_positions()))
    bodies: tuple[BodyRoi, ...] = ()
    if normals:
        bodies = _body_rois(
            case_dir,
            phantom,
            roi,
            slice_z_mm,
            normals,
            _patient_rng(seed, patient_id, stream=1),
            case_label,
            body_roi_slices,
            body_roi_margin_mm,
            body_rois_from,
        )
    (case_dir / "label.json").write_text(
        json.dumps(
            {
                "patient_id": patient_id,
                "label": case_label,
                "vertebra": vertebra,
                "features": phantom.features,
                "seed": seed,
                "synthetic": True,
                "body_rois": [
                    {"roi": b.path.name, "label": b.label, "vertebra": b.roi.vertebra}
                    for b in bodies
                ],
                "body_rois_from": body_rois_from if bodies else None,
            },
            indent=2,
        )
        + "\n"
    )
    logger.debug("synthetic case %s (%s) written to %s", patient_id, case_label, case_dir)
    return SynthCase(
        patient_id=patient_id,
        label=case_label,
        series_dir=series_dir,
        roi=roi,
        roi_path=roi_path,
        phantom=phantom,
        slice_z_mm=slice_z_mm,
        features=dict(phantom.features),
        body_rois=bodies,
    )


def make_cohort(
    out_dir: Path,
    *,
    patients: int,
    seed: int,
    malignant_fraction: float = 0.5,
    normals: int = 0,
    **options: Any,
) -> list[SynthCase]:
    """Write ``patients`` cases and ``manifest.csv``; labels are shuffled, reproducibly.

    ``normals`` and the other options go to :func:`make_case`."""
    if patients < 1:
        raise ValueError(f"patients: expected at least 1, got {patients}")
    if not 0.0 <= malignant_fraction <= 1.0:
        raise ValueError(f"malignant_fraction: expected 0..1, got {malignant_fraction}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    malignant = round(patients * malignant_fraction)
    labels = ["malignant"] * malignant + ["benign"] * (patients - malignant)
    rng.shuffle(labels)
    width = max(4, len(str(patients)))
    cases = [
        make_case(
            out_dir,
            patient_id=f"SYN{i + 1:0{width}d}",
            label=label,
            seed=seed,
            normals=normals,
            **options,
        )
        for i, label in enumerate(labels)
    ]
    write_manifest(out_dir / MANIFEST_NAME, cases)
    return cases


def write_manifest(path: Path, cases: list[SynthCase]) -> None:
    """One row per ROI (the reader's, then the body ROIs), paths relative to the manifest."""
    base = path.parent.resolve()

    def relative(p: Path) -> str:
        return p.resolve().relative_to(base).as_posix()

    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(MANIFEST_COLUMNS)
        for case in cases:
            series = relative(case.series_dir)
            writer.writerow(
                [case.patient_id, case.label, series, relative(case.roi_path), "reader"]
            )
            for body in case.body_rois:
                writer.writerow(
                    [case.patient_id, body.label, series, relative(body.path), "localiser"]
                )
