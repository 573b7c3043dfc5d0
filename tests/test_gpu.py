"""The CUDA paths against the CPU ones: skipped without a GPU (run benchmarks/gpu.sh on a GPU machine)."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from conftest import SMALL_CONFIG
from config import PatchCoreConfig
from coreset import FeatureStore, Projection, choose_coreset
from dataset import MVTecDataset, make_loader
from metrics import image_auroc
from patchcore import PatchCore
from search import NearestNeighbours

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CPU, GPU = torch.device("cpu"), torch.device("cuda")


def test_coreset_on_the_gpu_picks_what_the_cpu_picks() -> None:
    features = torch.randn(5000, 64, generator=torch.Generator().manual_seed(0))
    projection = Projection(64, 16, 0)
    points = features @ projection.matrix
    for mode in ("exact", "sharded"):
        cpu = choose_coreset(points, 0.05, projection, mode, 2000, progress=False).picks
        gpu = choose_coreset(points.to(GPU), 0.05, projection, mode, 2000, progress=False).picks
        agree = len(set(cpu.tolist()) & set(gpu.cpu().tolist())) / len(cpu)
        assert agree > 0.95, mode  # float rounding may swap a few near-ties


@pytest.mark.parametrize("search, bf16", [("pruned", False), ("flat", False), ("flat", True), ("ivf", False)])
def test_search_on_the_gpu_equals_the_cpu(search: str, bf16: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(4000, 64, generator=generator), torch.randn(500, 64, generator=generator)
    want_distances, want_indices = NearestNeighbours(bank, search, probe=200, bf16=bf16).search(queries, 1)
    distances, indices = NearestNeighbours(bank.to(GPU), search, probe=200, bf16=bf16).search(queries.to(GPU), 1)
    assert distances.device.type == "cuda"
    assert (indices.cpu() == want_indices).float().mean() > 0.99
    torch.testing.assert_close(distances.cpu(), want_distances, rtol=1e-3, atol=1e-3)


def test_feature_store_on_disk_serves_gpu_rows() -> None:
    features = torch.randn(100, 8, device=GPU)
    store = FeatureStore(100, 8, GPU, on_disk=True)
    store.append(features)
    rows = store.rows(torch.tensor([5, 1, 99], device=GPU))
    assert rows.device.type == "cuda" and torch.equal(rows, features[[5, 1, 99]])
    store.close()


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_gpu_model_scores_like_the_cpu_model(data_root: Path, precision: str) -> None:
    config = PatchCoreConfig(**SMALL_CONFIG)
    train = MVTecDataset(data_root, "tiles", "train", config.geometry)
    test = MVTecDataset(data_root, "tiles", "test", config.geometry)
    batch = next(iter(make_loader(test, len(test), 0, CPU)))
    cpu = PatchCore(dataclasses.replace(config, precision="fp32"), CPU)
    cpu.fit(make_loader(train, 8, 0, CPU))
    want = cpu.predict(batch["image"])[0]
    gpu = PatchCore(dataclasses.replace(config, precision=precision), GPU, extractor=copy.deepcopy(cpu.extractor))
    gpu.set_memory_bank(cpu.memory_bank)
    torch.testing.assert_close(gpu.predict(batch["image"])[0].cpu(), want, rtol=0.02, atol=0)
    gpu.fit(make_loader(train, 8, 0, GPU), [1, 6], feature_store="disk")
    labels = batch["label"].numpy()
    assert image_auroc(labels, gpu.predict(batch["image"])[0].cpu().numpy()) == 1.0
