"""Keep a model current without retraining: add good images, remove images added by mistake, roll back.

PatchCore's model is a set of normal patches, so adding good images is adding patches. add_good embeds only the new
images and continues the bank's greedy coreset over their patches: the bank's entries count as picks already made,
so the patches farthest from the bank are added, the coreset ratio of the new patches, as many as a retrain's greedy
on the old and new images together adds (patches already in the bank never are). The thresholds are set again from the calibration scores the model
already has (the bank only grows, so their scores against it can only fall: keeping them is conservative) and the
new images scored out of fold (each fold against the bank plus the picks from the other folds), at the stored
false-alarm rate. Every update is one history entry holding what undoes it, so rollback restores the previous
version exactly; the old training images are never needed. With search 'ivf', every update keeps the model's IVF
centroids (the k-means of training): they still partition the space, and only the lists are refilled with the new
bank, so no update runs a k-means (nor rollback, which restores the index exactly). A bank grown far beyond the one
trained on keeps its lists' count, ivf_lists of that bank; retraining sizes them anew.
"""
from __future__ import annotations

import csv
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from tqdm import tqdm

from calibration import Calibration, calibrate
from config import UserError
from coreset import Projection, continued_run, distances_to, image_folds, run_greedy, squared_row_norms
from dataset import ImageFiles, make_loader
from images import expand_paths, file_sha256

if TYPE_CHECKING:
    from patchcore import PatchCore

FOLDS = 5  # the new images' out-of-fold scores: each fold against the bank plus the picks from the other four
ADDED = "added train/good (out of fold)"


def good_paths(arguments: Sequence[str]) -> list[Path]:
    """The images named by ``arguments``: images, folders and globs as predict.py takes them, and list files: a
    .txt of one path a line, or a .csv with a 'path' column (predict.py's predictions.csv): its rows whose 'good'
    column is 1, yes, true or x when it has one (the operator's marks), every row otherwise."""
    patterns = []
    for argument in arguments:
        suffix = Path(argument).suffix.lower()
        if suffix == ".txt" and Path(argument).is_file():
            patterns += [line.strip() for line in Path(argument).read_text(encoding="utf-8").splitlines() if line.strip()]
        elif suffix == ".csv" and Path(argument).is_file():
            with open(argument, newline="", encoding="utf-8", errors="surrogateescape") as f:
                rows = list(csv.DictReader(f))
            if rows and "path" not in rows[0]:
                raise UserError(f"'{argument}' has no 'path' column: pass predict.py's CSV, or a .txt of paths")
            marked = "good" in (rows[0] if rows else {})
            patterns += [row["path"] for row in rows
                         if not marked or row["good"].strip().lower() in ("1", "yes", "true", "x")]
        else:
            patterns.append(argument)
    if not patterns:
        raise UserError(f"no images to add in {', '.join(arguments)} (no row marked good?)")
    return expand_paths(patterns)


def add_good(model: PatchCore, files: Sequence[str | Path], batch_size: int = 32, num_workers: int = 0) -> dict:
    """Add the good images ``files`` to ``model``: their patches farthest from the bank, new thresholds, one
    history entry. Images already in the model (by SHA-256) are skipped; unreadable ones are named in the report
    and the rest added. Returns the report (also the history entry, less what undoes it)."""
    _require_bank(model)
    known = {image["sha256"] for image in model.images if not image.get("removed")}
    new, duplicates, seen = [], [], set()
    for path in map(Path, files):
        digest = file_sha256(path)
        if digest is not None and (digest in known or digest in seen):
            duplicates.append(str(path))
        else:
            new.append((path, digest))
            seen.add(digest)
    features, scoring, readable, unreadable = _embed(model, [path for path, _ in new], batch_size, num_workers)
    digests = dict(new)
    records = [{"path": os.path.realpath(path), "sha256": digests[path]} for path in readable]
    before = thresholds_of(model)
    entry = {"action": "add_good", "images": [str(path) for path in readable], "duplicates": duplicates,
             "unreadable": unreadable, "entries_added": 0, "calibration": "unchanged (no new image)"}
    if readable:
        picks, scores, maxima = _picks_and_scores(model, features, scoring)
        undo = {"bank_size": len(model.memory_bank), "images": len(model.images),
                "calibration": None if model.calibration is None else model.calibration.to_dict()}
        patches = features.shape[1] * features.shape[2]
        model.set_memory_bank(torch.cat([model.memory_bank, features.flatten(0, 2)[picks].to(model.device)]),
                              model.ivf_centroids)
        image_index = torch.tensor(picks, dtype=torch.int64) // patches + len(model.images)
        model.entry_images = torch.cat([model.entry_images, image_index.to(torch.int32)])
        model.images = model.images + records
        model.calibration, entry["calibration"] = _recalibrated(model.calibration, scores, maxima,
                                                                [record["path"] for record in records])
        entry.update(entries_added=len(picks), undo=undo)
    return _record(model, entry, before)


