"""The triage result as a DICOM Comprehensive 3D Structured Report (built with highdicom).

The report goes into the original study (same Study Instance UID; Patient and General Study
modules copied from the CT by highdicom) and reads, as a tree:

    Imaging Measurement Report (TID 1500)
    ├─ language, device observer (the algorithm: device UID, name, manufacturer, model)
    ├─ procedure reported: Computed tomography of spine (SCT 241577003)
    └─ Imaging Measurements
       ├─ Measurement Group (TID 1410), the ROI as a whole — the patient-level result:
       │    tracking identifier "Vertebral fracture ROI" + tracking UID,
       │    Image Region: SCOORD3D POLYGON at the central slice x, in the CT's frame of reference,
       │    finding: Compression fracture of vertebral column (SCT 42942008),
       │    finding site: the vertebra (when known), algorithm identification (TID 4019),
       │    NUM Probability of cancer (DCM 111047, unit "1"), derivation Maximum (SCT 56851009),
       │    Pathology (DCM 111042) = Malignant (SCT 21594007) / Benign (SCT 30807003)
       └─ Measurement Group (TID 1410) per sagittal slice, in the order of ``slices_x_mm``:
            tracking identifier "Vertebral fracture ROI, sagittal slice x=… mm" + its own UID,
            the same polygon as SCOORD3D at that slice's x, finding, finding site,
            algorithm identification, NUM Probability of cancer of that slice (no derivation)

With a model that describes its training domain, the ROI group also holds the out-of-domain
guard's answer: NUM "Distance from the model's training domain" (99SPTRIAGE DOMAINSCORE,
unit "1", derivation Maximum over the slices) and the qualitative evaluation "Outside the
model's training domain" (99SPTRIAGE OUTSIDEDOMAIN) = Yes / No (SCT 373066001 / 373067005);
the threshold is an algorithm parameter. Outside the domain the Pathology evaluation is left
out (the model's call is not valid there) and the probability is reported as measured.

So the patient probability is the NUM with derivation "Maximum" in the group that also holds
the Pathology evaluation, and each slice probability sits in its own group whose region says
where the slice is. The algorithm identification (name, version, parameters incl. the
threshold) is given on every NUM and on every group (which covers the Pathology evaluation).

Contributing Equipment (SOP Common) gets an item for the algorithm as IHE AI Results asks:
purpose of reference Processing Equipment (DCM 109102), manufacturer, model name, software
versions and Device UID.

The CT instances are checked and prepared as evidence by :mod:`worker.sr_evidence`.

Identity: series and SOP Instance UIDs are derived from (annotation key, model version) only,
so re-running a job rebuilds the same object; the tracking UIDs are derived from the annotation
key (and slice), so the same lesion keeps its tracking UID across model versions.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from io import BytesIO

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from dicom_node.dicom.vertebrae import vertebra_code
from model.serving.prediction import Prediction
from model.serving.roi import Roi
from worker.derived import ReviewSeries
from worker.sr_evidence import frame_of_reference, in_utf8, with_type2_attributes
from worker.sr_review import review_groups

logger = logging.getLogger(__name__)


def _package_version() -> str:
    try:
        return version("spine-triage")
    except PackageNotFoundError:
        return "0+unknown"


DEMONSTRATION_NOTICE = "DEMONSTRATION MODEL - SYNTHETIC TRAINING DATA - NOT FOR CLINICAL USE"
# Series Description is LO (at most 64 characters): the same words, tighter.
DEMONSTRATION_SERIES_DESCRIPTION = (
    "DEMONSTRATION MODEL-SYNTHETIC TRAINING DATA-NOT FOR CLINICAL USE"
)
SERIES_DESCRIPTION = "AI triage result: vertebral fracture malignancy"
SERIES_NUMBER = 9901
INSTANCE_NUMBER = 1
LO_MAX_LENGTH = 64

PROCEDURE_CT_OF_SPINE = Code("241577003", "SCT", "Computed tomography of spine")
FINDING_COMPRESSION_FRACTURE = Code("42942008", "SCT", "Compression fracture of vertebral column")
ROI_TRACKING_IDENTIFIER = "Vertebral fracture ROI"
PRIVATE_SCHEME = "99SPTRIAGE"
DOMAIN_SCORE = Code("DOMAINSCORE", PRIVATE_SCHEME, "Distance from the model's training domain")
OUTSIDE_DOMAIN = Code("OUTSIDEDOMAIN", PRIVATE_SCHEME, "Outside the model's training domain")

_UID_NAMESPACE = "spine-triage/result-sr/v1"
_UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


@dataclass(frozen=True)
class AlgorithmInfo:
    """Who computed the result: the model (from its checkpoint meta) and this software."""

    name: str
    version: str
    device_uid: str
    manufacturer: str = "spine-triage project"
    software_version: str = field(default_factory=_package_version)
    demonstration: bool = False

    def __post_init__(self) -> None:
        for label, value in (
            ("name", self.name),
            ("version", self.version),
            ("manufacturer", self.manufacturer),
            ("software_version", self.software_version),
        ):
            if not value or len(value) > LO_MAX_LENGTH or "\\" in value:
                raise ValueError(
                    f"algorithm {label} must be 1-{LO_MAX_LENGTH} characters "
                    f"without a backslash: {value!r}"
                )
        if not _is_valid_uid(self.device_uid):
            raise ValueError(f"algorithm device_uid is not a valid DICOM UID: {self.device_uid!r}")

    @property
    def reported_name(self) -> str:
        """The algorithm name as the SR states it (with the notice for a demonstration model)."""
        if self.demonstration:
            return f"{self.name} ({DEMONSTRATION_NOTICE})"
        return self.name


@dataclass(frozen=True)
class TriageFinding:
    """One analysed ROI and the model's answer for it, as the model gave them."""

    roi: Roi
    prediction: Prediction

    def __post_init__(self) -> None:
        if tuple(self.prediction.x_mm) != tuple(self.roi.slices_x_mm):
            raise ValueError("the prediction's slice positions are not the ROI's")

    @property
    def central_slice_x_mm(self) -> float:
        return self.roi.central_slice_x_mm


