"""The key image: the result drawn into one picture, for viewers that show no SR.

A viewer without SR support shows a result SR as nothing at all (or a list of codes), and a
derived CT image without its overlay. So each job also writes one **Secondary Capture Image**
(``docs/conformance-statement.md`` says why this IOD, not a presentation state): the
sagittal review image (:mod:`worker.derived`) at the most suspicious ROI's central slice, in
colour, with

- every analysed ROI's box drawn on it — red where the probability reached the threshold,
  green below — labelled with its vertebra (when known) and probability;
- a band above the image with "computer-aided triage — not for diagnosis", the headline
  (probability, priority, flagged vertebra) and, for a demonstration model, its notice.

All of it is burned into the pixels (Burned In Annotation YES): a viewer that shows nothing
else shows this. The image goes into the original study (the CT's patient and study), in a
series of its own, and is sent with the SR — after the review series, before the SR, which
lists it among its evidence (Current Requested Procedure Evidence).

Identity: series and SOP Instance UIDs derive from (job key, model version), as the SR's do
(the picture shows the model's answer), so a re-run names the same image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from model.io.volume import Volume
from model.serving.preprocess import PreprocessParams
from worker.derived import BONE_WINDOW, ReviewImage, StoredReview, make_review_series
from worker.sr_evidence import in_utf8, with_type2_attributes

if TYPE_CHECKING:
    from worker.runtime import WorkerRuntime
    from worker.series import Series

logger = logging.getLogger(__name__)

KEY_IMAGE_SOP_CLASS = SecondaryCaptureImageStorage  # what highdicom's SCImage writes
KEY_IMAGE_SERIES_NUMBER = 9903
KEY_IMAGE_SERIES_DESCRIPTION = "AI triage key image: computer-aided triage, not for diagnosis"
NOTICE = "computer-aided triage - not for diagnosis"
DEMONSTRATION_NOTICE = "DEMONSTRATION MODEL - SYNTHETIC TRAINING DATA - NOT FOR CLINICAL USE"
FLAGGED_COLOUR = (255, 32, 32)
ROUTINE_COLOUR = (40, 210, 70)
TEXT_COLOUR = (255, 255, 255)
BAND_COLOUR = (0, 0, 0)
LINE_PX = 2
BAND_LINE_PX = 18
FONT_PX = 13
MIN_WIDTH_PX = 480  # a narrower review image is enlarged (whole pixels) so the text fits
_UID_NAMESPACE = "spine-triage/key-image/v1"


@dataclass(frozen=True)
class KeyFinding:
    """One ROI as the key image draws it: its box (y, z in mm, in the image's plane), the
    probability, whether it reached the threshold, and its vertebra when known."""

    polygon_yz_mm: tuple[tuple[float, float], ...]
    probability: float
    flagged: bool
    vertebra: str | None = None


def key_image_uids(job_key: str, model_version: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of a job's key image."""
    series_uid = generate_uid(entropy_srcs=[_UID_NAMESPACE, "series", job_key, model_version])
    sop_uid = generate_uid(entropy_srcs=[_UID_NAMESPACE, "instance", job_key, model_version])
    return str(series_uid), str(sop_uid)


def headline(probability: float, priority: str, vertebra: str | None) -> str:
    """The key image's result line, e.g. "malignancy probability 0.93 on L1: HIGH priority"."""
    on = f" on {vertebra}" if vertebra else ""
    return f"malignant fracture probability {probability:.2f}{on}: {priority} priority"


def render_key_image(
    image: ReviewImage, findings: Sequence[KeyFinding], lines: Sequence[str]
) -> np.ndarray:
    """The RGB pixels (rows, columns, 3; uint8): the band of ``lines`` above the review image
    in the bone window (enlarged by a whole factor when narrower than ``MIN_WIDTH_PX``), every
    finding's box and label drawn on it."""
    hu = image.dataset.pixel_array.astype(np.float32)
    centre, width = BONE_WINDOW
    grey = np.clip((hu - (centre - width / 2.0)) / width * 255.0, 0.0, 255.0).astype(np.uint8)
    scale = max(1, math.ceil(MIN_WIDTH_PX / image.columns))
    grey = np.repeat(np.repeat(grey, scale, axis=0), scale, axis=1)
    font = ImageFont.load_default(size=FONT_PX)
    wrapped = [part for line in lines for part in _wrap(line, font, grey.shape[1] - 12)]
    band = BAND_LINE_PX * len(wrapped) + 8
    canvas = Image.new("RGB", (grey.shape[1], grey.shape[0] + band), BAND_COLOUR)
    canvas.paste(Image.fromarray(grey, mode="L").convert("RGB"), (0, band))
    draw = ImageDraw.Draw(canvas)
    for number, line in enumerate(wrapped):
        draw.text((6, 4 + number * BAND_LINE_PX), line, fill=TEXT_COLOUR, font=font)
    for finding in findings:
        colour = FLAGGED_COLOUR if finding.flagged else ROUTINE_COLOUR
        # SCOORD coordinates put a pixel's centre at +0.5; PIL's at its index
        corners = (image.graphic_coordinates(finding.polygon_yz_mm) - 0.5) * scale
        points = np.rint(corners + (scale - 1) / 2.0).astype(int)
        left, top = (int(v) for v in points.min(axis=0))
        right, bottom = (int(v) for v in points.max(axis=0))
        draw.rectangle((left, top + band, right, bottom + band), outline=colour, width=LINE_PX)
        label = f"{finding.vertebra + ' ' if finding.vertebra else ''}{finding.probability:.2f}"
        draw.text((right + 4, top + band), label, fill=colour, font=font)
    return np.asarray(canvas, dtype=np.uint8)


def _wrap(line: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> list[str]:
    """``line`` broken at spaces into pieces no wider than ``width`` pixels."""
    pieces: list[str] = []
    for word in line.split(" "):
        if pieces and font.getlength(f"{pieces[-1]} {word}") <= width:
            pieces[-1] = f"{pieces[-1]} {word}"
        else:
            pieces.append(word)
    return pieces


def build_key_image(
    source: Dataset,
    image: ReviewImage,
    findings: Sequence[KeyFinding],
    *,
    result_line: str,
    job_key: str,
    model_version: str,
    manufacturer: str = "spine-triage project",
    software_version: str = "",
    demonstration: bool = False,
    review_stored: bool = True,
) -> hd.sc.SCImage:
    """The key image of a job: ``source`` is a header of the CT (its patient and study),
    ``image`` the review image it is drawn on (named as its source image when
    ``review_stored``, i.e. the PACS receives it too)."""
    lines = [NOTICE, result_line, *([DEMONSTRATION_NOTICE] if demonstration else [])]
    pixels = render_key_image(image, findings, lines)
    series_uid, sop_uid = key_image_uids(job_key, model_version)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=in_utf8(with_type2_attributes(source)),
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=KEY_IMAGE_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=manufacturer,
        patient_orientation=("P", "F"),  # rows toward posterior, columns toward the feet
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )
    sc.ConversionType = "WSD"  # made on a workstation, not digitised
    # the spine is not a paired structure: no Laterality (dciodvfy needs the body part to know)
    sc.BodyPartExamined = source.get("BodyPartExamined") or "SPINE"
    sc.SeriesDescription = KEY_IMAGE_SERIES_DESCRIPTION
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.ManufacturerModelName = "spine-triage"
    if software_version:
        sc.SoftwareVersions = software_version
    sc.DerivationDescription = (
        f"Sagittal review image at x={image.x_mm:.2f} mm with the triage result burned in "
        "(ROI boxes, probabilities); computer-aided triage, not for diagnosis"
    )
    if review_stored:
        reference = Dataset()
        reference.ReferencedSOPClassUID = image.dataset.SOPClassUID
        reference.ReferencedSOPInstanceUID = image.sop_instance_uid
        sc.SourceImageSequence = DicomSequence([reference])
    logger.info(
        "built key image %s: %d ROI(s) on the review image at x=%.2f mm",
        sop_uid,
        len(findings),
        image.x_mm,
    )
    return sc


def key_image_to_bytes(sc: Dataset) -> bytes:
    """The key image encoded as a DICOM file (preamble, file meta, data set)."""
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, sc, enforce_file_format=True)
    return buffer.getvalue()


