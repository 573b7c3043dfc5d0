"""Accuracy and speed of the reduced-precision paths against float32, on real data.

    python benchmarks/precision.py --data_path ../shared/data/mvtec_ad --category bottle --backbone resnet50 \
        --weights ../shared/weights/resnet50_imagenet_upto_layer3.pth --coreset_ratios 0.01 0.1

For each coreset ratio, this project trains on the category and scores its whole test set, each time in a fresh
process, as bench.py's project side does: in fp32 (the reference point), with --precision bf16 (the backbone under
bf16 autocast, the default pruned search in fp32), and with --precision bf16 --search flat (also the bf16 k-NN
candidates re-ranked in fp32); --variants chooses among these, fp32 first. It reports the AUROCs, their change
against fp32 (the issue's bound: 0.002) and the stage times. On a CPU without native bf16 the bf16 runs round as
bf16 does but compute far slower than fp32: their AUROCs hold, their times say nothing about a bf16 CPU.
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

from atomic import atomic_write_text  # noqa: E402
from bench import in_fresh_process, machine, project_job  # noqa: E402
from config import EvalConfig, PatchCoreConfig, add_arguments, from_arguments  # noqa: E402

VARIANTS = ("fp32:pruned", "bf16:pruned", "bf16:flat")
AUROC_TOLERANCE = 0.002


def markdown(report: dict) -> str:
    lines = ["| coreset | precision | search | features + coreset | inference | image AUROC | pixel AUROC | "
             "change against fp32 (image / pixel) | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for ratio, rows in report["rows"].items():
        reference = rows[0]
        for r in rows:
            change = (r["image_auroc"] - reference["image_auroc"], r["pixel_auroc"] - reference["pixel_auroc"])
            lines.append(
                f"| {ratio} | {r['precision']} | {r['search']} | {r['features_s']:.1f} + {r['coreset_s']:.1f} s | "
                f"{r['inference_s']:.1f} s | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | "
                f"{change[0]:+.4f} / {change[1]:+.4f} | {r['peak_rss_gb']:.2f} GiB |")
    return "\n".join(lines)


def largest_change(report: dict) -> float:
    """The largest AUROC change, image or pixel, of any reduced-precision run against its fp32 run."""
    return max((abs(r[key] - rows[0][key]) for rows in report["rows"].values() for r in rows[1:]
                for key in ("image_auroc", "pixel_auroc")), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, EvalConfig)
    add_arguments(parser, PatchCoreConfig)
    parser.add_argument("--coreset_ratios", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="precision:search runs per ratio, the first one the reference point")
    args = parser.parse_args()
    if args.variants[0] != VARIANTS[0]:
        parser.error(f"--variants: the first is the reference point, {VARIANTS[0]}")
    run, base_config = from_arguments(EvalConfig, args), from_arguments(PatchCoreConfig, args)
    report = {"machine": machine(run.resolved_device()),
              "category": run.category, "config": dataclasses.asdict(base_config), "run": dataclasses.asdict(run),
              "rows": {}}
    stem = Path(run.results_dir) / f"precision_{run.category}"
    for ratio in args.coreset_ratios:
        rows = report["rows"].setdefault(str(ratio), [])
        for precision, search in (variant.split(":") for variant in args.variants):
            config = dataclasses.replace(base_config, coreset_ratio=ratio, precision=precision, search=search)
            rows.append(in_fresh_process(project_job, config, run, run.category))
            print(f"coreset {ratio}, {precision}, {search} search: image / pixel AUROC {rows[-1]['image_auroc']:.4f}"
                  f" / {rows[-1]['pixel_auroc']:.4f}, inference {rows[-1]['inference_s']:.1f} s", flush=True)
            table = markdown(report)  # after every run: a long one keeps what it measured
            atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
            atomic_write_text(stem.with_suffix(".md"), table + "\n")
    change = largest_change(report)
    print(table)
    print(f"largest AUROC change against fp32: {change:.4f} ({'within' if change <= AUROC_TOLERANCE else 'beyond'} "
          f"{AUROC_TOLERANCE}); native bf16 on this CPU: {'yes' if report['machine']['native_bf16'] else 'no'}")


if __name__ == "__main__":
    main()
