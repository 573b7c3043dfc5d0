"""Export a trained category for inspection without torch or faiss: python export.py --category bottle [--format openvino]

Writes a bundle into --output (default exported/): the model (<category>.onnx, or <category>.xml + .bin for
OpenVINO) and <category>.json, the contract that goes with it. The graph takes images prepared by images.prepare
(resized, cropped, in [0, 1]) and returns raw image scores and anomaly maps, the nearest-neighbour distances
predict.py computes: the search is exact and bounded in memory. Everything a line may want to change stays in the
JSON: the calibrated thresholds with their rule, the preprocessing, the model's identity and the files' SHA-256.
predict_exported.py runs a bundle with ONNX Runtime or OpenVINO alone.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

import bundle
from atomic import WriteError, atomic_write_json, check_writable_folder
from config import ExportConfig, UserError, parse_flags, run_cli
from images import IMAGENET_MEAN, IMAGENET_STD, file_sha256
from patchcore import PatchCore, RegionOfInterest, checkpoint_path, map_operator, model_identity, score_patches
from search import GraphSearch, NearestNeighbours, PrunedFlatIndex

OPSET = 18
INPUT, OUTPUTS = "images", ("scores", "maps")


class ExportedModel(nn.Module):
    """The exported graph: images from images.prepare (N, 3, S, S), RGB in [0, 1] -> image scores (N,) and anomaly
    maps (N, S, S), as PatchCore.predict computes them (fp32): ImageNet normalisation, backbone, patch embedding,
    GraphSearch (exact nearest bank entries) and score_patches. For k > 1, each bank entry's k nearest entries are
    a table computed at export (the search PatchCore.predict runs for them)."""

    def __init__(self, model: PatchCore, chunk: int):
        super().__init__()
        self.config = model.config
        self.extractor, self.embedding = model.extractor.float().eval(), model.embedding.float()
        bank = model.memory_bank.cpu().float()
        self.search = GraphSearch(PrunedFlatIndex(bank.numpy()), chunk)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        if self.config.k > 1:
            self.register_buffer("neighbourhoods", NearestNeighbours(bank, "pruned").search(bank, self.config.k)[1])
        region = model.region()
        self.inspects_all = region is None
        if region is not None:  # the checkpoint's region to inspect, a constant of the graph
            self.register_buffer("roi_pixels", region.pixels.cpu())
            self.register_buffer("roi_patches", region.patches.cpu())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        region = None if self.inspects_all else RegionOfInterest(self.roi_pixels, self.roi_patches)
        normalized = (images - self.pixel_mean) / self.pixel_std
        maps = self.extractor(normalized if region is None else region.blank(normalized))
        features = self.embedding(maps) - self.search.mean  # centred, as the search's bank: distances unchanged

        def nearest(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            squared, indices = self.search(queries)
            return squared.clamp_min(0).sqrt(), indices

        return score_patches(features, nearest, lambda entries: self.neighbourhoods[entries], self.search.rows,
                             self.config, region)


def contract(checkpoint: dict, model: PatchCore, files: dict[str, dict[str, str]], run: ExportConfig,
             chunk: int) -> dict:
    """The bundle's JSON: what the graph takes and gives, the thresholds and everything else a line may change,
    the model's identity, and its files with their SHA-256 by format."""
    config, calibration, geometry = model.config, model.calibration, model.config.geometry
    (height, width), (resize_height, resize_width) = geometry.size, geometry.resize
    resize = (f"scale each channel by one factor, keeping the aspect ratio, to the smallest size covering "
              f"{resize_height} x {resize_width} (height x width; a side is round(side x factor))"
              if geometry.keep_aspect else f"resize each channel to {resize_height} x {resize_width} (height x width)")
    return {
        "format": bundle.FORMAT,
        "version": bundle.VERSION,
        "category": checkpoint["category"],
        "model_id": model_identity(checkpoint),
        "model": {"files": files, "onnx_opset": OPSET, "precision": "fp32"},
        "input": {
            "name": INPUT, "shape": ["batch", 3, height, width], "layout": "NCHW",
            "dtype": "float32", "channels": "RGB (a gray image in all three)", "value_range": [0.0, 1.0],
            "geometry": {"resize": list(geometry.resize), "size": list(geometry.size),
                         "keep_aspect": geometry.keep_aspect},
            "preprocessing": {
                "outside_graph": [
                    "decode; apply the EXIF orientation; palette to its colours; drop alpha",
                    "scale by bit depth: 8-bit / 255, 16-bit / 65535, float as it is (within [0, 1])",
                    f"{resize} with Pillow's antialiased bilinear filter in float32 (Image.resize(BILINEAR) on "
                    f"mode 'F' planes)",
                    f"center crop to {height} x {width}: top row (resized height - {height}) // 2, left column "
                    f"(resized width - {width}) // 2",
                ],
                "inside_graph": f"ImageNet normalisation (x - mean) / std, mean {list(IMAGENET_MEAN)}, "
                                f"std {list(IMAGENET_STD)}",
                "reference_implementation": "images.py: read_pixels(), then prepare() with images.Geometry.of(resize, "
                                            "size, keep_aspect) (numpy and Pillow only)",
            },
        },
        "outputs": {
            "scores": {"shape": ["batch"], "meaning": "image score: L2 distance of the image's worst patch to its "
                                                      "nearest memory-bank entry" + (" (Eq. 7 reweighting)"
                                                                                     if config.k > 1 else "")},
            "maps": {"shape": ["batch", height, width],
                     "meaning": "anomaly map: patch distances upsampled bilinearly and smoothed (Gaussian, "
                                f"sigma {config.blur_sigma} px), on the cropped input's pixels"
                                + ("" if model.roi is None else "; 0 outside the region to inspect")},
        },
        "thresholds": None if calibration is None else {
            "image": calibration.image_threshold, "pixel": calibration.pixel_threshold,
            "verdict": "anomalous when score > image threshold; defect region where map > pixel threshold",
            "rule": calibration.rule, "false_alarm_rate": calibration.false_alarm_rate, "source": calibration.source,
            "calibration_images": len(calibration.images)},
        "search": {"kind": "exact nearest neighbour (principal-axis bounds, then exact distances)",
                   "bank_entries": len(model.memory_bank), "bank_entries_at_a_time": chunk,
                   "largest_tensor_bytes_per_query": 4 * chunk},
        "region_to_inspect": None if model.roi is None else {
            "inspected_share": float(model.roi.float().mean()),
            "meaning": "in the graph: the input is set to the mean colour outside it, patches outside it score 0, and "
                       "the maps are 0 there"},
        "backbone": {"name": config.backbone, "layers": list(config.layers), "weights": config.weights,
                     "weights_sha256": checkpoint["weights_digest"]},
        "training": {"created": checkpoint.get("created"), "data_path": checkpoint.get("data_path"),
                     "num_train_images": checkpoint.get("num_train_images"), "config": dataclasses.asdict(config)},
        "versions": {"python": platform.python_version(), "torch": str(torch.__version__),
                     "exported_from": str(checkpoint_path(run.checkpoint_dir, run.category))},
    }


