"""The one rendering path: a stored instance → pixel frames → a displayable JPEG or PNG.

WADO-URI, WADO-RS ``/rendered``, ``/thumbnail`` and ``/frames`` all come through here.
Compressed pixel data (JPEG, JPEG-LS, JPEG 2000, RLE) is decoded by pydicom with the pylibjpeg
plugins. Grey images get the modality LUT (rescale), then the VOI: the requested window, else
the stored window, else a stored VOI LUT, else the full range of the frame; MONOCHROME1 is
inverted so that it looks as the modality meant it. RGB and YBR come out as RGB, palette colour
through its lookup tables.
"""

from __future__ import annotations

import contextlib
import io
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, pixel_array
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

JPEG_QUALITY = 90
THUMBNAIL_SIZE = 128
NATIVE_LITTLE_ENDIAN = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}

# Media type of one frame in its stored encoding (PS3.18 Table 8.7.3-2).
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


class RenderError(ValueError):
    """The instance has no image to render (no pixel data, frame out of range, undecodable)."""


@dataclass(frozen=True)
class RenderOptions:
    """What the caller asked for; ``frame`` counts from 0."""

    frame: int = 0
    media_type: str = "image/jpeg"
    window: tuple[float, float] | None = None  # (center, width)
    max_rows: int | None = None
    max_columns: int | None = None
    quality: int = JPEG_QUALITY


# A stored instance's file: opened by the retrieve path (``retrieve.open_instance``), or a path.
Source = str | Path | BinaryIO


def read(source: Source) -> Dataset:
    if not isinstance(source, str | Path):
        source.seek(0)  # the same open file serves several reads (a frame's header, then its pixels)
    return pydicom.dcmread(source)


@contextlib.contextmanager
def _opened(source: Source) -> Iterator[BinaryIO]:
    """``source`` as a file at its start: a path opened (and closed after), a file object rewound."""
    if isinstance(source, str | Path):
        with open(source, "rb") as fp:
            yield fp
    else:
        source.seek(0)
        yield source


def number_of_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def _check_frame(ds: Dataset, frame: int) -> int:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise RenderError("the instance has no pixel data")
    count = number_of_frames(ds)
    if not 0 <= frame < count:
        raise RenderError(f"frame {frame + 1} does not exist: the instance has {count} frame(s)")
    return count


# -- frames as bytes (WADO-RS /frames) ----------------------------------------------------------
@dataclass(frozen=True)
class Frame:
    data: bytes
    transfer_syntax_uid: str
    media_type: str


