"""Image loading: the MVTec AD layout (<root>/<category>/{train/good, validation/good, test/<type>,
ground_truth/<type>/<name>_mask.png}) and unlabelled images to inspect."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from config import UserError
from images import (IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, Geometry, image_size, prepare, prepare_mask,
                    prepared_or_error, read_pixels)

GOOD = "good"
LARGE_IMAGE = 4  # images of over 4x the model's input pixels are decoded in worker processes on any CPU
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


@dataclass(frozen=True)
class Sample:
    path: Path
    defect_type: str
    mask_path: Path | None

    @property
    def label(self) -> int:
        return int(self.defect_type != GOOD)


def _existing_root(root: str | Path) -> Path:
    if not Path(root).is_dir():
        raise UserError(f"data path '{root}' does not exist: pass --data_path, set $MVTEC_AD_PATH, or let train.py "
                        f"fetch MVTec AD there with --download mvtec_ad")
    return Path(root)


def list_categories(root: str | Path) -> list[str]:
    """Every subfolder of ``root`` that has train/good: the 15 MVTec names or a user's own."""
    root = _existing_root(root)
    categories = sorted(p.name for p in root.iterdir() if (p / "train" / GOOD).is_dir())
    if not categories:
        raise UserError(f"no category folder with train/good under '{root}': is it the MVTec AD root?")
    return categories


