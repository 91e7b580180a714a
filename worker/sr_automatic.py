"""The result of an automatic job as one DICOM Comprehensive 3D SR: one group per body.

The document is the reader-ROI report's (:mod:`worker.sr`: TID 1500, the classifier as the
device observer, the CT as evidence, Contributing Equipment) with one Measurement Group
(TID 1410) per analysed vertebral body, the most suspicious first:

    Measurement Group — "Vertebral body L1" (or "Vertebral body 3" when not labelled)
    ├─ tracking identifier + its own tracking UID
    ├─ Image Region: SCOORD3D POLYGON of the body's box at its central sagittal slice
    ├─ finding site: the vertebra (when labelled)
    ├─ algorithm identification (TID 4019) of the group: the *localiser* — the region was
    │  placed by a device, not a person
    ├─ NUM Probability of cancer of the body (derivation Maximum over its slices), algorithm:
    │  the classifier
    ├─ NUM Probability of cancer per sagittal slice, each with its own tracking identifier
    │  ("Vertebral body L1, sagittal slice x=… mm") and UID: the same box at that x
    └─ Pathology = Malignant (SCT 21594007) on a body at or above the threshold

The study's probability is the first group's body probability (the maximum over bodies);
the flag is raised on that body. A body below the threshold carries no Pathology evaluation:
"not flagged" is not a diagnosis of "benign".

Identity: series and SOP Instance UIDs derive from (job key, model version); each body's
tracking UID from (job key, body index), so a re-run rebuilds the same object.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from model.serving.prediction import suspicion_order
from model.serving.roi import Roi
from worker.derived import ReviewSeries
from worker.sr import (
    FINDING_COMPRESSION_FRACTURE,
    AlgorithmInfo,
    TriageFinding,
    domain_evaluations,
    domain_measurements,
    finding_sites_of,
    measurement_document,
    region_at,
    result_uids,
    tracking_uid,
)
from worker.sr_evidence import frame_of_reference
from worker.sr_review import review_groups

logger = logging.getLogger(__name__)

BODY_TRACKING_IDENTIFIER = "Vertebral body"


@dataclass(frozen=True)
class LocaliserInfo:
    """The device that placed the ROIs."""

    name: str
    version: str
    manufacturer: str = "spine-triage project"


def body_identifier(roi: Roi, index: int) -> str:
    """How a body is named in the report: its level, else its place from the bottom (1…)."""
    return f"{BODY_TRACKING_IDENTIFIER} {roi.vertebra or index + 1}"


def build_automatic_sr(
    source_images: Sequence[pydicom.Dataset],
    findings: Sequence[TriageFinding],
    algorithm: AlgorithmInfo,
    localiser: LocaliserInfo,
    *,
    job_key: str,
    institution_name: str | None = None,
    review: ReviewSeries | None = None,
    key_image: pydicom.Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR of an automatic job: ``findings`` one per body, in the localiser's order
    (inferior to superior; they are reported most suspicious first). With ``review``, each
    body's group also drawn on its review image (:mod:`worker.sr_review`); ``key_image``
    (:mod:`worker.key_image`) is listed among the evidence."""
    if not source_images:
        raise ValueError("the SR needs the CT instances it reports on as evidence")
    if not findings:
        raise ValueError("an automatic report needs at least one analysed body")
    frame_of_reference_uid = frame_of_reference(source_images)
    series_uid, sop_uid = result_uids(job_key, algorithm.version)
    classifier_id = hd.sr.AlgorithmIdentification(
        name=algorithm.reported_name,
        version=algorithm.version,
        parameters=[
            f"threshold={findings[0].prediction.threshold:g}",
            "body probability = maximum of its slice probabilities",
            "study probability = maximum over the bodies",
            *(
                [f"domain threshold={findings[0].prediction.domain_threshold:.4g}"]
                if findings[0].prediction.domain_threshold is not None
                else []
            ),
        ],
        manufacturer=algorithm.manufacturer,
    )
    localiser_id = hd.sr.AlgorithmIdentification(
        name=localiser.name,
        version=localiser.version,
        parameters=["ROI placed automatically on each vertebral body found"],
        manufacturer=localiser.manufacturer,
    )
    order = sorted(range(len(findings)), key=lambda i: suspicion_order(findings[i].prediction))
    groups = [
        _body_group(findings[i], i, frame_of_reference_uid, classifier_id, localiser_id, job_key)
        for i in order
    ]
    if review is not None:
        groups = [*review_groups(groups, review), *groups]  # drawn first: see sr_review
    sr = measurement_document(
        [
            *source_images,
            *(review.datasets if review else []),
            *([key_image] if key_image is not None else []),  # listed as evidence
        ],
        groups,
        algorithm,
        series_uid,
        sop_uid,
        institution_name,
    )
    top = findings[order[0]]
    logger.info(
        "built automatic SR sop_instance_uid=%s study=%s bodies=%d top=%.3f (%s)",
        sop_uid,
        sr.StudyInstanceUID,
        len(findings),
        top.prediction.patient_probability,
        top.prediction.priority,
    )
    return sr


def _body_group(
    finding: TriageFinding,
    index: int,
    frame_of_reference_uid: str,
    classifier_id: hd.sr.AlgorithmIdentification,
    localiser_id: hd.sr.AlgorithmIdentification,
    job_key: str,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    roi, prediction = finding.roi, finding.prediction
    measurements = [
        hd.sr.Measurement(
            name=codes.DCM.ProbabilityOfCancer,
            value=prediction.patient_probability,
            unit=codes.UCUM.NoUnits,
            derivation=codes.SCT.Maximum,
            algorithm_id=classifier_id,
        )
    ]
    for x, probability in zip(roi.slices_x_mm, prediction.slice_probabilities, strict=True):
        measurements.append(
            hd.sr.Measurement(
                name=codes.DCM.ProbabilityOfCancer,
                value=probability,
                unit=codes.UCUM.NoUnits,
                algorithm_id=classifier_id,
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=tracking_uid(f"{job_key}:body={index}", x),
                    identifier=f"{body_identifier(roi, index)}, sagittal slice x={x:g} mm",
                ),
            )
        )
    measurements.extend(domain_measurements(prediction, classifier_id))
    flagged = prediction.label == "malignant" and not prediction.outside_domain
    evaluations = [
        *(
            [hd.sr.QualitativeEvaluation(name=codes.DCM.Pathology, value=codes.SCT.Malignant)]
            if flagged
            else []
        ),
        *domain_evaluations(prediction),
    ]
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(f"{job_key}:body={index}"),
            identifier=body_identifier(roi, index),
        ),
        referenced_region=region_at(
            roi.polygon_yz_mm, roi.central_slice_x_mm, frame_of_reference_uid
        ),
        finding_type=FINDING_COMPRESSION_FRACTURE if flagged else None,
        finding_sites=finding_sites_of(roi.vertebra),
        algorithm_id=localiser_id,
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
    )
