"""Settings: the dataclasses below are the one source of truth; the CLI flags are generated from them."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
import threading
import types
import typing
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any, Callable, get_type_hints

if TYPE_CHECKING:  # torch is imported where a device is resolved: predict_exported.py runs without it
    import torch

    from images import Geometry

DATA_PATH_ENV = "MVTEC_AD_PATH"
DEFAULT_DATA_PATH = "data/mvtec_ad"
CORESET_MODES = ("auto", "exact", "sharded")
# Pixels a CPU pushes through the model at a time: 8 images at 224 px, whose activations stay in the caches (ResNet-50
# on a 2-core EPYC with 32 MiB L3: 17 images/s in groups of 8 at 224 px, 13 in one of 32); the torch path and the
# exported model's runner both go by it.
CPU_PIXELS_PER_PASS = 8 * 224 * 224
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SEARCHES = ("auto", "pruned", "flat", "ivf")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2", "wide_resnet101_2")


class UserError(Exception):
    """A problem the user can fix (path, data, checkpoint, option); shown as one line, exit code 2.

    ``str()`` is the user's message even when a DataLoader worker re-raised it wrapped in a traceback.
    """

    def __str__(self) -> str:
        last_line = (super().__str__().strip().splitlines() or [""])[-1]
        prefix, separator, message = last_line.partition(f"{type(self).__name__}: ")
        return message if separator and " " not in prefix else last_line


Check = tuple[Callable[[Any], bool], str]  # a value's test and the rule it states, e.g. "at least 1"


def at_least(low: float) -> Check:
    return (lambda value: value >= low), f"at least {low}"


def within(low: float, high: float, closed_high: bool = False) -> Check:
    """The open interval (low, high), or (low, high] with ``closed_high``."""
    if closed_high:
        return (lambda value: low < value <= high), f"in ({low}, {high}]"
    return (lambda value: low < value < high), f"in ({low}, {high})"


POSITIVE: Check = ((lambda value: value > 0), "positive")
ODD: Check = ((lambda value: value >= 1 and value % 2 == 1), "odd and positive")


def plain_name(name: str) -> str:
    """A category name as given, without trailing slashes; UserError unless it is a plain folder name (no
    separators, not '.' or '..'), so that it cannot name a checkpoint or results folder outside its own."""
    stripped = name.rstrip("/\\") or name
    if (stripped in ("", ".", "..") or "\0" in stripped
            or PurePosixPath(stripped).name != stripped or PureWindowsPath(stripped).name != stripped):
        raise UserError(f"--category '{name}' is not a plain folder name (no '/', '\\' or '..'): pass the name of "
                        f"a folder in the data path, as it is listed there")
    return stripped


def _option(default: Any, help: str, **kwargs: Any) -> Any:
    """A settings field: its default, its --help text, and optionally 'choices', a 'check' (a Check every value
    must pass, at parse time and in validate()), 'positional'."""
    return field(default=default, metadata={"help": help, **kwargs})


def check_fields(config: Any) -> None:
    """UserError for the first field of a settings dataclass whose value (or a number of its values) breaks its
    choices or check (a float must also be finite: nan and inf pass no range test by accident)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        for item in value if isinstance(value, tuple) else (value,):
            problem = None if item is None or isinstance(item, (bool, str)) and not f.metadata.get("choices") \
                else _problem(item, f.metadata)
            if problem:
                raise UserError(f"--{f.name} {problem}")


def _problem(value: Any, metadata: dict) -> str | None:
    """What is wrong with ``value`` for a field with this metadata ('must be ..., got ...'), or None."""
    choices, check = metadata.get("choices"), metadata.get("check")
    if choices and value not in choices:
        return f"takes one of {', '.join(choices)}, got '{value}'"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if check and not check[0](value):
        return f"must be {check[1]}, got {value}"
    return None


