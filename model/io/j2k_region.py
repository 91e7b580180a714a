"""Decode a rectangle of a JPEG 2000 image without decoding the rest of it.

An ROI needs a few dozen columns and rows of each axial slice; JPEG 2000 can decode just the
code-blocks that cover them (``opj_set_decode_area``), several times faster than the whole
512×512 image. This module calls the OpenJPEG library that ``pylibjpeg-openjpeg`` ships (its
extension module exports the OpenJPEG API) through :mod:`ctypes`, which also releases the GIL
while OpenJPEG works, so slices decode in parallel threads.

When the library or a symbol is missing, :func:`region_decoder_available` is ``False`` and the
caller decodes whole frames with pydicom instead.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

_J2K_CODESTREAM_MAGIC = b"\xff\x4f\xff\x51"
_JP2_MAGIC = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_OPJ_CODEC_J2K = 0
_OPJ_CODEC_JP2 = 2
# opj_dparameters_t is opaque to us: OpenJPEG fills it with defaults; this is ample room.
_DPARAMETERS_BYTES = 64 * 1024


class J2kRegionError(ValueError):
    """OpenJPEG could not decode the codestream (or the requested region of it)."""


class _ImageComponent(ctypes.Structure):
    _fields_ = [
        ("dx", ctypes.c_uint32),
        ("dy", ctypes.c_uint32),
        ("w", ctypes.c_uint32),
        ("h", ctypes.c_uint32),
        ("x0", ctypes.c_uint32),
        ("y0", ctypes.c_uint32),
        ("prec", ctypes.c_uint32),
        ("bpp", ctypes.c_uint32),
        ("sgnd", ctypes.c_uint32),
        ("resno_decoded", ctypes.c_uint32),
        ("factor", ctypes.c_uint32),
        ("data", ctypes.POINTER(ctypes.c_int32)),
        ("alpha", ctypes.c_uint16),
    ]


class _Image(ctypes.Structure):
    _fields_ = [
        ("x0", ctypes.c_uint32),
        ("y0", ctypes.c_uint32),
        ("x1", ctypes.c_uint32),
        ("y1", ctypes.c_uint32),
        ("numcomps", ctypes.c_uint32),
        ("color_space", ctypes.c_int),
        ("comps", ctypes.POINTER(_ImageComponent)),
        ("icc_profile_buf", ctypes.c_void_p),
        ("icc_profile_len", ctypes.c_uint32),
    ]


_READ_FN = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_SKIP_FN = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_SEEK_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_void_p)
_OPJ_STREAM_READ_FAILED = ctypes.c_size_t(-1).value


@dataclass(frozen=True)
class DecodedRegion:
    """Stored values of a rectangle of one component, as the codestream says they are."""

    values: np.ndarray  # int32, shape (rows, columns)
    precision: int
    signed: bool


class _MemoryStream:
    """OpenJPEG stream callbacks reading from one bytes object."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0
        self.read = _READ_FN(self._read)
        self.skip = _SKIP_FN(self._skip)
        self.seek = _SEEK_FN(self._seek)

    def _read(self, buffer: int, size: int, _user: int) -> int:
        remaining = len(self.data) - self.position
        if remaining <= 0:
            return _OPJ_STREAM_READ_FAILED
        count = min(size, remaining)
        ctypes.memmove(buffer, self.data[self.position : self.position + count], count)
        self.position += count
        return count

    def _skip(self, count: int, _user: int) -> int:
        target = min(max(self.position + count, 0), len(self.data))
        moved = target - self.position
        self.position = target
        return moved

    def _seek(self, offset: int, _user: int) -> int:
        if not 0 <= offset <= len(self.data):
            return 0
        self.position = offset
        return 1


