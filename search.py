"""Nearest-neighbour search of patch features in a memory bank: exact search that prunes with lower bounds (the
default on CPUs without AMX), exact flat search (faiss, on the GPU with faiss-gpu, or torch), an inverted-file index
for big banks, and a bf16 candidate search with an exact float32 re-rank (the default on CPUs with AMX)."""
from __future__ import annotations

import math

import faiss
import faiss.contrib.torch_utils  # noqa: F401  (lets faiss indexes take torch tensors)
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from config import cpu_has_native_bf16

# faiss (1.15) computes flat-search distances pair by pair until queries x dimensions exceed 128,000 (125 queries at
# 1024-d, 1,970 at the first level's 65): one image's 784 patches, or the few left for the full search, then took
# 4-9x longer than as one matrix product on a 2-core EPYC. The product pays from about 20 queries on, faiss's old
# threshold.
faiss.cvar.distance_compute_blas_threshold = 20


class PrunedFlatIndex:
    """Exact L2 k-NN: the neighbours of a flat index, with most of its arithmetic skipped.

    Rotating bank and queries onto the bank's principal axes leaves every distance unchanged, and on those axes the
    first h coordinates and the norm of the rest bound each distance from below, as a distance in h + 1 dimensions:
    ||q - b||^2 >= ||q_h - b_h||^2 + (||q_t|| - ||b_t||)^2. Patch features are strongly correlated (on MVTec bottle
    the first 64 of 1024 axes hold 93% of the variance), so the bound is tight. At each level h of ``heads``, a flat
    search of the bounds gives ``candidates`` + k - 1 entries per query, whose exact distances are computed; a query is
    settled when its k-th exact distance lies below the next bound, which bounds every other entry, so none of them
    can be nearer (a margin covers float32 rounding). The next level takes the queries left; those left after the
    last one get a full flat search. Distances are computed directly as ||q - b||^2 in float32.
    ``settled`` counts the queries settled at each level and by the full search, over all searches so far. The
    search is exact on any orthonormal axes around any centre: a ``basis`` (mean, axes) of a similar bank, such as
    the final bank's for the calibration folds' banks, saves their eigendecomposition and keeps the bounds tight.
    """

    def __init__(self, bank: np.ndarray, heads: tuple[int, ...] = (64, 256), candidates: int = 16,
                 margin: float = 1e-4, basis: tuple[np.ndarray, np.ndarray] | None = None):
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        size, dim = self.bank.shape
        self.candidates, self.margin = candidates, margin
        heads = tuple(h for h in heads if 2 * h < dim) if size > 4 * candidates else ()
        self.levels: list[tuple[np.ndarray, faiss.IndexFlatL2]] = []
        self.basis = None  # (mean, principal axes): another bank like this one may borrow them (``basis``)
        if heads:
            if basis is None or basis[1].shape[1] < max(heads):
                basis = _principal_axes(self.bank, max(heads))
            self.basis = basis
            self.mean, principal = basis
            norms = self._centered_norms(self.bank)
            self.bank_norm = float(norms.max())
        for head in heads:
            axes_h = np.ascontiguousarray(principal[:, :head])
            index = faiss.IndexFlatL2(head + 1)
            index.add(self._bounds(self.bank, norms, axes_h))
            self.levels.append((axes_h, index))
        self.settled = [0] * (len(self.levels) + 1)

    def _centered_norms(self, x: np.ndarray) -> np.ndarray:
        """Squared norms of the rows of x around the bank's mean, ||x||^2 - 2 x.mean + ||mean||^2 summed in float64
        (exact enough to subtract), without a centred copy of x: at a batch's size that copy's page faults alone cost
        more than the products."""
        mean = self.mean.astype(np.float64)
        return np.einsum("ij,ij->i", x, x, dtype=np.float64) - 2 * np.einsum("ij,j->i", x, mean) + mean @ mean

    def _bounds(self, x: np.ndarray, norms: np.ndarray, axes: np.ndarray) -> np.ndarray:
        """Rows of x around the bank's mean as (their first coordinates on ``axes``, the norm of the remaining ones),
        from their centred squared norms ``norms``: points whose distances bound the rows' distances from below."""
        axes_t = torch.from_numpy(axes)  # in torch's thread pool, the backbone's; numpy's BLAS threads spin against it
        head = (torch.from_numpy(x) @ axes_t - torch.from_numpy(self.mean) @ axes_t).numpy()
        tail = np.sqrt(np.maximum(norms - np.einsum("ij,ij->i", head, head, dtype=np.float64), 0))
        return np.ascontiguousarray(np.hstack([head, tail[:, None].astype(np.float32)]))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances (M, k) and bank indices (M, k) of each query's k nearest entries, nearest first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self.bank))
        squared, indices = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
        todo = np.arange(len(queries))
        candidates = self.candidates + k - 1  # k neighbours and as many spares as for k = 1
        if self.levels:
            norms = self._centered_norms(queries)
        for level, (axes, index) in enumerate(self.levels):
            every = len(todo) == len(queries)  # the first level takes them all: no copies
            part, part_norms = (queries, norms) if every else (queries[todo], norms[todo])
            lower, nearest = index.search(self._bounds(part, part_norms, axes), candidates + 1)
            part_squared, part_indices = _exact_among(self.bank, part, nearest[:, :candidates], k)
            done = lower[:, candidates] >= part_squared[:, -1] + self.margin * (part_norms + self.bank_norm)
            squared[todo[done]], indices[todo[done]] = part_squared[done], part_indices[done]
            self.settled[level] += int(done.sum())
            todo = todo[~done]
        if len(todo):
            _, nearest = faiss.knn(queries[todo], self.bank, k)  # a flat search without an index's copy of the bank
            squared[todo], indices[todo] = _exact_among(self.bank, queries[todo], nearest, k)
        self.settled[-1] += len(todo)
        return squared, indices