@dataclass
class PatchCoreConfig:
    """Everything that determines a memory bank and its scores; stored in every checkpoint."""

    backbone: str = _option("wide_resnet50_2", f"ImageNet backbone: {', '.join(BACKBONES)}")
    weights: str = _option("imagenet", "'imagenet' (torchvision download/cache), 'none' (random), or a state-dict file")
    layers: tuple[str, ...] = _option(("layer2", "layer3"), "backbone stages whose features are used")
    resize: tuple[int, ...] = _option((256,), "images are resized to this height and width (one number: a square) "
                                              "...", check=at_least(1))
    image_size: tuple[int, ...] = _option((224,), "... then center-cropped to this height and width (one number: a "
                                                  "square): the model's input", check=at_least(1))
    keep_aspect: bool = _option(False, "resize keeping each image's aspect ratio: scaled by one factor until it "
                                       "covers --resize (the excess is cropped with the rest); off: squeezed to "
                                       "--resize, as the reference does")
    patch_size: int = _option(3, "neighbourhood of the local feature aggregation", check=ODD)
    embedding_dim: int = _option(1024, "dimension of the patch features", check=at_least(1))
    coreset_ratio: float = _option(0.25, "fraction of training patches kept in the memory bank, in (0, 1]",
                                   check=within(0, 1, closed_high=True))
    projection_dim: int = _option(128, "random projection used to choose the coreset", check=at_least(1))
    k: int = _option(1, "nearest neighbours for scoring; k > 1 adds the paper's image-score reweighting (Eq. 7)",
                     check=at_least(1))
    blur_sigma: float = _option(4.0, "Gaussian smoothing of the anomaly maps, in pixels", check=at_least(0))
    seed: int = _option(0, "seed of the random projection, coreset start points and random weights")
    false_alarm_rate: float = _option(0.01, "target share of good images flagged: sets the stored image and pixel "
                                            "thresholds from good images only", check=within(0, 1))
    calibration_folds: int = _option(5, "without a validation/good folder, the thresholds come from every "
                                        "train/good image, scored out of fold: the images are split in this many "
                                        "folds, each scored against the coreset of the others", check=at_least(2))
    coreset: str = _option("auto", "'exact' greedy coreset, 'sharded' (greedy on random shards of at most "
                                   "--coreset_shard_size patches, merged: far faster on big sets), or 'auto' "
                                   "(sharded above that size)", choices=CORESET_MODES)
    coreset_shard_size: int = _option(4_000_000, "training patches above which 'auto' shards the coreset (about 5,100 "
                                                 "images at 224 px)", check=at_least(1))
    search: str = _option("auto", "nearest-neighbour search: 'pruned' (exact; lower bounds on the bank's principal "
                                  "axes skip most distances), 'flat' (exact, every distance; under bf16, bf16 "
                                  "candidates re-ranked in fp32), 'ivf' (faiss inverted file: approximate, for banks "
                                  "of 100k+ entries), or 'auto': 'flat' where bf16 runs on a CPU with AMX (faster "
                                  "there than 'pruned', not always the exact neighbour), 'pruned' elsewhere",
                          choices=SEARCHES)
    ivf_probe: int = _option(8, "with --search ivf: inverted lists visited per query (more: closer to exact, slower)",
                             check=at_least(1))
    precision: str = _option("auto", "'fp32', 'bf16' (the backbone's layer2 and layer3 under bf16 autocast, its "
                                     "stem and layer1 in fp32; with --search flat also a bf16 k-NN candidate "
                                     "search re-ranked in fp32), 'fp16' (backbone under fp16 autocast), or "
                                     "'auto': fp16 on CUDA, bf16 on CPUs with native bf16, fp32 otherwise",
                               choices=PRECISIONS)
    fp32_bank: bool = _option(True, "compute the training features in fp32 whatever --precision: the coreset "
                                    "picks and the memory bank are then the fp32 path's, and reduced precision "
                                    "runs at inference only (and for the thresholds); --no-fp32_bank trains in "
                                    "--precision too: faster, but its rounding changes some of the coreset's picks")

    def validate(self) -> None:
        """Raise UserError for settings that cannot work."""
        if self.backbone not in BACKBONES:
            raise UserError(f"unknown backbone '{self.backbone}': choose one of {', '.join(BACKBONES)}")
        check_fields(self)
        bad_layers = [name for name in self.layers if name not in ("layer1", "layer2", "layer3", "layer4")]
        if bad_layers or not self.layers:
            raise UserError(f"--layers takes names from layer1..layer4, got {' '.join(self.layers)}")
        for name in ("resize", "image_size"):
            values = getattr(self, name)
            if len(values) not in (1, 2) or min(values) < 1:
                raise UserError(f"--{name} takes one positive number (a square) or a height and a width, got "
                                f"{' '.join(map(str, values))}")
        geometry = self.geometry
        if geometry.size[0] > geometry.resize[0] or geometry.size[1] > geometry.resize[1]:
            raise UserError(f"--image_size ({' '.join(map(str, self.image_size))}) must be at most --resize "
                            f"({' '.join(map(str, self.resize))}) in height and width")

    @property
    def geometry(self) -> Geometry:
        """How an image becomes the model's input."""
        from images import Geometry  # noqa: PLC0415  (images.py imports this module)

        return Geometry.of(self.resize, self.image_size, self.keep_aspect)

    def resolved_precision(self, device: torch.device) -> str:
        """The precision 'auto' stands for on ``device``: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32."""
        if self.precision != "auto":
            return self.precision
        if device.type == "cuda":
            return "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"

    def resolved_search(self, device: torch.device) -> str:
        """The search 'auto' stands for on ``device``: 'flat' (bf16 candidates, re-ranked in fp32) where the
        precision resolves to bf16 on a CPU with AMX, else the exact 'pruned'. With AMX, one bf16 product ranks a
        bank as fast as the pruned search's bounds do on small banks and faster on big ones; AVX-512 BF16 alone only
        doubles fp32's product rate: the pruned search was faster there on bottle's banks and 1.2x slower on a
        100k-entry magnetic-tile bank (README, "Speed" and "Large data")."""
        if self.search != "auto":
            return self.search
        tiles = device.type == "cpu" and cpu_has_bf16_tiles()
        return "flat" if tiles and self.resolved_precision(device) == "bf16" else "pruned"


