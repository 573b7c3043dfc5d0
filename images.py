"""Image files: which files a command's PATH arguments name, and their pixels at their real value range.

numpy, Pillow, tifffile and imagecodecs only (no torch): predict.py, train.py and evaluate.py read images through
here, and so does the exported model's runner (predict_exported.py), so that every path reads a file the same way.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, TiffImagePlugin

from config import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
# The largest image read: 2^28 pixels (16,384 x 16,384, 268 megapixels), over line scanners' 100+ megapixel frames.
# Its size is read from the file's header before anything is decoded, so a decompression bomb (a small file that
# claims 20,000 x 20,000 pixels) costs nothing; an image at the limit takes 268 MB (gray) to 805 MB (RGB) decoded.
MAX_IMAGE_PIXELS = 1 << 28
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # Pillow's own check at 2x this: ours comes first, with a clear reason

# Pillow modes of 8-bit data, read as Pillow's convert("RGB") gives them; and those of deeper data, read as stored.
_EIGHT_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_DEEP_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
# EXIF orientation -> an array turned upright as ImageOps.exif_transpose turns an image (the Pillow method named),
# for the 16-bit colour pixels that Pillow cannot hold.
_UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda pixels: pixels[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda pixels: pixels[::-1, ::-1],  # ROTATE_180
    4: lambda pixels: pixels[::-1],  # FLIP_TOP_BOTTOM
    5: lambda pixels: pixels.swapaxes(0, 1),  # TRANSPOSE
    6: lambda pixels: pixels.swapaxes(0, 1)[:, ::-1],  # ROTATE_270: a quarter turn clockwise
    7: lambda pixels: pixels.swapaxes(0, 1)[::-1, ::-1],  # TRANSVERSE
    8: lambda pixels: pixels.swapaxes(0, 1)[::-1],  # ROTATE_90: a quarter turn anticlockwise
}
# The dtypes image arrays may have (besides bool), by the value that stands for full brightness.
FULL_SCALE = {"uint8": 255, "uint16": 65535, "float32": 1, "float64": 1}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def file_sha256(path: str | os.PathLike) -> str | None:
    """The file's SHA-256 in hex (what identifies a training image, or an exported model's file); None when it
    cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def display_name(path: str | os.PathLike) -> str:
    """``path`` as text that can be printed and drawn: a file name that is not valid UTF-8 keeps its readable
    part, the rest as U+FFFD (CSV files keep the exact bytes instead)."""
    return os.fsencode(path).decode("utf-8", "replace")