def remove_images(model: PatchCore, files: Sequence[str | Path]) -> dict:
    """Drop the bank entries and calibration scores of the images ``files`` (matched by SHA-256, or by path when
    the file is gone), set the thresholds again from the scores left, and record it (rollback undoes it)."""
    _require_bank(model)
    digests = {file_sha256(path) for path in files} - {None}
    wanted = {os.path.realpath(path) for path in files}
    matched = [i for i, image in enumerate(model.images) if not image.get("removed")
               and (image["sha256"] in digests or image["path"] in wanted)]
    if not matched:
        raise UserError(f"none of {', '.join(map(str, files))} built this model (by content or path): nothing to "
                        f"remove")
    keep = ~torch.isin(model.entry_images, torch.tensor(matched, dtype=torch.int32))
    if not keep.any():
        raise UserError("removing these images would leave the memory bank empty: retrain instead")
    before = thresholds_of(model)
    positions = torch.nonzero(~keep).squeeze(1)
    undo = {"positions": positions, "rows": model.memory_bank[positions].cpu(),
            "entry_images": model.entry_images[positions], "images": matched,
            "calibration": None if model.calibration is None else model.calibration.to_dict()}
    model.set_memory_bank(model.memory_bank[keep.to(model.device)], model.ivf_centroids)
    model.entry_images = model.entry_images[keep]
    removed_paths = [model.images[i]["path"] for i in matched]
    for i in matched:
        model.images[i] = {**model.images[i], "removed": model.version + 1}
    description = "unchanged"
    if model.calibration is not None:
        model.calibration, description = _without_scores(model.calibration, removed_paths)
    entry = {"action": "remove_images", "images": removed_paths, "entries_removed": len(positions),
             "calibration": description, "undo": undo}
    return _record(model, entry, before)


def rollback(model: PatchCore) -> dict:
    """Undo the last update: the bank, its provenance and the calibration exactly as they were before it."""
    if not model.history or model.history[-1]["action"] not in ("add_good", "remove_images"):
        raise UserError("this model has no update to roll back (it is as train.py made it)")
    last = model.history[-1]
    undo = last.get("undo")
    if last["action"] == "add_good" and undo is not None:
        model.set_memory_bank(model.memory_bank[:undo["bank_size"]], model.ivf_centroids)
        model.entry_images = model.entry_images[:undo["bank_size"]]
        model.images = model.images[:undo["images"]]
    elif last["action"] == "remove_images":
        total = len(model.memory_bank) + len(undo["positions"])
        keep = torch.ones(total, dtype=torch.bool)
        keep[undo["positions"]] = False
        bank = torch.empty(total, model.memory_bank.shape[1])
        bank[keep], bank[undo["positions"]] = model.memory_bank.cpu(), undo["rows"]
        entry_images = torch.empty(total, dtype=torch.int32)
        entry_images[keep], entry_images[undo["positions"]] = model.entry_images, undo["entry_images"]
        model.set_memory_bank(bank, model.ivf_centroids)
        model.entry_images = entry_images
        for i in undo["images"]:
            model.images[i] = {key: value for key, value in model.images[i].items() if key != "removed"}
    if undo is not None:
        model.calibration = None if undo["calibration"] is None else Calibration.from_dict(undo["calibration"])
    model.history = model.history[:-1]
    return {"action": "rollback", "undone": {key: value for key, value in last.items() if key != "undo"},
            "version": model.version}


def _require_bank(model: PatchCore) -> None:
    if model.memory_bank is None:
        raise UserError("the model has no memory bank: train it first")
    if not model.history:  # a checkpoint from before versions: its training is version 1
        model.history = [{"version": 1, "action": "train", "when": model.metadata.get("created"),
                          "thresholds": thresholds_of(model)}]


def _embed(model: PatchCore, paths: list[Path], batch_size: int, num_workers: int
           ) -> tuple[torch.Tensor, torch.Tensor, list[Path], list[str]]:
    """The readable images' patch features for the bank (N, h, w, D; as training computes them: fp32 under
    fp32_bank) and for scoring (as inspection computes them), the readable paths and the errors of the rest."""
    config, device = model.config, model.device
    dataset = ImageFiles(paths, config.geometry)
    bank_features, scoring_features, readable, unreadable = [], [], [], []
    again = config.fp32_bank and model.precision in ("bf16", "fp16")
    for batch in tqdm(make_loader(dataset, batch_size, num_workers, device), desc="new images", unit="batch"):
        ok = [i for i, error in enumerate(batch["error"]) if not error]
        unreadable += [error for error in batch["error"] if error]
        readable += [paths[int(batch["index"][i])] for i in ok]
        if ok:
            images = batch["image"][ok]
            features = model.embed(images, reduced_precision=not config.fp32_bank)
            bank_features.append(features.cpu())
            scoring_features.append(model.embed(images).cpu() if again else features.cpu())
    if not readable:
        return torch.empty(0), torch.empty(0), [], unreadable
    return torch.cat(bank_features), torch.cat(scoring_features), readable, unreadable


