"""Hostile inputs, made here: encode-dataset, reconstruct and distill skip each with its reason (one line) and go
on. Decompression bombs (PNG, GIF and WebP headers claiming billions of pixels: refused from the header, naming
the limit, never decoded), truncated JPEG/PNG/WebP, empty files, 1x1 and 100000x1 images, a non-UTF-8 file name,
symbolic link loops, a pipe named like an image, a folder that cannot be listed, tar shards with path-traversal
member names (never written anywhere), a tar whose header lies about a member's size (never allocated), and
damaged tars in the middle of the list."""
import errno
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from flax_vae.train import data, distill
from PIL import Image

from flax_vae import cli, encode_dataset, images
from flax_vae.encode_dataset import read_shard, verify
from flax_vae.images import BUNDLED_PHOTOS

from conftest import encoded, write_tar

LIMIT = "is more than PIL.Image.MAX_IMAGE_PIXELS = 89478485 pixels"
NON_UTF8 = os.fsdecode(b"caf\xe9.png")  # Latin-1: not UTF-8; Python keeps the byte as a lone surrogate



def png_bomb(width, height) -> bytes:
    """A PNG header claiming width x height pixels, with a few bytes of image data."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def gif_bomb(width, height) -> bytes:
    """A 4x4 GIF whose logical screen claims width x height pixels."""
    data = bytearray(encoded(Image.new("P", (4, 4)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def webp_bomb(width, height) -> bytes:
    """A 4x4 lossless WebP whose VP8L header claims width x height pixels (at most 16384 a side)."""
    data = bytearray(encoded(Image.new("RGB", (4, 4)), "WEBP", lossless=True))
    flags = int.from_bytes(data[21:25], "little") & ~0xFFFFFFF  # 14 bits each for width - 1, height - 1
    data[21:25] = (flags | (height - 1) << 14 | (width - 1)).to_bytes(4, "little")
    return bytes(data)



@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """inputs/: four good photos (one with a non-UTF-8 name) among hostile files; tars with two more good images.
    -> (inputs, {key: what its skip reason says}, the keys that are encoded)."""
    inputs = tmp_path_factory.mktemp("hostile") / "inputs"
    photos = [Image.open(p).convert("RGB").resize((64, 64)) for p in BUNDLED_PHOTOS]
    jpeg, png, webp = encoded(photos[0], "JPEG"), encoded(photos[1], "PNG"), encoded(photos[2], "WEBP")
    files = {"good/a.jpg": jpeg, "good/b.png": png, "good/c.webp": webp, NON_UTF8: png,
             "bomb.png": png_bomb(100_000, 100_000), "bomb.gif": gif_bomb(65_535, 65_535),
             "bomb.webp": webp_bomb(16_384, 16_384), "truncated.jpg": jpeg[:len(jpeg) // 2],
             "truncated.png": png[:len(png) // 2], "truncated.webp": webp[:len(webp) // 2], "empty.png": b"",
             "1x1.png": encoded(Image.new("RGB", (1, 1)), "PNG"),
             "100000x1.png": encoded(Image.new("RGB", (100_000, 1)), "PNG"), "locked/hidden.jpg": jpeg}
    for name, content in files.items():
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        (inputs / name).write_bytes(content)
    (inputs / "links").mkdir()
    (inputs / "links/up").symlink_to("..")  # a loop back to inputs/
    (inputs / "links/loop1.jpg").symlink_to("loop2.jpg")
    (inputs / "links/loop2.jpg").symlink_to("loop1.jpg")
    os.mkfifo(inputs / "pipe.jpg")  # reading it would block forever
    write_tar(inputs / "shard-0.tar", {"0.jpg": jpeg, "1.txt": b"a caption"})
    write_tar(inputs / "shard-1.tar", {"0.png": png, "1.jpg": jpeg, "2.jpg": jpeg})
    damaged = bytearray((inputs / "shard-1.tar").read_bytes())
    second = 512 + -(-len(png) // 512) * 512  # the second member's header
    damaged[second:second + 100] = b"\x13" * 100
    (inputs / "shard-1.tar").write_bytes(bytes(damaged))
    write_tar(inputs / "shard-2.tar", {"../escape.jpg": jpeg, "/tmp/absolute.jpg": jpeg, "a/../../up.jpg": jpeg})
    (inputs / "shard-3.tar").write_bytes(np.random.default_rng(0).bytes(3000))  # not a tar at all
    lie = tarfile.TarInfo("huge.jpg")
    lie.size = 2 ** 40  # a terabyte claimed, 100 bytes there: never allocated
    (inputs / "shard-4.tar").write_bytes(lie.tobuf() + b"x" * 100)
    (inputs / "locked").chmod(0)
    skipped = {
        "bomb.png": LIMIT, "bomb.gif": LIMIT, "bomb.webp": LIMIT, "truncated.jpg": "image file is truncated",
        "truncated.png": "image file is truncated", "truncated.webp": "not a readable image",
        "empty.png": "not a readable image: not an image", "1x1.png": "1x1 is smaller than the minimum size 32",
        "100000x1.png": "1x100000 is smaller than the minimum size 32", "links/up": "a folder already searched",
        "links/loop1.jpg": "Too many levels of symbolic links", "links/loop2.jpg": "Too many levels of symbolic links",
        "pipe.jpg": "not a regular file", "locked": "cannot list this folder: Permission denied",
        "shard-1.tar": "a damaged header at byte", "shard-2.tar/../escape.jpg": "unsafe member name",
        "shard-2.tar//tmp/absolute.jpg": "unsafe member name", "shard-2.tar/a/../../up.jpg": "unsafe member name",
        "shard-3.tar": "damaged or not a plain (uncompressed) tar file",
        "shard-4.tar": "damaged or not a plain (uncompressed) tar file",
        "shard-4.tar/huge.jpg": f"truncated tar member: 100 of {2 ** 40} bytes"}
    good = {"good/a.jpg", "good/b.png", "good/c.webp", NON_UTF8, "shard-0.tar/0.jpg", "shard-1.tar/0.png"}
    yield inputs, skipped, good
    (inputs / "locked").chmod(0o755)


@pytest.fixture
def locked(hostile, monkeypatch):
    """inputs/locked cannot be listed. chmod 000 does that for everyone but root, which reads anything: as root,
    listing it is made to fail as it fails for anyone else (os.scandir raises PermissionError)."""
    folder = hostile[0] / "locked"
    if os.access(folder, os.R_OK):
        scandir = os.scandir

        def refused(path="."):
            if Path(path) == folder:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return scandir(path)
        monkeypatch.setattr(os, "scandir", refused)
    return folder


def test_encode_dataset_skips_each_with_its_reason(hostile, locked, tmp_path):
    inputs, skipped, good = hostile
    encode_dataset.encode_dataset("taesd", inputs, tmp_path / "out", resolution=64, shard_size=4, batch_size=8,
                                  progress=False)
    reasons = {s["key"]: s["reason"] for s in map(json.loads, (tmp_path / "out/skipped.jsonl").read_text().splitlines())}
    assert reasons.keys() == skipped.keys()
    for key, reason in skipped.items():
        assert reason in reasons[key] and "\n" not in reasons[key], (key, reasons[key])
    keys = [key for p in (tmp_path / "out").glob("latents-*.safetensors") for g in read_shard(p).values()
            for key in g["keys"]]
    assert sorted(keys) == sorted(good)  # each once, the non-UTF-8 name too
    assert verify(tmp_path / "out")[1] == []
    # nothing written outside the output, where the tar's member names point or anywhere else
    assert list(inputs.parent.iterdir()) == [inputs] and list(tmp_path.iterdir()) == [tmp_path / "out"]
    assert not Path("/tmp/absolute.jpg").exists()


def test_reconstruct_skips_each_with_its_reason(hostile, tmp_path, capsys):
    """Every line goes to a UTF-8 stdout that refuses undecodable bytes (capsys): a non-UTF-8 name is shown
    escaped, not a crash."""
    inputs, skipped, _ = hostile
    names = ["good/a.jpg", NON_UTF8, "bomb.png", "bomb.gif", "bomb.webp", "truncated.jpg", "truncated.png",
             "truncated.webp", "empty.png", "1x1.png", "100000x1.png", "links/loop1.jpg", "pipe.jpg", "good"]
    with pytest.raises(SystemExit, match="12 of 14 images failed"):
        cli.main(["reconstruct", *[str(inputs / n) for n in names], "--model", "taesd", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    shown = {n: images.printable(inputs / n) for n in names}
    for name, reason in {**{n: skipped[n] for n in names[2:9] + names[11:13]}, "1x1.png": "1x1 is smaller than the "
                         "model's factor 8x8", "100000x1.png": "1x100000 is smaller than the model's factor 8x8",
                         "good": "not a regular file"}.items():
        assert [line for line in lines if line.startswith(f"{shown[name]}: skipped: ") and reason in line], name
    assert any(line.startswith(f"{shown[NON_UTF8]}: 64x64  PSNR") for line in lines) and "caf\\xe9.png" in shown[NON_UTF8]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.jpg.reconstruction.png",
                                                                 f"{NON_UTF8}.reconstruction.png"])


def test_distill_skips_each_with_its_reason(hostile, locked, tmp_path):
    inputs, skipped, _ = hostile
    (tmp_path / "eval").mkdir()
    Image.open(BUNDLED_PHOTOS[0]).convert("RGB").resize((64, 64)).save(tmp_path / "eval/held.png")
    d = distill.Distiller(distill.Config(teacher="taesd", data=str(inputs), eval_data=str(tmp_path / "eval"),
                                         out=str(tmp_path / "run"), crop="32", batch_size=8, pool_size=8,
                                         eval_size=32))
    reasons = {path.relative_to(inputs).as_posix(): reason for path, reason in d.skipped}
    want = {k: v for k, v in skipped.items() if ".tar" not in k and k not in ("1x1.png", "100000x1.png")}
    want.update({"1x1.png": "1x1 is too small", "100000x1.png": "100000x1 is too small"})
    assert reasons.keys() == want.keys()
    for key, reason in want.items():
        assert reason in reasons[key], (key, reasons[key])
    assert len(d.crops.pyramids) == 4 and d.crops.sample(np.random.default_rng(0), 2, 32).shape == (2, 32, 32, 3)
    assert distill.skipped_line([(inputs / NON_UTF8, "why")]) == "skipped 1 unreadable image: caf\\xe9.png (why)"


def test_image_files_and_find_files_report_what_they_skip(hostile, locked):
    listing = []
    files = data.image_files(hostile[0], listing)
    assert NON_UTF8 in [f.name for f in files] and not [f for f in files if f.suffix == ".tar"]
    assert {p.name for p, _ in listing} == {"up", "loop1.jpg", "loop2.jpg", "pipe.jpg", "locked"}
    with pytest.raises(ValueError, match="locked: cannot list this folder: Permission denied"):
        images.find_files(locked, images.IMAGE_SUFFIXES)