@dataclass(frozen=True)
class StoredKeyImage:
    """A job's key image and where its file lies (relative to the storage root)."""

    dataset: hd.sc.SCImage
    path: str


def write_key_image(
    rt: WorkerRuntime,
    series: Series,
    review: StoredReview | None,
    x_mm: float,
    findings: Sequence[KeyFinding],
    params: PreprocessParams,
    *,
    result_line: str,
    job_key: str,
    model_version: str,
    software_version: str = "",
    demonstration: bool = False,
    volume: Volume | None = None,
) -> StoredKeyImage | None:
    """The key image of a job drawn on the review image at ``x_mm``, stored durably; None when
    the site turned it off (``KEY_IMAGE=false``). Without a review series (``REVIEW_SERIES=
    false``) the review image is built for it alone, in memory (not sent, not referenced)."""
    if not rt.settings.key_image:
        return None
    if review is not None:
        image = review.series.image_at(x_mm)
    else:
        image = make_review_series(
            series,
            [x_mm],
            params,
            job_key=job_key,
            software_version=software_version,
            volume=volume,
        ).image_at(x_mm)
    sc = build_key_image(
        series.headers[0],
        image,
        findings,
        result_line=result_line,
        job_key=job_key,
        model_version=model_version,
        software_version=software_version,
        demonstration=demonstration,
        review_stored=review is not None,
    )
    stored = rt.store.write(
        series.study_instance_uid, sc.SeriesInstanceUID, sc.SOPInstanceUID, key_image_to_bytes(sc)
    )
    return StoredKeyImage(sc, stored.relative_path)