def _picks_and_scores(model: PatchCore, features: torch.Tensor, scoring: torch.Tensor
                      ) -> tuple[list[int], list[float], list[float]]:
    """The new patches (rows of ``features`` flattened) the continued greedy adds, and each new image's out-of-fold
    score and map maximum: the final picks and every fold's in one greedy pass."""
    config = model.config
    projection = Projection(config.embedding_dim, config.projection_dim, config.seed).matrix.to(model.device)
    patches = features.shape[1] * features.shape[2]
    points = features.flatten(0, 2).to(model.device) @ projection
    to_bank = distances_to(model.memory_bank @ projection, points)
    images = len(features)
    inside = model.inspected_rows(tuple(features.shape[1:3]), len(points))  # only patches it inspects enter the bank
    every = torch.arange(len(points), device=model.device) if inside is None else inside
    folds = image_folds(images, FOLDS)
    runs = [continued_run(to_bank, math.ceil(config.coreset_ratio * len(every)), every)]
    for fold in folds:
        rows = every[~torch.isin(every // patches, fold.to(model.device))]
        runs.append(continued_run(to_bank, math.ceil(config.coreset_ratio * len(rows)), rows))
    run_greedy(points, squared_row_norms(points), runs, progress=False)
    scores, maxima = [0.0] * images, [0.0] * images
    for fold, run in zip(folds, runs[1:]):
        bank = torch.cat([model.memory_bank, features.flatten(0, 2)[run.picks].to(model.device)])
        fold_scores, fold_maps = model.score(scoring[fold].to(model.device), model.index_for(bank, True), bank)
        for i, score, image_map in zip(fold.tolist(), fold_scores.tolist(), fold_maps):
            scores[i], maxima[i] = score, float(image_map.max())
    return runs[0].picks, scores, maxima


def thresholds_of(model: PatchCore) -> dict | None:
    """The model's thresholds as a history entry records them."""
    c = model.calibration
    return None if c is None else {"image": c.image_threshold, "pixel": c.pixel_threshold, "rule": c.rule,
                                   "images": len(c.images)}


def _recalibrated(calibration: Calibration | None, scores: list[float], maxima: list[float],
                  names: list[str]) -> tuple[Calibration, str]:
    """The calibration with the new images' out-of-fold scores joined to the stored ones, at the stored rate."""
    rate = 0.01 if calibration is None else calibration.false_alarm_rate
    old_scores, old_maxima, old_names = ([], [], []) if calibration is None else (
        list(calibration.image_scores), list(calibration.map_maxima), list(calibration.images))
    source = ADDED if calibration is None else (calibration.source if ADDED in calibration.source
                                                else f"{calibration.source} + {ADDED}")
    updated = calibrate(old_scores + scores, old_maxima + maxima, rate, source, old_names + names)
    description = (f"rule '{updated.rule}' at {rate:.1%} on {len(updated.images)} images: "
                   f"{len(old_scores)} stored scores and {len(scores)} new images' out-of-fold scores")
    return updated, description


def _without_scores(calibration: Calibration, paths: list[str]) -> tuple[Calibration, str]:
    """The calibration without the scores of the images at ``paths`` (names match a path or its end)."""
    def removed(name: str) -> bool:
        return any(path == name or path.endswith(os.sep + name) for path in paths)

    keep = [i for i, name in enumerate(calibration.images) if not removed(name)]
    if len(keep) == len(calibration.images):
        return calibration, "unchanged (no calibration score of these images)"
    if not keep:
        raise UserError("removing these images leaves no calibration score: retrain instead")
    updated = calibrate([calibration.image_scores[i] for i in keep], [calibration.map_maxima[i] for i in keep],
                        calibration.false_alarm_rate, calibration.source, [calibration.images[i] for i in keep])
    return updated, (f"rule '{updated.rule}' at {updated.false_alarm_rate:.1%} on the {len(keep)} calibration scores "
                     f"left")


def _record(model: PatchCore, entry: dict, before: dict | None) -> dict:
    """Append ``entry`` as the model's next version (with when, and the thresholds before and after); returns the
    report: the entry without what undoes it."""
    new_version = "undo" in entry  # else nothing changed (every image known or unreadable): no new version
    entry = {"version": model.version + new_version, "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             **entry, "thresholds_before": before, "thresholds_after": thresholds_of(model)}
    if new_version:
        model.history = model.history + [entry]
    return {**{key: value for key, value in entry.items() if key != "undo"}, "new_version": new_version}