def _cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags, from ``cpuinfo`` (none where it cannot be read)."""
    try:
        with open(cpuinfo) as f:
            return {word for line in f if line.startswith(("flags", "Features"))
                    for word in line.partition(":")[2].split()}
    except OSError:
        return set()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively: AVX-512 BF16, AMX, or Arm BF16."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_has_bf16_tiles() -> bool:
    """Whether this CPU has AMX's bf16 tile products, several times fp32's rate (AVX-512 BF16: about twice)."""
    return "amx_bf16" in _cpu_flags()


@dataclass
class RunConfig:
    """Which checkpoints and how to run; not part of the model."""

    category: str = _option("all", "a category folder name, or 'all' for every folder with train/good")
    checkpoint_dir: str = _option("checkpoints", "where the memory banks are")
    device: str = _option("auto", "'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...")
    batch_size: int = _option(32, "images per batch", check=at_least(1))
    num_workers: int = _option(-1, "image-decoding worker processes; -1: none on a CPU device of at most 4 cores "
                                   "(they would compete with the backbone's threads), else min(4, cores)",
                               check=at_least(-1))

    def __post_init__(self) -> None:
        if self.category not in ("", "all"):
            self.category = plain_name(self.category)

    def validate(self) -> None:
        """Raise UserError for run settings that cannot work."""
        check_fields(self)

    def resolved_device(self) -> torch.device:
        import torch  # noqa: PLC0415  (see the import at the top)

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise UserError(f"unknown --device '{self.device}': use auto, cpu or cuda") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {self.device} asked for, but CUDA is not available here: use --device cpu")
        return device


@dataclass
class TrainConfig(RunConfig):
    """train.py's run settings."""

    data_path: str | None = _option(None, f"MVTec-layout data root (default: ${DATA_PATH_ENV}, then {DEFAULT_DATA_PATH})")
    download: str | None = _option(None, "'mvtec_ad' or 'visa': fetch that data set into the data path when it is "
                                         "missing (VisA is arranged in the MVTec layout once)")
    skip_existing: bool = _option(False, "skip categories whose checkpoint is valid and made with the same settings")
    feature_store: str = _option("auto", "where training keeps every patch's full features while the coreset is "
                                         "chosen: 'memory', 'disk' (a temporary file in $TMPDIR; only the 128-d "
                                         "projections stay in memory), or 'auto' (disk when they would fill over a "
                                         "quarter of the free memory)", choices=("auto", "memory", "disk"))
    long_side: int | None = _option(None, "choose --image_size and --resize from the training images: their shape "
                                          "(the median) with its long side this many pixels (0: their own size), "
                                          "in multiples of 16, the aspect ratio kept (--keep_aspect)",
                                    check=at_least(0))
    roi: str | None = _option(None, "a mask of the area to inspect (white: inspect, black: ignore), the size of the "
                                    "training images; default: <category>/roi.png when there is one")
    add_good: tuple[str, ...] = _option((), "update the category's checkpoint with these good images (files, folders, "
                                            "globs, a .txt of paths, or predict.py's CSV: its rows marked 1 in a "
                                            "'good' column, or all): their patches beyond the bank's coverage are "
                                            "added, the thresholds set again; no retraining, the previous version "
                                            "kept for --rollback")
    remove_images: tuple[str, ...] = _option((), "update the checkpoint: drop the bank entries and calibration scores "
                                                 "of these images (added by mistake)")
    rollback: bool = _option(False, "restore the checkpoint's version before its last update")

    def resolved_data_path(self) -> str:
        """--data_path, else the environment variable, else the default."""
        return self.data_path or os.environ.get(DATA_PATH_ENV) or DEFAULT_DATA_PATH


