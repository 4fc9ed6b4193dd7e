"""Structural checks of PNG and JPEG data before a native decoder sees the bytes.

torchvision 0.29's libpng binding crashes the process (SIGSEGV) on some damaged PNGs, e.g. a
CRC error or an IDAT stream that ends early; its libjpeg binding and nvJPEG accept some
truncated JPEGs. Decompression bombs (a few KB declaring 16000x16000 pixels) cost GBs. So
:mod:`qvl_ros.core.conversion` runs :func:`check_png` / :func:`check_jpeg` on every compressed
frame and hands only data that passed to a decoder. Both are pure Python (``zlib``, ``re``,
``struct``); they raise :class:`ContainerError` with a short reason and a fixed ``key``.

PNG (ISO/IEC 15948): the signature; every chunk's length within the data and its CRC; IHDR
first, 13 bytes, sane width/height/bit depth/colour type/methods; the declared size against
``max_pixels`` (before anything is inflated); PLTE where the colour type needs it and of a
valid size, tRNS of the length its colour type implies; IDAT chunks present and consecutive;
IEND present; no unknown critical chunk. Then the concatenated IDAT stream is inflated with
Python's ``zlib`` in pieces of at most 1 MiB (never more than the size IHDR implies, so a zlib
bomb stops early): it must end (Adler-32 checked by zlib) exactly at the number of bytes the
header implies (all seven Adam7 passes when interlaced), with nothing after it, and every row's
filter type must be 0..4. With that, libpng meets no error path that reaches its error
handler. Cost: one extra inflate, about 1 ms per 640x480 RGB frame here.

JPEG (ITU T.81): SOI; a walk over the marker segments, each length within the data; exactly
one SOF before the first SOS, with 8- or 12-bit precision, a non-zero height (no DNL) and
width, 1..4 components with sampling factors 1..4; the declared size against ``max_pixels``;
at least one SOS; the entropy-coded data of every scan followed by a marker (stuffed 0xFF00
and RST markers are skipped), and EOI reached before the data ends. A stream cut anywhere is
rejected, also on the nvJPEG path. Damage inside the entropy-coded data that keeps this
structure is left to the decoder (libjpeg-turbo reports or tolerates it, like OpenCV).
"""
from __future__ import annotations

import re
import struct
import zlib
from typing import Any, List, Optional, Tuple

