"""Images read by their real value range: every Pillow mode a file opens as, 16-bit, 32-bit and float ones, arrays."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
import torch
from PIL import ExifTags, Image

import images
from images import Geometry
from config import PatchCoreConfig, UserError
from conftest import SMALL_CONFIG, _rgb_texture, _texture
from dataset import (IMAGENET_MEAN, IMAGENET_STD, MVTecDataset, image_tensor, load_image, load_mask, make_loader,
                     read_pixels)
from patchcore import PatchCore

CPU = torch.device("cpu")
RESIZE, SIZE = 72, 64
GEOMETRY = Geometry.of(RESIZE, SIZE)
MEAN, STD = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
# Every bit depth is resampled in float, so the same picture at 8 and 16 bit (or float) loads alike up to float32
# rounding (measured: 0). Pillow's own 8-bit resize, which the loader used before, rounds after each of its two
# passes: up to one 8-bit step away (measured 1.000 / 255 at most, 0.32 / 255 on average).
DEPTH_TOLERANCE = 1e-6
EIGHT_BIT_STEP = 1 / 255 + 1e-6
# images.prepare's antialiased bilinear resize against Pillow's BILINEAR filter in float, what it stands for: the
# same weights, rounded to float32 and summed in float32 (Pillow: double); measured up to 2.4e-7. torch's
# F.interpolate(antialias=True), which the loader used before, differs by up to 2.6e-6 here and 2e-5 elsewhere.
FILTER_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def gray() -> np.ndarray:
    """A non-square (60 x 90) 8-bit gray texture."""
    return np.round(_texture(np.random.default_rng(7), 60, 90) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    """A non-square (60 x 90) 8-bit colour texture."""
    return np.round(_rgb_texture(np.random.default_rng(8), 60, 90) * 255).astype(np.uint8)


def _saved(image: Image.Image, path: Path, **params: object) -> Path:
    image.save(path, **params)
    return path


def _mode(path: Path) -> str:
    with Image.open(path) as image:
        return image.mode


def _unit(tensor: torch.Tensor) -> torch.Tensor:
    """A load_image tensor back in [0, 1] units (undoing the ImageNet normalisation)."""
    return tensor * STD + MEAN


def _before(path: Path) -> torch.Tensor:
    """load_image as it was before images were read at their bit depth: Pillow's convert("RGB") and 8-bit resize."""
    with Image.open(path) as image:
        image = image.convert("RGB").resize((RESIZE, RESIZE), Image.Resampling.BILINEAR)
    offset = (RESIZE - SIZE) // 2
    pixels = np.asarray(image.crop((offset, offset, offset + SIZE, offset + SIZE)))
    return (torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255 - MEAN) / STD


def _load(path: Path) -> torch.Tensor:
    return load_image(path, GEOMETRY)


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((_unit(a) - _unit(b)).abs().max())


# ----------------------------------------------------------------------------------------------------------------
# 8-bit files: exactly as before, and by their RGB content


def _float_resize(rgb: np.ndarray) -> torch.Tensor:
    """The expected tensor of an (H, W, 3) uint8 picture: each channel in [0, 1], resized in float, cropped."""
    offset = (RESIZE - SIZE) // 2
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(channel, np.float32) / 255).resize(
        (RESIZE, RESIZE), Image.Resampling.BILINEAR))[offset:offset + SIZE, offset:offset + SIZE]
        for channel in np.moveaxis(rgb, 2, 0)]
    return (torch.from_numpy(np.stack(planes)) - MEAN) / STD


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "1", "CMYK"])
def test_8bit_images_load_as_their_rgb_resized_in_float(mode: str, rgb: np.ndarray, tmp_path: Path) -> None:
    image = Image.fromarray(rgb).convert(mode)
    path = _saved(image, tmp_path / ("image.tif" if mode == "CMYK" else "image.png"))
    with Image.open(path) as saved:
        expected = _float_resize(np.asarray(saved.convert("RGB")))
    assert _max_difference(_load(path), expected) <= FILTER_TOLERANCE
    assert _max_difference(_load(path), _before(path)) <= EIGHT_BIT_STEP  # the earlier 8-bit resize