def write_graph(module: ExportedModel, folder: Path, category: str, kind: str) -> list[Path]:
    """The model files of ``module`` in ``folder``: <category>.onnx, or <category>.xml and .bin (converted from that
    ONNX graph, kept in fp32)."""
    example = torch.rand(2, 3, *module.config.geometry.size)
    onnx_path = folder / f"{category}.onnx"
    quiet = logging.getLogger("onnx_ir")  # its notes on the exporter's own attributes are not the user's business
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            module(example)  # caches the map operators as real tensors: the graph holds them as constants
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT],
                                        output_names=list(OUTPUTS), verbose=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
    finally:
        quiet.setLevel(level)
        map_operator.cache_clear()  # nothing made while tracing may serve later eager calls
    program.save(str(onnx_path))
    if kind == "onnx":
        return [onnx_path]
    try:
        import openvino  # noqa: PLC0415  (only this format needs it)
    except ImportError:
        raise UserError("--format openvino needs the openvino package: pip install -r requirements-deploy.txt"
                        ) from None
    xml_path = folder / f"{category}.xml"
    openvino.save_model(openvino.convert_model(onnx_path), xml_path, compress_to_fp16=False)
    onnx_path.unlink()
    return [xml_path, xml_path.with_suffix(".bin")]


def export(run: ExportConfig) -> Path:
    """Write the bundle of ``run.category``; returns its JSON's path."""
    run.validate()
    output = check_writable_folder(run.output, "the exported model")
    model, checkpoint = PatchCore.load(checkpoint_path(run.checkpoint_dir, run.category), "cpu", run.category)
    print(f"[{run.category}] exporting {model_identity(checkpoint)}: {model.config.backbone}, "
          f"{len(model.memory_bank):,} bank entries, k = {model.config.k} -> {run.format}")
    module = ExportedModel(model, run.search_chunk).eval()
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{run.category}.export.", dir=output))
    try:
        files = write_graph(module, staging, run.category, run.format)
        digests = {path.name: file_sha256(path) for path in files}
        for path in files:  # the model files first, the JSON that names them last: no bundle is ever half there
            os.replace(path, output / path.name)
        json_path = output / f"{run.category}.json"
        formats = bundle.exported_formats(json_path, model_identity(checkpoint))  # the same model's other format
        formats[run.format] = digests
        atomic_write_json(json_path, contract(checkpoint, model, formats, run, run.search_chunk))
    except OSError as err:
        raise WriteError(f"cannot write the bundle into '{output}' ({err.strerror or err}): choose a writable "
                         f"folder with space") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    sizes = sum((output / name).stat().st_size for name in digests) / 2**20
    print(f"[{run.category}] {', '.join(digests)} ({sizes:.1f} MiB) and {json_path.name} -> {output}")
    return json_path


def main() -> None:
    export(*parse_flags(__doc__, ExportConfig))


if __name__ == "__main__":
    run_cli(main)
