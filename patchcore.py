"""PatchCore (Roth et al., CVPR 2022): patch embedding, greedy coreset memory bank, k-NN scores and anomaly maps."""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from atomic import atomic_write
from backbone import FeatureExtractor
from calibration import Calibration, chosen_thresholds
from config import CPU_PIXELS_PER_PASS, PatchCoreConfig, UserError, cpu_has_native_bf16
from coreset import Coreset, FeatureStore, Projection, choose_coresets, image_folds
from dataset import image_tensor, load_image
from images import file_sha256
from search import NearestNeighbours
from verdicts import Inspection

CHECKPOINT_FORMAT = "patchcore-memory-bank"
CHECKPOINT_VERSION = 2  # 2: carries the backbone weights and the calibrated thresholds
# fields added since version 2 came: they take their defaults when absent, or the value they would have had
FIELDS_ADDED_IN_VERSION_2 = {"coreset", "coreset_shard_size", "search", "ivf_probe", "precision", "fp32_bank",
                             "keep_aspect", "calibration_folds"}
VALUES_BEFORE_THE_FIELD = {"fp32_bank": False}  # what checkpoints without the field were trained with
FIELDS_REMOVED = {"calibration_fraction"}  # settings older checkpoints hold that no longer exist: dropped at load
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
MAX_PASS_PIXELS = 1 << 21  # larger inputs (over 2.1 megapixels) are embedded in tiles of about this size