def read_pixels(path: str | Path) -> np.ndarray:
    """An image file's pixels at their real value range, upright: (H, W, 1) gray or (H, W, 3) RGB.

    The EXIF orientation that cameras and phones write is applied (the image as a viewer shows it), in training,
    evaluation and inspection alike. By Pillow mode:
      L -> uint8 gray (one channel, the same values as its RGB);
      1, LA, La, P, PA, RGB, RGBA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV -> uint8 RGB by Pillow's convert("RGB")
          (palette to its colours, alpha dropped);
      I;16, I;16L, I;16B, I;16N (16-bit gray PNG, TIFF) -> uint16;
      RGB, RGBA of a 16-bit colour PNG or TIFF -> uint16 RGB (alpha dropped), read by imagecodecs (PNG) or tifffile
          (TIFF, its first page as Pillow's), as Pillow's RGB modes hold 8 bits only;
      I (32-bit integer: int TIFFs, and 16-bit PNGs in some Pillow versions) -> uint16 if all within 0..65535;
      F (32-bit float TIFF) -> float32 if all finite and within [0, 1].
    Any failure (not a regular file, a damaged or foreign file, over MAX_IMAGE_PIXELS, another mode, values out of
    range, permissions, memory) is a UserError naming the file and the reason, whatever raised it. 16-bit gray with
    alpha (PNG), 16-bit CMYK and premultiplied RGBA (TIFF) are still read at 8 bit, by Pillow.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ValueError("not a regular file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ValueError(f"{width} x {height} pixels, over the limit of {MAX_IMAGE_PIXELS / 1e6:.0f} "
                                     f"megapixels (images.MAX_IMAGE_PIXELS): split or downscale it")
                mode = image.mode
                if _is_sixteen_bit_colour(image, path):
                    pixels = _sixteen_bit_colour(image, path)
                else:
                    ImageOps.exif_transpose(image, in_place=True)  # no copy of an image without an orientation tag
                    if mode in _EIGHT_BIT_MODES and mode != "L":  # L stays one channel: resized once, not thrice
                        # La (premultiplied alpha) converts to RGB only by way of LA
                        pixels = np.asarray((image.convert("LA") if mode == "La" else image).convert("RGB"))
                    else:
                        pixels = np.asarray(image)
        try:
            return _by_mode(pixels, mode)
        except ValueError as err:
            raise ValueError(f"mode {mode}: {err}") from None
    except Exception as err:  # noqa: BLE001  (one bad file, whatever broke, is that file's problem alone)
        reason = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
        raise UserError(f"cannot read image '{path}' ({reason}): replace or remove the file") from None


def _is_sixteen_bit_colour(image: Image.Image, path: str | Path) -> bool:
    """Whether ``image``, open in Pillow as RGB or RGBA (8 bits), is a PNG or TIFF of 16-bit RGB or RGBA (not
    premultiplied by its alpha, which Pillow undoes and the readers of 16 bits do not)."""
    if image.mode not in ("RGB", "RGBA"):
        return False
    if image.format == "TIFF":
        return (set(image.tag_v2.get(TiffImagePlugin.BITSPERSAMPLE, ())) == {16}
                and image.tag_v2.get(TiffImagePlugin.EXTRASAMPLES) != (1,))
    if image.format == "PNG":
        with open(path, "rb") as file:  # IHDR's bit depth and colour type (RGB, RGBA), at fixed places
            return file.read(26)[24:] in (b"\x10\x02", b"\x10\x06")
    return False


def _sixteen_bit_colour(image: Image.Image, path: str | Path) -> np.ndarray:
    """The (H, W, 3 or 4) uint16 pixels, upright, of the 16-bit colour PNG or TIFF that ``image`` opened (its header
    checked): a TIFF's first page, as Pillow's frame 0. Pillow finds the EXIF orientation (for a PNG whose EXIF may
    follow its pixels, by decoding them at 8 bit, as exif_transpose does)."""
    import imagecodecs  # here: their import costs every command a fifth of a second, for these files alone
    import tifffile

    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    if image.format == "TIFF":
        pixels = tifffile.imread(path, key=0)
    else:
        pixels = imagecodecs.png_decode(Path(path).read_bytes())
    return np.ascontiguousarray(_UPRIGHT[orientation](pixels) if orientation in _UPRIGHT else pixels)


def _by_mode(pixels: np.ndarray, mode: str) -> np.ndarray:
    """The decoded pixels of a file of Pillow ``mode`` as read_pixels returns them; ValueError if unsupported."""
    if mode not in _EIGHT_BIT_MODES and mode not in _DEEP_MODES:
        raise ValueError("unsupported: save it as 8-bit gray or colour, or as 16-bit gray")
    if mode == "I":
        if pixels.min() < 0 or pixels.max() > 65535:
            raise ValueError(f"32-bit integer values span {pixels.min()} to {pixels.max()}, beyond 16 bit "
                             "(0 to 65535), so their full scale is unknown: save it as an 8- or 16-bit image")
        pixels = pixels.astype(np.uint16)
    return checked_pixels(pixels)


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding; None when it cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size
    except Exception:  # noqa: BLE001  (the reader names the file when it reads it)
        return None


def checked_pixels(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` as (H, W, 1) or (H, W, 3) (alpha dropped, bool as uint8 0 / 255) once they are an image the model
    takes: uint8, uint16, bool, or finite float32 / float64 within [0, 1]; a ValueError saying what is wrong
    otherwise."""
    if not (pixels.ndim in (2, 3) and min(pixels.shape[:2]) > 0 and pixels.shape[2:] in ((), (1,), (3,), (4,))):
        raise ValueError(f"shape {pixels.shape} is not (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    if pixels.dtype == np.bool_:
        pixels = pixels.astype(np.uint8) * 255
    if pixels.dtype.name not in FULL_SCALE:
        raise ValueError(f"dtype {pixels.dtype} is not uint8, uint16, bool, float32 or float64")
    if pixels.dtype.kind == "f" and not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1):
        raise ValueError(f"float values must be finite and within [0, 1], these span {pixels.min():g} to "
                         f"{pixels.max():g}: rescale them to [0, 1], or use 8- or 16-bit integers")
    return pixels.reshape(*pixels.shape[:2], -1)[:, :, :3]


