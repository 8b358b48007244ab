"""Real, valid media bytes for the sandbox's results: PNG images, MP4 videos, WAV audio.

Each file looks different per prompt (colours, pattern, clip, tone) so a gallery of a
sandbox run is meaningful, and carries the task id in a chunk every reader skips, so two
tasks never produce the same bytes. Pixels and tones are cached per prompt.
"""

from __future__ import annotations

import hashlib
import io
import math
import struct
import wave
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CLIPS = sorted(Path(__file__).with_name("clips").glob("*.mp4"))
CONTENT_TYPES = {"image": "image/png", "video": "video/mp4", "audio": "audio/wav"}


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@lru_cache(maxsize=512)
def _png_body(prompt: str, width: int, height: int, variation: int = 0) -> bytes:
    """IHDR + IDAT of a width×height RGB picture: two colours from the prompt, in one of four patterns."""
    d = _digest(prompt)
    c1, c2 = bytes(d[0:3]), bytes(d[3:6])
    pattern, cell = (d[6] + variation) % 4, 8 + (d[7] + 7 * variation) % 24
    rows = []
    for y in range(height):
        if pattern == 0:  # horizontal stripes
            row = (c1 if (y // cell) % 2 else c2) * width
        elif pattern == 1:  # vertical stripes
            row = b"".join(c1 if (x // cell) % 2 else c2 for x in range(width))
        elif pattern == 2:  # checkerboard
            row = b"".join(c1 if ((x // cell) + (y // cell)) % 2 else c2 for x in range(width))
        else:  # vertical gradient
            t = y / max(1, height - 1)
            row = bytes(int(a * (1 - t) + b * t) for a, b in zip(c1, c2, strict=True)) * width
        rows.append(b"\x00" + row)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"".join(rows), 6))


def png(prompt: str, tag: str, size: int = 96, aspect_ratio: str | None = None) -> bytes:
    """A text-to-image result at ``aspect_ratio`` (square if none), its longer side ``size`` pixels."""
    # colours follow the prompt; the pattern varies a little per task, so variants look like variants
    width, height = size_for(aspect_ratio, size)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_body(prompt, width, height, _digest(tag)[0] % 3)
        + _png_chunk(b"tEXt", b"task\x00" + tag.encode())
        + _png_chunk(b"IEND", b"")
    )


def mp4(prompt: str, tag: str) -> bytes:
    clip = _clip(CLIPS[_digest(prompt)[0] % len(CLIPS)])
    payload = tag.encode()
    return clip + struct.pack(">I", 8 + len(payload)) + b"free" + payload  # a top-level box players skip


@lru_cache(maxsize=8)
def _clip(path: Path) -> bytes:
    return path.read_bytes()


@lru_cache(maxsize=256)
def _tone(prompt: str) -> bytes:
    freq = 220 + _digest(prompt)[0] * 3
    rate = 8000
    frames = b"".join(struct.pack("<h", int(12000 * math.sin(2 * math.pi * freq * i / rate))) for i in range(rate // 2))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)
    return buf.getvalue()


def wav(prompt: str, tag: str) -> bytes:
    data = _tone(prompt)
    payload = tag.encode() + (b"\x00" if len(tag) % 2 else b"")
    extra = b"btid" + struct.pack("<I", len(payload)) + payload  # a RIFF chunk readers skip
    riff_size = len(data) - 8 + len(extra)
    return b"RIFF" + struct.pack("<I", riff_size) + data[8:] + extra


def render(modality: str, prompt: str, tag: str) -> tuple[bytes, str]:
    """The result file of a task: bytes and Content-Type."""
    maker = {"image": png, "video": mp4, "audio": wav}[modality]
    return maker(prompt, tag), CONTENT_TYPES[modality]


# -- outputs derived from inputs ---------------------------------------------------------------------
# A result that came from a source image shows that image: an edit keeps its colours at the
# requested aspect ratio, a cut-out keeps its pixels with transparency, a video pans across
# it. So a gallery shows where each result came from, and tests can tell.

MAX_SIDE = 256  # source pictures are kept at most this big (the sandbox only needs their look)
MAX_DECODE_PIXELS = 4_000_000  # larger PNGs are not decoded in pure Python: their colours come from a hash


@dataclass(frozen=True, slots=True)
class Picture:
    """RGBA pixels, row by row."""

    width: int
    height: int
    rgba: bytes

    def pixel(self, x: int, y: int) -> tuple[int, int, int, int]:
        i = 4 * (y * self.width + x)
        r, g, b, a = self.rgba[i : i + 4]
        return r, g, b, a


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def decode_png(data: bytes) -> Picture | None:
    """An 8-bit, non-interlaced PNG (grey, RGB, palette, with or without alpha) as RGBA; None for anything else."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    pos, idat, palette, trns = 8, [], b"", b""
    width = height = depth = colour = interlace = -1
    try:
        while pos + 8 <= len(data):
            (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
            body = data[pos + 8 : pos + 8 + length]
            pos += 12 + length
            if kind == b"IHDR":
                width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            elif kind == b"PLTE":
                palette = body
            elif kind == b"tRNS":
                trns = body
            elif kind == b"IDAT":
                idat.append(body)
            elif kind == b"IEND":
                break
        channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour)
        if depth != 8 or interlace != 0 or channels is None or width <= 0 or height <= 0 or width * height > MAX_DECODE_PIXELS:
            return None
        raw = zlib.decompress(b"".join(idat))
    except (struct.error, zlib.error, ValueError):
        return None
    stride = width * channels
    if len(raw) < height * (stride + 1):
        return None
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        flt, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        if flt == 1:
            for i in range(channels, stride):
                line[i] = (line[i] + line[i - channels]) & 0xFF
        elif flt == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif flt == 3:
            for i in range(stride):
                left = line[i - channels] if i >= channels else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif flt == 4:
            for i in range(stride):
                left, up_left = (line[i - channels], prev[i - channels]) if i >= channels else (0, 0)
                line[i] = (line[i] + _paeth(left, prev[i], up_left)) & 0xFF
        elif flt != 0:
            return None
        rows.append(bytes(line))
        prev = line
    flat = b"".join(rows)
    if colour == 6:
        rgba = flat
    elif colour == 2:
        rgba = b"".join(flat[i : i + 3] + b"\xff" for i in range(0, len(flat), 3))
    elif colour == 0:
        rgba = b"".join(bytes((v, v, v, 255)) for v in flat)
    elif colour == 4:
        rgba = b"".join(bytes((flat[i], flat[i], flat[i], flat[i + 1])) for i in range(0, len(flat), 2))
    else:  # palette
        if len(palette) < 3:
            return None
        table = [palette[3 * i : 3 * i + 3] + bytes((trns[i] if i < len(trns) else 255,)) for i in range(len(palette) // 3)]
        rgba = b"".join(table[v] if v < len(table) else b"\0\0\0\xff" for v in flat)
    return Picture(width, height, rgba)


def picture_of(data: bytes) -> Picture:
    """What a source image looks like: its decoded pixels (at most MAX_SIDE), or for formats the
    sandbox cannot decode without a library (JPEG, WebP, large PNGs), two colours from a hash of its bytes."""
    pic = decode_png(data)
    if pic is None:
        d = hashlib.sha256(data).digest()
        c1, c2 = bytes(d[0:3]) + b"\xff", bytes(d[3:6]) + b"\xff"
        pic = Picture(16, 16, b"".join((c1 if (x // 4 + y // 4) % 2 else c2) for y in range(16) for x in range(16)))
    scale = max(pic.width, pic.height) / MAX_SIDE
    if scale > 1:
        pic = resample(pic, max(1, round(pic.width / scale)), max(1, round(pic.height / scale)), cover=False)
    return pic


def resample(pic: Picture, width: int, height: int, *, cover: bool = True, zoom: float = 1.0, shift: float = 0.5) -> Picture:
    """``pic`` at ``width``×``height``, nearest neighbour. ``cover``: fill the frame, cropping what sticks out
    (``zoom`` > 1 crops more; ``shift`` in 0..1 slides the window from left to right); otherwise stretch."""
    sx, sy = pic.width / width, pic.height / height
    x0 = y0 = 0.0
    if cover:
        s = min(sx, sy) / zoom
        x0, y0 = (pic.width - width * s) * shift, (pic.height - height * s) / 2
        sx = sy = s
    src = pic.rgba
    cols = [4 * min(pic.width - 1, int(x0 + (x + 0.5) * sx)) for x in range(width)]
    rows = []
    for y in range(height):
        base = 4 * pic.width * min(pic.height - 1, int(y0 + (y + 0.5) * sy))
        rows.append(b"".join(src[base + c : base + c + 4] for c in cols))
    return Picture(width, height, b"".join(rows))


def size_for(aspect_ratio: str | None, longest: int) -> tuple[int, int]:
    """Width and height with exactly the ratio ``W:H`` (or ``WxH``), the longer side at most ``longest``."""
    w = h = 1
    if aspect_ratio:
        parts = aspect_ratio.replace("x", ":").replace("X", ":").split(":")
        if len(parts) == 2 and all(p.strip().isdigit() and int(p) > 0 for p in parts):
            w, h = int(parts[0]), int(parts[1])
            g = math.gcd(w, h)
            w, h = w // g, h // g
    unit = max(1, longest // max(w, h))
    return w * unit, h * unit


def encode_png(pic: Picture, tag: str, *, alpha: bool) -> bytes:
    """A PNG of ``pic`` (RGBA if ``alpha``, else RGB), with the task id in a tEXt chunk."""
    rows, stride = [], 4 * pic.width
    for y in range(pic.height):
        row = pic.rgba[y * stride : (y + 1) * stride]
        if not alpha:
            row = b"".join(row[i : i + 3] for i in range(0, stride, 4))
        rows.append(b"\x00" + row)
    ihdr = struct.pack(">IIBBBBB", pic.width, pic.height, 8, 6 if alpha else 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"".join(rows), 6))
        + _png_chunk(b"tEXt", b"task\x00" + tag.encode())
        + _png_chunk(b"IEND", b"")
    )


def edited(source: Picture, prompt: str, tag: str, size: tuple[int, int]) -> bytes:
    """An image edit: the source's pixels at the requested size, a quarter tinted towards the prompt's colour."""
    pic = resample(source, *size)
    tint = _digest(prompt)[:3]
    px = bytearray(pic.rgba)
    for i in range(0, len(px), 4):
        for c in range(3):
            px[i + c] = (3 * px[i + c] + tint[c]) // 4
    return encode_png(Picture(pic.width, pic.height, bytes(px)), tag, alpha=False)


def cut_out(source: Picture, tag: str, tolerance: int = 48) -> bytes:
    """A background removal: the source's own pixels, transparent where they match the corners' colour."""
    w, h = source.width, source.height
    corners = [source.pixel(x, y)[:3] for x, y in ((0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1))]
    bg = max(set(corners), key=corners.count)
    px = bytearray(source.rgba)
    for i in range(0, len(px), 4):
        if sum(abs(px[i + c] - bg[c]) for c in range(3)) <= tolerance:
            px[i + 3] = 0
    return encode_png(Picture(w, h, bytes(px)), tag, alpha=True)


def padded(data: bytes, min_bytes: int) -> bytes:
    """An MP4 grown to at least ``min_bytes`` with a ``free`` box (players skip it)."""
    missing = min_bytes - len(data)
    if missing <= 0:
        return data
    filler = max(8, missing)
    return data + struct.pack(">I", filler) + b"free" + bytes(filler - 8)


# -- a real H.264 video without an encoder ------------------------------------------------------------
# Every macroblock is I_PCM (raw samples, allowed by the Baseline profile), every frame an IDR
# picture: a valid stream any decoder plays, written with a bit writer and no codec library.

FPS, FRAMES = 12, 24


class _Bits:
    def __init__(self) -> None:
        self.out, self.acc, self.n = bytearray(), 0, 0

    def u(self, bits: int, value: int) -> None:
        for i in range(bits - 1, -1, -1):
            self.acc = (self.acc << 1) | ((value >> i) & 1)
            self.n += 1
            if self.n == 8:
                self.out.append(self.acc)
                self.acc = self.n = 0

    def ue(self, value: int) -> None:
        x = value + 1
        self.u(x.bit_length() - 1, 0)
        self.u(x.bit_length(), x)

    def se(self, value: int) -> None:
        self.ue(2 * value - 1 if value > 0 else -2 * value)

    def align_zero(self) -> None:
        while self.n:
            self.u(1, 0)

    def raw(self, data: bytes) -> None:
        assert self.n == 0
        self.out += data

    def trailing(self) -> bytes:
        self.u(1, 1)
        self.align_zero()
        return bytes(self.out)


def _nal(kind: int, rbsp: bytes) -> bytes:
    """A NAL unit (header + payload with emulation prevention), without a start code or length."""
    out, zeros = bytearray([0x60 | kind]), 0  # nal_ref_idc 3
    for b in rbsp:
        if zeros >= 2 and b <= 3:
            out.append(3)
            zeros = 0
        out.append(b)
        zeros = zeros + 1 if b == 0 else 0
    return bytes(out)


def _parameter_sets(width: int, height: int) -> tuple[bytes, bytes]:
    mbw, mbh = -(-width // 16), -(-height // 16)
    sps = _Bits()
    sps.u(8, 66)  # Baseline
    sps.u(8, 0xC0)  # constraint_set0/1
    sps.u(8, 30)  # level 3.0
    sps.ue(0)  # seq_parameter_set_id
    sps.ue(0)  # log2_max_frame_num_minus4
    sps.ue(2)  # pic_order_cnt_type: from frame_num
    sps.ue(1)  # max_num_ref_frames
    sps.u(1, 0)  # gaps_in_frame_num_value_allowed_flag
    sps.ue(mbw - 1)
    sps.ue(mbh - 1)
    sps.u(1, 1)  # frame_mbs_only_flag
    sps.u(1, 1)  # direct_8x8_inference_flag
    crop_r, crop_b = (16 * mbw - width) // 2, (16 * mbh - height) // 2
    sps.u(1, 1 if crop_r or crop_b else 0)
    if crop_r or crop_b:
        for v in (0, crop_r, 0, crop_b):
            sps.ue(v)
    sps.u(1, 0)  # vui_parameters_present_flag
    pps = _Bits()
    pps.ue(0)  # pic_parameter_set_id
    pps.ue(0)  # seq_parameter_set_id
    pps.u(1, 0)  # entropy_coding_mode_flag: CAVLC
    pps.u(1, 0)  # bottom_field_pic_order_in_frame_present_flag
    pps.ue(0)  # num_slice_groups_minus1
    pps.ue(0)  # num_ref_idx_l0_default_active_minus1
    pps.ue(0)  # num_ref_idx_l1_default_active_minus1
    pps.u(1, 0)  # weighted_pred_flag
    pps.u(2, 0)  # weighted_bipred_idc
    pps.se(0)  # pic_init_qp_minus26
    pps.se(0)  # pic_init_qs_minus26
    pps.se(0)  # chroma_qp_index_offset
    pps.u(1, 1)  # deblocking_filter_control_present_flag
    pps.u(1, 0)  # constrained_intra_pred_flag
    pps.u(1, 0)  # redundant_pic_cnt_present_flag
    return _nal(7, sps.trailing()), _nal(8, pps.trailing())


def _ycbcr(pic: Picture) -> tuple[bytes, bytes, bytes]:
    """BT.601 limited-range planes: Y at full size, Cb and Cr at half (the top-left sample of each 2×2)."""
    y_plane, cb_plane, cr_plane = bytearray(), bytearray(), bytearray()
    for i in range(0, len(pic.rgba), 4):
        r, g, b = pic.rgba[i], pic.rgba[i + 1], pic.rgba[i + 2]
        y_plane.append(16 + (65738 * r + 129057 * g + 25064 * b) // 256 // 1000)
    for y in range(0, pic.height, 2):
        for x in range(0, pic.width, 2):
            r, g, b, _ = pic.pixel(x, y)
            cb_plane.append(max(1, min(255, 128 + (-37945 * r - 74494 * g + 112439 * b) // 256 // 1000)))
            cr_plane.append(max(1, min(255, 128 + (112439 * r - 94154 * g - 18285 * b) // 256 // 1000)))
    return bytes(y_plane), bytes(cb_plane), bytes(cr_plane)


def _frame(pic: Picture, idr_id: int) -> bytes:
    """One IDR picture of I_PCM macroblocks (``pic`` is macroblock-aligned)."""
    y_plane, cb, cr = _ycbcr(pic)
    w, cw = pic.width, pic.width // 2
    bits = _Bits()
    bits.ue(0)  # first_mb_in_slice
    bits.ue(7)  # slice_type: I (all slices)
    bits.ue(0)  # pic_parameter_set_id
    bits.u(4, 0)  # frame_num
    bits.ue(idr_id)  # idr_pic_id: consecutive IDRs differ
    bits.u(1, 0)  # no_output_of_prior_pics_flag
    bits.u(1, 0)  # long_term_reference_flag
    bits.se(0)  # slice_qp_delta
    bits.ue(1)  # disable_deblocking_filter_idc
    for my in range(pic.height // 16):
        for mx in range(w // 16):
            bits.ue(25)  # mb_type I_PCM
            bits.align_zero()
            bits.raw(b"".join(y_plane[(16 * my + r) * w + 16 * mx : (16 * my + r) * w + 16 * mx + 16] for r in range(16)))
            for plane in (cb, cr):
                bits.raw(b"".join(plane[(8 * my + r) * cw + 8 * mx : (8 * my + r) * cw + 8 * mx + 8] for r in range(8)))
    return _nal(5, bits.trailing())


def _box(kind: bytes, *payload: bytes) -> bytes:
    data = b"".join(payload)
    return struct.pack(">I", 8 + len(data)) + kind + data


def _full(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, bytes([version]) + flags.to_bytes(3, "big"), *payload)


_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


def _mp4(width: int, height: int, samples: list[bytes], sps: bytes, pps: bytes) -> bytes:
    n = len(samples)
    avcc = _box(
        b"avcC", bytes([1, sps[1], sps[2], sps[3], 0xFF, 0xE1]), struct.pack(">H", len(sps)), sps, b"\x01", struct.pack(">H", len(pps)), pps
    )
    avc1 = _box(
        b"avc1", bytes(6), struct.pack(">H", 1), bytes(16), struct.pack(">HHII", width, height, 0x480000, 0x480000),
        struct.pack(">IH", 0, 1), bytes(32), struct.pack(">Hh", 0x18, -1), avcc,
    )  # fmt: skip

    def moov(offset: int) -> bytes:
        stbl = _box(
            b"stbl",
            _full(b"stsd", 0, 0, struct.pack(">I", 1), avc1),
            _full(b"stts", 0, 0, struct.pack(">III", 1, n, 1)),
            _full(b"stsc", 0, 0, struct.pack(">IIII", 1, 1, n, 1)),
            _full(b"stsz", 0, 0, struct.pack(">II", 0, n), *(struct.pack(">I", len(s)) for s in samples)),
            _full(b"stco", 0, 0, struct.pack(">II", 1, offset)),
        )
        minf = _box(
            b"minf", _full(b"vmhd", 0, 1, bytes(8)), _box(b"dinf", _full(b"dref", 0, 0, struct.pack(">I", 1), _full(b"url ", 0, 1))), stbl
        )
        mdia = _box(
            b"mdia",
            _full(b"mdhd", 0, 0, struct.pack(">IIII", 0, 0, FPS, n), struct.pack(">HH", 0x55C4, 0)),
            _full(b"hdlr", 0, 0, bytes(4), b"vide", bytes(12), b"VideoHandler\x00"),
            minf,
        )
        tkhd = _full(b"tkhd", 0, 3, struct.pack(">IIIII", 0, 0, 1, 0, n), bytes(8), struct.pack(">hhhH", 0, 0, 0, 0), _MATRIX,
                     struct.pack(">II", width << 16, height << 16))  # fmt: skip
        mvhd = _full(
            b"mvhd", 0, 0, struct.pack(">IIIIIH", 0, 0, FPS, n, 0x10000, 0x100), bytes(10), _MATRIX, bytes(24), struct.pack(">I", 2)
        )
        return _box(b"moov", mvhd, _box(b"trak", tkhd, mdia))

    ftyp = _box(b"ftyp", b"isom", struct.pack(">I", 512), b"isomiso2avc1mp41")
    head = ftyp + moov(0)
    return ftyp + moov(len(head) + 8) + _box(b"mdat", *samples)


@lru_cache(maxsize=64)
def _pan_video(source: Picture, size: tuple[int, int]) -> bytes:
    width, height = size[0] & ~1, size[1] & ~1
    mbw, mbh = 16 * -(-width // 16), 16 * -(-height // 16)
    sps, pps = _parameter_sets(width, height)
    samples = []
    for i in range(FRAMES):
        frame = resample(source, mbw, mbh, zoom=1.25, shift=i / (FRAMES - 1))
        nal = _frame(frame, i % 2)
        samples.append(struct.pack(">I", len(nal)) + nal)
    return _mp4(width, height, samples, sps, pps)


def video_of(source: Picture, tag: str, size: tuple[int, int]) -> bytes:
    """An image-to-video result: an H.264 MP4 panning across the source picture, the task id in a ``free`` box."""
    payload = tag.encode()
    return _pan_video(source, size) + struct.pack(">I", 8 + len(payload)) + b"free" + payload
