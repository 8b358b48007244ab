"""Is a file whole media, and of which kind? A structural check per container, by seeking.

A result counts as done only when its container says it is complete: a PNG's chunks run
through IEND; a JPEG's segments reach its scan and the file ends with EOI; an MP4/MOV/M4A's
top-level boxes add up exactly to the file and include ``moov``; a WAV's or WebP's RIFF size
is the file's; a GIF's blocks reach the trailer; an MP3's frames (after its ID3 tag) follow
each other to the end; an Ogg file's pages chain to an end-of-stream page; a FLAC file has
``fLaC``, STREAMINFO, and a last frame whose CRC-16 matches and which ends at the stream's
sample count; a WebM/Matroska file has its EBML header and a Segment that ends where the
file does (when its size is written). Anything else raises :class:`MediaError` with a plain
reason. Content-Length and Content-Type are not trusted: a cut body without Content-Length,
or an "Access denied" page sent as ``application/octet-stream``, fails here.

Only headers are read (through a small window cache), never the pixels or samples, so a
large file is checked with a few reads wherever it is: :func:`verify` takes bytes, a path
or a file descriptor. Checks are structural, not decoders: a file whose frames are garbage
inside a valid container passes. Known limits: an MP3 cut exactly between two frames, a
WAV written while streaming (its sizes left at 0 or 0xFFFFFFFF) and a WebM whose Segment
size is unknown cannot be told from whole ones; bytes after a PNG's IEND or zero bytes
after a JPEG's EOI are accepted (they do not make the image broken).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from .errors import MediaError

MODALITIES = ("image", "video", "audio")
_WINDOW = 1 << 16


@dataclass(frozen=True, slots=True)
class Media:
    """A verified file: ``kind`` is its container and file extension (png, jpg, mp4, …); ``modality`` image, video or audio."""

    kind: str
    modality: str


class _Source:
    """Random access to bytes or to an open file, through one cached window."""

    def __init__(self, data: bytes | None = None, fd: int | None = None) -> None:
        self._data, self._fd = data, fd
        self.size = len(data) if data is not None else os.fstat(fd).st_size if fd is not None else 0
        self._start, self._window = 0, b""

    def at(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes from ``offset`` (fewer at the end of the file)."""
        if self._data is not None:
            return self._data[offset : offset + n]
        assert self._fd is not None
        if not (self._start <= offset and offset + n <= self._start + len(self._window)):
            self._start, self._window = offset, os.pread(self._fd, max(n, _WINDOW), offset)
        return self._window[offset - self._start : offset - self._start + n]