@dataclass(frozen=True)
class Geometry:
    """How an image becomes the model's input of ``size`` (height, width): resized to ``resize`` (height, width),
    squeezed to it as the reference does, or with ``keep_aspect`` scaled by one factor until it covers it (no
    distortion, no padding); then center-cropped to ``size``."""

    resize: tuple[int, int]
    size: tuple[int, int]
    keep_aspect: bool = False

    @classmethod
    def of(cls, resize: int | Sequence[int], size: int | Sequence[int], keep_aspect: bool = False) -> Geometry:
        """From one number (a square) or a height and a width each."""
        return cls(_pair(resize), _pair(size), keep_aspect)

    def scaled(self, height: int, width: int) -> tuple[int, int]:
        """The size an image of ``height`` x ``width`` is resized to before the crop."""
        if not self.keep_aspect:
            return self.resize
        factor = max(self.resize[0] / height, self.resize[1] / width)
        return max(self.resize[0], round(height * factor)), max(self.resize[1], round(width * factor))

    def offsets(self, scaled: tuple[int, int]) -> tuple[int, int]:
        """The crop's top row and left column in the resized image."""
        return (scaled[0] - self.size[0]) // 2, (scaled[1] - self.size[1]) // 2

    def describe(self) -> str:
        how = "scaled keeping its aspect ratio until it covers" if self.keep_aspect else "resized to"
        return (f"{how} {self.resize[0]} x {self.resize[1]}, then center-cropped to {self.size[0]} x {self.size[1]} "
                f"(height x width)")


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    values = (value,) if isinstance(value, int) else tuple(value)
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def prepare(pixels: np.ndarray, geometry: Geometry) -> np.ndarray:
    """An image as the model takes it before normalisation: (C, height, width) float32 in [0, 1] at
    ``geometry.size``, C = 1 (gray) or 3 (RGB), from pixels as read_pixels returns them or as a camera SDK gives
    them ((H, W), (H, W, 1), (H, W, 3) or (H, W, 4) of uint8, uint16, bool, or float in [0, 1]; anything else is a
    ValueError).

    Each channel is scaled to [0, 1] by its bit depth and resized as ``geometry`` says by Pillow's antialiased
    bilinear filter, the one the reference's torchvision Resize applies to 8-bit images, computed here in float32
    whatever the bit depth (Pillow's 8-bit resize rounds after each of its two passes, which moved some
    magnetic-tile scores by 2%); only the rows and columns the crop keeps are computed. The same picture at 8 or 16
    bit gives the same array, up to float rounding. This is the one definition of the model's input: the torch path
    (dataset.py) and the exported model's runner both call it.
    """
    pixels = checked_pixels(pixels)
    scaled = geometry.scaled(*pixels.shape[:2])
    (top, left), (height, width) = geometry.offsets(scaled), geometry.size
    full_scale = FULL_SCALE[pixels.dtype.name]
    rows = _resample(pixels, scaled[0], top, height, full_scale)  # (height, W, C), scaled to [0, 1]
    both = _resample(rows.transpose(1, 0, 2), scaled[1], left, width, 1)  # (width, height, C): x <-> y
    return np.ascontiguousarray(both.transpose(2, 1, 0))