def result_uids(annotation_key: str, model_version: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the result SR of this annotation and model."""
    series_uid = generate_uid(
        entropy_srcs=[_UID_NAMESPACE, "series", annotation_key, model_version]
    )
    sop_uid = generate_uid(entropy_srcs=[_UID_NAMESPACE, "instance", annotation_key, model_version])
    return str(series_uid), str(sop_uid)


def tracking_uid(annotation_key: str, slice_x_mm: float | None = None) -> str:
    """Tracking UID of the ROI (``slice_x_mm`` None) or of its region on one sagittal slice."""
    sources = [_UID_NAMESPACE, "tracking", annotation_key]
    if slice_x_mm is not None:
        sources.append(f"x={slice_x_mm:.4f}")
    return str(generate_uid(entropy_srcs=sources))


def build_triage_sr(
    source_images: Sequence[pydicom.Dataset],
    finding: TriageFinding,
    algorithm: AlgorithmInfo,
    *,
    annotation_key: str,
    institution_name: str | None = None,
    review: ReviewSeries | None = None,
    key_image: pydicom.Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The result SR of ``finding`` for the CT instances ``source_images`` (its evidence);
    with ``review``, each group also drawn on its review image (:mod:`worker.sr_review`);
    ``key_image`` (:mod:`worker.key_image`) is listed among the evidence."""
    if not source_images:
        raise ValueError("the SR needs the CT instances it reports on as evidence")
    frame_of_reference_uid = frame_of_reference(source_images)
    series_uid, sop_uid = result_uids(annotation_key, algorithm.version)
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.reported_name,
        version=algorithm.version,
        parameters=algorithm_parameters(finding.prediction),
        manufacturer=algorithm.manufacturer,
    )
    finding_sites = finding_sites_of(finding.roi.vertebra)
    groups = [
        _patient_group(finding, frame_of_reference_uid, algorithm_id, finding_sites, annotation_key)
    ]
    groups.extend(
        _slice_group(
            finding,
            x,
            probability,
            frame_of_reference_uid,
            algorithm_id,
            finding_sites,
            annotation_key,
        )
        for x, probability in zip(
            finding.roi.slices_x_mm, finding.prediction.slice_probabilities, strict=True
        )
    )
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
    logger.info(
        "built result SR sop_instance_uid=%s study=%s label=%s groups=%d",
        sop_uid,
        sr.StudyInstanceUID,
        finding.prediction.label,
        len(groups),
    )
    return sr