def images_in(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _mask_for(ground_truth: Path, defect_type: str, image: Path) -> Path | None:
    for name in (f"{image.stem}_mask.png", f"{image.stem}.png"):
        candidate = ground_truth / defect_type / name
        if candidate.is_file():
            return candidate
    return None


def find_samples(root: str | Path, category: str, split: str) -> list[Sample]:
    """The images of one split ('train' or 'test'), with their defect type and mask file."""
    folder = _existing_root(root) / category
    if not folder.is_dir():
        raise UserError(f"category folder '{folder}' does not exist: check --data_path and --category")
    if not (folder / "train" / GOOD).is_dir():
        raise UserError(f"'{folder}' has no train/good folder: expected the MVTec AD layout")
    split_dir = folder / split
    if not split_dir.is_dir():
        raise UserError(f"'{split_dir}' does not exist: expected the MVTec AD layout")
    types = [GOOD] if split == "train" else sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    samples = [
        Sample(path, defect_type, None if defect_type == GOOD else _mask_for(folder / "ground_truth", defect_type, path))
        for defect_type in types
        for path in images_in(split_dir / defect_type)
    ]
    if not samples:
        where = split_dir / GOOD if split == "train" else split_dir
        raise UserError(f"no images found in '{where}' (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return samples


def image_tensor(pixels: np.ndarray, geometry: Geometry) -> torch.Tensor:
    """An image array (from a camera SDK, say) as the model takes it, like load_image does for files: images.prepare
    (scaled by bit depth, resized, cropped), as RGB, ImageNet-normalised; (3, height, width) of ``geometry.size``.
    ``pixels``: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (alpha dropped) of uint8, uint16, bool, or float32 /
    float64 within [0, 1]; anything else is a UserError."""
    try:
        unit = torch.from_numpy(prepare(pixels, geometry))
    except ValueError as err:
        raise UserError(f"cannot use pixel array: {err}") from None
    return normalized(unit)


def normalized(unit: torch.Tensor) -> torch.Tensor:
    """images.prepare's (C, H, W) in [0, 1] as RGB, ImageNet-normalised: the model's input (3, H, W)."""
    return (unit.expand(3, -1, -1) - _MEAN) / _STD


def load_image(path: str | Path, geometry: Geometry) -> torch.Tensor:
    """One image file as the model takes it (image_tensor), read at any bit depth read_pixels reads."""
    return image_tensor(read_pixels(path), geometry)


def load_mask(path: str | Path, geometry: Geometry) -> torch.Tensor:
    """A ground-truth mask (defect where any value > 0, at any bit depth) with its image's geometry (nearest
    neighbour), as bool (height, width)."""
    return torch.from_numpy(prepare_mask(read_pixels(path), geometry))


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) tensor back to an (H, W, 3) array in [0, 1] for display."""
    return (image.cpu() * _STD + _MEAN).clamp(0, 1).permute(1, 2, 0).numpy()


class MVTecDataset(Dataset):
    """One split of one category: images and masks as load_image / load_mask give them, labels, indices."""

    def __init__(self, root: str | Path, category: str, split: str, geometry: Geometry):
        self.samples = find_samples(root, category, split)
        self.geometry = geometry

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        pixels = read_pixels(sample.path)
        if sample.mask_path is not None:
            mask_pixels = read_pixels(sample.mask_path)
            if mask_pixels.shape[:2] != pixels.shape[:2]:
                raise UserError(f"mask '{sample.mask_path}' is {_size(mask_pixels)} pixels, its image '{sample.path}' "
                                f"{_size(pixels)}: a mask must have its image's size (and orientation)")
            mask = torch.from_numpy(prepare_mask(mask_pixels, self.geometry))
        else:
            mask = torch.zeros(self.geometry.size, dtype=torch.bool)
        return {
            "image": image_tensor(pixels, self.geometry),
            "mask": mask,
            "label": sample.label,
            "has_mask": sample.mask_path is not None or sample.label == 0,
            "index": index,
        }


def _size(pixels: np.ndarray) -> str:
    return f"{pixels.shape[1]} x {pixels.shape[0]}"


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """Batches in file order, decoded in ``num_workers`` worker processes (-1: ``auto_workers``; pinned memory for
    a GPU)."""
    workers = auto_workers(device, dataset) if num_workers < 0 else num_workers
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda")


def auto_workers(device: torch.device, dataset: Dataset | None = None) -> int:
    """Decoding processes for ``device``: up to 4, except on a CPU of at most 4 cores, where they would compete with
    the backbone's threads, unless the images are large (``_large_images``): their decoding takes about as long as
    the backbone. With bf16 on 2 cores (README, "Full-size images"): bottle at MVTec's 900 px, 20.2 images/s decoded
    between batches and 27.1 with 2 workers; its 256 px copy 32.1 and 35.9, magnetic tile 29.4 and 26.7."""
    cores = os.cpu_count() or 1
    small_cpu = device.type == "cpu" and cores <= 4
    return 0 if small_cpu and not _large_images(dataset) else min(4, cores)


def _large_images(dataset: Dataset | None) -> bool:
    """Whether the first image of ``dataset`` (an MVTecDataset or ImageFiles, or a concatenation of them) has over
    LARGE_IMAGE times the pixels of the model's input, by its file's header; False when unknown."""
    while isinstance(dataset, ConcatDataset):
        dataset = dataset.datasets[0]
    if isinstance(dataset, MVTecDataset):
        first = dataset.samples[0].path
    elif isinstance(dataset, ImageFiles) and dataset.paths:
        first = dataset.paths[0]
    else:
        return False
    size = image_size(first)  # None when unreadable: the loader names the file when it reads it
    height, width = dataset.geometry.size
    return size is not None and size[0] * size[1] > LARGE_IMAGE * height * width


class ImageFiles(Dataset):
    """Unlabelled images to inspect, read as load_image reads them. A file that cannot be read or prepared, for
    whatever reason, yields a zero image and its error message instead of an exception, so that one bad file in
    thousands does not stop the others."""

    def __init__(self, paths: Sequence[Path], geometry: Geometry):
        self.paths, self.geometry = list(paths), geometry

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        prepared, error = prepared_or_error(self.paths[index], self.geometry)
        if prepared is None:
            return {"image": torch.zeros(3, *self.geometry.size), "error": error, "index": index}
        return {"image": normalized(torch.from_numpy(prepared)), "error": "", "index": index}
