"""Decoding the pixel data of the slices a volume needs, as float32 Hounsfield units.

Any transfer syntax pydicom can decode (with the pylibjpeg plugins) works. JPEG 2000 frames
are decoded region-only (:mod:`model.io.j2k_region`) in parallel threads; other frames are
decoded whole by pydicom and cropped. A request may ask for a reduced resolution (1/2^reduce
per axis, for an overview): JPEG 2000 decodes it directly (OpenJPEG's ``reduce``), other
frames are decoded whole and averaged over 2^reduce × 2^reduce blocks.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import pixel_array

from model.io.headers import FrameHeader, UnreadableSliceError
from model.io.j2k_region import (
    DecodedRegion,
    J2kRegionError,
    decode_j2k_region,
    region_decoder_available,
)

logger = logging.getLogger(__name__)

NATIVE_TRANSFER_SYNTAXES = frozenset(
    {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
)
JPEG2000_TRANSFER_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})


@dataclass(frozen=True)
class FrameRequest:
    """One frame to decode, and the part of it wanted: rows and columns as [start, stop)."""

    header: FrameHeader
    rows: tuple[int, int]
    columns: tuple[int, int]
    reduce: int = 0  # decode at 1/2^reduce resolution per axis

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the decoded region."""
        return (
            reduced_size(self.rows[0], self.rows[1], self.reduce),
            reduced_size(self.columns[0], self.columns[1], self.reduce),
        )


