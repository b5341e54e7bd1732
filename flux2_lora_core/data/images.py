"""Probing and decoding image files: headers only to inspect, pixels only when training needs them.

`probe_image` reads a file's header (size after EXIF rotation, format, frames) without decoding;
`verify_image_file` streams the bytes once to hash them and to check that the JPEG/PNG/WebP
structure reaches its end marker (a truncated download fails that check, and only such rare
files pay for a real decode to confirm); `load_image_rgb` decodes to the RGB users see.
Every failure is an `ImageError` whose `.code`, `.detail` and `.fix` say what is wrong and what to do.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import ImageError

# Pillow refuses outright above 2 x Image.MAX_IMAGE_PIXELS (2 x 89,478,485 = 178,956,970 px: about
# 0.5 GiB as RGB, e.g. 16,000 x 11,000). We use that number as a fixed limit of our own, so it holds even
# when another node pack sets Image.MAX_IMAGE_PIXELS = None, and training (at most a few megapixels)
# never needs more.
MAX_IMAGE_PIXELS = 178_956_970
# The formats a dataset may hold (matched case-insensitively); others are reported, not read. A GIF (like an
# animated WebP) trains on its first frame, composited on white where it is transparent.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
PILLOW_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")  # JPEG includes MPO (phone photos)
_CHUNK = 1 << 20
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
_REREAD = "re-export or re-download it"


@dataclass(frozen=True)
class ImageInfo:
    """What the header says. width/height are as the user sees the image (EXIF rotation applied)."""

    path: Path
    width: int
    height: int
    format: str
    mode: str
    n_frames: int
    file_size: int
    orientation: int = 1

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


def image_error(path, code: str, detail: str, fix: str) -> ImageError:
    exc = ImageError(path, f"{detail}: {fix}")
    exc.code, exc.detail, exc.fix = code, detail, fix
    return exc


def open_regular_file(path):
    """Open for reading only if it is a regular file: a FIFO or socket named *.png must never block us."""
    st = os.stat(path)  # follows symlinks; raises for loops and broken links
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "is not a regular file (a FIFO, socket or device)", str(path))
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)  # non-blocking: if it was swapped for a FIFO since stat, this still returns
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "is not a regular file (a FIFO, socket or device)", str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _os_error(path, exc: OSError) -> ImageError:
    if exc.errno == errno.ELOOP:
        return image_error(path, "unreadable_image", "is a symbolic link loop", "point the link at a real file")
    if isinstance(exc, FileNotFoundError):
        return image_error(path, "unreadable_image", "does not exist (a broken symbolic link?)", "restore or remove it")
    if isinstance(exc, PermissionError):
        return image_error(path, "unreadable_image", "permission denied", "make it readable (e.g. chmod a+r)")
    if isinstance(exc, IsADirectoryError):
        return image_error(path, "not_an_image", "is a folder named like an image", "rename the folder")
    if exc.errno == errno.EINVAL:
        return image_error(path, "not_an_image", exc.strerror, "remove it or replace it with an image file")
    return image_error(path, "unreadable_image", f"cannot be read ({exc.strerror or exc})",
                       "check the disk and the file")


def _sniff(head: bytes) -> str:
    """Say what a file that Pillow cannot identify probably is, from its first bytes."""
    low = head[:512].lower().lstrip()
    if low.startswith((b"<!doctype html", b"<html", b"<head", b"<!--")) or b"<html" in low:
        return "is an HTML page, not an image (a web page was saved instead of the picture)"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1", b"ftypavif"):
        return "is HEIC/AVIF data, which is not a supported format"
    try:
        codecs.utf_8_decode(head, "strict", False)  # False: a character cut at byte 512 is fine
    except UnicodeDecodeError:
        return "is not an image Pillow can read (unknown format or damaged header)"
    return "is a text file, not an image" if b"\x00" not in head else "is not an image Pillow can read"


def _orientation(im: Image.Image) -> int:
    try:
        # PngImageFile.getexif() decodes the whole image when the EXIF chunk comes late; the base
        # method only looks at what the header already gave us (eXIf before IDAT, or XMP).
        exif = Image.Image.getexif(im) if im.format == "PNG" else im.getexif()
        value = int(exif.get(0x0112, 1))
    except Exception:  # a damaged EXIF block must not make a good image unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def probe_image(path) -> ImageInfo:
    """Read the header only. Raises ImageError for anything that is not a loadable image file."""
    path = Path(path)
    try:
        f = open_regular_file(path)
    except OSError as exc:
        raise _os_error(path, exc) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise image_error(path, "empty_file", "the file is empty (0 bytes)", _REREAD)
        try:
            with Image.open(f, formats=PILLOW_FORMATS) as im:
                width, height = im.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise _bomb(path, width * height, f"{width}x{height} = ")
                orientation = _orientation(im)
                n_frames = int(getattr(im, "n_frames", 1) or 1)
                fmt, mode = im.format or "?", im.mode
        except UnidentifiedImageError:
            f.seek(0)
            raise image_error(path, "not_an_image", _sniff(f.read(512)), "replace it with the real image") from None
        except Image.DecompressionBombError as exc:  # Pillow's own limit (2x ours at its default) said no
            pixels = re.search(r"\((\d+) pixels\)", str(exc))
            raise _bomb(path, int(pixels.group(1)) if pixels else None) from None
        except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError) as exc:
            raise image_error(path, "damaged_image", f"is damaged or truncated ({exc})", _REREAD) from None
    if orientation in _SWAPS_SIDES and fmt != "TIFF":  # Pillow's TIFF plugin already reports the turned size
        width, height = height, width
    return ImageInfo(path, width, height, fmt, mode, n_frames, size, orientation)


def _bomb(path, pixels: int | None, size: str = "") -> ImageError:
    claim = f"claims {size}{pixels / 1e6:.0f} megapixels" if pixels else "claims too many pixels"
    return image_error(path, "decompression_bomb", f"{claim}, over the {MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel "
                       "limit (decompression-bomb protection; it was not decoded)",
                       "downscale it below the limit, or remove it")


class _JpegWalk:
    """Follow JPEG markers over streamed chunks until EOI; entropy-coded data is skipped with a regex."""

    _marker = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker inside scan data (not stuffing, not RSTn)

    def __init__(self):
        self.tail, self.skip, self.in_scan, self.complete, self.broken = b"", 0, False, False, False

    def feed(self, chunk: bytes) -> None:
        if self.complete or self.broken:
            return
        buf = self.tail + chunk if self.tail else chunk
        pos = min(self.skip, len(buf))
        self.skip -= pos
        while pos < len(buf):
            if self.in_scan:
                m = self._marker.search(buf, pos)
                if m is None:  # keep a trailing 0xFF: its marker byte is in the next chunk
                    pos = len(buf) - 1 if buf.endswith(b"\xff") else len(buf)
                    break
                pos, self.in_scan = m.start(), False
            if len(buf) - pos < 4 and not buf.startswith(b"\xff\xd9", pos):
                break
            if buf[pos] != 0xFF:
                self.broken = True
                return
            code = buf[pos + 1]
            if code == 0xFF:  # fill byte
                pos += 1
            elif code == 0xD9:
                self.complete = True
                return
            elif code == 0xD8 or 0xD0 <= code <= 0xD7 or code == 0x01:  # markers without a length
                pos += 2
            else:
                end = pos + 2 + struct.unpack_from(">H", buf, pos + 2)[0]
                self.in_scan = code == 0xDA
                if end > len(buf):
                    self.skip, pos = end - len(buf), len(buf)
                else:
                    pos = end
        self.tail = buf[pos:]


class _PngWalk:
    """Follow PNG chunk lengths over streamed chunks until IEND."""

    def __init__(self):
        self.tail, self.skip, self.complete = b"", 8, False

    def feed(self, chunk: bytes) -> None:
        if self.complete:
            return
        buf = self.tail + chunk if self.tail else chunk
        pos = min(self.skip, len(buf))
        self.skip -= pos
        while self.skip == 0 and len(buf) - pos >= 8:
            length, kind = struct.unpack_from(">I4s", buf, pos)
            if kind == b"IEND":
                self.complete = True
                return
            end = pos + 12 + length
            if end > len(buf):
                self.skip, pos = end - len(buf), len(buf)
            else:
                pos = end
        self.tail = buf[pos:]


def _decodes(path, info: ImageInfo) -> bool:
    """The expensive arbiter: does Pillow decode the first frame without running out of data?"""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone switched Pillow's own check off: trust only ours
        return False
    try:
        with open_regular_file(path) as f, Image.open(f, formats=PILLOW_FORMATS) as im:
            if im.format in ("JPEG", "MPO"):
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))  # DCT scaling: cheap
            im.load()
        return True
    except Exception:
        return False


def verify_image_file(path, info: ImageInfo | None = None) -> str:
    """Stream the file once: return its SHA-256 hex digest, or raise ImageError if it is truncated.

    JPEG must reach its EOI marker and PNG its IEND chunk, WebP must be as long as its RIFF header
    says; other formats (BMP, TIFF, GIF) are decoded. A file that fails the structural check is
    decoded to confirm, so an odd-but-complete file (e.g. a JPEG missing only EOI) is not refused.
    """
    info = info or probe_image(path)
    walk = _JpegWalk() if info.format in ("JPEG", "MPO") else _PngWalk() if info.format == "PNG" else None
    digest, total, head = hashlib.sha256(), 0, b""
    try:
        with open_regular_file(path) as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                if walk:
                    walk.feed(chunk)
                if total < 12:
                    head += chunk[:12]
                total += len(chunk)
    except OSError as exc:
        raise _os_error(path, exc) from None
    if walk is not None:
        complete = walk.complete
    elif info.format == "WEBP" and head[:4] == b"RIFF":
        complete = total >= 8 + struct.unpack_from("<I", head, 4)[0]
    else:
        complete = False  # no cheap structural check for this format: decode it
    if not complete and not _decodes(path, info):
        raise image_error(path, "truncated_image",
                          "is truncated or damaged (the image data ends early or cannot be decoded)", _REREAD)
    return digest.hexdigest()


def file_sha256(path) -> str:
    """SHA-256 of a file, streamed (the dataset fingerprint); ImageError if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open_regular_file(path) as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise _os_error(path, exc) from None
    return digest.hexdigest()