@dataclass(frozen=True)
class InspectConfig:
    """How evaluate.py and predict.py run a stored model where it may differ from the checkpoint's settings."""

    precision: str | None = _option(None, "inspect in this precision instead of the checkpoint's (see train.py "
                                          "--help): 'fp32' computes exactly what an exported model computes",
                                    choices=PRECISIONS)


@dataclass
class EvalConfig(RunConfig):
    """evaluate.py's run settings."""

    data_path: str | None = _option(None, "MVTec-layout data root (default: the one stored in the checkpoint)")
    results_dir: str = _option("results", "where summary.json, plots and maps go")
    max_maps: int = _option(10, "anomaly-map pictures per category: this many highest-scored good and "
                                "lowest-scored defective images; 0 writes every test image", check=at_least(0))
    no_plots: bool = _option(False, "skip all pictures (plots and maps)")


@dataclass
class PredictConfig(RunConfig):
    """predict.py's run settings: inspect new, unlabelled images with a trained category."""

    paths: tuple[str, ...] = _option((), "images, folders (searched recursively) or glob patterns", positional=True)
    category: str = _option("", "the category whose checkpoint inspects the images (required)")
    output: str | None = _option(None, "CSV of the verdicts (default: results/<category>/predictions.csv)")
    maps: str | None = _option(None, "folder for overlay pictures (image, heat map, region) of the anomalous images")
    all_maps: bool = _option(False, "with --maps: a picture for every image, not only the anomalous ones")
    threshold: float | None = _option(None, "image-score threshold instead of the stored one (the pixel threshold "
                                            "scales with it)", check=POSITIVE)
    roi: str | None = _option(None, "a mask of the area to inspect (white: inspect) for this run, in place of the "
                                    "checkpoint's: the size of the images")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error style: a usage mistake is one line on stderr ('error: ...'), exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


@dataclass
class ExportConfig:
    """export.py's settings: which checkpoint, in which format, where."""

    category: str = _option("", "the category whose checkpoint is exported (required)")
    checkpoint_dir: str = _option("checkpoints", "where the memory banks are")
    format: str = _option("onnx", "'onnx' (ONNX Runtime, TensorRT, ...) or 'openvino' (IR .xml + .bin)",
                          choices=("onnx", "openvino"))
    output: str = _option("exported", "folder of the bundle: <category>.onnx (or .xml + .bin) and <category>.json")
    search_chunk: int = _option(16384, "bank entries the graph compares a query with at a time: its largest tensor "
                                       "is queries x search_chunk floats (64 KiB a query at 16384)", check=at_least(1))

    def __post_init__(self) -> None:
        if self.category:
            self.category = plain_name(self.category)

    def validate(self) -> None:
        if not self.category:
            raise UserError("export.py exports one category: pass --category NAME (a checkpoint in "
                            f"'{self.checkpoint_dir}')")
        check_fields(self)