def reduced_size(start: int, stop: int, reduce: int) -> int:
    """Samples of [start, stop) at 1/2^reduce resolution (as JPEG 2000 counts them)."""
    step = 1 << reduce
    return -(-stop // step) - -(-start // step)


def block_mean(values: np.ndarray, reduce: int) -> np.ndarray:
    """Mean over 2^reduce × 2^reduce blocks (the last blocks of a ragged edge are smaller)."""
    if reduce == 0:
        return values
    step = 1 << reduce
    rows, columns = values.shape
    padded_rows, padded_columns = -(-rows // step) * step, -(-columns // step) * step
    padded = np.pad(
        values.astype(np.float32), ((0, padded_rows - rows), (0, padded_columns - columns))
    )
    weights = np.pad(
        np.ones(values.shape, np.float32), ((0, padded_rows - rows), (0, padded_columns - columns))
    )
    shape = (padded_rows // step, step, padded_columns // step, step)
    return np.asarray(
        padded.reshape(shape).sum(axis=(1, 3)) / weights.reshape(shape).sum(axis=(1, 3))
    )


class _DatasetCache:
    """Reads each file once, even when several threads want frames of it."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._locks = {path: threading.Lock() for path in paths}
        self._datasets: dict[Path, Dataset] = {}

    def get(self, path: Path) -> Dataset:
        with self._locks[path]:
            dataset = self._datasets.get(path)
            if dataset is None:
                try:
                    dataset = pydicom.dcmread(path)
                except Exception as exc:
                    raise UnreadableSliceError(f"file {path.name}: cannot read ({exc})") from exc
                if "PixelData" not in dataset:
                    raise UnreadableSliceError(f"file {path.name}: no Pixel Data")
                self._datasets[path] = dataset
            return dataset

    def release(self, path: Path) -> None:
        """Forget a file whose frames are all decoded (its pixel data is not kept twice)."""
        with self._locks[path]:
            self._datasets.pop(path, None)


def _codestream(dataset: Dataset, header: FrameHeader) -> bytes:
    extended = None
    if "ExtendedOffsetTable" in dataset and "ExtendedOffsetTableLengths" in dataset:
        extended = (dataset.ExtendedOffsetTable, dataset.ExtendedOffsetTableLengths)
    return get_frame(
        dataset.PixelData,
        header.frame_index or 0,
        number_of_frames=header.number_of_frames,
        extended_offsets=extended,
    )


def _stored_from_region(header: FrameHeader, region: DecodedRegion) -> np.ndarray | None:
    """Stored values of a decoded region, or None when pydicom must decode the frame."""
    values = region.values
    if header.pixel_representation == 1 and not region.signed:
        # Signed data stored as an unsigned codestream: reinterpret the two's complement.
        limit = 1 << (region.precision - 1)
        return np.where(values >= limit, values - (1 << region.precision), values)
    if header.pixel_representation == 0 and region.signed:
        return None
    return values


def _whole_frame(dataset: Dataset, request: FrameRequest) -> np.ndarray:
    header = request.header
    if header.number_of_frames > 1:
        frame = pixel_array(dataset, index=header.frame_index)
    else:
        frame = dataset.pixel_array
    if frame.shape != (header.rows, header.columns):
        raise UnreadableSliceError(
            f"{header.describe()}: decoded shape {frame.shape}, expected "
            f"({header.rows}, {header.columns}); only single-sample images are supported"
        )
    r0, r1 = request.rows
    c0, c1 = request.columns
    return np.asarray(frame[r0:r1, c0:c1])


def _hounsfield(header: FrameHeader, stored: np.ndarray) -> np.ndarray:
    hounsfield = stored.astype(np.float32) * np.float32(header.rescale_slope)
    hounsfield += np.float32(header.rescale_intercept)
    return hounsfield


def _decode_whole(dataset: Dataset, request: FrameRequest) -> np.ndarray:
    try:
        return block_mean(
            _hounsfield(request.header, _whole_frame(dataset, request)), request.reduce
        )
    except UnreadableSliceError:
        raise
    except Exception as exc:  # pydicom and its plugins raise many types for bad pixel data
        raise UnreadableSliceError(
            f"{request.header.describe()}: cannot decode pixel data ({exc})"
        ) from exc


def _region_or_none(request: FrameRequest, codestream: bytes) -> DecodedRegion | None:
    """Runs in a decode thread: OpenJPEG works without the GIL."""
    try:
        return decode_j2k_region(
            codestream, rows=request.rows, columns=request.columns, reduce=request.reduce
        )
    except J2kRegionError as exc:
        logger.debug("%s: region decoding failed (%s)", request.header.describe(), exc)
        return None


def decode_frames(requests: Sequence[FrameRequest], *, workers: int | None = None) -> np.ndarray:
    """Decode the requested regions (all the same size) into one (n, rows, columns) array.

    Files are read in this thread; JPEG 2000 regions are then decoded in ``workers`` threads
    (OpenJPEG releases the GIL, and nothing else happens in those threads, so they do not
    queue for it); other frames are decoded whole by pydicom and cropped.
    """
    if not requests:
        raise ValueError("no frames to decode")
    shapes = {r.shape for r in requests}
    if len(shapes) != 1:
        raise ValueError(f"requested regions differ in size: {sorted(shapes)}")
    rows, columns = shapes.pop()
    output = np.empty((len(requests), rows, columns), dtype=np.float32)
    cache = _DatasetCache(sorted({r.header.path for r in requests}))
    region_path = region_decoder_available()
    codestreams: dict[int, bytes] = {}
    frames_left: dict[Path, int] = {}
    for request in requests:
        frames_left[request.header.path] = frames_left.get(request.header.path, 0) + 1
    for index, request in enumerate(requests):
        dataset = cache.get(request.header.path)
        frames_left[request.header.path] -= 1
        if region_path and request.header.transfer_syntax_uid in JPEG2000_TRANSFER_SYNTAXES:
            try:
                codestreams[index] = _codestream(dataset, request.header)
            except ValueError as exc:
                raise UnreadableSliceError(
                    f"{request.header.describe()}: cannot find the frame's data ({exc})"
                ) from exc
        else:
            output[index] = _decode_whole(dataset, request)
            if frames_left[request.header.path] == 0:
                cache.release(request.header.path)
    if not codestreams:
        return output
    order = sorted(codestreams)
    threads = min(workers if workers is not None else (os.cpu_count() or 1), len(order))
    if threads > 1:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
            regions = list(pool.map(lambda i: _region_or_none(requests[i], codestreams[i]), order))
    else:
        regions = [_region_or_none(requests[i], codestreams[i]) for i in order]
    for index, region in zip(order, regions, strict=True):
        request = requests[index]
        stored = None if region is None else _stored_from_region(request.header, region)
        if stored is None:  # region decoding failed or needs pydicom's corrections
            output[index] = _decode_whole(cache.get(request.header.path), request)
        else:
            output[index] = _hounsfield(request.header, stored)
    return output
