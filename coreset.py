"""The memory bank's choice: the reference's greedy k-center coreset on a random projection (exact, or on shards for
big sets), and the store of full training features it chooses from (in memory, or on disk for low-memory training)."""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from config import UserError


class Projection:
    """The seeded Gaussian (dim, projection_dim) projection the coreset is chosen on, and the random draws after it
    (start points, shard order) in the reference's order: the same seed gives the same picks."""

    def __init__(self, dim: int, projection_dim: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.matrix = torch.randn(dim, projection_dim, generator=generator)
        self._state_after = generator.get_state()

    def generator(self) -> torch.Generator:
        """A generator at the state right after the projection was drawn."""
        generator = torch.Generator()
        generator.set_state(self._state_after)
        return generator


@dataclass
class GreedyRun:
    """One greedy k-center run over some of the points: each point's squared distance to the run's picks so far
    (-inf for points outside the run, which are never picked), the picks it may still make, and the distance at or
    below which it stops early. At its end, the largest distance left is its coverage radius: every point of the run
    lies that close to a pick (the next pick would be that far)."""

    nearest: torch.Tensor
    remaining: int
    floor: float = -math.inf
    picks: list[int] = field(default_factory=list)

    @property
    def radius(self) -> float:
        return float(self.nearest.max()) if len(self.nearest) else 0.0


def greedy_coreset(points: torch.Tensor, ratio: float, generator: torch.Generator, rows: torch.Tensor | None = None,
                   num_starts: int = 10, candidates: int = 1024, progress: bool = True) -> tuple[torch.Tensor, float]:
    """Indices of the reference's approximate greedy k-center coreset of projected points (N, P), or of its
    ``rows`` (sorted indices) alone, with no copy of them: the other points are never picked and cover nothing; and
    its coverage radius (GreedyRun.radius, a squared distance on the projection).

    As in the reference, each point's distance starts as its mean distance to ``num_starts`` random points, and
    each pick is the point whose distance is largest, after which every distance becomes the smaller of itself
    and the distance to the pick. The picks are the same as that one-at-a-time greedy's (up to float rounding of
    near-ties), made in passes (see run_greedy).
    """
    run = started_run(points, ratio, generator, rows, num_starts)
    if run is None:
        return (torch.arange(len(points), device=points.device) if rows is None else rows), 0.0
    run_greedy(points, squared_row_norms(points), [run], candidates, progress)
    return torch.tensor(run.picks, device=points.device), run.radius


def started_run(points: torch.Tensor, ratio: float, generator: torch.Generator, rows: torch.Tensor | None = None,
                num_starts: int = 10) -> GreedyRun | None:
    """The reference's greedy over the points (or their ``rows``) before its first pick (see started_runs)."""
    return started_runs(points, ratio, [generator], [rows], num_starts)[0]


def started_runs(points: torch.Tensor, ratio: float, generators: list[torch.Generator],
                 row_sets: list[torch.Tensor | None], num_starts: int = 10,
                 block: int = 1 << 16) -> list[GreedyRun | None]:
    """Greedy runs over the points (or each set of rows) before their first pick, as the reference starts one: each
    point's distance its mean distance to ``num_starts`` random points of the run (drawn by the run's generator),
    squared, the distances computed as the reference computes them (sqrt of ||p||² - 2 p·s + ||s||², clamped at
    0), for all runs in one product per block of points; points outside a run at -inf. None for a run whose ratio
    keeps every point (no greedy to run)."""
    counts, starts = [], []
    for generator, rows in zip(generators, row_sets):
        num_points = len(points) if rows is None else len(rows)
        count = max(1, int(num_points * ratio))
        counts.append(count if count < num_points else None)
        if count < num_points:
            drawn = torch.randint(num_points, (num_starts,), generator=generator).to(points.device)
            starts.append(drawn if rows is None else rows[drawn])
    if not starts:
        return [None] * len(row_sets)
    anchors = points[torch.cat(starts)]
    anchor_norms, squared_norms = squared_row_norms(anchors), squared_row_norms(points)
    means = torch.empty(len(starts), len(points), device=points.device)
    for first in range(0, len(points), block):
        last = first + block
        distances = torch.addmm(anchor_norms, points[first:last], anchors.T, alpha=-2)
        distances = distances.add_(squared_norms[first:last, None]).clamp_(min=0).sqrt_()
        means[:, first:last] = distances.view(-1, len(starts), num_starts).mean(2).T
    runs: list[GreedyRun | None] = []
    started = iter(means.square_())
    for count, rows in zip(counts, row_sets):
        if count is None:
            runs.append(None)
            continue
        nearest = next(started)
        if rows is not None:
            outside = torch.ones_like(nearest, dtype=torch.bool)
            outside[rows] = False
            nearest[outside] = -math.inf
        runs.append(GreedyRun(nearest, count))
    return runs


def squared_row_norms(points: torch.Tensor) -> torch.Tensor:
    return torch.cat([part.square().sum(1) for part in points.split(1 << 16)])  # no temporary as big as the points


def run_greedy(points: torch.Tensor, squared_norms: torch.Tensor, runs: list[GreedyRun], candidates: int = 1024,
               progress: bool = True) -> None:
    """Make every run's picks, exactly as the one-at-a-time greedy makes them, in passes: in each pass, each run
    takes the ``candidates`` points of largest distance and runs the greedy on them alone for as long as its next
    pick's distance stays above every other point's (which can only shrink), so that pick is the one the full greedy
    would make; then one matrix product of every point with all the runs' new picks (often hundreds) brings each
    run's distances up to date with its own, instead of one memory-bound sweep per pick."""
    size = min(candidates, len(points) - 1)
    with tqdm(total=sum(run.remaining for run in runs), desc="coreset", unit="pick", disable=not progress,
              mininterval=1.0) as bar:
        active = [run for run in runs if run.remaining > 0]
        while active:
            new = [_greedy_on_candidates(points, squared_norms, run.nearest, size, run.remaining, run.floor)
                   for run in active]
            _update_nearest(points, squared_norms, [run.nearest for run in active], new)
            for run, picks in zip(active, new):
                run.picks += picks
                run.remaining = 0 if not picks else run.remaining - len(picks)
                bar.update(len(picks))
            active = [run for run in active if run.remaining > 0]


def _greedy_on_candidates(points: torch.Tensor, squared_norms: torch.Tensor, nearest: torch.Tensor, size: int,
                          limit: int, floor: float = -math.inf) -> list[int]:
    """The next picks of the full greedy (at most ``limit``, none at a distance at or below ``floor``), found among
    the ``size`` farthest points alone; none when the greedy has ended."""
    values, indices = nearest.topk(size + 1)
    bound = values[size]  # no other point is farther, now or after more picks
    order = indices[:size].argsort()  # index order: ties go to the lowest index, as the full argmax does
    indices, distances = indices[:size][order], values[:size][order].clone()
    rows, norms = points[indices], squared_norms[indices]
    picks: list[int] = []
    while len(picks) < limit:
        best = int(distances.argmax())
        if not (distances[best] > bound and distances[best] > floor):
            break
        picks.append(int(indices[best]))
        torch.minimum(distances, torch.addmv(norms, rows, rows[best], alpha=-2).add_(norms[best]), out=distances)
    if picks:
        return picks
    farthest = int(nearest.argmax())
    return [farthest] if nearest[farthest] > floor else []


def _update_nearest(points: torch.Tensor, squared_norms: torch.Tensor, nearest: list[torch.Tensor],
                    picks: list[list[int]], block_elements: int = 1 << 22) -> None:
    """Each nearest[r] = min(nearest[r], squared distance to the nearest of ``picks[r]``), for all runs r in one
    product per block of points."""
    columns = [pick for run_picks in picks for pick in run_picks]
    if not columns:
        return
    chosen, chosen_norms = points[columns], squared_norms[columns]
    ends = torch.tensor([len(run_picks) for run_picks in picks]).cumsum(0).tolist()
    block = max(1024, block_elements // len(columns))
    for start in range(0, len(points), block):
        end = start + block
        # ||c||² - 2 p·c per pick c; a point's own ||p||² is added after the minimum (the same float result: adding
        # one number to each is monotone), one pass over the block fewer
        distances = torch.addmm(chosen_norms, points[start:end], chosen.T, alpha=-2)
        for run_nearest, first, last in zip(nearest, [0, *ends[:-1]], ends):
            if last > first:
                closest = distances[:, first:last].amin(1).add_(squared_norms[start:end])
                torch.minimum(run_nearest[start:end], closest, out=run_nearest[start:end])


def sharded_coreset(points: torch.Tensor, ratio: float, generator: torch.Generator, num_shards: int,
                    rows: torch.Tensor | None = None, progress: bool = True) -> tuple[torch.Tensor, float]:
    """The greedy coreset of each of ``num_shards`` seeded random, equal parts of the points (or of their ``rows``),
    merged (sorted), and its coverage radius (the largest of the shards').

    The time of greedy k-center grows as points x picks, so ``num_shards`` shards cost 1 / num_shards of the exact
    greedy at the same ratio. Each shard gets 1 / num_shards of the picks, so the merged picks cover the points
    less tightly than the exact greedy's: see the README for what that costs in AUROC."""
    eligible = torch.arange(len(points), device=points.device) if rows is None else rows
    order = eligible[torch.randperm(len(eligible), generator=generator).to(points.device)]
    picks, radius = [], 0.0
    for shard in tqdm(order.tensor_split(num_shards), desc="coreset shards", unit="shard", disable=not progress):
        shard = shard.sort().values
        shard_picks, shard_radius = greedy_coreset(points[shard], ratio, generator, progress=False)
        picks.append(shard[shard_picks])
        radius = max(radius, shard_radius)
    return torch.cat(picks).sort().values, radius


@dataclass(frozen=True)
class Coreset:
    """A chosen coreset: indices into the points, the shards it was chosen on (1: the exact greedy), and its
    coverage radius: every point chosen from lies within that squared distance of a pick, on the projection."""

    picks: torch.Tensor
    shards: int
    radius: float


def choose_coreset(points: torch.Tensor, ratio: float, projection: Projection, mode: str, shard_size: int,
                   rows: torch.Tensor | None = None, progress: bool = True) -> Coreset:
    """The coreset of the projected points (N, P), or of its ``rows`` only (sorted indices into all N); mode 'auto'
    shards sets of more than ``shard_size`` points."""
    return choose_coresets(points, ratio, projection, mode, shard_size, [rows], progress)[0]


def choose_coresets(points: torch.Tensor, ratio: float, projection: Projection, mode: str, shard_size: int,
                    row_sets: list[torch.Tensor | None], progress: bool = True) -> list[Coreset]:
    """The coreset of each set of rows (None: all points), each exactly as choose_coreset chooses it alone; those
    of the exact greedy in one pass (run_greedy: one product per step brings every run's distances up to date), as
    the memory bank and the calibration folds' banks of one training are chosen."""
    coresets: dict[int, Coreset] = {}
    exact: dict[int, torch.Tensor | None] = {}
    for position, rows in enumerate(row_sets):
        num_points = len(points) if rows is None else len(rows)
        num_shards = 1 if mode == "exact" else max(1 if mode == "auto" else 2, math.ceil(num_points / shard_size))
        if num_shards > 1:
            picks, radius = sharded_coreset(points, ratio, projection.generator(), num_shards, rows, progress)
            coresets[position] = Coreset(picks, num_shards, radius)
        else:
            exact[position] = rows
    started = started_runs(points, ratio, [projection.generator() for _ in exact], list(exact.values()))
    runs = {position: run for position, run in zip(exact, started) if run is not None}
    for position, rows in exact.items():
        if position not in runs:  # the ratio keeps every point
            everything = torch.arange(len(points), device=points.device) if rows is None else rows
            coresets[position] = Coreset(everything, 1, 0.0)
    if runs:
        run_greedy(points, squared_row_norms(points), list(runs.values()), progress=progress)
    for position, run in runs.items():
        coresets[position] = Coreset(torch.tensor(run.picks, device=points.device), 1, run.radius)
    return [coresets[position] for position in range(len(row_sets))]


def image_folds(count: int, folds: int) -> list[torch.Tensor]:
    """``count`` images in ``folds`` interleaved folds (image i in fold i mod folds; at most one fold per image):
    for out-of-fold scores, each fold scored against the coreset of the others."""
    folds = min(folds, count)
    return [torch.arange(fold, count, folds) for fold in range(folds)]


def distances_to(bank_points: torch.Tensor, points: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """Each point's squared distance (N,) to its nearest row of ``bank_points``, in blocks of block x block."""
    squared_norms, bank_norms = squared_row_norms(points), squared_row_norms(bank_points)
    nearest = torch.full((len(points),), math.inf, device=points.device)
    for start in range(0, len(points), block):
        for first in range(0, len(bank_points), block):
            distances = torch.addmm(bank_norms[first:first + block], points[start:start + block],
                                    bank_points[first:first + block].T, alpha=-2)
            distances.add_(squared_norms[start:start + block, None])
            torch.minimum(nearest[start:start + block], distances.amin(1), out=nearest[start:start + block])
    return nearest


def continued_run(nearest_to_bank: torch.Tensor, count: int, rows: torch.Tensor | None = None) -> GreedyRun:
    """A greedy run that continues a bank's greedy over new points (or their ``rows``): the bank's entries count as
    picks already made, so each point starts at its squared distance to the bank (``distances_to``), and the
    farthest are picked first, ``count`` of them (a retrain's greedy on old and new points together makes as many
    picks); a point at distance 0 (already in the bank) is never picked."""
    nearest = nearest_to_bank.clone()
    if rows is not None:
        outside = torch.ones_like(nearest, dtype=torch.bool)
        outside[rows] = False
        nearest[outside] = -math.inf
    return GreedyRun(nearest, count, 0.0)


def available_memory(device: torch.device) -> int:
    """Bytes free for new data on ``device``: free GPU memory, or the kernel's MemAvailable (0 when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


class FeatureStore:
    """Every training patch's full feature vector, filled in order: a tensor on the model's device, or, for
    low-memory training, a temporary file (deleted when closed) of which only the rows asked for are read back.

    On disk the rows are float32 as computed, so the memory bank is the same either way."""

    def __init__(self, num_rows: int, dim: int, device: torch.device, on_disk: bool, directory: str | None = None):
        self.num_rows, self.dim, self.device, self.on_disk, self.filled = num_rows, dim, device, on_disk, 0
        if not on_disk:
            self.features = torch.empty(num_rows, dim, device=device)
            return
        directory = directory or tempfile.gettempdir()
        needed, free = num_rows * dim * 4, shutil.disk_usage(directory).free
        if needed > free:
            raise UserError(f"low-memory training needs {needed / 2**30:.1f} GiB of temporary space in '{directory}', "
                            f"which has {free / 2**30:.1f} GiB free: point TMPDIR at a bigger disk")
        self.file = tempfile.TemporaryFile(dir=directory, prefix="patchcore-features-")

    @staticmethod
    def should_use_disk(num_rows: int, dim: int, device: torch.device, mode: str) -> bool:
        """mode 'disk', 'memory', or 'auto': disk when the features would take over a quarter of the free memory."""
        if mode != "auto":
            return mode == "disk"
        return num_rows * dim * 4 > available_memory(device) / 4

    def append(self, rows: torch.Tensor) -> None:
        if self.on_disk:
            self.file.write(memoryview(rows.float().cpu().numpy()))
        else:
            self.features[self.filled:self.filled + len(rows)] = rows
        self.filled += len(rows)

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows (len(indices), dim) on the model's device; from disk, only those rows are read, each run of
        consecutive rows in one read (plain reads, not a memory map: nothing read stays in this process)."""
        if not self.on_disk:
            return self.features[indices.to(self.device)]
        self.file.flush()
        indices = indices.cpu().numpy()
        order = np.argsort(indices, kind="stable")
        wanted = indices[order]
        rows = np.empty((len(indices), self.dim), np.float32)
        for run in np.split(np.arange(len(wanted)), np.flatnonzero(np.diff(wanted) != 1) + 1):
            if len(run):
                block = np.empty((len(run), self.dim), np.float32)
                self.file.seek(int(wanted[run[0]]) * self.dim * 4)
                self.file.readinto(memoryview(block))
                rows[order[run]] = block
        self.file.seek(0, os.SEEK_END)  # appends go on at the end
        return torch.from_numpy(rows).to(self.device)

    def close(self) -> None:
        if self.on_disk:
            self.file.close()
        else:
            del self.features
