"""Every photograph the project reads is decoded here: by the download stage's check,
by prepare, by the prediction and scoring commands. So a file is either
accepted with the same pixels on every path, or refused with the same reason.

The policy, by the mode Pillow opens a file in:

    RGB                     used as it is
    L, P, CMYK, YCbCr, RGBX  Pillow's conversion to RGB (grey copied into R, G and B;
                            CMYK without a colour profile)
    RGBA, LA, PA, RGBa, P with transparency
                            composited on white, as an image viewer shows it (a fully
                            opaque alpha channel changes nothing)
    I;16 (any byte order)   16-bit grey scaled to 8 bits (v / 257, rounded: 65535 is
                            white, an 8-bit image saved as 16-bit comes back exactly)
    I, F                    refused: 32-bit integer or floating-point pixels have no
                            defined white level (a 16-bit PGM opens as I)
    1                       refused: a black-and-white drawing (a mask?), not a photograph
    anything else           refused, naming the mode

EXIF orientation is applied first (``ImageOps.exif_transpose``). The download stage
keeps the files byte for byte, so prepare applies it when it decodes them. A file
with several frames is read at its first. Colour profiles (ICC) are not applied.
"""

from __future__ import annotations

import os
import warnings
import zipfile
import zlib
from io import BytesIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from skinlesion.progress import threads
from skinlesion.untrusted import MAX_FILE_BYTES, MAX_PIXELS, TooLarge, escaped, first_line, read_capped

# Pillow warns from 89 megapixels on; this module's own cap (MAX_PIXELS, lower) refuses such
# an image in one line instead, so the warning would only add a second, misleading one.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

CONVERTED = {"L", "P", "CMYK", "YCbCr", "RGBX"}
WITH_ALPHA = {"RGBA", "LA", "PA", "RGBa"}
REFUSED = {
    "I": "32-bit integer pixels (e.g. a 16-bit PGM or TIFF) with no defined white level",
    "F": "floating-point pixels with no defined white level",
    "1": "a 1-bit black-and-white image (a mask?), not a photograph",
}
FIX = "save it as an 8-bit RGB JPEG or PNG"


class Unusable(Exception):
    """Why a file cannot be used as an image: a phrase to follow the file's name."""


def read(source) -> bytes:
    """The bytes of ``source``: bytes, a path, or anything with ``read()`` (an archive
    member, a binary file). Raises Unusable saying why they cannot be read."""
    try:
        if isinstance(source, (bytes, bytearray)):
            if len(source) > MAX_FILE_BYTES:
                raise TooLarge("it")
            return bytes(source)
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as handle:
                return read_capped(handle, MAX_FILE_BYTES, "it")
        if hasattr(source, "open"):  # an archive member: its stated size first, then no further than the cap
            if source.size > MAX_FILE_BYTES:
                raise TooLarge("it")
            with source.open() as handle:
                return read_capped(handle, MAX_FILE_BYTES, "it")
        return read_capped(source, MAX_FILE_BYTES, "it")
    except TooLarge:
        raise Unusable(f"is larger than {MAX_FILE_BYTES // 2**20} MiB, the cap for one image; refusing to read "
                       f"it") from None
    except PermissionError:
        raise Unusable("cannot be read: permission denied; give this user read access to it") from None
    except FileNotFoundError:
        raise Unusable("cannot be read: no such file (a broken link, or removed while this ran)") from None
    except IsADirectoryError:
        raise Unusable("is a folder, not an image file") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise Unusable(f"cannot be read from its zip ({first_line(error)}); the archive is damaged: "
                       f"copy it again") from None
    except OSError as error:
        raise Unusable(f"cannot be read ({error.strerror or first_line(error)}); check the disk or share "
                       f"it is on") from None


def _rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in WITH_ALPHA or (mode == "P" and "transparency" in image.info):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    if mode in CONVERTED:
        return image.convert("RGB")
    if mode.startswith("I;16"):
        grey = (np.asarray(image).astype(np.uint32) + 128) // 257
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    raise Unusable(f"has mode {mode}: {REFUSED.get(mode, 'a pixel format this project does not read')}; {FIX}")


