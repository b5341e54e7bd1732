"""images.py: header probes that never decode, RGB decoding as users see it, hostile files refused."""

from __future__ import annotations

import hashlib
import os
import socket
import time

import numpy as np
import pytest
from PIL import Image, ImageFile

from flux2_lora_core.data import images
from flux2_lora_core.data.images import load_image_rgb, probe_image, verify_image_file
from flux2_lora_core.errors import ImageError

pytestmark = pytest.mark.timeout(60)


def code_of(call, *args):
    with pytest.raises(ImageError) as info:
        call(*args)
    return info.value.code, str(info.value)


@pytest.fixture
def no_decoding(monkeypatch):
    """Any attempt to decode pixels fails the test: probes must read headers only."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.parametrize("name, fmt", [("a.jpg", "JPEG"), ("a.png", "PNG"), ("a.webp", "WEBP"), ("a.bmp", "BMP"),
                                       ("a.tif", "TIFF")])
def test_probe_reads_size_format_mode_and_file_size(tmp_path, make_image, name, fmt):
    path = make_image(tmp_path / name, (120, 90))
    info = probe_image(path)
    assert (info.width, info.height, info.format, info.n_frames) == (120, 90, fmt, 1)
    assert info.mode == "RGB" and info.file_size == path.stat().st_size and info.orientation == 1


def exif(orientation: int) -> Image.Exif:
    data = Image.Exif()
    data[0x0112] = orientation
    return data


def left_red_right_blue(path, fmt=None):
    im = Image.new("RGB", (100, 50), "red")
    im.paste((0, 0, 255), (50, 0, 100, 50))
    im.save(path, format=fmt, exif=exif(6))
    return path


@pytest.mark.parametrize("name", ["o.jpg", "o.png", "o.webp", "o.tif"])
def test_exif_orientation_6_probes_rotated_without_decoding(tmp_path, name, no_decoding):
    path = left_red_right_blue(tmp_path / name)
    info = probe_image(path)
    assert (info.width, info.height, info.orientation) == (50, 100, 6)


def test_exif_orientation_6_loads_rotated_clockwise(tmp_path):
    im = load_image_rgb(left_red_right_blue(tmp_path / "o.png"))
    assert im.size == (50, 100) and im.mode == "RGB"
    assert im.getpixel((25, 5)) == (255, 0, 0)  # the left (red) half is now on top
    assert im.getpixel((25, 95)) == (0, 0, 255)


@pytest.mark.parametrize("mode, color, expected", [
    ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent red: white, not red or black
    ("RGBA", (0, 0, 0, 128), (127, 127, 127)),  # half-transparent black over white
    ("LA", (0, 0), (255, 255, 255)),
    ("LA", (0, 255), (0, 0, 0)),
])
def test_transparency_is_composited_on_white(tmp_path, mode, color, expected):
    path = tmp_path / f"{mode}.png"
    Image.new(mode, (8, 8), color).save(path)
    pixel = load_image_rgb(path).getpixel((3, 3))
    assert all(abs(a - b) <= 1 for a, b in zip(pixel, expected)), pixel


def test_palette_with_transparent_index_and_rgb_colour_key_become_white(tmp_path):
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.save(tmp_path / "p.png", transparency=0)
    im = load_image_rgb(tmp_path / "p.png")
    assert im.getpixel((0, 0)) == (255, 255, 255) and im.getpixel((1, 1)) == (255, 0, 0)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "key.png", transparency=(1, 2, 3))
    assert load_image_rgb(tmp_path / "key.png").getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("name", ["c.jpg", "c.tif"])
def test_cmyk_converts_to_rgb(tmp_path, name):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / name)
    assert probe_image(tmp_path / name).mode == "CMYK"
    r, g, b = load_image_rgb(tmp_path / name).getpixel((4, 4))
    assert r > 240 and g < 15 and b < 15


def test_16_bit_grey_png_scales_to_8_bits_instead_of_clipping(tmp_path):
    Image.new("I;16", (8, 8), 32768).save(tmp_path / "g.png")
    assert probe_image(tmp_path / "g.png").mode == "I;16"
    assert load_image_rgb(tmp_path / "g.png").getpixel((0, 0)) == (128, 128, 128)


def test_big_endian_int_and_float_grey_tiffs_scale_correctly(tmp_path):
    data = np.full((4, 4), 65535, dtype=">u2")
    Image.frombytes("I;16B", (4, 4), data.tobytes()).save(tmp_path / "b.tif")
    assert load_image_rgb(tmp_path / "b.tif").getpixel((0, 0)) == (255, 255, 255)
    Image.new("I", (4, 4), 16384).save(tmp_path / "i.tif")
    assert load_image_rgb(tmp_path / "i.tif").getpixel((0, 0)) == (64, 64, 64)
    Image.new("F", (4, 4), 0.5).save(tmp_path / "f.tif")
    assert load_image_rgb(tmp_path / "f.tif").getpixel((0, 0)) == (128, 128, 128)


def test_one_bit_and_greyscale_become_rgb(tmp_path):
    Image.new("1", (8, 8), 1).save(tmp_path / "b.png")
    Image.new("L", (8, 8), 77).save(tmp_path / "l.jpg", quality=100)
    assert load_image_rgb(tmp_path / "b.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_image_rgb(tmp_path / "l.jpg").getpixel((0, 0)) == (77, 77, 77)


@pytest.mark.parametrize("name", ["a.gif", "a.webp", "a.png"])
def test_animations_report_frames_and_load_the_first(tmp_path, name):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], lossless=True)
    assert probe_image(tmp_path / name).n_frames == 3
    assert load_image_rgb(tmp_path / name).getpixel((8, 8)) == (255, 0, 0)


def test_verify_returns_the_sha256_of_complete_files(tmp_path, make_image):
    for name in ("a.jpg", "a.png", "a.webp", "a.bmp", "a.tif"):
        path = make_image(tmp_path / name, (300, 200))
        assert verify_image_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name, keep", [("t.jpg", 0.5), ("t.jpg", 0.98), ("t.png", 0.5), ("t.webp", 0.5),
                                        ("t.bmp", 0.7)])
def test_truncated_files_are_refused_by_verify_and_load(tmp_path, truncated_copy, name, keep):
    src = tmp_path / ("src" + name[1:])
    Image.effect_noise((256, 256), 60).convert("RGB").save(src)
    cut = truncated_copy(src, tmp_path / name, keep)
    if name.endswith(".webp"):  # Pillow reads the whole WebP container when opening it
        assert code_of(probe_image, cut)[0] == "damaged_image"
    else:
        probe_image(cut)  # the header is intact: the cheap structural check has to catch it
        assert code_of(verify_image_file, cut)[0] == "truncated_image"
    with pytest.raises(ImageError):
        load_image_rgb(cut)


def test_load_refuses_truncated_files_even_when_another_pack_allows_them(tmp_path, truncated_copy, monkeypatch):
    src = tmp_path / "src.jpg"
    Image.effect_noise((256, 256), 60).convert("RGB").save(src)
    cut = truncated_copy(src, tmp_path / "cut.jpg")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # what some node packs set globally
    assert code_of(load_image_rgb, cut)[0] == "truncated_image"
    assert load_image_rgb(src).size == (256, 256)


def test_jpeg_walk_handles_any_chunk_boundary_progressive_scans_and_trailers(tmp_path, monkeypatch):
    noise = Image.effect_noise((128, 96), 60).convert("RGB")
    noise.save(tmp_path / "p.jpg", progressive=True, quality=90)
    noise.save(tmp_path / "r.jpg", restart_marker_blocks=1, quality=90)
    data = (tmp_path / "p.jpg").read_bytes()
    (tmp_path / "trailer.jpg").write_bytes(data + b"\x00" * 100 + b"camera trailer")
    # an APP1 segment whose payload contains an end marker (like an EXIF thumbnail) must not count
    app1 = b"\xff\xe1" + (2 + 6).to_bytes(2, "big") + b"ab\xff\xd9cd"
    with_thumb = data[:2] + app1 + data[2:]
    (tmp_path / "thumb_cut.jpg").write_bytes(with_thumb[: len(with_thumb) // 2])
    for chunk in (1, 2, 7, 4096):
        monkeypatch.setattr(images, "_CHUNK", chunk)
        for name in ("p.jpg", "r.jpg", "trailer.jpg"):
            verify_image_file(tmp_path / name)
        assert code_of(verify_image_file, tmp_path / "thumb_cut.jpg")[0] == "truncated_image"


def test_png_cut_just_before_iend_decodes_and_is_accepted(tmp_path, make_image):
    path = make_image(tmp_path / "a.png", (64, 64))
    (tmp_path / "b.png").write_bytes(path.read_bytes()[:-12])  # the pixels are all there
    verify_image_file(tmp_path / "b.png")


@pytest.mark.parametrize("content, code, words", [
    (b"", "empty_file", "empty (0 bytes)"),
    (b"just some notes\n", "not_an_image", "text file"),
    (b"<!DOCTYPE html>\n<html><body>Not found</body></html>", "not_an_image", "HTML page"),
    (b"\x00\x01\x02garbage" * 10, "not_an_image", "not an image"),
])
def test_files_that_are_not_images_say_what_they_are(tmp_path, content, code, words):
    (tmp_path / "x.png").write_bytes(content)
    got, message = code_of(probe_image, tmp_path / "x.png")
    assert got == code and words in message and "x.png" in message


def test_folders_fifos_links_and_loops_never_hang_or_crash(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    os.mkfifo(tmp_path / "pipe.png")
    os.symlink("loop.png", tmp_path / "loop.png")
    os.symlink("missing.png", tmp_path / "broken.png")
    cases = [("dir.jpg", "folder"), ("pipe.png", "not a regular file"), ("loop.png", "loop"),
             ("broken.png", "does not exist")]
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(tmp_path / "sock.png"))
        cases.append(("sock.png", "not a regular file"))
    except OSError:  # path too long for a Unix socket on this machine: the FIFO covers the same code
        pass
    start = time.monotonic()
    for name, words in cases:
        for call in (probe_image, verify_image_file, load_image_rgb):
            assert words in code_of(call, tmp_path / name)[1]
    assert time.monotonic() - start < 5
    server.close()


def test_permission_denied_is_reported(tmp_path, make_image, monkeypatch):
    path = make_image(tmp_path / "locked.png")
    real_open = os.open

    def deny(p, *args, **kwargs):  # tests run as root, where chmod 000 does not stop reads
        if str(p).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    code, message = code_of(probe_image, path)
    assert code == "unreadable_image" and "permission denied" in message


def test_decompression_bomb_is_refused_from_its_header(tmp_path, bomb_bytes, no_decoding):
    (tmp_path / "bomb.png").write_bytes(bomb_bytes(20000, 20000))
    start = time.monotonic()
    code, message = code_of(probe_image, tmp_path / "bomb.png")
    assert code == "decompression_bomb" and "400 megapixels" in message
    assert time.monotonic() - start < 1


def test_bomb_limit_holds_when_pillows_own_check_is_switched_off(tmp_path, bomb_bytes, monkeypatch, no_decoding):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    (tmp_path / "bomb.png").write_bytes(bomb_bytes(15000, 15000))
    code, message = code_of(probe_image, tmp_path / "bomb.png")
    assert code == "decompression_bomb" and "15000x15000" in message
    (tmp_path / "ok.png").write_bytes(bomb_bytes(13000, 13000))  # 169 MP: under the limit, header only
    assert probe_image(tmp_path / "ok.png").width == 13000