def _native_frame_size(ds: Dataset) -> int | None:
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits % 8:
        return None  # bit-packed (1-bit) data: decoded by pydicom instead
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    return int(ds.Rows) * int(ds.Columns) * samples * (bits // 8)


def stored_frame(source: Source, frame: int) -> Frame:
    """One frame exactly as stored: a compressed frame's codestream, or native pixel bytes."""
    with _opened(source) as fp:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
        tsuid = UID(str(ds.file_meta.TransferSyntaxUID))
        size = _native_frame_size(ds) if tsuid in NATIVE_LITTLE_ENDIAN and "Rows" in ds else None
        if size is not None:
            # Fast path: seek straight to the frame, without reading the rest of the pixel data.
            count = number_of_frames(ds)
            if not 0 <= frame < count:
                raise RenderError(f"frame {frame + 1} does not exist: the instance has {count} frame(s)")
            header = fp.read(12)
            if len(header) < 8 or struct.unpack_from("<HH", header) != (0x7FE0, 0x0010):
                raise RenderError("the instance has no pixel data")
            fp.seek(fp.tell() - len(header) + (8 if tsuid == ImplicitVRLittleEndian else 12) + frame * size)
            data = fp.read(size)
            if len(data) != size:
                raise RenderError(f"pixel data of frame {frame + 1} is truncated")
            return Frame(data, str(tsuid), "application/octet-stream")
    ds = read(source)
    count = _check_frame(ds, frame)
    if tsuid.is_compressed:
        data = get_frame(ds.PixelData, frame, number_of_frames=count)
        return Frame(data, str(tsuid), FRAME_MEDIA_TYPES.get(str(tsuid), "application/octet-stream"))
    return Frame(_uncompressed_bytes(ds, frame), ExplicitVRLittleEndian, "application/octet-stream")


def uncompressed_frame(source: Source, frame: int) -> Frame:
    """One frame as native little-endian pixel bytes, decoding compressed data server-side."""
    stored = stored_frame(source, frame)
    if stored.transfer_syntax_uid in NATIVE_LITTLE_ENDIAN:
        return Frame(stored.data, ExplicitVRLittleEndian, "application/octet-stream")
    ds = read(source)
    return Frame(_uncompressed_bytes(ds, frame), ExplicitVRLittleEndian, "application/octet-stream")


def _uncompressed_bytes(ds: Dataset, frame: int) -> bytes:
    try:
        arr = pixel_array(ds, index=frame)
    except Exception as exc:
        raise RenderError(f"cannot decode the pixel data: {exc}") from None
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


# -- images (WADO-URI, /rendered, /thumbnail) ----------------------------------------------------
def decode(ds: Dataset, frame: int = 0) -> np.ndarray:
    """The pixel values of one frame: 2-D for grey, (rows, columns, 3) RGB for colour."""
    _check_frame(ds, frame)
    try:
        arr = pixel_array(ds, index=frame)
    except Exception as exc:
        raise RenderError(f"cannot decode the pixel data: {type(exc).__name__}: {exc}") from None
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        arr = arr[0]  # a single-frame request may come back with a leading frame axis
    return arr


def to_8bit(ds: Dataset, arr: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """Display values 0-255: LUTs and window for grey, colour lookup for palette images."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
        bits = int(descriptor[2]) if descriptor else 8
        return (rgb >> 8).astype(np.uint8) if bits > 8 else rgb.astype(np.uint8)
    if arr.ndim == 3:  # RGB (YBR was converted by the decoder)
        if arr.dtype == np.uint8:
            return arr[..., :3]
        top = float(2 ** int(ds.get("BitsStored", 16)) - 1)
        return np.clip(arr[..., :3].astype(np.float64) * (255.0 / top), 0, 255).astype(np.uint8)
    values = apply_modality_lut(arr, ds).astype(np.float64)
    if window is None:
        window = stored_window(ds)
    if window is not None:
        out = linear_window(values, *window, function=str(ds.get("VOILUTFunction", "LINEAR")).upper())
    elif "VOILUTSequence" in ds:
        lut = apply_voi(values, ds).astype(np.float64)
        out = _stretch(lut)
    else:
        out = _stretch(values)
    if photometric == "MONOCHROME1":
        out = 255.0 - out
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def stored_window(ds: Dataset) -> tuple[float, float] | None:
    """The first window (center, width) stored in the instance, if any."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
    except (TypeError, ValueError, IndexError):
        return None
    return (c, w) if w >= 1 and math.isfinite(c) and math.isfinite(w) else None


def linear_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """VOI windowing to 0-255 (PS3.3 C.11.2.1.2): LINEAR, LINEAR_EXACT or SIGMOID."""
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (values - center) / max(width, 1e-6)))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / max(width, 1e-6) + 0.5, 0, 1) * 255.0
    width = max(width, 1.0)
    return np.clip(((values - (center - 0.5)) / (width - 1.0 or 1.0) + 0.5), 0, 1) * 255.0


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return (values - low) * (255.0 / (high - low))


def encode(pixels: np.ndarray, options: RenderOptions) -> bytes:
    image = Image.fromarray(pixels, "RGB" if pixels.ndim == 3 else "L")
    if options.max_rows or options.max_columns:
        width = options.max_columns or image.width
        height = options.max_rows or image.height
        image.thumbnail((max(1, width), max(1, height)), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if options.media_type == "image/png":
        image.save(out, "PNG", compress_level=3)
    else:
        image.save(out, "JPEG", quality=max(1, min(100, options.quality)))
    return out.getvalue()


def render(source: Source, options: RenderOptions) -> bytes:
    """A stored instance's frame as JPEG or PNG."""
    ds = read(source)
    pixels = to_8bit(ds, decode(ds, options.frame), options.window)
    return encode(pixels, options)


def thumbnail(source: Source, media_type: str = "image/jpeg", size: int = THUMBNAIL_SIZE) -> bytes:
    """A small preview of the instance's middle frame."""
    ds = read(source)
    frame = number_of_frames(ds) // 2
    pixels = to_8bit(ds, decode(ds, frame))
    return encode(pixels, RenderOptions(media_type=media_type, max_rows=size, max_columns=size, quality=80))