def _exact_among(bank: np.ndarray, queries: np.ndarray, subsets: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest of each query's own subset of bank rows, by direct float32 squared distances (faiss: an
    indexed gather that costs a twentieth of torch's gather and subtraction)."""
    subsets = np.ascontiguousarray(subsets, dtype=np.int64)
    rows, width = subsets.shape
    squared, indices = np.empty((rows, k), np.float32), np.empty((rows, k), np.int64)
    faiss.knn_L2sqr_by_idx(faiss.swig_ptr(queries), faiss.swig_ptr(bank), faiss.swig_ptr(subsets), queries.shape[1],
                           rows, len(bank), width, k, faiss.swig_ptr(squared), faiss.swig_ptr(indices),
                           width)  # an explicit row stride: -1 misreads the rows
    return squared, indices


def _principal_axes(bank: np.ndarray, count: int, sample_size: int = 16384,
                    chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """The mean (D,) and the ``count`` leading principal axes (D, count) of up to ``sample_size`` evenly spaced bank
    rows, both float32; the scatter matrix is summed in float64 a chunk of rows at a time, so the bank is never
    copied whole (at float64, twice its float32 size)."""
    rows = np.linspace(0, len(bank) - 1, min(len(bank), sample_size)).astype(np.int64)
    parts = np.array_split(rows, -(-len(rows) // chunk))
    mean = sum(bank[part].sum(0, dtype=np.float64) for part in parts) / len(rows)
    scatter = np.zeros((bank.shape[1],) * 2)
    for part in parts:
        centered = bank[part] - mean
        scatter += centered.T @ centered
    _, axes = np.linalg.eigh(scatter)  # ascending variance; orthonormal in float64
    return mean.astype(np.float32), np.ascontiguousarray(axes[:, ::-1][:, :count], dtype=np.float32)


def ivf_lists(bank_size: int) -> int:
    """Inverted lists for a bank: 4 sqrt(N), as faiss's guidelines suggest, and at least 39 training points each."""
    return max(1, min(round(4 * math.sqrt(bank_size)), bank_size // 39))


def train_ivf_centroids(bank: torch.Tensor) -> torch.Tensor:
    """The coarse centroids (ivf_lists(len(bank)), D) of an inverted file on ``bank`` (on the CPU), float32: faiss's
    k-means as IndexIVFFlat.train runs it, with faiss's fixed seed (1234), so the same bank gives the same centroids.
    The costly step of building an inverted file (21 s for a 100k bank, issue #31): a model computes them once, at
    training, and its checkpoint keeps them."""
    dim = bank.shape[1]
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, ivf_lists(len(bank)))
    index.train(bank)
    return index.quantizer.reconstruct_n(0, index.nlist)


def _bf16_with_columns(rows: torch.Tensor, columns: torch.Tensor, block: int = 32) -> torch.Tensor:
    """``rows`` and then ``columns`` side by side in bf16, zero-padded to a multiple of ``block`` columns (the
    depth of AMX's bf16 tiles): one product of such queries (-2q, 1, 1) and entries (b, the bf16 rounding of
    ||b||² and its rest) is ||b||² - 2 q·b, the distance less ||q||², accumulated in fp32 and rounded once."""
    width = rows.shape[1] + columns.shape[1]
    padding = rows.new_zeros(len(rows), -width % block)
    return torch.cat([rows, columns.to(rows.dtype), padding], 1).bfloat16()


class NearestNeighbours:
    """The k nearest memory-bank entries of query patches, with float32 L2 distances.

    search 'pruned' (the default) is exact: ``PrunedFlatIndex`` on the CPU; on a GPU, where the flat search's matrix
    product is cheap, it runs as 'flat'. 'flat' is exact, every query against every entry. 'ivf' clusters the bank
    into lists around ``ivf_centroids`` (given: no k-means; None: ``train_ivf_centroids(bank)``), kept as
    ``self.ivf_centroids``, and visits the ``probe`` lists nearest to each query: approximate, much faster on big
    banks. ``bf16`` (flat only) ranks the bank with one bfloat16 product per chunk of queries, the entries' norms
    included, for CPUs and GPUs with native bf16, then re-ranks the ``candidates`` best exactly in float32: the
    distances returned are those of float32 search for the entry found, which is the exact nearest unless a true
    neighbour fell outside the candidates (a CPU without bf16 units rounds the same way but multiplies in fp32, as
    fast as fp32 search). On a GPU with faiss-gpu, a bank too big for one GPU is split across all of them (faiss
    sharding). ``basis``: for 'pruned', the axes of a similar bank to borrow (PrunedFlatIndex).
    """

    def __init__(self, bank: torch.Tensor, search: str = "pruned", probe: int = 8, bf16: bool = False,
                 candidates: int = 16, ivf_centroids: torch.Tensor | None = None,
                 basis: tuple[np.ndarray, np.ndarray] | None = None):
        self.bank = bank.float().contiguous()
        self.bf16, self.candidates, self.index = bf16 and search == "flat", candidates, None
        self.ivf_centroids: torch.Tensor | None = None
        dim, on_gpu = self.bank.shape[1], self.bank.device.type == "cuda"
        search = "flat" if search == "pruned" and on_gpu else search
        if self.bf16 or (on_gpu and not hasattr(faiss, "StandardGpuResources") and search == "flat"):
            self.bank_norms = self.bank.square().sum(1)
            self.native_bf16 = on_gpu or cpu_has_native_bf16()
            if self.bf16:  # a CPU without bf16 units gets the same rounding, computed in fp32 at fp32 speed
                rounded_norms = self.bank_norms.bfloat16().float()
                norm_columns = torch.stack([rounded_norms, self.bank_norms - rounded_norms], 1)
                bank_bf16 = _bf16_with_columns(self.bank, norm_columns)
                self.bank_bf16 = bank_bf16 if self.native_bf16 else bank_bf16.float()
            return
        if search == "pruned":
            self.index, self.on_index_device = PrunedFlatIndex(self.bank.numpy(), basis=basis), False
            return
        if search == "ivf":
            if ivf_centroids is None:
                ivf_centroids = train_ivf_centroids(self.bank.cpu())
            self.ivf_centroids = ivf_centroids.float().cpu().contiguous()
            quantizer = faiss.IndexFlatL2(dim)
            quantizer.add(self.ivf_centroids)  # holding all its lists' centroids, the index counts as trained
            self.index = faiss.IndexIVFFlat(quantizer, dim, len(self.ivf_centroids))
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
        device; k is at most the bank's size."""
        queries, k = queries.float().contiguous(), min(k, len(self.bank))
        if self.index is None:
            squared, indices = self._torch_search(queries, k)
        elif isinstance(self.index, PrunedFlatIndex):
            squared, indices = (torch.from_numpy(t).to(queries.device) for t in self.index.search(queries.numpy(), k))
        elif self.on_index_device:
            squared, indices = self.index.search(queries, k)
        else:
            squared, indices = (t.to(queries.device) for t in self.index.search(queries.cpu(), k))
        return squared.clamp_min(0).sqrt(), indices

    def _torch_search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact search in float32, or bf16 candidates re-ranked in float32, a chunk of queries at a time: about
        2^25 distances per chunk (2,048 queries against 16k entries: 64 MiB of bf16 products), so the temporaries
        stay small whatever the bank's size (on bottle's banks, smaller chunks ran as fast or faster; on a 100k
        bank, chunks four times larger were 10% faster)."""
        values, indices = [], []
        for part in queries.split(max(1, min(4096, 2 ** 25 // len(self.bank)))):
            if self.bf16:
                squared, nearest = self._rerank(part, self._bf16_candidates(part, k), k)
            else:
                ranked = torch.addmm(self.bank_norms, part, self.bank.T, alpha=-2)
                ranked.add_(part.square().sum(1, keepdim=True))
                squared, nearest = ranked.topk(k, dim=1, largest=False)
            values.append(squared)
            indices.append(nearest)
        return torch.cat(values), torch.cat(indices)

    def _bf16_candidates(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Bank indices (M, max(k, candidates)) of the entries nearest to each query by one bf16 product."""
        rounded = _bf16_with_columns(queries.mul(-2), torch.ones(len(queries), 2, device=queries.device))
        products = (rounded if self.native_bf16 else rounded.float()) @ self.bank_bf16.T
        return products.bfloat16().topk(min(len(self.bank), max(k, self.candidates)), dim=1,
                                        largest=False).indices

    def _rerank(self, queries: torch.Tensor, candidates: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances and bank indices of the k nearest of each query's candidates, computed directly in
        float32."""
        if queries.is_cuda:
            best = (queries[:, None] - self.bank[candidates]).square().sum(2).topk(k, dim=1, largest=False)
            return best.values, candidates.gather(1, best.indices)
        squared, nearest = _exact_among(self.bank.numpy(), queries.numpy(), candidates.numpy(), k)
        return torch.from_numpy(squared), torch.from_numpy(nearest)


class GraphSearch(nn.Module):
    """Each query's nearest bank entry, exactly, in plain tensor operations that an exported graph (ONNX Runtime,
    OpenVINO) runs: PrunedFlatIndex's search, with its principal axes, bounds, candidates and settle rule.

    At each level, the bounds of the queries still open against every bank entry give ``candidates`` + 1 entries per
    query (8: as fast as 16 on bottle's 10% bank and 5% faster on its 1% one, with half the rows to gather),
    among which the nearest is found by the product form of the distance; a query is settled when that
    distance lies below the next bound, with PrunedFlatIndex's margin (which also covers the product form's
    rounding). The open queries go on to the next level, and those left after the last one to a full search (the
    ``candidates`` nearest by the product form, the nearest of them as before). The distance returned is computed
    directly, as a sum of squared differences, for the entry found. Bank and queries are centred on the bank's mean
    (distances unchanged, products smaller).

    Memory: the bank and its bounds are held as chunks of ``chunk`` entries, each a constant of its own that is
    read in place (products with it, rows gathered from it), so that no runtime folds a slice or transpose of the
    bank into a second copy; and no tensor of queries x bank entries is larger than queries x ``chunk`` (64 KiB a
    query at 16,384: 49 MiB for a 224-px image's 784 patches), whatever the bank's size. The candidates' rows take
    half as much (a query's 8 rows: 32 KiB at 1024 dimensions).
    """

    def __init__(self, index: PrunedFlatIndex, chunk: int = 16384, candidates: int = 8):
        super().__init__()
        self.candidates, self.margin = candidates, index.margin
        self.levels = len(index.levels)
        mean = index.mean if self.levels else np.zeros(index.bank.shape[1], np.float32)
        centered = torch.from_numpy(index.bank - mean)
        self.size, self.bank_norm = len(centered), float(centered.square().sum(1).max())
        self.register_buffer("mean", torch.from_numpy(mean))
        bounds = [torch.as_tensor(bounds_index.reconstruct_n(0, bounds_index.ntotal)) for _, bounds_index in index.levels]
        for level, (axes, _) in enumerate(index.levels):
            self.register_buffer(f"axes{level}", torch.from_numpy(axes))
        self.starts = list(range(0, len(centered), chunk))
        for c, start in enumerate(self.starts):
            rows = centered[start:start + chunk]
            self.register_buffer(f"bank{c}", rows.clone())
            self.register_buffer(f"bank_norms{c}", rows.square().sum(1))
            for level, level_bounds in enumerate(bounds):
                part = level_bounds[start:start + chunk]
                # (-2 b, ||b||^2, 1): one product with a point's (p, 1, ||p||^2) is their squared distance
                self.register_buffer(f"bounds{level}_{c}", torch.cat([-2 * part, part.square().sum(1, keepdim=True),
                                                                      torch.ones(len(part), 1)], 1))

    def forward(self, centered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared L2 distances (M,) and bank indices (M,) of the nearest entry of each query (M, D), given centred
        on the bank's mean: ``queries - self.mean``."""
        count = centered.shape[0]  # not len(): that would fix the graph to one number of queries
        nearest = torch.zeros(count, dtype=torch.long, device=centered.device)
        todo, part, part_norms = torch.arange(count, device=centered.device), centered, centered.square().sum(1)
        for level in range(self.levels):
            head = part @ getattr(self, f"axes{level}")
            head_norms = head.square().sum(1, keepdim=True)
            tail = (part_norms[:, None] - head_norms).clamp_min(0)  # the squared norm of the rest
            points = torch.cat([head, tail.sqrt(), torch.ones_like(tail), head_norms + tail], 1)
            tables = [(getattr(self, f"bounds{level}_{c}"), None) for c in range(len(self.starts))]
            lower, candidates = self._smallest(points, tables, self.candidates + 1)
            part_squared, part_nearest = self._nearest_among(part, part_norms, candidates[:, :self.candidates])
            done = lower[:, self.candidates] >= part_squared + self.margin * (part_norms + self.bank_norm)
            settled, open_ = torch.nonzero(done).squeeze(1), torch.nonzero(~done).squeeze(1)
            nearest = nearest.scatter(0, todo.index_select(0, settled), part_nearest.index_select(0, settled))
            todo, part, part_norms = (values.index_select(0, open_) for values in (todo, part, part_norms))
        tables = [(getattr(self, f"bank{c}"), getattr(self, f"bank_norms{c}")) for c in range(len(self.starts))]
        _, candidates = self._smallest(part, tables, min(self.candidates, self.size))
        nearest = nearest.scatter(0, todo, self._nearest_among(part, part_norms, candidates)[1])
        return (centered - self.rows(nearest)).square().sum(1), nearest

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """The (centred) bank rows of ``indices`` (any shape), gathered from each chunk in turn."""
        return self._gather(indices, lambda c, local: F.embedding(local, getattr(self, f"bank{c}")))

    def _gather(self, indices: torch.Tensor, take) -> torch.Tensor:
        """``take(c, local)``, chunk c's values at its local indices, for every index, merged over the chunks."""
        merged = None
        for c, start in enumerate(self.starts):
            length = getattr(self, f"bank_norms{c}").shape[0]
            values = take(c, (indices - start).clamp(0, length - 1))
            if merged is None:
                merged = values
                continue
            inside = indices >= start
            merged = torch.where(inside.view(*inside.shape, *[1] * (values.dim() - inside.dim())), values, merged)
        return merged

    def _smallest(self, points: torch.Tensor, tables: list[tuple[torch.Tensor, torch.Tensor | None]],
                  count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``count`` smallest squared distances of each point to the rows of the chunked table, ascending, and
        their row indices, in product form: ||p||^2 - 2 p.t + ||t||^2 with each chunk's norms, or, where they are
        None, one product of points and a chunk already extended for it. Each chunk's ``count`` smallest are
        merged."""
        point_norms = points.square().sum(1, keepdim=True) if tables[0][1] is not None else None
        values, indices = [], []
        for start, (rows, norms) in zip(self.starts, tables):
            distances = F.linear(points, rows)  # a product with the chunk as it is stored: nothing to transpose
            if norms is not None:
                distances = point_norms - 2 * distances + norms
            chunk_values, chunk_indices = distances.topk(min(count, len(rows)), dim=1, largest=False)
            values.append(chunk_values)
            indices.append(chunk_indices + start)
        if len(values) == 1:
            return values[0], indices[0]
        merged, order = torch.cat(values, 1).topk(count, dim=1, largest=False)
        return merged, torch.cat(indices, 1).gather(1, order)

    def _nearest_among(self, queries: torch.Tensor, query_norms: torch.Tensor,
                       candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The nearest of each (centred) query's candidate entries by the product form of the squared distance, that
        distance and the entry's index: one pass over the candidates' rows, chunk by chunk."""
        def half_distances(c: int, local: torch.Tensor) -> torch.Tensor:  # ||b||^2 - 2 q.b
            # F.embedding: a plain row gather (ONNX Gather), several times faster in the runtimes than indexing's
            products = (F.embedding(local, getattr(self, f"bank{c}")) @ queries[:, :, None])[:, :, 0]
            norms = getattr(self, f"bank_norms{c}").index_select(0, local.flatten()).view_as(local)
            return norms - 2 * products

        squared, position = self._gather(candidates, half_distances).min(1)
        return squared + query_norms, candidates.gather(1, position[:, None])[:, 0]

