"""Enhanced CT Image Storage: all slices of a synthetic series as frames of one instance.

Written with the functional groups the Enhanced CT IOD requires (pixel measures, plane
position and orientation, pixel value transformation, frame content with dimension indices,
CT frame type, acquisition, table, position, geometry, reconstruction, exposure and X-ray
details, frame anatomy, irradiation event), so that validators accept it as they accept the
classic CT Image Storage files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import EnhancedCTImageStorage, generate_uid

from model.synthetic.dicom import (
    RESCALE_INTERCEPT,
    SeriesIdentity,
    SeriesLayout,
    base_dataset,
    ds_values,
    encode_pixels,
    file_meta_for,
)

_FRAME_TYPE = ["ORIGINAL", "PRIMARY", "STATIC", "NONE"]
_ACQUISITION_DATETIME = "20240115101500"
_DIMENSION_POINTER_IMAGE_POSITION = 0x00200032
_DIMENSION_POINTER_PLANE_POSITION = 0x00209113


def _item(**attributes: object) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _sequence(**attributes: object) -> DicomSequence:
    return DicomSequence([_item(**attributes)])


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _shared_groups(layout: SeriesLayout, identity: SeriesIdentity) -> Dataset:
    field_of_view = ds_values(layout.pixel_spacing_mm * max(layout.rows, layout.columns))[0]
    shared = Dataset()
    shared.PixelMeasuresSequence = _sequence(
        PixelSpacing=ds_values(layout.pixel_spacing_mm, layout.pixel_spacing_mm),
        SliceThickness=ds_values(layout.slice_spacing_mm)[0],
        SpacingBetweenSlices=ds_values(layout.slice_spacing_mm)[0],
    )
    shared.PlaneOrientationSequence = _sequence(
        ImageOrientationPatient=[*layout.row_direction.tolist(), *layout.column_direction.tolist()]
    )
    shared.PixelValueTransformationSequence = _sequence(
        RescaleIntercept=RESCALE_INTERCEPT, RescaleSlope=1.0, RescaleType="HU"
    )
    shared.CTImageFrameTypeSequence = _sequence(
        FrameType=_FRAME_TYPE,
        PixelPresentation="MONOCHROME",
        VolumetricProperties="VOLUME",
        VolumeBasedCalculationTechnique="NONE",
    )
    shared.CTAcquisitionTypeSequence = _sequence(
        AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO"
    )
    shared.CTAcquisitionDetailsSequence = _sequence(
        DataCollectionDiameter=500.0,
        RevolutionTime=0.5,
        SingleCollimationWidth=0.625,
        TotalCollimationWidth=40.0,
        TableHeight=150.0,
        GantryDetectorTilt=0.0,
    )
    shared.CTTableDynamicsSequence = _sequence(
        TableSpeed=80.0, TableFeedPerRotation=40.0, SpiralPitchFactor=1.0
    )
    shared.CTGeometrySequence = _sequence(
        DistanceSourceToDetector=1085.6, DistanceSourceToDataCollectionCenter=595.0
    )
    shared.CTReconstructionSequence = _sequence(
        ReconstructionAlgorithm="FILTER_BACK_PROJ",
        ConvolutionKernel="BONE",
        ConvolutionKernelGroup="BONE",
        ReconstructionFieldOfView=[field_of_view, field_of_view],
        ReconstructionPixelSpacing=ds_values(layout.pixel_spacing_mm, layout.pixel_spacing_mm),
        ImageFilter="NONE",
        ReconstructionAngle=360.0,
    )
    shared.CTExposureSequence = _sequence(
        ExposureTimeInms=500.0,
        XRayTubeCurrentInmA=200.0,
        ExposureInmAs=100.0,
        ExposureModulationType="NONE",
    )
    shared.FrameVOILUTSequence = _sequence(WindowCenter=400.0, WindowWidth=1800.0)
    shared.CTXRayDetailsSequence = _sequence(
        KVP=120.0, FocalSpots=[0.7], FilterType="BODY", FilterMaterial=["ALUMINUM"]
    )
    shared.FrameAnatomySequence = _sequence(
        AnatomicRegionSequence=DicomSequence([_code("421060004", "SCT", "Spine")]),
        FrameLaterality="U",
    )
    shared.IrradiationEventIdentificationSequence = _sequence(
        IrradiationEventUID=generate_uid(
            entropy_srcs=[identity.series_instance_uid, "irradiation-event"]
        )
    )
    return shared


def write_enhanced_ct(
    series_dir: Path,
    slices: Sequence[np.ndarray],
    zs: np.ndarray,
    corner: np.ndarray,
    layout: SeriesLayout,
    identity: SeriesIdentity,
    syntax: str,
) -> Path:
    """One Enhanced CT Image Storage instance holding every slice as a frame."""
    sop_instance = generate_uid(entropy_srcs=[identity.series_instance_uid, "enhanced"])
    ds = base_dataset(identity, EnhancedCTImageStorage)
    ds.file_meta = file_meta_for(EnhancedCTImageStorage, sop_instance)
    ds.SOPInstanceUID = sop_instance
    ds.ImageType = _FRAME_TYPE
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = layout.rows, layout.columns
    ds.NumberOfFrames = layout.slices
    ds.PresentationLUTShape = "IDENTITY"
    ds.ContentQualification = "RESEARCH"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PatientPosition = "FFS" if layout.feet_first else "HFS"
    ds.AcquisitionDateTime = _ACQUISITION_DATETIME
    ds.AcquisitionDuration = 5.0
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.SoftwareVersions = "1"
    ds.DeviceSerialNumber = "PHANTOM-0001"
    for keyword in (
        "KVP",
        "AcquisitionDate",
        "AcquisitionTime",
        "AcquisitionNumber",
        "WindowCenter",
        "WindowWidth",
    ):
        if keyword in ds:
            delattr(ds, keyword)  # classic CT attributes; frames carry them here
    dimension_uid = generate_uid(entropy_srcs=[identity.series_instance_uid, "dimensions"])
    ds.DimensionOrganizationSequence = _sequence(DimensionOrganizationUID=dimension_uid)
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = _sequence(
        DimensionOrganizationUID=dimension_uid,
        DimensionIndexPointer=_DIMENSION_POINTER_IMAGE_POSITION,
        FunctionalGroupPointer=_DIMENSION_POINTER_PLANE_POSITION,
        DimensionDescriptionLabel="Image Position (Patient)",
    )
    ds.SharedFunctionalGroupsSequence = DicomSequence([_shared_groups(layout, identity)])
    order = list(range(layout.slices))
    if not layout.reverse_order:
        order.reverse()  # frame 1 at the top, as for the classic files
    # Dimension index values count along the patient (inferior → superior).
    per_frame = []
    for k in order:
        item = Dataset()
        item.PlanePositionSequence = _sequence(
            ImagePositionPatient=ds_values(corner[0], corner[1], zs[k])
        )
        item.FrameContentSequence = _sequence(
            FrameAcquisitionDateTime=_ACQUISITION_DATETIME,
            FrameReferenceDateTime=_ACQUISITION_DATETIME,
            FrameAcquisitionDuration=5000.0 / layout.slices,
            DimensionIndexValues=[k + 1],
        )
        item.CTPositionSequence = _sequence(
            TablePosition=ds_values(-zs[k])[0],
            ReconstructionTargetCenterPatient=ds_values(layout.center[0], layout.center[1], zs[k]),
            DataCollectionCenterPatient=ds_values(0.0, 0.0, zs[k]),
        )
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    encode_pixels(ds, np.stack([slices[k] for k in order]), syntax)
    path = series_dir / "CT_enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
