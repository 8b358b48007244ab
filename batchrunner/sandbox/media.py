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
from functools import lru_cache
from pathlib import Path

CLIPS = sorted(Path(__file__).with_name("clips").glob("*.mp4"))
CONTENT_TYPES = {"image": "image/png", "video": "video/mp4", "audio": "audio/wav"}


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@lru_cache(maxsize=512)
def _png_body(prompt: str, size: int, variation: int = 0) -> bytes:
    """IHDR + IDAT of a size×size RGB picture: two colours from the prompt, in one of four patterns."""
    d = _digest(prompt)
    c1, c2 = bytes(d[0:3]), bytes(d[3:6])
    pattern, cell = (d[6] + variation) % 4, 8 + (d[7] + 7 * variation) % 24
    rows = []
    for y in range(size):
        if pattern == 0:  # horizontal stripes
            row = (c1 if (y // cell) % 2 else c2) * size
        elif pattern == 1:  # vertical stripes
            row = b"".join(c1 if (x // cell) % 2 else c2 for x in range(size))
        elif pattern == 2:  # checkerboard
            row = b"".join(c1 if ((x // cell) + (y // cell)) % 2 else c2 for x in range(size))
        else:  # vertical gradient
            t = y / max(1, size - 1)
            row = bytes(int(a * (1 - t) + b * t) for a, b in zip(c1, c2, strict=True)) * size
        rows.append(b"\x00" + row)
    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"".join(rows), 6))


def png(prompt: str, tag: str, size: int = 96) -> bytes:
    # colours follow the prompt; the pattern varies a little per task, so variants look like variants
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_body(prompt, size, _digest(tag)[0] % 3)
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