@dataclass
class DeployConfig:
    """predict_exported.py's settings: inspect images with an exported model, without torch."""

    model: str = _option("", "the exported model: <category>.onnx or <category>.xml, its <category>.json beside it",
                         positional=True)
    paths: tuple[str, ...] = _option((), "images, folders (searched recursively) or glob patterns", positional=True)
    runtime: str = _option("auto", "'onnxruntime', 'openvino', or 'auto' (openvino for .xml, onnxruntime for .onnx)",
                           choices=("auto", "onnxruntime", "openvino"))
    output: str | None = _option(None, "CSV of the verdicts (default: results/<category>/predictions.csv)")
    batch_size: int = _option(8, "images per run of the model", check=at_least(1))
    threshold: float | None = _option(None, "image-score threshold instead of the bundle's (the pixel threshold "
                                            "scales with it)", check=POSITIVE)

    def validate(self) -> None:
        check_fields(self)


def add_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """Add one --flag per dataclass field (a positional argument where the field says so), with default and help;
    a value outside the field's choices or check is a usage error when the flags are parsed."""
    hints = get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        flag, default, help_text = f"--{f.name}", f.default, f.metadata["help"]
        hint = _without_none(hints[f.name])
        if f.metadata.get("positional"):
            nargs = "+" if hint == tuple[str, ...] else None
            parser.add_argument(f.name, nargs=nargs, metavar=f.name.rstrip("s").upper(), help=help_text)
        elif hint is bool:
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(flag, action=action, default=default, help=help_text)
        elif hint in (tuple[str, ...], tuple[int, ...]):
            shown = f" (default: {' '.join(map(str, default))})" if default else ""
            parser.add_argument(flag, nargs="+", default=list(default), help=help_text + shown,
                                type=_parser_of(typing.get_args(hint)[0], f.metadata))
        else:
            shown = "" if default in (None, "") else f" (default: {default})"
            parser.add_argument(flag, type=_parser_of(hint, f.metadata), default=default,
                                choices=f.metadata.get("choices"), help=help_text + shown)


def _parser_of(hint: Any, metadata: dict) -> Callable[[str], Any]:
    """argparse's type function for a field: the value converted to the field's type and checked."""
    kind = {int: int, float: float}.get(hint, str)

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got "
                                             f"'{text}'") from None
        problem = None if metadata.get("choices") else _problem(value, metadata)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__  # what argparse names in its messages
    return parse


def parse_flags(description: str, *config_classes: type) -> list[Any]:
    """A script's command line parsed into one instance of each settings dataclass (their flags together in
    --help; ``description`` is its docstring)."""
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for config_class in config_classes:
        add_arguments(parser, config_class)
    args = parser.parse_args()
    return [from_arguments(config_class, args) for config_class in config_classes]


def _without_none(hint: Any) -> Any:
    """``X | None`` -> ``X``; other hints unchanged."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if isinstance(hint, types.UnionType) and len(args) == 1 else hint


def from_arguments(config_class: type, args: argparse.Namespace) -> Any:
    """Build a dataclass from the parsed flags that add_arguments made for it."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)}
    return config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def to_flags(config: Any) -> list[str]:
    """The command-line flags that give every field of ``config`` as it is (add_arguments' flags, inverted): to run
    a script as a whole process with settings held in a dataclass."""
    flags = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None or f.metadata.get("positional"):
            continue
        if isinstance(value, bool):
            flags += [f"--{f.name}"] if value else ([f"--no-{f.name}"] if f.default else [])
        elif isinstance(value, tuple):
            flags += [f"--{f.name}", *map(str, value)] if value else []
        else:
            flags += [f"--{f.name}", str(value)]
    return flags


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what the interrupted command kept (e.g. where its partial results are)."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a CLI entry point: user errors become one line on stderr and exit code 2; Ctrl-C, and SIGTERM (a
    scheduler's time limit, a service stop), exit code 130 after the command's own clean-up."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as interruption:
        kept = str(interruption) or "checkpoints and results written so far are complete; nothing half-written was kept"
        print(f"interrupted: {kept}", file=sys.stderr)
        sys.exit(130)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
