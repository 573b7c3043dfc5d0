"""Plain, literal versions of the fast paths: the references the tests hold them to."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_embedding(maps: list[torch.Tensor], patch_size: int, dim: int) -> torch.Tensor:
    """The PatchCore reference's patch features, step by step: unfold p x p patches (zero padding), upsample the
    deeper layers' unfolded patches to the first layer's grid, adaptive-average-pool each flattened C*p*p
    patch to ``dim``, stack the layers and pool the stack to ``dim``. Returns (B, h, w, dim)."""
    batch, _, height, width = maps[0].shape
    per_layer = []
    for x in maps:
        _, channels, h, w = x.shape
        patches = F.unfold(x, patch_size, padding=patch_size // 2).view(batch, channels, patch_size, patch_size, h, w)
        if (h, w) != (height, width):
            patches = F.interpolate(patches.reshape(-1, 1, h, w), size=(height, width), mode="bilinear",
                                    align_corners=False).view(batch, channels, patch_size, patch_size, height, width)
        patches = patches.permute(0, 4, 5, 1, 2, 3).reshape(-1, 1, channels * patch_size**2)
        per_layer.append(F.adaptive_avg_pool1d(patches, dim).squeeze(1))
    stacked = torch.stack(per_layer, dim=1).reshape(-1, 1, len(maps) * dim)
    return F.adaptive_avg_pool1d(stacked, dim).view(batch, height, width, dim)


def plain_greedy_coreset(features: torch.Tensor, ratio: float, projection_dim: int = 128, seed: int = 0,
                         num_starts: int = 10) -> torch.Tensor:
    """Greedy k-center on the same seeded projection and start points as coreset.greedy_coreset, with each
    pick's distances computed plainly as ((z - z[j]) ** 2).sum(1)."""
    num_points = len(features)
    count = max(1, int(num_points * ratio))
    if count >= num_points:
        return torch.arange(num_points)
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(features.shape[1], projection_dim, generator=generator).to(features.dtype)
    starts = torch.randint(num_points, (num_starts,), generator=generator)
    points = features @ projection
    nearest = torch.stack([((points - points[s]) ** 2).sum(1).sqrt() for s in starts], 1).mean(1) ** 2
    picks = []
    for _ in range(count):
        pick = int(nearest.argmax())
        picks.append(pick)
        nearest = torch.minimum(nearest, ((points - points[pick]) ** 2).sum(1))
    return torch.tensor(picks)