def measurement_document(
    source_images: Sequence[pydicom.Dataset],
    groups: Sequence[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations],
    algorithm: AlgorithmInfo,
    series_uid: str,
    sop_uid: str,
    institution_name: str | None,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 document around ``groups``: the device observer is the algorithm."""
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=algorithm.device_uid,
                    name=algorithm.reported_name,
                    manufacturer_name=algorithm.manufacturer,
                    model_name=algorithm.name,
                ),
            )
        ),
        procedure_reported=PROCEDURE_CT_OF_SPINE,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[
            in_utf8(with_type2_attributes(source_images[0])),
            *(in_utf8(image) for image in source_images[1:]),
        ],
        content=report[0],
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=INSTANCE_NUMBER,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name="spine-triage",
        software_versions=algorithm.software_version,
        series_description=(
            DEMONSTRATION_SERIES_DESCRIPTION if algorithm.demonstration else SERIES_DESCRIPTION
        ),
        institution_name=institution_name,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[_algorithm_equipment(algorithm)],
    )
    _set_device_uid(sr, algorithm)
    return sr


def sr_to_bytes(sr: pydicom.Dataset) -> bytes:
    """The SR encoded as a DICOM file (preamble, file meta, data set)."""
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, sr, enforce_file_format=True)
    return buffer.getvalue()


def finding_sites_of(vertebra: str | None) -> list[hd.sr.FindingSite] | None:
    if vertebra is None:
        return None
    code = vertebra_code(vertebra)
    if code is None:
        logger.info("vertebra %r has no SNOMED CT code here; finding site omitted", vertebra)
        return None
    return [hd.sr.FindingSite(anatomic_location=code)]


def region_at(
    polygon_yz_mm: Sequence[tuple[float, float]], x_mm: float, frame_of_reference_uid: str
) -> hd.sr.ImageRegion3D:
    points = [(x_mm, y, z) for y, z in polygon_yz_mm]
    if points[0] != points[-1]:
        points.append(points[0])
    return hd.sr.ImageRegion3D(
        graphic_type=hd.sr.GraphicTypeValues3D.POLYGON,
        graphic_data=np.array(points, dtype=float),
        frame_of_reference_uid=frame_of_reference_uid,
    )


def algorithm_parameters(prediction: Prediction) -> list[str]:
    """The classifier's parameters as the SR names them (the domain threshold when guarded)."""
    parameters = [
        f"threshold={prediction.threshold:g}",
        "patient probability = maximum of the slice probabilities",
    ]
    if prediction.domain_threshold is not None:
        parameters.append(f"domain threshold={prediction.domain_threshold:.4g}")
    return parameters


def domain_measurements(
    prediction: Prediction, algorithm_id: hd.sr.AlgorithmIdentification
) -> list[hd.sr.Measurement]:
    """The domain score as a NUM (none without a domain description)."""
    if prediction.domain_score is None:
        return []
    return [
        hd.sr.Measurement(
            name=DOMAIN_SCORE,
            value=prediction.domain_score,
            unit=codes.UCUM.NoUnits,
            derivation=codes.SCT.Maximum,
            algorithm_id=algorithm_id,
        )
    ]


def domain_evaluations(prediction: Prediction) -> list[hd.sr.QualitativeEvaluation]:
    """The evaluation "Outside the model's training domain": Yes or No (none if unguarded)."""
    if prediction.in_domain is None:
        return []
    value = codes.SCT.No if prediction.in_domain else codes.SCT.Yes
    return [hd.sr.QualitativeEvaluation(name=OUTSIDE_DOMAIN, value=value)]


def _patient_group(
    finding: TriageFinding,
    frame_of_reference_uid: str,
    algorithm_id: hd.sr.AlgorithmIdentification,
    finding_sites: list[hd.sr.FindingSite] | None,
    annotation_key: str,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    pathology = codes.SCT.Malignant if finding.prediction.label == "malignant" else codes.SCT.Benign
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(annotation_key), identifier=ROI_TRACKING_IDENTIFIER
        ),
        referenced_region=region_at(
            finding.roi.polygon_yz_mm, finding.central_slice_x_mm, frame_of_reference_uid
        ),
        finding_type=FINDING_COMPRESSION_FRACTURE,
        finding_sites=finding_sites,
        algorithm_id=algorithm_id,
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.ProbabilityOfCancer,
                value=finding.prediction.patient_probability,
                unit=codes.UCUM.NoUnits,
                derivation=codes.SCT.Maximum,
                algorithm_id=algorithm_id,
            ),
            *domain_measurements(finding.prediction, algorithm_id),
        ],
        qualitative_evaluations=[
            *(
                []
                if finding.prediction.outside_domain
                else [hd.sr.QualitativeEvaluation(name=codes.DCM.Pathology, value=pathology)]
            ),
            *domain_evaluations(finding.prediction),
        ],
    )