__all__ = ["ContainerError", "PNG_SIGNATURE", "JPEG_SOI", "check_png", "check_jpeg", "as_bytes_view"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
_INFLATE_PIECE = 1 << 20


class ContainerError(ValueError):
    """Data that must not reach the decoder; ``key`` is one of "corrupt", "too_large"."""

    def __init__(self, reason: str, key: str = "corrupt") -> None:
        super().__init__(reason)
        self.key = key


def as_bytes_view(data: Any) -> memoryview:
    """A flat unsigned-byte memoryview of ``data`` (bytes, array('B'), numpy uint8, list of ints)."""
    try:
        view = memoryview(data)
    except TypeError:
        return memoryview(bytes(data))
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _too_large(what: str, h: int, w: int, max_pixels: Optional[int]) -> None:
    if max_pixels and h * w > max_pixels:
        raise ContainerError(f"{what} declares {w}x{h} = {h * w} pixels, more than "
                             f"max_input_pixels {max_pixels}", key="too_large")


# ------------------------------------------------------------------------------------- PNG
# colour type -> (channels, allowed bit depths)
_PNG_COLOUR = {0: (1, (1, 2, 4, 8, 16)), 2: (3, (8, 16)), 3: (1, (1, 2, 4, 8)), 4: (2, (8, 16)),
               6: (4, (8, 16))}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
# Fixed lengths of ancillary chunks libpng parses (a wrong one is reported as an error by some
# libpng builds).
_PNG_FIXED = {b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"pHYs": 9, b"tIME": 7, b"oFFs": 9}


def _png_rows(h: int, w: int, bits_per_px: int, interlace: int) -> List[Tuple[int, int, int]]:
    """(offset, rows, bytes per row incl. the filter byte) of each pass of the inflated data."""
    def stride(width: int) -> int:
        return 1 + (width * bits_per_px + 7) // 8

    if interlace == 0:
        return [(0, h, stride(w))]
    passes, offset = [], 0
    for x0, y0, dx, dy in _ADAM7:
        pw, ph = (w - x0 + dx - 1) // dx, (h - y0 + dy - 1) // dy
        if pw > 0 and ph > 0:
            passes.append((offset, ph, stride(pw)))
            offset += ph * stride(pw)
    return passes


class _FilterBytes:
    """Checks the filter type byte at the start of every row of the inflated stream."""

    def __init__(self, passes: List[Tuple[int, int, int]]) -> None:
        self.passes = passes
        self.total = sum(rows * stride for _, rows, stride in passes)
        self.pos = 0

    def feed(self, out: bytes) -> None:
        lo, hi = self.pos, self.pos + len(out)
        if hi > self.total:
            raise ContainerError(f"cannot decode png: image data inflates to more than the "
                                 f"{self.total} bytes the header implies")
        for base, rows, stride in self.passes:
            end = base + rows * stride
            if end <= lo or base >= hi:
                continue
            first = base + max(0, -(-(lo - base) // stride)) * stride  # first row start >= lo
            for at in range(first, min(hi, end), stride):
                if out[at - lo] > 4:
                    row = (at - base) // stride
                    raise ContainerError(f"cannot decode png: row {row} has filter type {out[at - lo]}")
        self.pos = hi


def _png_chunks(view: memoryview):
    """(offset, type, payload) of each chunk up to IEND; lengths and CRCs checked."""
    n, pos = len(view), 8
    while True:
        if pos + 12 > n:
            raise ContainerError(f"cannot decode png: truncated at byte {pos} (no IEND)")
        length, ctype = struct.unpack_from(">I4s", view, pos)
        if length > 0x7FFFFFFF or not ctype.isalpha():
            raise ContainerError(f"cannot decode png: bad chunk header at byte {pos}")
        end = pos + 12 + length
        if end > n:
            raise ContainerError(f"cannot decode png: chunk {ctype.decode()} at byte {pos} declares "
                                 f"{length} bytes, {n - pos - 12} left (truncated)")
        crc = struct.unpack_from(">I", view, pos + 8 + length)[0]
        if zlib.crc32(view[pos + 4:pos + 8 + length]) != crc:
            raise ContainerError(f"cannot decode png: CRC error in chunk {ctype.decode()} at byte {pos}")
        yield pos, ctype, view[pos + 8:pos + 8 + length]
        if ctype == b"IEND":
            return
        pos = end


def _png_header(payload: memoryview, max_pixels: Optional[int]) -> Tuple[int, int, int, int, int]:
    if len(payload) != 13:
        raise ContainerError(f"cannot decode png: IHDR has {len(payload)} bytes, not 13")
    w, h, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", payload)
    if not (0 < w <= 0x7FFFFFFF and 0 < h <= 0x7FFFFFFF):
        raise ContainerError(f"cannot decode png: IHDR size {w}x{h} is invalid")
    if colour not in _PNG_COLOUR or depth not in _PNG_COLOUR[colour][1]:
        raise ContainerError(f"cannot decode png: bit depth {depth} with colour type {colour} is invalid")
    if comp != 0 or filt != 0 or interlace not in (0, 1):
        raise ContainerError("cannot decode png: unknown compression, filter or interlace method")
    _too_large("png", h, w, max_pixels)
    return h, w, depth, colour, interlace


def check_png(data: Any, max_pixels: Optional[int] = None) -> Tuple[int, int]:
    """Validate a PNG (see the module doc); returns its (height, width)."""
    view = as_bytes_view(data)
    if bytes(view[:8]) != PNG_SIGNATURE:
        raise ContainerError("cannot decode png: bad signature")
    header = None
    palette = 0
    idat: List[memoryview] = []
    idat_done = False
    seen = set()
    for pos, ctype, payload in _png_chunks(view):
        if header is None and ctype != b"IHDR":
            raise ContainerError(f"cannot decode png: first chunk is {ctype.decode()}, not IHDR")
        if ctype == b"IDAT":
            if idat_done:
                raise ContainerError(f"cannot decode png: IDAT at byte {pos} after other chunks")
            idat.append(payload)
            continue
        if idat:
            idat_done = True
        if ctype in seen and ctype in (b"IHDR", b"PLTE", b"tRNS") + tuple(_PNG_FIXED):
            raise ContainerError(f"cannot decode png: second {ctype.decode()} chunk")
        seen.add(ctype)
        if ctype == b"IHDR":
            header = _png_header(payload, max_pixels)
        elif ctype == b"PLTE":
            palette = _png_palette(payload, header, bool(idat))
        elif ctype == b"tRNS":
            _png_trns(payload, header, palette, bool(idat))
        elif ctype in _PNG_FIXED and len(payload) != _PNG_FIXED[ctype]:
            raise ContainerError(f"cannot decode png: {ctype.decode()} has {len(payload)} bytes")
        elif ctype != b"IEND" and not (ctype[0] & 0x20):  # unknown critical chunk
            raise ContainerError(f"cannot decode png: unknown critical chunk {ctype.decode()}")
    h, w, depth, colour, interlace = header
    if colour == 3 and not palette:
        raise ContainerError("cannot decode png: palette image without PLTE")
    if not idat:
        raise ContainerError("cannot decode png: no IDAT chunk")
    _png_inflate(idat, _png_rows(h, w, depth * _PNG_COLOUR[colour][0], interlace))
    return h, w


def _png_palette(payload: memoryview, header, after_idat: bool) -> int:
    _, _, depth, colour, _ = header
    entries, rest = divmod(len(payload), 3)
    if rest or not 1 <= entries <= 256 or after_idat or colour in (0, 4):
        raise ContainerError(f"cannot decode png: invalid PLTE ({len(payload)} bytes)")
    if colour == 3 and entries > (1 << depth):
        raise ContainerError(f"cannot decode png: PLTE has {entries} entries for {depth}-bit indices")
    return entries


def _png_trns(payload: memoryview, header, palette: int, after_idat: bool) -> None:
    colour = header[3]
    ok = {0: len(payload) == 2, 2: len(payload) == 6, 3: 0 < len(payload) <= palette}.get(colour, False)
    if not ok or after_idat:
        raise ContainerError(f"cannot decode png: invalid tRNS ({len(payload)} bytes, colour type {colour})")


def _png_inflate(idat: List[memoryview], passes: List[Tuple[int, int, int]]) -> None:
    rows = _FilterBytes(passes)
    inflater = zlib.decompressobj()
    try:
        for piece in idat:
            buf = bytes(piece)
            while buf and not inflater.eof:
                rows.feed(inflater.decompress(buf, _INFLATE_PIECE))
                buf = inflater.unconsumed_tail
            if inflater.eof and (buf or inflater.unused_data or piece is not idat[-1]):
                raise ContainerError("cannot decode png: data after the end of the image stream")
        while not inflater.eof:
            out = inflater.decompress(b"", _INFLATE_PIECE)
            if not out:
                break
            rows.feed(out)
    except zlib.error as exc:
        raise ContainerError(f"cannot decode png: corrupt image data ({exc})") from None
    if not inflater.eof or rows.pos != rows.total:
        raise ContainerError(f"cannot decode png: image data ends early ({rows.pos} of {rows.total} bytes)")


# ------------------------------------------------------------------------------------ JPEG
_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_STANDALONE = frozenset((0x01, *range(0xD0, 0xD8)))  # TEM, RST0..7
# A marker inside entropy-coded data: 0xFF followed by neither 0x00 (stuffing), RSTn nor 0xFF (fill).
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _jpeg_frame(view: memoryview, pos: int, length: int, max_pixels: Optional[int]) -> Tuple[int, int]:
    if length < 8:
        raise ContainerError(f"cannot decode jpeg: SOF at byte {pos} too short")
    precision, h, w, ncomp = struct.unpack_from(">BHHB", view, pos + 4)
    if precision not in (8, 12):
        raise ContainerError(f"cannot decode jpeg: unsupported sample precision {precision}")
    if h == 0 or w == 0:
        raise ContainerError(f"cannot decode jpeg: frame size {w}x{h} is invalid")
    if not 1 <= ncomp <= 4 or length != 8 + 3 * ncomp:
        raise ContainerError(f"cannot decode jpeg: SOF with {ncomp} components and length {length}")
    for c in range(ncomp):
        sampling = view[pos + 4 + 6 + 3 * c + 1]
        if not (1 <= sampling >> 4 <= 4 and 1 <= sampling & 15 <= 4):
            raise ContainerError(f"cannot decode jpeg: component {c} has sampling factors {sampling:#04x}")
    _too_large("jpeg", h, w, max_pixels)
    return h, w


def check_jpeg(data: Any, max_pixels: Optional[int] = None) -> Tuple[int, int]:
    """Validate a JPEG's structure (see the module doc); returns its (height, width)."""
    view = as_bytes_view(data)
    n = len(view)
    if bytes(view[:2]) != JPEG_SOI:
        raise ContainerError("cannot decode jpeg: no SOI marker")
    pos, size, scans = 2, None, 0
    while True:
        if pos + 2 > n:
            raise ContainerError(f"cannot decode jpeg: data ends at byte {n} before EOI (truncated)")
        if view[pos] != 0xFF:
            raise ContainerError(f"cannot decode jpeg: expected a marker at byte {pos}")
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            if not scans:
                raise ContainerError("cannot decode jpeg: EOI before any scan")
            return size
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD8, 0x00):
            raise ContainerError(f"cannot decode jpeg: unexpected marker 0xff{marker:02x} at byte {pos}")
        if pos + 4 > n:
            raise ContainerError(f"cannot decode jpeg: data ends at byte {n} inside a marker (truncated)")
        length = struct.unpack_from(">H", view, pos + 2)[0]
        end = pos + 2 + length
        if length < 2 or end > n:
            raise ContainerError(f"cannot decode jpeg: segment 0xff{marker:02x} at byte {pos} declares "
                                 f"{length} bytes, {n - pos - 2} left (truncated)")
        if marker in _SOF:
            if size is not None:
                raise ContainerError(f"cannot decode jpeg: second frame header at byte {pos}")
            size = _jpeg_frame(view, pos, length, max_pixels)
        elif marker == 0xDA:
            if size is None:
                raise ContainerError(f"cannot decode jpeg: scan at byte {pos} before the frame header")
            ns = view[pos + 4] if length > 2 else 0
            if not 1 <= ns <= 4 or length != 6 + 2 * ns:
                raise ContainerError(f"cannot decode jpeg: scan header at byte {pos} is invalid")
            scans += 1
            found = _NEXT_MARKER.search(view, end)
            if found is None:
                raise ContainerError(f"cannot decode jpeg: scan {scans} data runs to the end of the data "
                                     f"without EOI (truncated)")
            end = found.start()
        pos = end
