"""Nearest-neighbour search of patch features in a memory bank: exact flat search (faiss, on the GPU with faiss-gpu,
or torch), an inverted-file index for big banks, and a bf16 candidate search with an exact float32 re-rank."""
from __future__ import annotations

import math

import faiss
import faiss.contrib.torch_utils  # noqa: F401  (lets faiss indexes take torch tensors)
import torch

from config import cpu_has_native_bf16

def ivf_lists(bank_size: int) -> int:
    """Inverted lists for a bank: 4 sqrt(N), as faiss's guidelines suggest, and at least 39 training points each."""
    return max(1, min(round(4 * math.sqrt(bank_size)), bank_size // 39))


class NearestNeighbours:
    """The k nearest memory-bank entries of query patches, with float32 L2 distances.

    search 'flat' is exact. 'ivf' clusters the bank into ``ivf_lists(len(bank))`` lists (faiss k-means, seeded)
    and visits the ``probe`` lists nearest to each query: approximate, much faster on big banks. ``bf16`` (flat
    only) ranks the bank with bfloat16 products, for CPUs and GPUs with native bf16, then re-ranks the
    ``candidates`` best exactly in float32: the distances returned are those of float32 search for the entry
    found, which is the exact nearest unless a true neighbour fell outside the candidates (a CPU without bf16
    units rounds the same way but multiplies in fp32, as fast as fp32 search). On a GPU with
    faiss-gpu, a bank too big for one GPU is split across all of them (faiss sharding).
    """

    def __init__(self, bank: torch.Tensor, search: str = "flat", probe: int = 8, bf16: bool = False,
                 candidates: int = 8):
        self.bank = bank.float().contiguous()
        self.bf16, self.candidates, self.index = bf16 and search == "flat", candidates, None
        dim, on_gpu = self.bank.shape[1], self.bank.device.type == "cuda"
        if self.bf16 or (on_gpu and not hasattr(faiss, "StandardGpuResources") and search == "flat"):
            self.bank_norms = self.bank.square().sum(1)
            self.native_bf16 = on_gpu or cpu_has_native_bf16()
            if self.bf16:  # a CPU without bf16 units gets the same rounding, computed in fp32 at fp32 speed
                self.bank_bf16 = self.bank.bfloat16() if self.native_bf16 else self.bank.bfloat16().float()
            return
        if search == "ivf":
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, ivf_lists(len(self.bank)))
            self.index.train(self.bank.cpu())
            self.index.nprobe = probe
        else:
            self.index = faiss.IndexFlatL2(dim)
        self.on_index_device = on_gpu and hasattr(faiss, "StandardGpuResources")
        if self.on_index_device and self._needs_sharding():
            options = faiss.GpuMultipleClonerOptions()
            options.shard = True  # each GPU holds a part of the bank; queries go to all of them
            self.index, self.on_index_device = faiss.index_cpu_to_all_gpus(self.index, co=options), False
        elif self.on_index_device:
            self.resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self.resources, self.bank.device.index or 0, self.index)
        self.index.add(self.bank if self.on_index_device else self.bank.cpu())

    def _needs_sharding(self) -> bool:
        """Whether the bank would take over half of its GPU's free memory and there are more GPUs to share it."""
        free = torch.cuda.mem_get_info(self.bank.device)[0]
        return faiss.get_num_gpus() > 1 and self.bank.numel() * 4 > free / 2

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """L2 distances (M, k) and bank indices (M, k) of each query's k nearest bank entries, on the queries'
        device."""
        queries = queries.float().contiguous()
        if self.index is None:
            squared, indices = self._torch_search(queries, k)
        elif self.on_index_device:
            squared, indices = self.index.search(queries, k)
        else:
            squared, indices = (t.to(queries.device) for t in self.index.search(queries.cpu(), k))
        return squared.clamp_min(0).sqrt(), indices

    def _torch_search(self, queries: torch.Tensor, k: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact search in float32, or bf16 candidates re-ranked in float32, a chunk of queries at a time."""
        values, indices = [], []
        for part in queries.split(chunk):
            query_norms = part.square().sum(1, keepdim=True)
            if not self.bf16:
                ranked = torch.addmm(self.bank_norms, part, self.bank.T, alpha=-2).add_(query_norms)
                best = ranked.topk(k, dim=1, largest=False)
                values.append(best.values)
                indices.append(best.indices)
                continue
            rounded = part.bfloat16() if self.native_bf16 else part.bfloat16().float()
            products = (rounded @ self.bank_bf16.T).bfloat16().float()
            candidates = (self.bank_norms - 2 * products).topk(max(k, self.candidates), dim=1, largest=False).indices
            exact = (part[:, None] - self.bank[candidates]).square().sum(2)
            best = exact.topk(k, dim=1, largest=False)
            values.append(best.values)
            indices.append(candidates.gather(1, best.indices))
        return torch.cat(values), torch.cat(indices)