def prepare_mask(pixels: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A mask's pixels (H, W, C) (defect, or inspected area, where any value > 0) with ``geometry`` as prepare
    gives its image: (height, width) bool, resized by nearest neighbour."""
    scaled = geometry.scaled(*pixels.shape[:2])
    (top, left), (height, width) = geometry.offsets(scaled), geometry.size
    marked = Image.fromarray((pixels > 0).any(axis=2)).resize(scaled[::-1], Image.Resampling.NEAREST)
    return np.array(marked)[top:top + height, left:left + width]


def _resample(planes: np.ndarray, size: int, start: int, count: int, full_scale: float) -> np.ndarray:
    """Rows ``start`` to ``start + count`` of ``planes`` (L, W, C) resized along their first axis to ``size``, as
    float32 divided by ``full_scale``: each output row a weighted sum of a few input rows (gathered whole, so the
    work follows the output, not the input)."""
    length = len(planes)
    if length == size:
        return np.multiply(planes[start:start + count], np.float32(1 / full_scale), dtype=np.float32)
    indices, weights = resize_weights(length, size)
    indices, weights = indices[start:start + count], (weights[start:start + count] / full_scale).astype(np.float32)
    out = weights[:, 0, None, None] * planes[indices[:, 0]]
    for tap in range(1, indices.shape[1]):
        out += weights[:, tap, None, None] * planes[indices[:, tap]]
    return out.astype(np.float32, copy=False)


def resize_weights(in_length: int, out_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's antialiased bilinear filter from ``in_length`` to ``out_length`` samples (its Resample.c): for each
    output sample, the input samples it reads (out_length, taps) and their weights (float64, summing to 1), a
    triangle filter stretched by the downscaling factor. A sample beyond an output's reach gets weight 0."""
    scale = in_length / out_length
    support = max(scale, 1.0)  # the bilinear filter's support, 1, times the downscaling factor
    centers = (np.arange(out_length) + 0.5) * scale
    first = np.maximum(np.trunc(centers - support + 0.5), 0).astype(np.int64)
    end = np.minimum(np.trunc(centers + support + 0.5), in_length).astype(np.int64)
    indices = first[:, None] + np.arange(int((end - first).max()))
    weights = np.maximum(0.0, 1.0 - np.abs((indices - centers[:, None] + 0.5) / support))
    weights[indices >= end[:, None]] = 0.0
    weights /= weights.sum(1, keepdims=True)
    return np.minimum(indices, in_length - 1), weights


def region_of_interest(path: str | Path, image: str | Path, geometry: Geometry) -> np.ndarray:
    """A mask of the area to inspect (white, any value > 0: inspect) at the model's input (height, width) bool,
    mapped there as the images are; it must have the shape of ``image``, an image of the category (within 5%, for
    images whose size varies a little). UserError otherwise."""
    pixels = read_pixels(path)
    size = image_size(image)
    if size is not None and abs(pixels.shape[0] * size[0] / (pixels.shape[1] * size[1]) - 1) > 0.05:
        raise UserError(f"region to inspect '{path}' is {pixels.shape[1]} x {pixels.shape[0]} pixels, the image "
                        f"'{image}' {size[0]} x {size[1]}: draw it on an image of the category")
    if not (pixels > 0).any():
        raise UserError(f"region to inspect '{path}' is all black: white marks the area to inspect")
    return prepare_mask(pixels, geometry)


def prepared_or_error(path: str | Path, geometry: Geometry) -> tuple[np.ndarray | None, str]:
    """``prepare(read_pixels(path), geometry)``, or None and the reason when anything fails (e.g. MemoryError resizing
    a huge image): one file's problem stays that file's row."""
    try:
        return prepare(read_pixels(path), geometry), ""
    except UserError as err:
        return None, str(err)
    except Exception as err:  # noqa: BLE001
        return None, f"cannot read image '{path}' ({type(err).__name__}: {err})"


def expand_paths(patterns: Sequence[str]) -> list[Path]:
    """The image files named by ``patterns``, in order, each real file once (the first path naming it): a file as
    it is; a folder's images recursively; a glob pattern's (``*``, ``?``, ``[...]``, ``**`` for any depth)
    matching images, and the images of its matching folders. Folders reached through symbolic links are followed,
    each real folder once, so a link loop ends; hidden entries are skipped unless a pattern names them. Anything
    with an image suffix is returned, so that a dangling link or an unreadable file gets its row and its reason
    when it is read. UserError when a pattern names nothing, or a folder cannot be listed."""
    files: dict[str, Path] = {}
    for pattern in patterns:
        if any(character in pattern for character in "*?["):
            matches = list(_glob(pattern))
            if not matches:
                raise UserError(f"no image or folder matches '{pattern}'")
        elif os.path.lexists(pattern):
            matches = [Path(pattern)]
        else:
            raise UserError(f"'{pattern}' does not exist: pass image files, folders or glob patterns")
        for match in matches:
            for path in _images_under(match) if match.is_dir() else [match]:
                files.setdefault(os.path.realpath(path), path)
    if not files:
        raise UserError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(patterns)}")
    return list(files.values())


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _walk(top: Path) -> Iterator[tuple[Path, bool]]:
    """(path, is_folder) of every non-hidden entry below ``top``, depth first in name order, following links to
    folders; a real folder is entered once, so links that loop back end there."""
    entered: set[tuple[int, int]] = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            identity = os.stat(folder)
            key = (identity.st_dev, identity.st_ino)
            if key in entered:
                continue
            entered.add(key)
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as err:
            raise UserError(f"cannot list folder '{folder}' ({err.strerror}): check its permissions") from None
        below = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = folder / entry.name
            is_folder = _is_folder(entry)
            yield path, is_folder
            if is_folder:
                below.append(path)
        stack.extend(reversed(below))


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:
        return False