def _slice_group(
    finding: TriageFinding,
    x_mm: float,
    probability: float,
    frame_of_reference_uid: str,
    algorithm_id: hd.sr.AlgorithmIdentification,
    finding_sites: list[hd.sr.FindingSite] | None,
    annotation_key: str,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(annotation_key, x_mm),
            identifier=f"{ROI_TRACKING_IDENTIFIER}, sagittal slice x={x_mm:g} mm",
        ),
        referenced_region=region_at(finding.roi.polygon_yz_mm, x_mm, frame_of_reference_uid),
        finding_type=FINDING_COMPRESSION_FRACTURE,
        finding_sites=finding_sites,
        algorithm_id=algorithm_id,
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.ProbabilityOfCancer,
                value=probability,
                unit=codes.UCUM.NoUnits,
                algorithm_id=algorithm_id,
            )
        ],
    )


def _algorithm_equipment(algorithm: AlgorithmInfo) -> hd.ContributingEquipment:
    description = "Malignant vertebral fracture triage (computer-aided triage, not a diagnosis)"
    if algorithm.demonstration:
        description = f"{description}. {DEMONSTRATION_NOTICE}"
    return hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.name,
        software_versions=[algorithm.version, algorithm.software_version],
        contribution_description=description,
    )


def _set_device_uid(sr: hd.sr.Comprehensive3DSR, algorithm: AlgorithmInfo) -> None:
    """Device UID is not a highdicom parameter; add it to the algorithm's equipment item."""
    for item in sr.ContributingEquipmentSequence:
        if (
            item.get("ManufacturerModelName") == algorithm.name
            and item.PurposeOfReferenceCodeSequence[0].CodeValue
            == codes.DCM.ProcessingEquipment.value
        ):
            item.DeviceUID = algorithm.device_uid
            return
    raise RuntimeError("the algorithm's Contributing Equipment item is missing")


def _is_valid_uid(value: str) -> bool:
    return len(value) <= 64 and _UID_PATTERN.fullmatch(value) is not None


def _distinct_points(points: Sequence[tuple[float, float]]) -> set[tuple[float, float]]:
    return {(float(y), float(z)) for y, z in points}
