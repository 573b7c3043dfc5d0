"""MVTec AD layout loader: <root>/<category>/{train/good, test/<type>, ground_truth/<type>/<name>_mask.png}."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from config import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GOOD = "good"
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
        raise UserError(f"data path '{root}' does not exist: pass --data_path or set $MVTEC_AD_PATH")
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


def _open(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise UserError(f"cannot read image '{path}' ({err}): replace or remove the file") from None


def _resize_and_crop(image: Image.Image, resize: int, image_size: int, resample: Image.Resampling) -> np.ndarray:
    image = image.resize((resize, resize), resample)
    offset = (resize - image_size) // 2
    return np.asarray(image.crop((offset, offset, offset + image_size, offset + image_size)))


def load_image(path: str | Path, resize: int, image_size: int) -> torch.Tensor:
    """One image as the model takes it: RGB, resized to resize x resize (non-square images are squeezed, not
    cropped to their shorter side, so defects near the long sides stay in view), center-cropped to
    image_size, ImageNet-normalised; (3, image_size, image_size)."""
    pixels = _resize_and_crop(_open(Path(path), "RGB"), resize, image_size, Image.Resampling.BILINEAR)
    return (torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255 - _MEAN) / _STD


def load_mask(path: str | Path, resize: int, image_size: int) -> torch.Tensor:
    """A ground-truth mask with the same geometry as load_image (nearest neighbour), as bool."""
    return torch.from_numpy(_resize_and_crop(_open(Path(path), "L"), resize, image_size, Image.Resampling.NEAREST) > 0)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) tensor back to an (H, W, 3) array in [0, 1] for display."""
    return (image.cpu() * _STD + _MEAN).clamp(0, 1).permute(1, 2, 0).numpy()


class MVTecDataset(Dataset):
    """One split of one category: images and masks as load_image / load_mask give them, labels, indices."""

    def __init__(self, root: str | Path, category: str, split: str, resize: int, image_size: int):
        self.samples = find_samples(root, category, split)
        self.resize, self.image_size = resize, image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        if sample.mask_path is not None:
            mask = load_mask(sample.mask_path, self.resize, self.image_size)
        else:
            mask = torch.zeros(self.image_size, self.image_size, dtype=torch.bool)
        return {
            "image": load_image(sample.path, self.resize, self.image_size),
            "mask": mask,
            "label": sample.label,
            "has_mask": sample.mask_path is not None or sample.label == 0,
            "index": index,
        }


def make_loader(dataset: MVTecDataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """Batches in file order, decoded in worker processes (pinned memory for a GPU)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=device.type == "cuda")