def _too_many_pixels(image: Image.Image) -> str | None:
    """Why ``image`` (opened, not yet decoded) is over the pixel cap, or None."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        return f"is {width} x {height} pixels, over the cap of {MAX_PIXELS / 1e6:.0f} megapixels"
    return None


def decode(data: bytes, size: int | None = None) -> Image.Image:
    """``data`` as an RGB image by the policy above; squashed to ``size`` x ``size``
    (bicubic, nothing cropped) when ``size`` is given. Raises Unusable."""
    if not data:
        raise Unusable("is empty (0 bytes), not an image; copy it again")
    try:
        with Image.open(BytesIO(data)) as image:
            if size is not None:
                image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when it is much larger
            if too_many := _too_many_pixels(image):  # before a pixel is decoded: memory stays bounded
                raise Unusable(f"{too_many} for one image; downscale it")
            oriented = ImageOps.exif_transpose(image)  # decodes every pixel: a damaged file fails here
    except Unusable:
        raise
    except Image.DecompressionBombError as error:
        raise Unusable(f"is implausibly large ({first_line(error)}); refusing to decode it") from None
    except UnidentifiedImageError:
        raise Unusable("is not an image (no format Pillow recognises)") from None
    except Exception as error:  # noqa: BLE001 - Pillow's plugins raise many kinds of error on damaged files
        raise Unusable(f"is not a readable image ({first_line(error)}); the file is damaged or incomplete: "
                       f"copy it again") from None
    rgb = _rgb(oriented)
    return rgb if size is None else rgb.resize((size, size), Image.Resampling.BICUBIC)


def load_image(source, size: int) -> np.ndarray:
    """``source`` (bytes, a path, or anything with ``read()``) as uint8 ``size x size x 3``.
    HAM10000's 4:3 frames become square, squashed rather than cropped so that nothing
    at the lesion's edge is lost. Raises Unusable."""
    return np.asarray(decode(read(source), size))


def problem(source) -> str | None:
    """Why ``source`` (as for ``read``) cannot be used as a photograph, or None: the download stage's
    check, the same decoding the other paths do."""
    try:
        decode(read(source))
    except Unusable as error:
        return str(error)
    return None


def mask_problem(source) -> str | None:
    """Why ``source`` cannot be read as a lesion mask (any mode: it is thresholded), or None."""
    try:
        data = read(source)
        if not data:
            return "is empty (0 bytes), not an image; copy it again"
        with Image.open(BytesIO(data)) as mask:
            if too_many := _too_many_pixels(mask):
                return too_many
            mask.load()
    except Unusable as error:
        return str(error)
    except Image.DecompressionBombError as error:
        return f"is implausibly large ({first_line(error)}); refusing to decode it"
    except UnidentifiedImageError:
        return "is not an image (no format Pillow recognises)"
    except Exception as error:  # noqa: BLE001 - as in decode
        return f"is not a readable image ({first_line(error)}); the file is damaged or incomplete: copy it again"
    return None


def printable(name: str) -> str:
    """``name`` as text that can be written: a file name that is not UTF-8 (from a
    Windows share, say) keeps its odd bytes as \\xNN escapes instead of failing the CSV,
    and control characters (a terminal's escape codes, a newline that would forge a line)
    are escaped too."""
    return escaped(os.fsencode(name).decode("utf-8", "backslashreplace"))


def decode_all(members: list, size: int) -> tuple[list[int], np.ndarray, list[str]]:
    """Decode ``members`` (skinlesion.data.archives members) at ``size``; returns the indices that worked, their pixels,
    and one error line per file that did not."""

    def decode(member):
        try:
            return load_image(member, size), None
        except Unusable as error:
            return None, f"{printable(member.origin)} {error}"

    with threads(os.cpu_count() or 1) as pool:
        results = list(pool.map(decode, members))
    ok = [i for i, (pixels, _) in enumerate(results) if pixels is not None]
    errors = [error for _, error in results if error]
    pixels = np.stack([results[i][0] for i in ok]) if ok else np.zeros((0, size, size, 3), np.uint8)
    return ok, pixels, errors