@pytest.mark.parametrize("height, width", [(600, 400), (45, 1000), (1250, 500)])
def test_big_and_elongated_images_are_resized_as_pillow_does(height: int, width: int) -> None:
    """Downscaled by up to 17x (a camera frame, a long part, to the model's input), where the filter's support
    matters."""
    rgb = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    assert _max_difference(image_tensor(rgb, GEOMETRY), _float_resize(rgb)) <= FILTER_TOLERANCE


def test_alpha_is_dropped(rgb: np.ndarray, gray: np.ndarray, tmp_path: Path) -> None:
    alpha = np.random.default_rng(0).integers(0, 256, gray.shape, dtype=np.uint8)
    rgba = _saved(Image.fromarray(np.dstack([rgb, alpha])), tmp_path / "rgba.png")
    assert torch.equal(_load(rgba), _load(_saved(Image.fromarray(rgb), tmp_path / "rgb.png")))
    la = _saved(Image.fromarray(np.dstack([gray, alpha])), tmp_path / "la.png")
    assert _mode(la) == "LA"
    assert torch.equal(_load(la), _load(_saved(Image.fromarray(gray), tmp_path / "gray.png")))


def test_premultiplied_gray_alpha_tiff_loads_as_its_gray(gray: np.ndarray, tmp_path: Path) -> None:
    """Pillow opens a TIFF with associated alpha (ExtraSamples 1) as 'La', which convert("RGB") rejects."""
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([gray, np.full_like(gray, 255)])).save(buffer, "TIFF")
    unassociated = b"\x52\x01\x03\x00\x01\x00\x00\x00\x02\x00"  # tag 338 (ExtraSamples), SHORT, 1 value: 2
    path = tmp_path / "la.tif"
    path.write_bytes(buffer.getvalue().replace(unassociated, unassociated[:-2] + b"\x01\x00"))
    assert _mode(path) == "La"
    assert torch.equal(_load(path), _load(_saved(Image.fromarray(gray), tmp_path / "gray.png")))


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_image_loads_as_its_colours(transparency: bool, rgb: np.ndarray, tmp_path: Path) -> None:
    palette_image = Image.fromarray(rgb).quantize(16)
    path = _saved(palette_image, tmp_path / "p.png", **({"transparency": 0} if transparency else {}))
    with Image.open(path) as saved:
        assert saved.mode == "P" and ("transparency" in saved.info) == transparency
    colours = np.asarray(palette_image.getpalette(), np.uint8).reshape(-1, 3)[np.asarray(palette_image)]
    assert torch.equal(_load(path), _load(_saved(Image.fromarray(colours), tmp_path / "colours.png")))


def test_bilevel_image_loads_as_black_and_white(tmp_path: Path) -> None:
    bits = np.random.default_rng(0).random((60, 90)) > 0.5
    path = _saved(Image.fromarray(bits), tmp_path / "bits.png")
    assert _mode(path) == "1"
    black_and_white = Image.fromarray(bits.astype(np.uint8) * 255)
    assert torch.equal(_load(path), _load(_saved(black_and_white, tmp_path / "gray.png")))


def test_cmyk_image_loads_as_its_rgb(rgb: np.ndarray, tmp_path: Path) -> None:
    cmyk = np.dstack([255 - rgb, np.zeros_like(rgb[:, :, 0])])  # no black: red = 255 - cyan, ...
    path = _saved(Image.fromarray(cmyk, "CMYK"), tmp_path / "cmyk.tif")
    assert torch.equal(_load(path), _load(_saved(Image.fromarray(rgb), tmp_path / "rgb.png")))