def sniff(head: bytes) -> str | None:
    """The extension of a media file from its first bytes, or None if unrecognised: a quick guess, not a check (see :func:`verify`)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[4:8] == b"ftyp":
        return "mov" if head[8:10] == b"qt" else "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "webm"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"fLaC"):
        return "flac"
    if head.startswith(b"ID3") or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "mp3"
    return None


def verify(source: bytes | int | str | os.PathLike[str], modality: str = "unknown") -> Media:
    """The kind and modality of a whole media file, or :class:`MediaError` with the reason.

    ``source`` is the file's bytes, an open file descriptor (read with ``pread``; its offset
    is not moved) or a path. ``modality`` is what the job asked for: when it is image, video
    or audio the file must be of that modality ("unknown": any verified media).
    """
    if isinstance(source, bytes):
        media = _check(_Source(data=source))
    else:
        name = f"file descriptor {source}" if isinstance(source, int) else os.fspath(source)
        try:
            fd = source if isinstance(source, int) else os.open(source, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                media = _check(_Source(fd=fd))
            finally:
                if not isinstance(source, int):
                    os.close(fd)
        except OSError as exc:
            raise MediaError(f"cannot read {name}: {exc.strerror or exc}") from None
    if modality in MODALITIES and media.modality != modality:
        raise MediaError(f"{_a(modality)} model's result is {_a(media.modality)} file ({media.kind.upper()})")
    return media


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _check(src: _Source) -> Media:
    if src.size == 0:
        raise MediaError("the result is empty (0 bytes)")
    head = src.at(0, 32)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png(src)
    if head.startswith(b"\xff\xd8\xff"):
        return _jpeg(src)
    if head.startswith((b"GIF87a", b"GIF89a")):
        return _gif(src)
    if head[:4] == b"RIFF" and head[8:12] in (b"WAVE", b"WEBP"):
        return _riff(src, head[8:12])
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return _bmff(src)
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return _ebml(src)
    if head.startswith(b"OggS"):
        return _ogg(src)
    if head.startswith(b"fLaC"):
        return _flac(src)
    if head.startswith(b"ID3") or _mpeg_frame(head) is not None:
        return _mp3(src)
    raise MediaError(f"not a media file: starts with {_describe(head)}")


def _describe(head: bytes) -> str:
    """The first bytes as the user would recognise them: text quoted, anything else in hex."""
    text = head.rstrip(b"\x00")
    if text and all(32 <= b < 127 or b in (9, 10, 13) for b in text):
        return repr(text.decode("ascii").strip()[:24])
    return "bytes " + head[:8].hex(" ")


# -- images ---------------------------------------------------------------------------------
def _png(src: _Source) -> Media:
    pos, first = 8, True
    while True:
        header = src.at(pos, 8)
        if len(header) < 8:
            raise MediaError(f"PNG ends before IEND (at byte {src.size})")
        length, kind = struct.unpack(">I4s", header)
        if not kind.isalpha():
            raise MediaError(f"PNG chunk at byte {pos} is damaged")
        if first and kind != b"IHDR":
            raise MediaError("PNG does not start with IHDR")
        first = False
        end = pos + 12 + length
        if end > src.size:
            raise MediaError(f"PNG ends before IEND (inside its {kind.decode()} chunk, at byte {src.size} of {end})")
        if kind == b"IEND":
            return Media("png", "image")
        pos = end


def _jpeg(src: _Source) -> Media:
    pos, frame = 2, False
    while True:
        marker = src.at(pos, 2)
        if len(marker) < 2:
            raise MediaError("JPEG ends before its image data")
        if marker[0] != 0xFF:
            raise MediaError(f"JPEG segment at byte {pos} is damaged")
        code = marker[1]
        if code == 0xFF:  # fill byte
            pos += 1
            continue
        if code == 0xD9:
            raise MediaError("JPEG ends (EOI) before its image data")
        if code == 0x01 or 0xD0 <= code <= 0xD7:
            pos += 2
            continue
        raw = src.at(pos + 2, 2)
        if len(raw) < 2:
            raise MediaError("JPEG ends inside a header segment")
        pos += 2 + int.from_bytes(raw, "big")
        if 0xC0 <= code <= 0xCF and code not in (0xC4, 0xC8, 0xCC):
            frame = True
        if code == 0xDA:
            break
        if pos > src.size:
            raise MediaError("JPEG ends inside a header segment")
    if not frame:
        raise MediaError("JPEG has no frame header (SOF) before its image data")
    tail = src.at(max(pos, src.size - 4096), 4096).rstrip(b"\x00")  # zero padding after EOI is harmless
    if pos > src.size or not tail.endswith(b"\xff\xd9"):
        raise MediaError("JPEG ends before EOI")
    return Media("jpg", "image")


def _gif(src: _Source) -> Media:
    packed = src.at(10, 1)
    if not packed:
        raise MediaError("GIF ends inside its header")
    pos = 13 + (3 << ((packed[0] & 7) + 1) if packed[0] & 0x80 else 0)
    images = 0
    while True:
        block = src.at(pos, 1)
        if not block:
            raise MediaError("GIF ends before its trailer")
        if block == b"\x3b":
            if not images:
                raise MediaError("GIF has no image")
            return Media("gif", "image")
        if block == b"\x21":  # extension: label, then sub-blocks
            pos += 2
        elif block == b"\x2c":  # image: descriptor, local colour table, LZW code size, then sub-blocks
            flags = src.at(pos + 9, 1)
            if not flags:
                raise MediaError("GIF ends before its trailer")
            pos += 10 + (3 << ((flags[0] & 7) + 1) if flags[0] & 0x80 else 0) + 1
            images += 1
        else:
            raise MediaError(f"GIF block at byte {pos} is damaged")
        while True:
            n = src.at(pos, 1)
            if not n:
                raise MediaError("GIF ends before its trailer")
            pos += 1 + n[0]
            if n[0] == 0:
                break


def _riff(src: _Source, form: bytes) -> Media:
    name = "WAV" if form == b"WAVE" else "WebP"
    (size,) = struct.unpack("<I", src.at(4, 4))
    streamed = form == b"WAVE" and size in (0, 0xFFFFFFFF)  # written while streaming: the size was never filled in
    if not streamed and size + 8 != src.size:
        raise MediaError(f"{name} is {src.size} bytes where its RIFF header says {size + 8}")
    end, pos, seen = src.size, 12, []
    while pos + 8 <= end:
        kind, length = struct.unpack("<4sI", src.at(pos, 8))
        seen.append(kind)
        if streamed and kind == b"data" and length in (0, 0xFFFFFFFF):
            break
        pos += 8 + length + (length & 1)
        if pos > end + (length & 1):
            raise MediaError(f"{name} chunk {kind.decode('latin-1')!r} runs past the end of the file")
    if form == b"WAVE":
        if b"fmt " not in seen or b"data" not in seen:
            raise MediaError("WAV has no 'fmt ' or no 'data' chunk")
        return Media("wav", "audio")
    if not seen or seen[0] not in (b"VP8 ", b"VP8L", b"VP8X"):
        raise MediaError("WebP has no image chunk")
    return Media("webp", "image")


# -- video (and MP4 audio) --------------------------------------------------------------------
def _boxes(src: _Source, start: int, end: int, name: str) -> list[tuple[bytes, int, int]]:
    """The boxes between ``start`` and ``end`` as (type, payload start, box end); they must fill it exactly."""
    boxes, pos = [], start
    while pos < end:
        header = src.at(pos, 16)
        if len(header) < 8 or pos + 8 > end:
            raise MediaError(f"{name} boxes add up to {pos} of {end} bytes")
        size, kind = struct.unpack(">I4s", header[:8])
        body = pos + 8
        if size == 1:
            if len(header) < 16:
                raise MediaError(f"{name} boxes add up to {pos} of {end} bytes")
            (size,) = struct.unpack(">Q", header[8:16])
            body = pos + 16
        elif size == 0:
            size = end - pos
        if not all(32 <= b < 127 for b in kind) or size < body - pos:
            raise MediaError(f"{name} box at byte {pos} is damaged")
        if pos + size > end:
            raise MediaError(f"{name} ends inside its {kind.decode()!r} box: boxes add up to {pos + size} of {end} bytes")
        boxes.append((kind, body, pos + size))
        pos += size
    return boxes


def _bmff(src: _Source) -> Media:
    top = _boxes(src, 0, src.size, "MP4")
    kinds = [kind for kind, _, _ in top]
    if b"moov" not in kinds:
        raise MediaError("MP4 has no 'moov' box (the index a player needs)")
    brand = src.at(top[0][1], 4) if kinds[0] == b"ftyp" else b""
    kind = "mov" if brand == b"qt  " else "m4a" if brand in (b"M4A ", b"M4B ", b"M4P ") else "mp4"
    handlers: set[bytes] = set()
    try:
        for _, moov_start, moov_end in (box for box in top if box[0] == b"moov"):
            for trak in (b for b in _boxes(src, moov_start, moov_end, "MP4") if b[0] == b"trak"):
                for mdia in (b for b in _boxes(src, trak[1], trak[2], "MP4") if b[0] == b"mdia"):
                    for hdlr in (b for b in _boxes(src, mdia[1], mdia[2], "MP4") if b[0] == b"hdlr"):
                        handlers.add(src.at(hdlr[1] + 8, 4))
    except MediaError as exc:
        raise MediaError(f"MP4 'moov' box is damaged: {exc.message}") from None
    if b"vide" in handlers:
        return Media(kind, "video")
    if b"soun" in handlers:
        return Media("m4a" if kind == "mp4" else kind, "audio")
    return Media(kind, "audio" if kind == "m4a" else "video")


def _vint(src: _Source, pos: int, *, marker: bool) -> tuple[int, int]:
    """An EBML variable-length integer at ``pos``: (value, its length). Sizes drop the length marker; all ones is -1 (unknown)."""
    first = src.at(pos, 1)
    if not first or first[0] == 0:
        raise MediaError(f"WebM element at byte {pos} is damaged")
    length = 9 - first[0].bit_length()
    raw = src.at(pos, length)
    if len(raw) < length:
        raise MediaError(f"WebM ends inside an element header at byte {pos}")
    value = int.from_bytes(raw, "big")
    if not marker:
        value &= (1 << (7 * length)) - 1
        if value == (1 << (7 * length)) - 1:
            value = -1
    return value, length


def _element(src: _Source, pos: int) -> tuple[int, int, int | None]:
    """An EBML element at ``pos``: (id, payload start, end — None when its size is unknown)."""
    ident, n = _vint(src, pos, marker=True)
    size, m = _vint(src, pos + n, marker=False)
    body = pos + n + m
    return ident, body, None if size < 0 else body + size


def _ebml_children(src: _Source, start: int, end: int) -> list[tuple[int, int, int]]:
    """The (id, payload start, end) of the elements from ``start`` to ``end``; one of unknown size is the last."""
    found, pos = [], start
    while pos < end:
        ident, body, stop = _element(src, pos)
        found.append((ident, body, end if stop is None else stop))
        if stop is None:
            break
        pos = stop
    return found


def _ebml(src: _Source) -> Media:
    _, body, end = _element(src, 0)
    if end is None or end > src.size:
        raise MediaError("WebM ends inside its EBML header")
    doctype = next((src.at(b, e - b) for i, b, e in _ebml_children(src, body, end) if i == 0x4282), b"")
    kind = "webm" if doctype.rstrip(b"\x00") == b"webm" else "mkv"
    if end >= src.size:
        raise MediaError(f"{kind.upper()} has only its EBML header")
    ident, start, stop = _element(src, end)
    if ident != 0x18538067:
        raise MediaError(f"{kind.upper()} has no Segment after its EBML header")
    if stop is not None and stop != src.size:  # a Segment of known size ends where the file does
        raise MediaError(f"{kind.upper()} is {src.size} bytes where its Segment ends at byte {stop}")
    types: set[bytes] = set()
    for ident, first, last in _ebml_children(src, start, src.size if stop is None else stop):
        if ident == 0x1654AE6B:  # Tracks → TrackEntry → TrackType (1 video, 2 audio)
            for entry in (c for c in _ebml_children(src, first, last) if c[0] == 0xAE):
                types.update(src.at(b, 1) for i, b, _ in _ebml_children(src, entry[1], entry[2]) if i == 0x83)
            break
        if ident == 0x1F43B675:  # a Cluster: media data, and no Tracks before it
            break
    return Media(kind, "audio" if types == {b"\x02"} else "video")


# -- audio ----------------------------------------------------------------------------------
def _ogg(src: _Source) -> Media:
    pos, flags, first_body = 0, 0, b""
    while pos < src.size:
        header = src.at(pos, 27)
        if len(header) < 27:
            raise MediaError(f"Ogg ends inside a page header at byte {pos}")
        if header[:4] != b"OggS":
            raise MediaError(f"Ogg page at byte {pos} is damaged")
        flags, count = header[5], header[26]
        table = src.at(pos + 27, count)
        body = pos + 27 + count
        if not first_body:
            first_body = src.at(body, 8)
        pos = body + sum(table)
        if len(table) < count or pos > src.size:
            raise MediaError(f"Ogg ends inside a page (at byte {src.size} of {pos})")
    if not flags & 0x04:
        raise MediaError("Ogg ends before its last page (no end-of-stream page)")
    return Media("ogg", "video" if first_body.startswith(b"\x80theora") else "audio")


def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005 if crc & 0x8000 else crc << 1) & 0xFFFF
        table.append(crc)
    return tuple(table)


_CRC16 = _crc16_table()  # FLAC's frame CRC: polynomial 0x8005, initial value 0


def _crc16(data: bytes) -> int:
    crc, table = 0, _CRC16
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[(crc >> 8) ^ byte]
    return crc


def _flac(src: _Source) -> Media:
    pos, first, info = 4, True, b""
    while True:
        header = src.at(pos, 4)
        if len(header) < 4:
            raise MediaError("FLAC ends inside its metadata")
        last, kind, length = header[0] & 0x80, header[0] & 0x7F, int.from_bytes(header[1:], "big")
        if first:
            if kind != 0 or length != 34:
                raise MediaError("FLAC does not start with STREAMINFO")
            info = src.at(pos + 4, 34)
        first = False
        pos += 4 + length
        if last:
            break
    if src.at(pos, 2) not in (b"\xff\xf8", b"\xff\xf9"):
        raise MediaError("FLAC ends before its audio frames" if pos >= src.size else f"FLAC frame at byte {pos} is damaged")
    # Frames carry no length, but each ends with a CRC-16 of itself: the last one starts at a sync code within the
    # largest frame's size of the end and its CRC matches, or the file was cut inside it. Cut between two frames,
    # the last frame ends before the stream's total samples (STREAMINFO; 0 when not known).
    max_block, max_frame = int.from_bytes(info[2:4], "big"), int.from_bytes(info[7:10], "big")
    total = ((info[13] & 0x0F) << 32) | int.from_bytes(info[14:18], "big")
    start = max(pos, src.size - (max_frame or 1 << 16))
    tail = src.at(start, src.size - start)
    at = len(tail) - 2
    while (at := tail.rfind(b"\xff", 0, at)) >= 0:
        if tail[at + 1 : at + 2] in (b"\xf8", b"\xf9") and _crc16(tail[at:-2]) == int.from_bytes(tail[-2:], "big"):
            end = _flac_frame_end(tail[at : at + 16], max_block)
            if total and end is not None and end < total:
                raise MediaError(f"FLAC ends after {end} of its {total} samples")
            return Media("flac", "audio")
    raise MediaError("FLAC ends inside an audio frame (its CRC does not match)")


def _flac_frame_end(header: bytes, fixed_block: int) -> int | None:
    """The sample number just past the frame whose header starts ``header`` (None if it cannot be read)."""
    if len(header) < 6:
        return None
    variable, code = header[1] & 1, header[2] >> 4
    lead = 8 - (header[4] ^ 0xFF).bit_length()  # the frame (or sample) number, UTF-8 style
    if lead == 1 or lead > 7:
        return None
    width = max(lead, 1)
    number = header[4] & (0x7F >> lead) if lead else header[4]
    for byte in header[5 : 4 + width]:
        number = (number << 6) | (byte & 0x3F)
    extra = header[4 + width : 6 + width]
    if code == 1:
        block = 192
    elif 2 <= code <= 5:
        block = 576 << (code - 2)
    elif code == 6 and extra:
        block = extra[0] + 1
    elif code == 7 and len(extra) == 2:
        block = int.from_bytes(extra, "big") + 1
    elif code >= 8:
        block = 256 << (code - 8)
    else:
        return None
    return (number if variable else number * fixed_block) + block


_MP3_KBPS = {  # (MPEG-1?, layer) → kbit/s per bitrate index
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}  # by version bits


def _mpeg_frame(header: bytes) -> int | None:
    """The length of the MPEG audio frame whose header starts ``header`` (0: free format), or None if it is not one."""
    if len(header) < 4 or header[0] != 0xFF or header[1] & 0xE0 != 0xE0:
        return None
    version, layer_bits = (header[1] >> 3) & 3, (header[1] >> 1) & 3
    bitrate, rate_index, padding = header[2] >> 4, (header[2] >> 2) & 3, (header[2] >> 1) & 1
    if version == 1 or layer_bits == 0 or bitrate == 15 or rate_index == 3:
        return None
    layer, mpeg1 = 4 - layer_bits, version == 3
    kbps, rate = _MP3_KBPS[(mpeg1, layer)][bitrate], _MP3_RATES[version][rate_index]
    if kbps == 0:
        return 0
    if layer == 1:
        return (12000 * kbps // rate + padding) * 4
    return (144000 if mpeg1 or layer == 2 else 72000) * kbps // rate + padding


def _mp3(src: _Source) -> Media:
    pos = 0
    while src.at(pos, 3) == b"ID3":
        tag = src.at(pos, 10)
        if len(tag) < 10:
            raise MediaError("MP3 ends inside its ID3 tag")
        size = (tag[6] << 21) | (tag[7] << 14) | (tag[8] << 7) | tag[9]
        pos += 10 + size + (10 if tag[5] & 0x10 else 0)
    if pos >= src.size:
        raise MediaError("MP3 ends inside its ID3 tag, before any audio frame")
    frames = 0
    while pos < src.size:
        header = src.at(pos, 4)
        length = _mpeg_frame(header)
        if length is None:
            if frames and header[:3] in (b"TAG", b"ID3", b"APE", b"LYR"):  # tags after the audio
                break
            raise MediaError(f"MP3 has no audio frame at byte {pos}" if not frames else f"MP3 frame at byte {pos} is damaged")
        frames += 1
        if length == 0:  # free format: frame lengths are not written down; the first frame is all we can check
            break
        if pos + length > src.size:
            raise MediaError(f"MP3 ends inside a frame (at byte {src.size} of {pos + length})")
        pos += length
    return Media("mp3", "audio")