def _images_under(folder: Path) -> list[Path]:
    return sorted((path for path, is_folder in _walk(folder) if not is_folder and _is_image_name(path.name)),
                  key=lambda path: path.parts)


def _glob(pattern: str) -> Iterator[Path]:
    """The paths that match ``pattern``, in name order: image files, and folders (whose images expand_paths takes).
    Its fixed leading folders are the walk's start; the rest is matched against each path below it."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    top = Path(*parts[:fixed]) if fixed else Path(".")
    regex = _pattern_regex(parts[fixed:])
    if not top.is_dir():
        return
    matched_folders: list[Path] = []
    for path, is_folder in sorted(_walk(top), key=lambda item: item[0].parts):
        if any(path.is_relative_to(folder) for folder in matched_folders):
            continue  # inside a matched folder: expand_paths takes its images
        relative = path.relative_to(top).as_posix()
        if regex.fullmatch(relative) and (is_folder or _is_image_name(path.name)):
            if is_folder:
                matched_folders.append(path)
            yield path


def _pattern_regex(parts: Sequence[str]) -> re.Pattern:
    """A regex for a path relative to the walk's start, from the pattern's components after its fixed ones:
    ``**`` stands for any number of folders (as the last component: anything below)."""
    pieces = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            pieces.append("(?:[^/]+/)*[^/]+" if last else "(?:[^/]+/)*")
        else:
            pieces.append(_component_regex(part) + ("" if last else "/"))
    return re.compile("".join(pieces))


def _component_regex(part: str) -> str:
    """A regex for one name in a glob pattern: ``*`` and ``?`` within the name (not matching a leading '.'),
    ``[...]`` a set (``[!...]`` its complement), anything else itself."""
    out, i = [] if part.startswith(".") else ["(?!\\.)"], 0
    while i < len(part):
        character = part[i]
        if character == "*":
            out.append("[^/]*")
        elif character == "?":
            out.append("[^/]")
        elif character == "[" and "]" in part[i + 2:]:
            end = part.index("]", i + 2)
            body = part[i + 1:end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append(f"[{body.replace(chr(92), chr(92) * 2)}]")
            i = end
        else:
            out.append(re.escape(character))
        i += 1
    return "".join(out)
