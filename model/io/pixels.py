"""Decoding the pixel data of the slices a volume needs, as float32 Hounsfield units.

Any transfer syntax pydicom can decode (with the pylibjpeg plugins) works. JPEG 2000 frames
are decoded region-only (:mod:`model.io.j2k_region`) in parallel threads. Uncompressed
little-endian frames of 16-bit pixels are read straight from the file: only the rows a request
needs, without building a pydicom data set (:func:`read_native_rows`). Other frames are
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
# Read straight from the file (:func:`read_native_rows`): implicit and explicit VR little endian.
DIRECT_TRANSFER_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian


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


def read_native_rows(header: FrameHeader, rows: tuple[int, int]) -> np.ndarray | None:
    """Stored values of rows [start, stop) of an uncompressed little-endian frame of 16-bit
    pixels, read from the file without parsing it again (its header was read already), or
    None when the file is not laid out that way (pydicom then decodes it).

    The Pixel Data element must be the file's last, holding exactly every frame's pixels: its
    tag, VR (explicit VR) and length are checked right before the value, so a file with
    trailing elements, other bit depths, several samples per pixel or a wrong length falls
    back. The values are pydicom's: the bits above Bits Stored cleared, or the sign extended
    into them for signed pixels."""
    if header.transfer_syntax_uid not in DIRECT_TRANSFER_SYNTAXES:
        return None
    frame_bytes = header.rows * header.columns * 2
    total = frame_bytes * header.number_of_frames
    start, stop = rows
    if not 0 <= start < stop <= header.rows:
        return None
    try:
        descriptor = os.open(header.path, os.O_RDONLY)
    except OSError:
        return None  # pydicom reports it
    try:
        value_at = os.fstat(descriptor).st_size - total
        if value_at < 12:  # no room for the element's header (and the file's preamble)
            return None
        element = os.pread(descriptor, 12, value_at - 12)
        length = total.to_bytes(4, "little")
        explicit = header.transfer_syntax_uid == "1.2.840.10008.1.2.1"
        if explicit:
            if not (
                element[:4] == _PIXEL_DATA_TAG
                and element[4:6] in (b"OW", b"OB")
                and element[6:8] == b"\0\0"
                and element[8:] == length
            ):
                return None
        elif element[4:] != _PIXEL_DATA_TAG + length:
            return None
        first = value_at + (header.frame_index or 0) * frame_bytes + start * header.columns * 2
        wanted = (stop - start) * header.columns * 2
        data = os.pread(descriptor, wanted, first)
    finally:
        os.close(descriptor)
    if len(data) != wanted:
        return None
    dtype = "<i2" if header.pixel_representation == 1 else "<u2"
    stored = np.frombuffer(data, dtype=dtype).reshape(stop - start, header.columns)
    unused = 16 - header.bits_stored
    if 0 < unused < 16:  # the bits above Bits Stored cleared (or the sign extended), as pydicom
        stored = np.right_shift(np.left_shift(stored, unused), unused)
    return stored


def _read_direct(request: FrameRequest) -> np.ndarray | None:
    """The request's HU read straight from the file, or None (see :func:`read_native_rows`)."""
    stored = read_native_rows(request.header, request.rows)
    if stored is None:
        return None
    c0, c1 = request.columns
    return block_mean(_hounsfield(request.header, stored[:, c0:c1]), request.reduce)


def _block_sums(values: np.ndarray, bins: tuple[int, int]) -> np.ndarray:
    """Sums over ``bins`` (rows, columns) blocks of a 2-D array whose size is a multiple of
    them, added up as strided slices (integers in int32, floats in float64)."""
    rows = np.array(values[:: bins[0]], dtype=np.float64 if values.dtype.kind == "f" else np.int32)
    for offset in range(1, bins[0]):
        np.add(rows, values[offset :: bins[0]], out=rows)
    sums = np.array(rows[:, :: bins[1]])
    for offset in range(1, bins[1]):
        np.add(sums, rows[:, offset :: bins[1]], out=sums)
    return sums


def decode_block_sums(request: FrameRequest, bins: tuple[int, int]) -> np.ndarray:
    """Sums of HU over ``bins`` (rows, columns) blocks of the requested region, whose size
    must be a multiple of them: an uncompressed frame is summed as stored integers and scaled
    once per block, anything else is decoded whole by pydicom (``reduce`` must be 0)."""
    if request.reduce:
        raise ValueError("block sums are taken at full resolution")
    height, width = request.shape
    if height % bins[0] or width % bins[1]:
        raise ValueError(f"region {height}×{width} is not a whole number of {bins} blocks")
    stored = read_native_rows(request.header, request.rows)
    if stored is None:
        return _block_sums(decode_frames([request], workers=1)[0], bins)
    c0, c1 = request.columns
    slope, intercept = request.header.rescale_slope, request.header.rescale_intercept
    return _block_sums(stored[:, c0:c1], bins) * slope + bins[0] * bins[1] * intercept


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
        direct = _read_direct(request)
        if direct is not None:
            output[index] = direct
            frames_left[request.header.path] -= 1
            continue
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
