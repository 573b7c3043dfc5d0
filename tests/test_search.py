"""The pruned exact search against brute force in float64: the same neighbours, whether the lower bounds settle a
query at a level or the full flat search has to."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from search import NearestNeighbours, PrunedFlatIndex


def brute_force(bank: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    queries, bank = queries.astype(np.float64), bank.astype(np.float64)
    squared = (queries**2).sum(1)[:, None] + (bank**2).sum(1) - 2 * queries @ bank.T
    order = np.argsort(squared, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(squared, order, 1), order


def correlated(rows: int, generator: np.random.Generator, dim: int = 1024, rank: int = 24) -> np.ndarray:
    """Features whose variance sits on a few axes, as patch features' does, plus a little isotropic noise."""
    mixing = generator.standard_normal((rank, dim)) / np.sqrt(rank)
    noise = 0.02 * generator.standard_normal((rows, dim))
    return (generator.standard_normal((rows, rank)) @ mixing + noise).astype(np.float32)


def assert_same_neighbours(bank: np.ndarray, queries: np.ndarray, squared: np.ndarray, indices: np.ndarray,
                           k: int) -> None:
    want_squared, want_indices = brute_force(bank, queries, k)
    np.testing.assert_allclose(squared, want_squared, rtol=1e-5, atol=1e-5)
    gaps = np.diff(brute_force(bank, queries, k + 1)[0], axis=1)
    clear = (gaps > 1e-5 * want_squared.max()).all(1)  # no near-tie for any of the k places
    assert clear.mean() > 0.5  # the comparison below covers most queries
    np.testing.assert_array_equal(indices[clear], want_indices[clear])


@pytest.mark.parametrize("k", [1, 3, 20])
@pytest.mark.parametrize("offset", [0.0, 10.0])  # 10: norms 10x those around the mean, which the bounds subtract
def test_correlated_features_are_settled_by_the_bounds_with_the_exact_neighbours(k: int, offset: float) -> None:
    generator = np.random.default_rng(0)
    bank, queries = correlated(3000, generator) + offset, correlated(400, generator) + offset
    index = PrunedFlatIndex(bank)
    squared, indices = index.search(queries, k)
    assert_same_neighbours(bank, queries, squared, indices, k)
    assert sum(index.settled) == len(queries)
    assert index.settled[-1] < len(queries) / 4  # the bounds did the work, not the full search


def test_a_bank_borrowing_a_similar_banks_axes_finds_the_exact_neighbours() -> None:
    """As a calibration fold's bank borrows the final bank's axes: no eigendecomposition of its own, the same exact
    neighbours, the bounds still doing the work; a basis too narrow for the heads is not borrowed."""
    generator = np.random.default_rng(2)
    full = correlated(3000, generator)
    part, queries = full[np.arange(3000) % 5 != 0], correlated(400, generator)
    lender = PrunedFlatIndex(full)
    index = PrunedFlatIndex(part, basis=lender.basis)
    assert index.basis is lender.basis
    squared, indices = index.search(queries, 3)
    assert_same_neighbours(part, queries, squared, indices, 3)
    assert index.settled[-1] < len(queries) / 4
    narrow = (lender.basis[0], lender.basis[1][:, :64])
    assert PrunedFlatIndex(part, basis=narrow).basis[1].shape[1] == 256


def test_isotropic_features_fall_back_to_the_full_search_with_the_exact_neighbours() -> None:
    generator = np.random.default_rng(1)
    bank = generator.standard_normal((2000, 1024)).astype(np.float32)
    queries = generator.standard_normal((300, 1024)).astype(np.float32)
    index = PrunedFlatIndex(bank)
    squared, indices = index.search(queries, 2)
    assert_same_neighbours(bank, queries, squared, indices, 2)
    assert index.settled[-1] > len(queries) / 2  # no axis holds the distances: the bounds are weak


def test_a_bank_of_few_entries_is_searched_in_full() -> None:
    generator = np.random.default_rng(2)
    bank, queries = correlated(10, generator, dim=64), correlated(50, generator, dim=64)
    index = PrunedFlatIndex(bank)
    assert index.levels == []
    squared, indices = index.search(queries, 9)
    assert_same_neighbours(bank, queries, squared, indices, 9)
    squared, indices = index.search(queries, 12)  # more neighbours than entries: all of them, nearest first
    np.testing.assert_array_equal(indices, brute_force(bank, queries, 10)[1])


def test_pruned_search_is_the_default_and_equals_flat_search() -> None:
    generator = np.random.default_rng(3)
    bank, queries = torch.from_numpy(correlated(1500, generator)), torch.from_numpy(correlated(200, generator))
    pruned = NearestNeighbours(bank)
    assert isinstance(pruned.index, PrunedFlatIndex)
    distances, indices = pruned.search(queries, 1)
    flat_distances, flat_indices = NearestNeighbours(bank, "flat").search(queries, 1)
    assert (indices == flat_indices).float().mean() > 0.99
    torch.testing.assert_close(distances, flat_distances, rtol=1e-4, atol=1e-4)


def test_small_query_sets_take_the_matrix_product() -> None:
    """search.py lowers faiss's BLAS threshold (a misspelt cvar would be a silent no-op). The matrix product computes
    ||q||^2 - 2 q.b + ||b||^2, whose rounding leaves some distances of entries to themselves nonzero; pair by pair
    they are all exactly 0."""
    import faiss

    bank = (np.random.default_rng(4).random((500, 256)) + 1).astype(np.float32)  # positive, as ReLU features
    index = faiss.IndexFlatL2(256)
    index.add(bank)
    squared, _ = index.search(bank[:30], 1)  # 30 x 256 = 7,680: far below faiss's default threshold of 128,000
    assert np.count_nonzero(squared) > 0
