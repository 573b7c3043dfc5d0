"""A full-resolution stand-in of a downscaled category, for timing the loader where decoding costs.

    python benchmarks/upscaled_copy.py ../shared/data/mvtec_ad/bottle /tmp/bottle_900/bottle --size 900

The shared bottle is a 256 px copy of MVTec AD's 900 px original: decoding it is cheap, decoding the original is
not. This writes every image of the category folder upscaled to --size (bicubic; masks nearest) as PNG, in the same
layout, so that benchmarks can read images of the original's size. Smooth upscaled pictures compress better than
photographs, so their decoding is, if anything, cheaper than the original's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset import IMAGE_SUFFIXES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a category folder in the MVTec layout")
    parser.add_argument("target", type=Path, help="the new category folder (must not exist)")
    parser.add_argument("--size", type=int, default=900, help="side of the square copies, in pixels")
    args = parser.parse_args()
    if not (args.source / "train").is_dir():
        parser.error(f"'{args.source}' has no train folder: pass a category folder in the MVTec layout")
    if args.target.exists():
        parser.error(f"'{args.target}' exists: pass a new folder")
    paths = sorted(p for p in args.source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for path in tqdm(paths, desc="upscaling", unit="image"):
        target = (args.target / path.relative_to(args.source)).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        resample = Image.Resampling.NEAREST if "ground_truth" in path.relative_to(args.source).parts \
            else Image.Resampling.BICUBIC
        with Image.open(path) as image:
            image.resize((args.size, args.size), resample).save(target)
    print(f"{len(paths)} images at {args.size} px -> {args.target}")


if __name__ == "__main__":
    main()
