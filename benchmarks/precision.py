"""Accuracy and speed of the reduced-precision paths against float32, on real data.

    python benchmarks/precision.py --data_path ../shared/data/mvtec_ad --category bottle --backbone resnet50 \
        --weights ../shared/weights/resnet50_imagenet_upto_layer3.pth --coreset_ratios 0.01 0.1

For each coreset ratio, this project trains on the category and scores its whole test set, each time in a fresh
process, as bench.py's project side does: in fp32 (the reference point), with --precision bf16 --no-fp32_bank
(layer2 and layer3 under bf16 autocast in training too, the exact pruned search in fp32), with --precision bf16
--search flat --no-fp32_bank (also the bf16 k-NN candidates re-ranked in fp32), and with --precision bf16 --search
flat (training features in fp32, so fp32's bank, and bf16 at inference only: the defaults on a CPU with native
bf16); --variants chooses among these, fp32 first. It reports
the AUROCs, their change against fp32 (the issue's bound: 0.002) and the stage times. On a CPU without native bf16
the bf16 runs round as bf16 does but compute far slower than fp32: their AUROCs hold, their times say nothing
about a bf16 CPU.

The greedy coreset amplifies any change of the features into other picks, and on data such as magnetic tile other
picks (another --seed, say) move the AUROCs more than bf16 does. --same_picks also scores every variant on one
coreset, in one more process: fp32's features choose the picks, each variant's own features fill the bank at
those picks, so that its change against fp32 is precision's own.
Results: results/precision_<category>.json and .md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402

from atomic import atomic_write_text  # noqa: E402
from bench import in_fresh_process, machine, project_job  # noqa: E402
from config import EvalConfig, PatchCoreConfig, add_arguments, from_arguments  # noqa: E402
from coreset import Projection, choose_coreset  # noqa: E402
from dataset import MVTecDataset, make_loader  # noqa: E402
from evaluate import category_metrics, predict  # noqa: E402
from patchcore import PatchCore  # noqa: E402

VARIANTS = ("fp32:pruned", "bf16:pruned", "bf16:flat", "bf16:flat:fp32_bank")
AUROC_TOLERANCE = 0.002


def variant_config(config: PatchCoreConfig, variant: str) -> PatchCoreConfig:
    """``config`` with a variant's settings: 'precision:search', and ':fp32_bank' for --fp32_bank."""
    precision, search, *bank = variant.split(":")
    return dataclasses.replace(config, precision=precision, search=search, fp32_bank=bank == ["fp32_bank"])


def same_picks_job(config: PatchCoreConfig, run: EvalConfig, category: str, variants: list[str]) -> list[dict]:
    """Each variant's AUROCs on one coreset: fp32's features (the first variant's) choose the picks, each
    variant's own features fill the bank at those picks."""
    device = run.resolved_device()
    train = MVTecDataset(run.data_path, category, "train", config.geometry)
    test = MVTecDataset(run.data_path, category, "test", config.geometry)
    extractor, picks, results = None, None, []
    for variant in variants:
        model = PatchCore(variant_config(config, variant), device, extractor)
        extractor = model.extractor
        features = torch.cat([model.embed(batch["image"], not model.config.fp32_bank).flatten(0, 2)
                              for batch in make_loader(train, run.batch_size, run.num_workers, device)])
        if picks is None:
            projection = Projection(config.embedding_dim, config.projection_dim, config.seed)
            picks = choose_coreset(features @ projection.matrix.to(device), config.coreset_ratio, projection,
                                   config.coreset, config.coreset_shard_size).picks
        model.set_memory_bank(features[picks].clone())
        del features
        metrics = category_metrics(predict(model, test, run, category), category)
        results.append({"image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"]})
    return results


def markdown(report: dict) -> str:
    lines = ["| coreset | precision | search | features + coreset | inference | image AUROC | pixel AUROC | "
             "change against fp32 (image / pixel) | same picks: image / pixel AUROC | change | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for ratio, rows in report["rows"].items():
        for r in rows:
            same = r.get("same_picks")
            same_columns = "– | –" if same is None else (
                f"{same['image_auroc']:.4f} / {same['pixel_auroc']:.4f} | {_change(same, rows[0]['same_picks'])}")
            lines.append(
                f"| {ratio} | {r['precision']}{', fp32 bank' if r.get('fp32_bank') else ''} | {r['search']} | "
                f"{r['features_s']:.1f} + {r['coreset_s']:.1f} s | "
                f"{r['inference_s']:.1f} s | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | "
                f"{_change(r, rows[0])} | {same_columns} | {r['peak_rss_gb']:.2f} GiB |")
    return "\n".join(lines)


def _change(aurocs: dict, reference: dict) -> str:
    return (f"{aurocs['image_auroc'] - reference['image_auroc']:+.4f} / "
            f"{aurocs['pixel_auroc'] - reference['pixel_auroc']:+.4f}")


def largest_change(report: dict, key: str | None = None) -> float:
    """The largest AUROC change, image or pixel, of any reduced-precision run against its fp32 run; with ``key``
    'same_picks', on the same picks."""
    def aurocs(row: dict) -> dict:
        return row if key is None else row[key]

    return max((abs(aurocs(r)[metric] - aurocs(rows[0])[metric]) for rows in report["rows"].values()
                for r in rows[1:] for metric in ("image_auroc", "pixel_auroc")), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, EvalConfig)
    add_arguments(parser, PatchCoreConfig)
    parser.add_argument("--coreset_ratios", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="precision:search runs per ratio, the first one the reference point")
    parser.add_argument("--same_picks", action="store_true",
                        help="also score every variant on fp32's coreset picks (precision's own effect)")
    args = parser.parse_args()
    if args.variants[0] != VARIANTS[0]:
        parser.error(f"--variants: the first is the reference point, {VARIANTS[0]}")
    run, base_config = from_arguments(EvalConfig, args), from_arguments(PatchCoreConfig, args)
    report = {"machine": machine(run.resolved_device()),
              "category": run.category, "config": dataclasses.asdict(base_config), "run": dataclasses.asdict(run),
              "rows": {}}
    stem = Path(run.results_dir) / f"precision_{run.category}"

    def save() -> str:  # after every run: a long one keeps what it measured
        table = markdown(report)
        atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
        atomic_write_text(stem.with_suffix(".md"), table + "\n")
        return table

    for ratio in args.coreset_ratios:
        rows = report["rows"].setdefault(str(ratio), [])
        for variant in args.variants:
            config = variant_config(dataclasses.replace(base_config, coreset_ratio=ratio), variant)
            rows.append({**in_fresh_process(project_job, config, run, run.category), "fp32_bank": config.fp32_bank})
            print(f"coreset {ratio}, {variant}: image / pixel AUROC {rows[-1]['image_auroc']:.4f}"
                  f" / {rows[-1]['pixel_auroc']:.4f}, inference {rows[-1]['inference_s']:.1f} s", flush=True)
            table = save()
        if args.same_picks:
            config = dataclasses.replace(base_config, coreset_ratio=ratio)
            for row, same in zip(rows, in_fresh_process(same_picks_job, config, run, run.category, args.variants)):
                row["same_picks"] = same
            table = save()
    print(table)
    for what, key in (("", None), (" on the same picks", "same_picks")) if args.same_picks else (("", None),):
        change = largest_change(report, key)
        print(f"largest AUROC change against fp32{what}: {change:.4f} "
              f"({'within' if change <= AUROC_TOLERANCE else 'beyond'} {AUROC_TOLERANCE})")
    print(f"native bf16 on this CPU: {'yes' if report['machine']['native_bf16'] else 'no'}")


if __name__ == "__main__":
    main()