def _adaptive_bins(in_len: int, out_len: int) -> list[tuple[int, int]]:
    """The input range [start, end) that adaptive_avg_pool1d averages for each output."""
    return [((i * in_len) // out_len, -(-((i + 1) * in_len) // out_len)) for i in range(out_len)]


class PatchEmbedding(nn.Module):
    """Locally aware patch features, exactly as the PatchCore reference computes them, but directly.

    The reference unfolds every p x p neighbourhood of each layer (zero padding), upsamples the deeper
    layers' patches bilinearly to the first layer's grid, adaptive-average-pools each flattened C*p*p patch
    to ``dim``, stacks the layers and pools the stack to ``dim`` again. That is one fixed linear map in
    which each output sums depthwise p x p filters of one or two channels of a single layer. The filters
    and channel indices are derived from the pooling bins once; the forward pass runs those depthwise
    convolutions at each layer's own resolution, gathers the channels each output needs, upsamples and
    adds — the C*p*p patch tensors are never built.
    """

    def __init__(self, channels: tuple[int, ...], patch_size: int, dim: int):
        super().__init__()
        self.patch_size, self.dim = patch_size, dim
        self.output_ranges: list[tuple[int, int]] = []
        self.ragged: list[bool] = []
        stack_bins = _adaptive_bins(len(channels) * dim, dim)
        for layer, num_channels in enumerate(channels):
            kernels, index, weight, span = self._layer_map(layer, num_channels, stack_bins)
            self.register_buffer(f"kernels{layer}", kernels.repeat(num_channels, 1, 1, 1))
            self.register_buffer(f"index{layer}", index)
            self.register_buffer(f"weight{layer}", weight)
            self.output_ranges.append(span)
            self.ragged.append(not bool(weight.all()))

    def _layer_map(self, layer: int, num_channels: int, stack_bins: list[tuple[int, int]]):
        """Filters, gather indices and term weights of one layer's share of the reference's pooling."""
        area, dim = self.patch_size**2, self.dim
        patch_bins = _adaptive_bins(num_channels * area, dim)
        terms: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0] * area))
        for out, (start, end) in enumerate(stack_bins):
            for stacked in range(start, end):
                if stacked // dim != layer:
                    continue
                p_start, p_end = patch_bins[stacked % dim]
                for flat in range(p_start, p_end):
                    channel, position = divmod(flat, area)
                    terms[out][channel][position] += 1.0 / ((end - start) * (p_end - p_start))
        outputs = sorted(terms)
        kernel_ids: dict[tuple[float, ...], int] = {}
        per_output = [[(channel, kernel_ids.setdefault(tuple(round(w, 12) for w in row), len(kernel_ids)))
                       for channel, row in terms[out].items()] for out in outputs]
        num_kernels = len(kernel_ids)
        width = max(len(t) for t in per_output)
        index = torch.zeros(len(outputs), width, dtype=torch.long)
        weight = torch.zeros(len(outputs), width)
        for row, pairs in enumerate(per_output):
            for column, (channel, kernel) in enumerate(pairs):
                index[row, column] = channel * num_kernels + kernel
                weight[row, column] = 1.0
        kernels = torch.tensor(list(kernel_ids), dtype=torch.float32).view(num_kernels, 1, self.patch_size, self.patch_size)
        return kernels, index, weight, (outputs[0], outputs[-1] + 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Backbone maps (B, C_l, h_l, w_l) -> patch features (B, h_0, w_0, dim)."""
        height, width = maps[0].shape[-2:]
        pieces, covered = [], 0
        for layer, x in enumerate(maps):
            kernels, index, weight = (getattr(self, f"{name}{layer}") for name in ("kernels", "index", "weight"))
            local = F.conv2d(x.to(kernels.dtype), kernels, padding=self.patch_size // 2, groups=x.shape[1])
            gathered = local.index_select(1, index.flatten()).unflatten(1, index.shape)
            features = (gathered * weight[..., None, None]).sum(2) if self.ragged[layer] else gathered.sum(2)
            if features.shape[-2:] != (height, width):
                features = F.interpolate(features, size=(height, width), mode="bilinear", align_corners=False)
            start, end = self.output_ranges[layer]
            overlap = covered - start  # outputs whose pooling bin spans this layer and the one before: their sum
            if overlap > 0:
                pieces[-1] = torch.cat([pieces[-1][:, :-overlap], pieces[-1][:, -overlap:] + features[:, :overlap]], 1)
                features = features[:, overlap:]
            pieces.append(features)
            covered = end
        # layers' outputs side by side (an exported graph runs a slice-assignment as transposes and a scatter)
        return torch.cat(pieces, 1).permute(0, 2, 3, 1)


@dataclasses.dataclass(frozen=True)
class RegionOfInterest:
    """The part of the model's input to inspect: ``pixels`` (H, W), 1 inside and 0 outside, and ``patches`` (h, w),
    the same on the feature grid: a patch counts when any of its pixels is inspected (a defect at the region's edge
    is still seen)."""

    pixels: torch.Tensor
    patches: torch.Tensor

    @classmethod
    def of(cls, mask: torch.Tensor, grid: tuple[int, int]) -> RegionOfInterest:
        """From a bool (H, W) mask at the model's input and its feature grid (h, w)."""
        pixels = mask.float()
        return cls(pixels, F.adaptive_max_pool2d(pixels[None, None], grid)[0, 0])

    def to(self, device: torch.device) -> RegionOfInterest:
        return RegionOfInterest(self.pixels.to(device), self.patches.to(device))

    def blank(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) with the ignored area set to 0, the mean colour: what lies there reaches
        no feature of the inspected area through the backbone's receptive field, in training and inspection alike."""
        return images * self.pixels


def _require_finite(features: torch.Tensor, dataset, indices: torch.Tensor) -> None:
    """UserError naming the first image of a batch whose features are NaN or infinite (broken weights): such a
    bank would pass every defect."""
    finite = torch.isfinite(features.flatten(1)).all(1).cpu()
    if not finite.all():
        index = int(indices[~finite][0])
        name = getattr(dataset, "samples", None)
        image = f"'{name[index].path}'" if name is not None else f"number {index}"
        raise UserError(f"the backbone gives NaN or infinite features for image {image}: check --weights (a damaged "
                        f"weights file?) and the image")


def _upsampling_matrix(source: int, target: int) -> torch.Tensor:
    """(target, source) matrix of 1-D linear interpolation, F.interpolate(mode="linear", align_corners=False)."""
    identity = torch.eye(source, dtype=torch.float64)[None]
    return F.interpolate(identity, size=target, mode="linear", align_corners=False)[0].T


def _gaussian_matrix(size: int, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """(size, size) matrix of scipy.ndimage.gaussian_filter1d(x, sigma) (mode 'reflect', truncate 4)."""
    if sigma <= 0:
        return torch.eye(size, dtype=torch.float64)
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1)
    weights = torch.exp(-0.5 * (offsets.double() / sigma) ** 2)
    positions = (torch.arange(size)[:, None] + offsets) % (2 * size)
    positions = torch.where(positions < size, positions, 2 * size - 1 - positions)  # half-sample symmetric
    matrix = torch.zeros(size, size, dtype=torch.float64)
    return matrix.scatter_add_(1, positions, (weights / weights.sum()).expand(size, -1))


@functools.lru_cache(maxsize=8)
def map_operator(source: int, size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return (_gaussian_matrix(size, sigma) @ _upsampling_matrix(source, size)).to(device, dtype)


def anomaly_maps(patch_scores: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """Patch scores (B, h, w) -> maps (B, H, W) of ``size``: bilinear upsampling then Gaussian smoothing, as the
    reference does with F.interpolate and scipy.ndimage.gaussian_filter. Both are separable linear maps, so
    they are folded into one small matrix per axis and applied as two batched products on the scores' device."""
    _, height, width = patch_scores.shape
    rows = map_operator(height, size[0], sigma, patch_scores.device, patch_scores.dtype)
    columns = map_operator(width, size[1], sigma, patch_scores.device, patch_scores.dtype)
    return rows @ patch_scores @ columns.T


def score_patches(features: torch.Tensor, nearest: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                  neighbourhood: Callable[[torch.Tensor], torch.Tensor], bank: Callable[[torch.Tensor], torch.Tensor],
                  config: PatchCoreConfig, roi: RegionOfInterest | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch features (B, h, w, D) -> image scores (B,) and anomaly maps (B, S, S): the scoring of PatchCore.predict
    and of the exported graph alike. ``nearest(queries)`` gives each query's L2 distance to its nearest bank entry
    and that entry's index; ``neighbourhood(entries)`` the indices of each entry's k nearest entries and
    ``bank(entries)`` their rows (both used only for k > 1). A patch's score is its distance, the image's the
    largest, reweighted for k > 1 by the paper's Eq. 7; the map is the patch scores upsampled and smoothed. With an
    ``roi``, patches outside it score 0 and the maps are 0 outside it."""
    batch, height, width, dim = features.shape
    distances, indices = nearest(features.reshape(-1, dim))
    patch_scores = distances.reshape(batch, height * width)
    if roi is not None:
        patch_scores = patch_scores * roi.patches.flatten()  # outside the region: 0, never an image's score
    image_scores = patch_scores.max(1).values
    if config.k > 1:
        image_scores = _reweight(features.reshape(batch, -1, dim), patch_scores, indices.view(batch, -1),
                                 neighbourhood, bank)
    maps = anomaly_maps(patch_scores.view(batch, height, width), config.geometry.size, config.blur_sigma)
    return image_scores, maps if roi is None else maps * roi.pixels


def _reweight(features: torch.Tensor, patch_scores: torch.Tensor, nearest: torch.Tensor,
              neighbourhood: Callable[[torch.Tensor], torch.Tensor],
              bank: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The paper's Eq. 7: damp the maximal patch score s* when the bank entry m* nearest to that test patch lies in a
    dense bank region, s = (1 - exp(s*) / sum over the k nearest bank entries m of m* of exp(||m_test* - m||)) * s*."""
    rows = torch.arange(features.shape[0], device=features.device)
    worst = patch_scores.argmax(1)
    test_patch = features[rows, worst]
    distances = (test_patch[:, None] - bank(neighbourhood(nearest[rows, worst]))).norm(dim=-1)
    s_star = patch_scores[rows, worst]
    return (1 - torch.exp(s_star - torch.logsumexp(distances, dim=1))) * s_star


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PatchCore:
    """A memory bank of nominal patch features and the scoring against it, for one category."""

    def __init__(self, config: PatchCoreConfig, device: torch.device, extractor: FeatureExtractor | None = None):
        config.validate()
        self.config, self.device = config, device
        self.precision, self.search = config.resolved_precision(device), config.resolved_search(device)
        if self.precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
            print("note: this CPU has no native bf16: the backbone runs far slower in bf16 than in fp32",
                  file=sys.stderr)
        if extractor is None:
            torch.manual_seed(config.seed)  # makes --weights none reproducible
            extractor = FeatureExtractor(config.backbone, config.weights, config.layers)
        self.extractor = extractor.to(device, memory_format=torch.channels_last)
        self.embedding = PatchEmbedding(extractor.channels, config.patch_size, config.embedding_dim).to(device)
        self.memory_bank: torch.Tensor | None = None
        self.neighbours: NearestNeighbours | None = None
        self.ivf_centroids: torch.Tensor | None = None  # with search 'ivf': the index's lists (k-means at training)
        self.calibration: Calibration | None = None
        # Provenance: the images that built the bank ({"path", "sha256"}, and "removed" once taken out), the image of
        # each bank entry (index into images, -1 unknown), the versions (history: one entry per training or update,
        # with what undoes it); and the checkpoint's other fields (category, ...).
        self.images: list[dict] = []
        self.entry_images: torch.Tensor | None = None
        self.history: list[dict] = []
        self.metadata: dict = {}
        self.roi: torch.Tensor | None = None  # (H, W) bool at the model's input: the area to inspect (None: all)
        self._regions: dict[tuple[int, int], RegionOfInterest] = {}

    def set_roi(self, mask: torch.Tensor | None) -> None:
        """Inspect only where ``mask`` (H, W at the model's input, bool) is true; None: everywhere."""
        if mask is not None and tuple(mask.shape) != self.config.geometry.size:
            raise UserError(f"the region to inspect is {tuple(mask.shape)} at the model's input, the input is "
                            f"{self.config.geometry.size}")
        self.roi, self._regions = (None if mask is None else mask.bool().cpu()), {}

    def region(self, grid: tuple[int, int] | None = None) -> RegionOfInterest | None:
        """The region to inspect on the model's input, and on the feature grid ``grid`` (default: this geometry's,
        the input size over the backbone's stride, rounded up); None without one."""
        if self.roi is None:
            return None
        height, width = self.config.geometry.size
        grid = grid or (-(-height // self.extractor.stride), -(-width // self.extractor.stride))
        if tuple(grid) not in self._regions:
            self._regions[tuple(grid)] = RegionOfInterest.of(self.roi, tuple(grid)).to(self.device)
        return self._regions[tuple(grid)]

    @torch.inference_mode()
    def embed(self, images: torch.Tensor, reduced_precision: bool = True) -> torch.Tensor:
        """Normalised images (B, 3, S, S) -> patch features (B, h, w, D), float32 on the model's device; the backbone
        in the model's precision, or with ``reduced_precision`` False in fp32.

        On a CPU the images go through in groups of about CPU_PIXELS_PER_PASS pixels, whose activations stay in the
        caches; an image over MAX_PASS_PIXELS goes through in tiles."""
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        region = self.region()
        if region is not None:
            images = region.blank(images)
        dtype = AUTOCAST_DTYPES.get(self.precision) if reduced_precision else None
        if images[0, 0].numel() > MAX_PASS_PIXELS:
            return torch.stack([self._embed_tiled(image, dtype) for image in images])
        group = max(1, CPU_PIXELS_PER_PASS // images[0, 0].numel()) if self.device.type == "cpu" else len(images)
        features = []
        for part in images.split(group):
            features.append(self._embed_pass(part, dtype))
        return features[0] if len(features) == 1 else torch.cat(features)

    def _embed_pass(self, images: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        maps = self.extractor(images, autocast=dtype)
        return self.embedding([m.float() for m in maps])

    def _embed_tiled(self, image: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        """One large image's patch features (h, w, D) from overlapping tiles of about MAX_PASS_PIXELS, each padded
        by the features' receptive radius, whose inner features are stitched: equal to one pass over the whole image
        (up to float rounding), in a fraction of its memory. Tiles start on the deepest layer's grid, so every layer's
        grid lines up with the whole image's; that needs a height and width in multiples of that stride."""
        height, width = image.shape[-2:]
        align, stride = self.extractor.deep_stride, self.extractor.stride
        if height % align or width % align:
            raise UserError(f"a {height} x {width} input is processed in tiles, which need a height and width in "
                            f"multiples of {align}: pass --image_size {height // align * align} "
                            f"{width // align * align} (or --long_side, which rounds so)")
        reach = self.extractor.receptive_field + (self.config.patch_size + 1) * align  # + aggregation, upsampling
        margin = -(-reach // 2 // align) * align
        side = max(4 * margin, int(MAX_PASS_PIXELS ** 0.5) // align * align)
        core = side - 2 * margin
        features = None
        for top in range(0, height, core):
            for left in range(0, width, core):
                y0, x0 = max(0, top - margin), max(0, left - margin)
                tile = self._embed_pass(image[None, :, y0:min(height, top + core + margin),
                                              x0:min(width, left + core + margin)], dtype)[0]
                if features is None:
                    features = tile.new_empty(-(-height // stride), -(-width // stride), tile.shape[-1])
                rows = slice(top // stride, -(-min(height, top + core) // stride))
                columns = slice(left // stride, -(-min(width, left + core) // stride))
                features[rows, columns] = tile[rows.start - y0 // stride:rows.stop - y0 // stride,
                                               columns.start - x0 // stride:columns.stop - x0 // stride]
        return features

    @torch.inference_mode()
    def fit(self, loader: DataLoader, calibration_folds: int = 0, feature_store: str = "memory") -> dict:
        """Build the memory bank from nominal training images; returns seconds per stage and sizes.

        ``feature_store`` 'disk' keeps the full patch features in a temporary file while the coreset is chosen on
        their projections (which alone stay in memory), 'auto' does so when they would crowd the free memory; the
        memory bank is the same. With ``calibration_folds`` (k), every training image is also scored out of fold,
        for calibration, as an unseen good image: the images are split in k folds (coreset.image_folds) and each
        fold is scored against the coreset (same settings) of the other folds' patches, which is the bank that
        training without that fold would build. The folds' coresets and the bank's are chosen in one greedy pass
        (choose_coresets). The scores and map maxima, in the data set's order, are returned under 'out_of_fold',
        computed in the precision that inspection will use: under ``fp32_bank`` with reduced precision, the images
        are embedded once more in that precision. The memory bank itself keeps every image's patches.
        """
        start = time.perf_counter()
        config = self.config
        projection = Projection(config.embedding_dim, config.projection_dim, config.seed)
        matrix = projection.matrix.to(self.device)
        store = None
        try:
            for batch in tqdm(loader, desc="features", unit="batch"):
                embedded = self.embed(batch["image"], reduced_precision=not config.fp32_bank)
                patches = embedded.flatten(0, 2)
                if store is None:  # sized once from the first batch: no concatenation copies
                    grid = list(embedded.shape[1:3])
                    store = self._feature_store(len(loader.dataset) * grid[0] * grid[1], feature_store)
                    points = torch.empty(store.num_rows, config.projection_dim, device=self.device)
                projected = points[store.filled:store.filled + len(patches)]
                projected[:] = patches @ matrix
                # a NaN or infinite feature makes its projection so: checked there, on 1/8 of the numbers
                _require_finite(projected.view(len(embedded), -1), loader.dataset, batch["index"])
                store.append(patches)
            _sync(self.device)
            features_s = time.perf_counter() - start
            start = time.perf_counter()
            inside = self.inspected_rows(grid, store.filled)
            folds = image_folds(len(loader.dataset), calibration_folds) if calibration_folds else []
            every = torch.arange(store.filled, device=self.device) if inside is None else inside
            patches_per_image = grid[0] * grid[1]
            others = [every[~torch.isin(every // patches_per_image, fold.to(self.device))] for fold in folds]
            coreset, *fold_coresets = choose_coresets(points, config.coreset_ratio, projection, config.coreset,
                                                      config.coreset_shard_size, [inside, *others])
            picks, shards = coreset.picks, coreset.shards
            if shards > 1:
                print(f"coreset: greedy on {shards} shards of ~{store.num_rows // shards:,} patches, merged "
                      f"(--coreset {config.coreset}, --coreset_shard_size {config.coreset_shard_size:,})")
            self.set_memory_bank(store.rows(picks))
            self.images = image_records(loader.dataset)
            self.entry_images = (picks.cpu() // patches_per_image).to(torch.int32)
            self.history = []
            _sync(self.device)
            report = {"features_s": features_s, "coreset_s": time.perf_counter() - start,
                      "num_patches": store.filled, "memory_bank_size": len(picks), "feature_grid": grid,
                      "coreset_shards": shards, "feature_store": "disk" if store.on_disk else "memory"}
            if folds:
                start = time.perf_counter()
                embed_again = config.fp32_bank and self.precision in AUTOCAST_DTYPES
                report["out_of_fold"] = self._score_out_of_fold(store, grid, folds, fold_coresets,
                                                                loader if embed_again else None)
                report["calibration_s"] = time.perf_counter() - start
            return report
        finally:
            if store is not None:
                store.close()

    def _feature_store(self, num_rows: int, mode: str) -> FeatureStore:
        """The store of the training features: on disk when ``mode`` says so, or says 'auto' and memory is short."""
        dim = self.config.embedding_dim
        on_disk = FeatureStore.should_use_disk(num_rows, dim, self.device, mode)
        if on_disk and mode == "auto":
            print(f"features of {num_rows:,} patches ({num_rows * dim * 4 / 2**30:.1f} GiB) would crowd the free "
                  f"memory: kept in a temporary file, only their projections in memory (--feature_store memory "
                  f"forces memory)")
        return FeatureStore(num_rows, dim, self.device, on_disk)

    def _score_out_of_fold(self, store: FeatureStore, grid: list[int], folds: list[torch.Tensor],
                           coresets: list[Coreset], loader: DataLoader | None = None,
                           batch_size: int = 8) -> dict[str, list[float]]:
        """Scores and map maxima of every image of ``folds`` (rows of ``store``, grid[0] * grid[1] per image), each
        fold against the bank of its coreset, ``batch_size`` images at a time: few, because the training features
        are still in memory and the search's temporaries grow with the batch. With ``loader`` (the training
        images'), their features are computed anew by ``embed``, not taken from ``store``."""
        patches_per_image, offsets = grid[0] * grid[1], torch.arange(grid[0] * grid[1])
        count = sum(len(fold) for fold in folds)
        scores, maxima = [0.0] * count, [0.0] * count
        for fold, coreset in zip(folds, coresets):
            bank = store.rows(coreset.picks)
            neighbours = self.index_for(bank, like_the_bank=True)
            if loader is None:
                batches = (store.rows((part[:, None] * patches_per_image + offsets).flatten()).view(len(part), *grid, -1)
                           for part in fold.split(batch_size))
            else:
                images = DataLoader(Subset(loader.dataset, fold.tolist()), batch_size=batch_size,
                                    num_workers=loader.num_workers, pin_memory=loader.pin_memory)
                batches = (self.embed(batch["image"]) for batch in images)
            for part, features in zip(fold.split(batch_size), batches):
                image_scores, maps = self.score(features, neighbours, bank)
                for image, score, map_maximum in zip(part.tolist(), image_scores.tolist(),
                                                     maps.flatten(1).max(1).values.tolist()):
                    scores[image], maxima[image] = score, map_maximum
        return {"image_scores": scores, "map_maxima": maxima}

    def inspected_rows(self, grid: tuple[int, int], rows: int) -> torch.Tensor | None:
        """Indices of the patches inside the region to inspect among ``rows`` patches of images with feature grid
        ``grid`` (image after image), which alone may enter the bank; None without a region (all of them)."""
        region = self.region(tuple(grid))
        if region is None:
            return None
        inside = torch.nonzero(region.patches.flatten() > 0).squeeze(1)
        images = rows // (grid[0] * grid[1])
        offsets = torch.arange(images, device=inside.device)[:, None] * (grid[0] * grid[1])
        return (offsets + inside).flatten()

    def index_for(self, bank: torch.Tensor, like_the_bank: bool = False) -> NearestNeighbours:
        """The search index of ``bank`` with this model's search and precision settings (with search 'ivf', its
        lists around the model's centroids); ``like_the_bank``: a bank like the model's (a part of the same
        training), whose pruned search borrows the model's principal axes."""
        basis = getattr(self.neighbours.index, "basis", None) if like_the_bank and self.neighbours else None
        return NearestNeighbours(bank, self.search, self.config.ivf_probe, bf16=self.precision == "bf16",
                                 ivf_centroids=self.ivf_centroids, basis=basis)

    def set_memory_bank(self, bank: torch.Tensor, ivf_centroids: torch.Tensor | None = None) -> None:
        """Set the bank and build its index. With search 'ivf', the index's lists lie around ``ivf_centroids``: the
        model's own, which an update passes on and a checkpoint stores (they still partition the space after the
        bank changes; the lists are refilled with its entries, so rollback restores the index exactly); None, at
        training, runs the k-means on this bank, whose centroids the model then keeps."""
        self.memory_bank = bank.to(self.device).float()
        self.ivf_centroids = ivf_centroids
        self.neighbours = self.index_for(self.memory_bank)
        self.ivf_centroids = self.neighbours.ivf_centroids

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B,) and anomaly maps (B, S, S), both on the model's device."""
        if self.neighbours is None:
            raise RuntimeError("PatchCore.predict needs a memory bank: call fit() or load a checkpoint")
        return self.score(self.embed(images), self.neighbours, self.memory_bank)

    def score(self, features: torch.Tensor, neighbours: NearestNeighbours,
               bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch features (B, h, w, D) -> image scores (B,) and anomaly maps (B, S, S) against ``bank``."""
        def nearest(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            distances, indices = neighbours.search(queries, 1)
            return distances[:, 0], indices[:, 0]

        return score_patches(features, nearest, lambda entries: neighbours.search(bank[entries], self.config.k)[1],
                             bank.__getitem__, self.config, self.region(tuple(features.shape[1:3])))

    def thresholds(self, image_threshold: float | None = None) -> tuple[float, float]:
        """(image, pixel) thresholds: the calibrated ones, or ``image_threshold`` with the pixel threshold scaled
        by the same factor, so that regions keep their relation to the verdicts."""
        if self.calibration is None:
            if image_threshold is None:
                raise UserError("this checkpoint has no calibrated thresholds: retrain it with train.py, or pass a "
                                "threshold")
            return chosen_thresholds(image_threshold, image_threshold)
        return chosen_thresholds(self.calibration.image_threshold, self.calibration.pixel_threshold, image_threshold)

    def inspect(self, images: torch.Tensor | Sequence[str | Path | np.ndarray], threshold: float | None = None,
                batch_size: int = 32) -> Inspection:
        """Scores, maps and verdicts of images given as model input (B, 3, S, S), or as image files or arrays
        (H, W[, C]; uint8, uint16 or float in [0, 1]) read as dataset.load_image / image_tensor read them."""
        if isinstance(images, torch.Tensor):
            batches = [images]
        else:
            geometry = self.config.geometry
            batches = (torch.stack([load_image(x, geometry) if isinstance(x, (str, Path))
                                    else image_tensor(x, geometry) for x in images[i:i + batch_size]])
                       for i in range(0, len(images), batch_size))
        scores, maps = [np.empty(0, np.float32)], [np.empty((0, *self.config.geometry.size), np.float32)]  # no images
        for image_scores, image_maps in map(self.predict, batches):
            scores.append(image_scores.cpu().numpy())
            maps.append(image_maps.cpu().numpy())
        return Inspection(np.concatenate(scores), np.concatenate(maps), *self.thresholds(threshold))

    @property
    def version(self) -> int:
        """1 after training, one more with each update (add_good, remove_images); rollback goes back one."""
        return self.history[-1]["version"] if self.history else 1

    def add_good(self, images: Sequence[str | Path], batch_size: int = 32, num_workers: int = 0) -> dict:
        """Add good images (files) to the model without retraining: update.add_good. Returns its report."""
        from update import add_good  # noqa: PLC0415  (update.py builds on this module)
        return add_good(self, images, batch_size, num_workers)

    def remove_images(self, images: Sequence[str | Path]) -> dict:
        """Drop the bank entries (and calibration scores) of images added by mistake: update.remove_images."""
        from update import remove_images  # noqa: PLC0415
        return remove_images(self, images)

    def rollback(self) -> dict:
        """Restore the version before the last update, exactly: update.rollback."""
        from update import rollback  # noqa: PLC0415
        return rollback(self)

    def save(self, path: str | Path, **metadata) -> Path:
        """Write the memory bank (with search 'ivf', its index's centroids too: no k-means at load), the calibration,
        the backbone weights, the complete config, the provenance and history, the checkpoint's earlier fields
        (``self.metadata``, e.g. category) and ``metadata`` atomically: the file alone is enough to inspect images (no
        weights file or download needed) and to update the model."""
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **self.metadata,
            **metadata,
            "config": dataclasses.asdict(self.config),
            "memory_bank": self.memory_bank.cpu(),
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "resolved_precision": self.precision,
            "resolved_search": self.search,
            "weights_digest": self.extractor.weights_digest,
            "backbone_state": self.extractor.weights_state,
            "versions": {"python": platform.python_version(), "torch": str(torch.__version__),
                         "torchvision": str(torchvision.__version__), "faiss": str(faiss.__version__)},
            "images": self.images,
            "entry_images": self.entry_images,
            "history": self.history,
            "roi": self.roi,
            "ivf_centroids": self.ivf_centroids,
        }
        return atomic_write(path, lambda tmp: _torch_save(checkpoint, tmp))

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu",
             category: str | None = None, precision: str | None = None) -> tuple["PatchCore", dict]:
        """A model ready to inspect, and the checkpoint's contents; UserError for damaged or foreign files, and, with
        ``category``, for a checkpoint trained for another category (e.g. copied under another name). ``precision``
        replaces the stored one for inspection ('fp32': what an exported model computes)."""
        checkpoint = read_checkpoint(path, category)
        stored = checkpoint["config"]
        config = PatchCoreConfig(**{**VALUES_BEFORE_THE_FIELD, **stored, "layers": tuple(stored["layers"]),
                                    **{key: _numbers(stored[key]) for key in ("resize", "image_size")},
                                    **({} if precision is None else {"precision": precision})})
        config.validate()  # before building the backbone it names
        extractor = FeatureExtractor(config.backbone, config.weights, config.layers, state=checkpoint["backbone_state"])
        if extractor.weights_digest != checkpoint["weights_digest"]:
            raise UserError(f"checkpoint '{path}' is damaged (its backbone weights do not match their digest): "
                            f"retrain with train.py")
        model = cls(config, torch.device(device), extractor)
        ivf_centroids = checkpoint.get("ivf_centroids")
        if model.search == "ivf" and ivf_centroids is None:
            print(f"note: checkpoint '{path}' has no stored IVF centroids: the index is trained (k-means) at each "
                  f"load; retraining with train.py stores them", file=sys.stderr)
        model.set_memory_bank(checkpoint["memory_bank"], ivf_centroids)
        if checkpoint["calibration"] is not None:
            model.calibration = Calibration.from_dict(checkpoint["calibration"])
        model.images, model.history = checkpoint.get("images", []), checkpoint.get("history", [])
        model.entry_images = checkpoint.get("entry_images")
        if model.entry_images is None:  # a checkpoint from before provenance: its entries' images are unknown
            model.entry_images = torch.full((len(model.memory_bank),), -1, dtype=torch.int32)
        model.set_roi(checkpoint.get("roi"))
        model.metadata = {key: checkpoint[key] for key in ("category", "data_path", "created", "device",
                                                            "num_train_images", "timings") if key in checkpoint}
        return model, checkpoint


def _numbers(value: int | Sequence[int]) -> tuple[int, ...]:
    """A stored geometry field as a tuple: checkpoints from before non-square inputs hold one int."""
    return (value,) if isinstance(value, int) else tuple(value)


def _torch_save(value: dict, path: Path) -> None:
    """torch.save through a Python file: a full disk then surfaces as the OSError that atomic_write reports (given
    a path, torch writes through C++ streams and says only 'iostream error')."""
    with open(path, "wb") as f:
        torch.save(value, f)


def model_identity(checkpoint: dict) -> str:
    """What names a model in the verdicts it gives: its category, when it was trained, and its version."""
    history = checkpoint.get("history") or [{"version": 1}]
    return f"{checkpoint.get('category', 'model')}@{checkpoint.get('created', 'unknown')}/v{history[-1]['version']}"


def image_records(dataset) -> list[dict]:
    """The provenance of a data set's images: each one's resolved path and SHA-256 (its index when the data set
    has no files)."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return [{"path": f"image {i}", "sha256": None} for i in range(len(dataset))]
    return [{"path": os.path.realpath(sample.path), "sha256": file_sha256(sample.path)} for sample in samples]


def checkpoint_path(checkpoint_dir: str | Path, category: str) -> Path:
    """Where a category's checkpoint is: <checkpoint_dir>/<category>.pt."""
    return Path(checkpoint_dir) / f"{category}.pt"


def read_checkpoint(path: str | Path, category: str | None = None) -> dict:
    """The contents of a checkpoint file, validated: format, fields, finite numbers, and, with ``category``, the
    category it was trained for; UserError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint '{path}': run train.py for this category first")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle of foreign objects, not a torch file at all
        raise UserError(f"checkpoint '{path}' is damaged or not a PatchCore checkpoint ({type(err).__name__}): "
                        f"retrain with train.py") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"'{path}' is not a PatchCore checkpoint: retrain with train.py")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"checkpoint '{path}' has format version {checkpoint.get('version')}, this code reads "
                        f"{CHECKPOINT_VERSION}: retrain with train.py")
    field_names = {f.name for f in dataclasses.fields(PatchCoreConfig)}
    bank, backbone_state = checkpoint.get("memory_bank"), checkpoint.get("backbone_state")
    config = checkpoint.get("config")
    if isinstance(config, dict):
        config = checkpoint["config"] = {key: value for key, value in config.items() if key not in FIELDS_REMOVED}
    known_fields = isinstance(config, dict) and field_names - FIELDS_ADDED_IN_VERSION_2 <= set(config) <= field_names
    if (not known_fields or not isinstance(bank, torch.Tensor) or bank.ndim != 2
            or bank.shape[1] != checkpoint["config"]["embedding_dim"] or "weights_digest" not in checkpoint
            or not isinstance(backbone_state, dict) or not isinstance(checkpoint.get("calibration", 0), dict | None)):
        raise UserError(f"checkpoint '{path}' is incomplete or from another version: retrain with train.py")
    trained_for = checkpoint.get("category")
    if category is not None and trained_for is not None and trained_for != category:
        raise UserError(f"checkpoint '{path}' was trained for category '{trained_for}', not '{category}': use "
                        f"--category {trained_for} (and its file name {trained_for}.pt), or train '{category}'")
    if len(bank) == 0 or not bool(torch.isfinite(bank).all()):
        raise UserError(f"checkpoint '{path}' has an empty memory bank or NaN / infinite entries in it: retrain with "
                        f"train.py")
    centroids = checkpoint.get("ivf_centroids")
    if centroids is not None and (not isinstance(centroids, torch.Tensor) or centroids.ndim != 2
                                  or len(centroids) == 0 or centroids.shape[1] != bank.shape[1]
                                  or not centroids.is_floating_point() or not bool(torch.isfinite(centroids).all())):
        raise UserError(f"checkpoint '{path}' has damaged IVF centroids (not finite (lists, {bank.shape[1]}) "
                        f"numbers): retrain with train.py")
    entry_images = checkpoint.get("entry_images")
    if entry_images is not None and (not isinstance(entry_images, torch.Tensor) or entry_images.shape != (len(bank),)
                                     or not isinstance(checkpoint.get("images"), list)
                                     or not isinstance(checkpoint.get("history"), list)):
        raise UserError(f"checkpoint '{path}' has damaged provenance (bank entries without their images): retrain "
                        f"with train.py")
    calibration = checkpoint.get("calibration")
    if calibration is not None and not _valid_calibration(calibration):
        raise UserError(f"checkpoint '{path}' has thresholds that are not positive finite numbers: retrain with "
                        f"train.py")
    return checkpoint


def _valid_calibration(calibration: dict) -> bool:
    try:
        thresholds = [float(calibration[key]) for key in ("image_threshold", "pixel_threshold")]
        scores = [float(s) for key in ("image_scores", "map_maxima") for s in calibration[key]]
    except (KeyError, TypeError, ValueError):
        return False
    return all(math.isfinite(t) and t > 0 for t in thresholds) and all(math.isfinite(s) for s in scores)