def load_image_rgb(path) -> Image.Image:
    """Decode the first frame to RGB as a viewer shows it: EXIF rotation, transparency on white."""
    info = probe_image(path)
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # Pillow would silently return half an image: check ourselves
        verify_image_file(path, info)
    try:
        with open_regular_file(path) as f, Image.open(f, formats=PILLOW_FORMATS) as im:
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # damaged EXIF: probe_image also reads orientation 1 then
                im = im.copy()
            return to_rgb(im)
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError) as exc:
        raise image_error(path, "undecodable_image", f"cannot be decoded ({exc})", _REREAD) from None


def _grey_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit int and float greyscale to 8 bits by scaling the full range, not clipping."""
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    if mode == "F" and lo >= 0 and hi <= 1.0:  # float images are 0..1 by convention
        return np.rint(a * 255).astype(np.uint8)
    if mode == "F" and lo >= 0 and hi <= 255:
        return np.rint(a).astype(np.uint8)
    if lo >= 0 and hi <= 65535:  # "I;16*" always, and "I" almost always comes from 16-bit files
        return np.rint(a * (255 / 65535)).astype(np.uint8)
    span = hi - lo or 1.0  # anything else: stretch min..max
    return np.rint((a - lo) * (255 / span)).astype(np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparent pixels become white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_grey_to_uint8(np.asarray(im), im.mode)).convert("RGB")
    if im.mode == "CMYK":
        return _cmyk_to_rgb(im)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """Use the embedded ICC profile when there is one (print CMYK looks wrong without it)."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            import io

            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # a broken profile: fall back to Pillow's plain conversion
            pass
    return im.convert("RGB")  # Pillow already un-inverts Adobe CMYK JPEGs when it reads them
