"""verify.py on real files: the sandbox's own media, small files made by ffmpeg (tests/media), and hand-broken copies."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from batchrunner.errors import MediaError
from batchrunner.sandbox import media
from batchrunner.verify import Media, verify

MEDIA = Path(__file__).resolve().parent / "media"
FIXTURES = {
    "tiny.jpg": Media("jpg", "image"),
    "tiny.gif": Media("gif", "image"),
    "tiny.webp": Media("webp", "image"),
    "tiny.mp3": Media("mp3", "audio"),
    "tiny.ogg": Media("ogg", "audio"),
    "tiny.flac": Media("flac", "audio"),
    "tiny.m4a": Media("m4a", "audio"),
    "tiny.webm": Media("webm", "video"),
    "audio.webm": Media("webm", "audio"),
    "tiny.mov": Media("mov", "video"),
    "tiny.mkv": Media("mkv", "video"),
}
PNG = media.png("a red bottle", "task-1")
MP4 = media.mp4("a watch turning", "task-2")
WAV = media.wav("a jingle", "task-3")


def reason(source: bytes | int | str | Path, modality: str = "unknown") -> str:
    with pytest.raises(MediaError) as caught:
        verify(source, modality)
    return caught.value.message


def test_the_sandbox_media_are_whole_and_of_their_modality() -> None:
    assert verify(PNG, "image") == Media("png", "image")
    assert verify(MP4, "video") == Media("mp4", "video")
    assert verify(WAV, "audio") == Media("wav", "audio")
    for clip in media.CLIPS:  # every shipped clip, with the free box the sandbox appends
        assert verify(media.mp4(clip.stem, "t"), "video").modality == "video"


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_files_made_by_ffmpeg_are_recognised_from_bytes_path_and_descriptor(name: str) -> None:
    path = MEDIA / name
    assert verify(path.read_bytes()) == FIXTURES[name]
    assert verify(path) == FIXTURES[name]
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 7, os.SEEK_SET)
        assert verify(fd) == FIXTURES[name]
        assert os.lseek(fd, 0, os.SEEK_CUR) == 7  # read by pread: the caller's offset is not moved
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_container_notices_a_cut_anywhere(name: str) -> None:
    data = (MEDIA / name).read_bytes()
    for cut in sorted({len(data) - 1, len(data) - 3, len(data) - 100, len(data) // 2, len(data) // 3, 40}):
        with pytest.raises(MediaError):
            verify(data[:cut])


def test_flac_cut_anywhere_by_its_metadata_its_last_frame_crc_or_its_sample_count() -> None:
    data = (MEDIA / "tiny.flac").read_bytes()
    assert reason(data[:30]) == "FLAC ends inside its metadata"
    pos = 4
    while not data[pos] & 0x80:  # to the last metadata block
        pos += 4 + int.from_bytes(data[pos + 1 : pos + 4], "big")
    frames = pos + 4 + int.from_bytes(data[pos + 1 : pos + 4], "big")
    assert reason(data[:frames]) == "FLAC ends before its audio frames"
    assert reason(data[:frames] + b"\x00\x00" + data[frames:]) == f"FLAC frame at byte {frames} is damaged"
    assert reason(data[:-1]) == "FLAC ends inside an audio frame (its CRC does not match)"
    total = ((data[8 + 13] & 0x0F) << 32) | int.from_bytes(data[8 + 14 : 8 + 18], "big")  # STREAMINFO's sample count
    syncs = [at for at in range(frames + 1, len(data) - 1) if data[at : at + 2] == b"\xff\xf8"]
    assert len(syncs) > 2
    for at in syncs:  # a cut between two frames leaves a last frame that ends before the stream's samples
        assert reason(data[:at]).endswith(f" of its {total} samples")


def test_png_cut_or_damaged() -> None:
    assert reason(PNG[:-1]).startswith("PNG ends before IEND (inside its IEND chunk")
    assert reason(PNG[:-12]).startswith("PNG ends before IEND")
    assert reason(PNG[: len(PNG) // 2]).startswith("PNG ends before IEND (inside its IDAT chunk")
    damaged = bytearray(PNG)
    damaged[12:16] = b"\x00\x01\x02\x03"  # the IHDR chunk's type
    assert reason(bytes(damaged)) == "PNG chunk at byte 8 is damaged"
    assert verify(PNG + b"\x00" * 10).kind == "png"  # bytes after IEND do not make an image broken


def test_mp4_boxes_must_add_up_to_the_file_and_include_moov() -> None:
    assert reason(MP4[:-5]) == f"MP4 ends inside its 'free' box: boxes add up to {len(MP4)} of {len(MP4) - 5} bytes"
    assert reason(MP4 + b"\x00\x00\x00") == f"MP4 boxes add up to {len(MP4)} of {len(MP4) + 3} bytes"
    boxes, pos = [], 0
    while pos < len(MP4):
        size, kind = struct.unpack(">I4s", MP4[pos : pos + 8])
        boxes.append((kind, MP4[pos : pos + size]))
        pos += size
    assert b"moov" in dict(boxes)
    assert reason(b"".join(box for kind, box in boxes if kind != b"moov")) == "MP4 has no 'moov' box (the index a player needs)"
    # a 64-bit size (size 1) and "to the end" (size 0) are read as the format says
    big = b"".join(struct.pack(">I4sQ", 1, kind, len(box) + 8) + box[8:] if kind == b"mdat" else box for kind, box in boxes)
    assert verify(big) == Media("mp4", "video")
    last_kind, last = boxes[-1]
    to_end = b"".join(box for _, box in boxes[:-1]) + struct.pack(">I4s", 0, last_kind) + last[8:]
    assert verify(to_end) == Media("mp4", "video")


def test_riff_sizes_must_match() -> None:
    assert reason(WAV[:-2]) == f"WAV is {len(WAV) - 2} bytes where its RIFF header says {len(WAV)}"
    assert reason(WAV + b"\x00\x00") == f"WAV is {len(WAV) + 2} bytes where its RIFF header says {len(WAV)}"
    webp = (MEDIA / "tiny.webp").read_bytes()
    assert reason(webp[:-1]) == f"WebP is {len(webp) - 1} bytes where its RIFF header says {len(webp)}"


def test_other_containers_name_what_is_missing() -> None:
    gif = (MEDIA / "tiny.gif").read_bytes()
    assert reason(gif[:-1]) == "GIF ends before its trailer"
    jpg = (MEDIA / "tiny.jpg").read_bytes()
    assert reason(jpg[:-2]) == "JPEG ends before EOI"
    assert verify(jpg + b"\x00" * 64).kind == "jpg"  # zero padding after EOI is harmless
    ogg = (MEDIA / "tiny.ogg").read_bytes()
    assert reason(ogg[:-1]) == f"Ogg ends inside a page (at byte {len(ogg) - 1} of {len(ogg)})"
    mp3 = (MEDIA / "tiny.mp3").read_bytes()
    assert reason(mp3[:-1]).startswith("MP3 ends inside a frame")
    assert reason(mp3[:20]) == "MP3 ends inside its ID3 tag, before any audio frame"
    webm = (MEDIA / "tiny.webm").read_bytes()
    assert reason(webm[:-1]).startswith(f"WEBM is {len(webm) - 1} bytes where its Segment ends at byte {len(webm)}")


def test_non_media_bodies_are_named_by_their_first_bytes() -> None:
    assert (
        reason(b'<?xml version="1.0" encoding="UTF-8"?><Error>Access Denied</Error>')
        == "not a media file: starts with '<?xml version=\"1.0\" enco'"
    )
    assert reason(b"<html><body>Access denied</body></html>") == "not a media file: starts with '<html><body>Access denie'"
    assert reason(b"") == "the result is empty (0 bytes)"
    rng = random.Random(3)
    for _ in range(200):  # random bytes declared image/png never pass
        body = rng.randbytes(rng.randrange(1, 4096))
        with pytest.raises(MediaError):
            verify(body)
    assert reason(bytes.fromhex("8f3a11002233445566")) == "not a media file: starts with bytes 8f 3a 11 00 22 33 44 55"


def test_the_modality_must_match_the_job() -> None:
    assert reason(MP4, "image") == "an image model's result is a video file (MP4)"
    assert reason(PNG, "audio") == "an audio model's result is an image file (PNG)"
    assert reason((MEDIA / "audio.webm").read_bytes(), "video") == "a video model's result is an audio file (WEBM)"
    assert verify(MP4, "unknown").kind == "mp4"  # a model not in the catalog accepts any verified media
    assert verify(WAV, "unknown").kind == "wav"


def test_a_large_file_is_checked_by_seeking(tmp_path: Path) -> None:
    # an 8 MiB 'mdat' before 'moov': only box headers are read
    mdat = struct.pack(">I4s", 8 + (8 << 20), b"mdat") + b"\x00" * (8 << 20)
    boxes, pos = {}, 0
    while pos < len(MP4):
        size, kind = struct.unpack(">I4s", MP4[pos : pos + 8])
        boxes[kind] = MP4[pos : pos + size]
        pos += size
    path = tmp_path / "big.mp4"
    path.write_bytes(boxes[b"ftyp"] + mdat + boxes[b"moov"])
    assert verify(path, "video") == Media("mp4", "video")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)
    assert reason(path).startswith("MP4 ends inside its 'moov' box")
    assert reason(tmp_path / "missing.mp4").startswith("cannot read")