def test_unknown_mode_is_a_user_error(rgb: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _saved(Image.fromarray(rgb).convert("CMYK"), tmp_path / "cmyk.tif")
    monkeypatch.setattr(images, "_EIGHT_BIT_MODES", images._EIGHT_BIT_MODES - {"CMYK"})  # a mode it does not know
    with pytest.raises(UserError, match=rf"^cannot read image '{path}' \(mode CMYK: unsupported"):
        _load(path)


# ----------------------------------------------------------------------------------------------------------------
# Deeper files: their value range, their precision


def _16bit_gray_files(gray: np.ndarray, folder: Path) -> list[Path]:
    """The 8-bit ``gray`` at 16 bit (value * 257) as PNG (I;16), little-endian TIFF (I;16), big-endian TIFF (I;16B)."""
    deep = gray.astype(np.uint16) * 257
    big_endian = Image.frombytes("I;16B", deep.shape[::-1], deep.astype(">u2").tobytes())
    return [_saved(Image.fromarray(deep), folder / "deep.png"), _saved(Image.fromarray(deep), folder / "deep.tif"),
            _saved(big_endian, folder / "deep_big_endian.tif")]


def test_16bit_gray_equals_its_8bit_version(gray: np.ndarray, tmp_path: Path) -> None:
    eight_bit = _load(_saved(Image.fromarray(gray), tmp_path / "gray.png"))
    for path in _16bit_gray_files(gray, tmp_path):
        assert _mode(path) in {"I;16", "I;16B"}
        deep = _load(path)
        assert _max_difference(deep, eight_bit) <= DEPTH_TOLERANCE
        assert _max_difference(deep, image_tensor(gray / 255, GEOMETRY)) < 1e-6  # its precision kept (1.2e-7)
        assert float(_unit(deep).mean()) == pytest.approx(float(_unit(eight_bit).mean()), abs=1e-3)
        assert float(_unit(_before(path)).min()) > 0.99  # what convert("RGB") made of it: all white


def test_12bit_range_loads_dark_not_clipped(gray: np.ndarray, tmp_path: Path) -> None:
    twelve_bit = gray.astype(np.uint16) * 16  # 0 to 4080, as a 12-bit camera fills a 16-bit PNG
    deep = _unit(_load(_saved(Image.fromarray(twelve_bit), tmp_path / "12bit.png")))
    eight_bit = _unit(_load(_saved(Image.fromarray(gray), tmp_path / "gray.png")))
    assert float(deep.max()) <= 4095 / 65535
    assert torch.allclose(deep, eight_bit * (255 * 16 / 65535), atol=1e-3)


def test_32bit_integer_image_within_16_bits_loads_as_16bit(gray: np.ndarray, tmp_path: Path) -> None:
    path = _saved(Image.fromarray(gray.astype(np.int32) * 257), tmp_path / "int32.tif")
    assert _mode(path) == "I"
    assert torch.equal(_load(path), _load(_16bit_gray_files(gray, tmp_path)[0]))


@pytest.mark.parametrize("value", [-1, 65536])
def test_32bit_integer_image_beyond_16_bits_is_a_user_error(value: int, gray: np.ndarray, tmp_path: Path) -> None:
    pixels = gray.astype(np.int32)
    pixels[0, 0] = value
    path = _saved(Image.fromarray(pixels), tmp_path / "int32.tif")
    with pytest.raises(UserError, match=rf"^cannot read image '{path}' \(mode I: .*0 to 65535"):
        _load(path)


def test_float_tiff_in_unit_range_equals_its_8bit_version(gray: np.ndarray, tmp_path: Path) -> None:
    path = _saved(Image.fromarray(gray.astype(np.float32) / 255), tmp_path / "float.tif")
    assert _mode(path) == "F"
    assert _max_difference(_load(path), _load(_saved(Image.fromarray(gray), tmp_path / "gray.png"))) <= DEPTH_TOLERANCE


@pytest.mark.parametrize("value", [1.5, -0.1, np.nan, np.inf])
def test_float_tiff_beyond_unit_range_is_a_user_error(value: float, gray: np.ndarray, tmp_path: Path) -> None:
    pixels = gray.astype(np.float32) / 255
    pixels[0, 0] = value
    path = _saved(Image.fromarray(pixels), tmp_path / "float.tif")
    with pytest.raises(UserError, match=rf"^cannot read image '{path}' \(mode F: .*within \[0, 1\].*rescale"):
        _load(path)


def _orientation_exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return exif


def _16bit_colour_file(pixels: np.ndarray, path: Path, orientation: int = 1) -> Path:
    """(H, W, 3 or 4) uint16 ``pixels`` as a PNG (imagecodecs) or TIFF (tifffile) by ``path``'s suffix, as Pillow
    cannot write them; an ``orientation`` other than 1 as a TIFF tag, or as a PNG's eXIf chunk after its pixels."""
    if path.suffix == ".tif":
        alpha = ["unassalpha"] if pixels.shape[2] == 4 else None
        tags = [(ExifTags.Base.Orientation, "H", 1, orientation, True)] if orientation != 1 else []
        tifffile.imwrite(path, pixels, photometric="rgb", extrasamples=alpha, extratags=tags)
        return path
    png = imagecodecs.png_encode(pixels)
    if orientation != 1:
        data = b"eXIf" + _orientation_exif(orientation).tobytes()[6:]  # without its "Exif\0\0" header
        png = png[:-12] + struct.pack(">I", len(data) - 4) + data + struct.pack(">I", zlib.crc32(data)) + png[-12:]
    path.write_bytes(png)
    return path


def _16bit_rgb(rgb: np.ndarray, seed: int) -> np.ndarray:
    """``rgb`` as the high bytes of 16-bit values, with random low bytes."""
    return rgb.astype(np.uint16) << 8 | np.random.default_rng(seed).integers(0, 256, rgb.shape, dtype=np.uint16)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_colour_equals_its_8bit_version(suffix: str, rgb: np.ndarray, tmp_path: Path) -> None:
    path = _16bit_colour_file(rgb.astype(np.uint16) * 257, tmp_path / f"deep{suffix}")
    assert _mode(path) == "RGB"
    eight_bit = _load(_saved(Image.fromarray(rgb), tmp_path / "rgb.png"))
    assert _max_difference(_load(path), eight_bit) <= DEPTH_TOLERANCE


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_colour_keeps_its_low_byte(suffix: str, rgb: np.ndarray, tmp_path: Path) -> None:
    """Two files that differ only in the low byte of each value (Pillow reads both as the same 8-bit RGB)."""
    one, other = _16bit_rgb(rgb, 0), _16bit_rgb(rgb, 1)
    pixels = read_pixels(_16bit_colour_file(one, tmp_path / f"one{suffix}"))
    assert pixels.dtype == np.uint16 and np.array_equal(pixels, one)
    prepared = images.prepare(pixels, GEOMETRY)
    # each value v at v / 65535, as an 8-bit image's at v / 255
    assert np.abs(prepared - images.prepare(one / 65535, GEOMETRY)).max() <= DEPTH_TOLERANCE
    other_prepared = images.prepare(read_pixels(_16bit_colour_file(other, tmp_path / f"other{suffix}")), GEOMETRY)
    assert np.abs(prepared - other_prepared).max() > 1e-4


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_colour_alpha_is_dropped(suffix: str, rgb: np.ndarray, tmp_path: Path) -> None:
    deep = _16bit_rgb(rgb, 0)
    alpha = np.random.default_rng(2).integers(0, 65536, rgb.shape[:2], dtype=np.uint16)
    path = _16bit_colour_file(np.dstack([deep, alpha]), tmp_path / f"rgba{suffix}")
    assert _mode(path) == "RGBA"
    assert np.array_equal(read_pixels(path), deep)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_colour_is_turned_upright_as_pillow_turns_8bit(suffix: str, orientation: int, rgb: np.ndarray,
                                                             tmp_path: Path) -> None:
    eight_bit = _saved(Image.fromarray(rgb), tmp_path / f"rgb{suffix}", exif=_orientation_exif(orientation))
    deep = _16bit_colour_file(_16bit_rgb(rgb, 0), tmp_path / f"deep{suffix}", orientation)
    assert np.array_equal(read_pixels(deep) >> 8, read_pixels(eight_bit))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_oversize_16bit_colour_is_refused_before_decoding(suffix: str, rgb: np.ndarray, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = _16bit_colour_file(_16bit_rgb(rgb, 0), tmp_path / f"big{suffix}")
    decoded = []
    monkeypatch.setattr(tifffile, "imread", lambda *args, **kwargs: decoded.append(args))
    monkeypatch.setattr(imagecodecs, "png_decode", lambda *args, **kwargs: decoded.append(args))
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 90 * 60 - 1)
    with pytest.raises(UserError, match=rf"^cannot read image '{path}' \(90 x 60 pixels, over the limit"):
        read_pixels(path)
    assert decoded == []


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_damaged_16bit_colour_file_is_a_user_error(suffix: str, rgb: np.ndarray, tmp_path: Path) -> None:
    """Its header whole (Pillow opens it), half its pixels gone: the decoder's error becomes the file's."""
    path = _16bit_colour_file(_16bit_rgb(rgb, 0), tmp_path / f"damaged{suffix}")
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    assert _mode(path) == "RGB"
    with pytest.raises(UserError, match=rf"^cannot read image '{path}' \(.+\): replace or remove the file$"):
        read_pixels(path)


def test_16bit_mask_marks_every_nonzero_value(tmp_path: Path) -> None:
    defect = np.zeros((60, 90), bool)
    defect[20:40, 30:50] = True
    eight_bit = _saved(Image.fromarray(defect.astype(np.uint8) * 255), tmp_path / "mask.png")
    sixteen_bit = _saved(Image.fromarray(defect.astype(np.uint16)), tmp_path / "mask16.png")  # 1 of 65535
    expected = load_mask(eight_bit, GEOMETRY)
    assert expected.any()
    assert torch.equal(load_mask(sixteen_bit, GEOMETRY), expected)


# ----------------------------------------------------------------------------------------------------------------
# Arrays (image_tensor): the same reading as for files


def _array(pixels: np.ndarray) -> torch.Tensor:
    return image_tensor(pixels, GEOMETRY)


def test_arrays_load_as_the_files_of_them(rgb: np.ndarray, gray: np.ndarray, tmp_path: Path) -> None:
    rgb_file = _load(_saved(Image.fromarray(rgb), tmp_path / "rgb.png"))
    gray_file = _load(_saved(Image.fromarray(gray), tmp_path / "gray.png"))
    assert torch.equal(_array(rgb), rgb_file)
    assert torch.equal(_array(np.dstack([rgb, np.zeros_like(gray)])), rgb_file)  # (H, W, 4): alpha dropped
    assert torch.equal(_array(gray), gray_file)
    assert torch.equal(_array(gray[:, :, None]), gray_file)
    assert torch.equal(_array(gray.astype(np.uint16) * 257), _load(_16bit_gray_files(gray, tmp_path)[0]))
    bits = gray > 128
    assert torch.equal(_array(bits), _load(_saved(Image.fromarray(bits), tmp_path / "bits.png")))
    for dtype in (np.float32, np.float64):
        assert _max_difference(_array(rgb.astype(dtype) / 255), rgb_file) <= DEPTH_TOLERANCE


@pytest.mark.parametrize(("pixels", "problem"), [
    (np.zeros((60, 90), np.int64), "dtype int64"),
    (np.full((60, 90), 2.0), r"within \[0, 1\]"),
    (np.full((60, 90), np.nan, np.float32), r"within \[0, 1\]"),
    (np.zeros((60, 90, 2), np.uint8), r"shape \(60, 90, 2\)"),
    (np.zeros((1, 60, 90, 3), np.uint8), r"shape \(1, 60, 90, 3\)"),
])
def test_bad_arrays_are_user_errors(pixels: np.ndarray, problem: str) -> None:
    with pytest.raises(UserError, match=rf"^cannot use pixel array: .*{problem}"):
        _array(pixels)


# ----------------------------------------------------------------------------------------------------------------
# With the model: the same picture at 8 and 16 bit scores the same


def test_patchcore_scores_the_16bit_image_as_the_8bit_one(data_root: Path, tmp_path: Path) -> None:
    config = PatchCoreConfig(**SMALL_CONFIG, precision="fp32")  # bf16 would round the two inputs apart
    model = PatchCore(config, CPU)
    model.fit(make_loader(MVTecDataset(data_root, "gray", "train", config.geometry), batch_size=8,
                          num_workers=0, device=CPU))
    test = MVTecDataset(data_root, "gray", "test", config.geometry)
    eight_bit, sixteen_bit = [], []
    for i, sample in enumerate(test.samples):
        deep = read_pixels(sample.path)[:, :, 0].astype(np.uint16) * 257  # 'gray' is 8-bit L
        eight_bit.append(load_image(sample.path, config.geometry))
        sixteen_bit.append(load_image(_saved(Image.fromarray(deep), tmp_path / f"{i}.png"), config.geometry))
    scores_8, _ = model.predict(torch.stack(eight_bit))
    scores_16, _ = model.predict(torch.stack(sixteen_bit))
    assert torch.allclose(scores_16, scores_8, rtol=1e-5)  # measured: equal