class _OpenJpeg:
    """The OpenJPEG functions we call, bound once per process."""

    def __init__(self, library: ctypes.CDLL) -> None:
        c_void_p, c_int, c_int32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int32
        image_pp = ctypes.POINTER(ctypes.POINTER(_Image))
        signatures: dict[str, tuple[object, list[object]]] = {
            "opj_create_decompress": (c_void_p, [c_int]),
            "opj_set_default_decoder_parameters": (None, [c_void_p]),
            "opj_setup_decoder": (c_int, [c_void_p, c_void_p]),
            "opj_set_decoded_resolution_factor": (c_int, [c_void_p, ctypes.c_uint32]),
            "opj_codec_set_threads": (c_int, [c_void_p, c_int]),
            "opj_stream_create": (c_void_p, [ctypes.c_size_t, c_int]),
            "opj_stream_set_read_function": (None, [c_void_p, _READ_FN]),
            "opj_stream_set_skip_function": (None, [c_void_p, _SKIP_FN]),
            "opj_stream_set_seek_function": (None, [c_void_p, _SEEK_FN]),
            "opj_stream_set_user_data_length": (None, [c_void_p, ctypes.c_uint64]),
            "opj_read_header": (c_int, [c_void_p, c_void_p, image_pp]),
            "opj_set_decode_area": (
                c_int,
                [c_void_p, ctypes.POINTER(_Image), c_int32, c_int32, c_int32, c_int32],
            ),
            "opj_decode": (c_int, [c_void_p, c_void_p, ctypes.POINTER(_Image)]),
            "opj_end_decompress": (c_int, [c_void_p, c_void_p]),
            "opj_stream_destroy": (None, [c_void_p]),
            "opj_destroy_codec": (None, [c_void_p]),
            "opj_image_destroy": (None, [ctypes.POINTER(_Image)]),
        }
        for name, (restype, argtypes) in signatures.items():
            function = getattr(library, name)
            function.restype = restype
            function.argtypes = argtypes
            setattr(self, name, function)

    def decode(
        self, codestream: bytes, columns: tuple[int, int], rows: tuple[int, int], reduce: int = 0
    ) -> DecodedRegion:
        fmt = _OPJ_CODEC_JP2 if codestream.startswith(_JP2_MAGIC) else _OPJ_CODEC_J2K
        if fmt == _OPJ_CODEC_J2K and not codestream.startswith(_J2K_CODESTREAM_MAGIC):
            raise J2kRegionError("not a JPEG 2000 codestream")
        stream = _MemoryStream(codestream)
        codec = self.opj_create_decompress(fmt)  # type: ignore[attr-defined]
        opj_stream = self.opj_stream_create(max(len(codestream), 1), 1)  # type: ignore[attr-defined]
        image = ctypes.POINTER(_Image)()
        try:
            parameters = ctypes.create_string_buffer(_DPARAMETERS_BYTES)
            self.opj_set_default_decoder_parameters(parameters)  # type: ignore[attr-defined]
            if not self.opj_setup_decoder(codec, parameters):  # type: ignore[attr-defined]
                raise J2kRegionError("cannot set up the JPEG 2000 decoder")
            self.opj_codec_set_threads(codec, 1)  # type: ignore[attr-defined]
            self.opj_stream_set_read_function(opj_stream, stream.read)  # type: ignore[attr-defined]
            self.opj_stream_set_skip_function(opj_stream, stream.skip)  # type: ignore[attr-defined]
            self.opj_stream_set_seek_function(opj_stream, stream.seek)  # type: ignore[attr-defined]
            self.opj_stream_set_user_data_length(opj_stream, len(codestream))  # type: ignore[attr-defined]
            if not self.opj_read_header(opj_stream, codec, ctypes.byref(image)):  # type: ignore[attr-defined]
                raise J2kRegionError("cannot read the JPEG 2000 header")
            header = image.contents
            if header.numcomps != 1:
                raise J2kRegionError(f"{header.numcomps} components; expected 1")
            x0, y0 = header.x0 + columns[0], header.y0 + rows[0]
            x1, y1 = header.x0 + columns[1], header.y0 + rows[1]
            if reduce and not self.opj_set_decoded_resolution_factor(codec, reduce):  # type: ignore[attr-defined]
                raise J2kRegionError(f"cannot decode at 1/{1 << reduce} resolution")
            if not self.opj_set_decode_area(codec, image, x0, y0, x1, y1):  # type: ignore[attr-defined]
                raise J2kRegionError(f"cannot set the decode area {columns} × {rows}")
            if not self.opj_decode(codec, opj_stream, image):  # type: ignore[attr-defined]
                raise J2kRegionError("JPEG 2000 decoding failed")
            self.opj_end_decompress(codec, opj_stream)  # type: ignore[attr-defined]
            component = image.contents.comps[0]
            width, height = int(component.w), int(component.h)
            expected = (
                _reduced(columns[0], columns[1], reduce),
                _reduced(rows[0], rows[1], reduce),
            )
            if (width, height) != expected or component.factor != reduce:
                raise J2kRegionError(
                    f"decoded a {width}×{height} region, expected {expected[0]}×{expected[1]}"
                )
            values = np.ctypeslib.as_array(component.data, shape=(height * width,))
            return DecodedRegion(
                values=values.reshape(height, width).copy(),
                precision=int(component.prec),
                signed=bool(component.sgnd),
            )
        finally:
            if image:
                self.opj_image_destroy(image)  # type: ignore[attr-defined]
            self.opj_stream_destroy(opj_stream)  # type: ignore[attr-defined]
            self.opj_destroy_codec(codec)  # type: ignore[attr-defined]


def _reduced(start: int, stop: int, reduce: int) -> int:
    """Samples of [start, stop) at resolution 1/2^reduce (JPEG 2000: ceil of the bounds)."""
    step = 1 << reduce
    return -(-stop // step) - -(-start // step)


_library_lock = threading.Lock()
_library: _OpenJpeg | None = None
_library_failed = False


def _extension_path() -> str:
    """The pylibjpeg-openjpeg extension module, which bundles OpenJPEG 2.5."""
    import importlib

    import openjpeg  # noqa: F401 - makes sure the package is installed

    for name in ("_openjpeg", "openjpeg._openjpeg"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        path = getattr(module, "__file__", None)
        if path:
            return str(path)
    raise ImportError("pylibjpeg-openjpeg's extension module was not found")


def _load() -> _OpenJpeg | None:
    global _library, _library_failed
    with _library_lock:
        if _library is None and not _library_failed:
            try:
                _library = _OpenJpeg(ctypes.CDLL(_extension_path()))
            except (ImportError, OSError, AttributeError) as exc:
                logger.info(
                    "JPEG 2000 region decoding unavailable (%s); decoding whole frames", exc
                )
                _library_failed = True
        return _library


def region_decoder_available() -> bool:
    """Whether :func:`decode_j2k_region` can be used in this process."""
    return _load() is not None


def decode_j2k_region(
    codestream: bytes, *, rows: tuple[int, int], columns: tuple[int, int], reduce: int = 0
) -> DecodedRegion:
    """Decode rows ``[rows[0], rows[1])`` × columns ``[columns[0], columns[1])`` of a
    single-component JPEG 2000 codestream (J2K or JP2). Releases the GIL while decoding.

    ``reduce`` > 0 decodes at 1/2^reduce resolution (OpenJPEG skips the finest wavelet
    levels, which is most of the work): the result has ceil(size / 2^reduce) samples per axis.
    """
    library = _load()
    if library is None:
        raise J2kRegionError("the OpenJPEG library is not available")
    return library.decode(codestream, columns, rows, reduce)
