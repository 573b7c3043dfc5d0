"""ImageNet backbones: a torchvision ResNet run only up to the last feature layer PatchCore uses."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from config import UserError

STEM = ("conv1", "bn1", "relu", "maxpool")
STAGES = ("layer1", "layer2", "layer3", "layer4")
FP32_UNDER_BF16 = STEM + ("layer1",)  # where bf16 moves the patch features most (README: "bf16 against fp32")


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"weights file '{path}' does not exist: pass --weights imagenet, none, or a state-dict file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for foreign or damaged files
        raise UserError(f"cannot read weights file '{path}' ({type(err).__name__}): expected a torch state dict") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file '{path}' is not a state dict of tensors")
    return state


def _build(name: str, weights: str, loaded: bool = False) -> nn.Module:
    """The torchvision model ``name``; ``loaded``: every weight it will use comes from a state loaded next (which
    _load_state requires), so it is built uninitialized (on the meta device, then allocated): no random init of
    every layer, 0.4 s of a ResNet-50."""
    builder = getattr(torchvision.models, name)
    if loaded:
        with torch.device("meta"):
            model = builder(weights=None)
        return model.to_empty(device="cpu")
    if weights != "imagenet":
        return builder(weights=None)
    enum = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    try:
        return builder(weights=enum)
    except Exception as err:  # urllib, ssl or socket errors when offline
        raise UserError(
            f"cannot download the ImageNet weights of {name} ({type(err).__name__}): pass --weights FILE "
            f"(a state dict), or put {Path(enum.url).name} into $TORCH_HOME/hub/checkpoints"
        ) from None


class FeatureExtractor(nn.Module):
    """The stem and stages of a ResNet up to the last of ``layers``; returns those layers' maps.

    Weights: 'imagenet' (torchvision's IMAGENET1K_V1, as the PatchCore reference uses), 'none' (random,
    seeded by the caller) or a state-dict file, loaded non-strictly but required to hold every parameter
    of the stages that run (keys of later stages, such as layer4 or fc, may be absent). ``state``, the
    ``weights_state`` of an earlier extractor (as a checkpoint carries it), replaces ``weights``: nothing
    is downloaded or read from a weights file then.
    """

    def __init__(self, name: str, weights: str, layers: tuple[str, ...],
                 state: dict[str, torch.Tensor] | None = None):
        super().__init__()
        model = _build(name, weights, loaded=state is not None or weights not in ("imagenet", "none"))
        self.layers = tuple(sorted(layers, key=STAGES.index))
        used = STEM + STAGES[: STAGES.index(self.layers[-1]) + 1]
        if state is not None:
            _load_state(model, state, used, "the backbone state in the checkpoint")
        elif weights not in ("imagenet", "none"):
            _load_state(model, _load_state_dict(Path(weights)), used, f"weights file '{weights}'")
        self.body = nn.ModuleDict({name: getattr(model, name) for name in used})
        self.channels = tuple(_out_channels(self.body[layer]) for layer in self.layers)
        self.stride = 2 ** (STAGES.index(self.layers[0]) + 2)  # of the first used layer's grid: 4, 8, 16, 32
        self.deep_stride = 2 ** (STAGES.index(self.layers[-1]) + 2)  # of the last one's
        self.receptive_field = _receptive_field(self.body)
        self.eval().requires_grad_(False)
        self.weights_state = self.body.state_dict()  # before folding: what a checkpoint stores to rebuild this
        self.weights_digest = self._digest()
        _fuse_batchnorm(self.body)

    def forward(self, images: torch.Tensor, autocast: torch.dtype | None = None) -> list[torch.Tensor]:
        """The maps of ``layers``; with ``autocast`` (fp16 or bf16), the stages run under that autocast, except, for
        bf16, the stem and layer1: a quarter of ResNet-50's arithmetic, but with them in bf16 too the patch features
        move about four times as much."""
        maps, x = [], images
        for name, module in self.body.items():
            reduced = autocast is not None and not (autocast == torch.bfloat16 and name in FP32_UNDER_BF16)
            with torch.autocast(images.device.type, dtype=autocast, enabled=reduced):
                x = module(x)
            if name in self.layers:
                maps.append(x)
        return maps

    def _digest(self) -> str:
        """SHA-256 of the parameters and buffers that run: identifies the weights, whatever file they came from."""
        sha = hashlib.sha256()
        for key, tensor in sorted(self.weights_state.items()):
            sha.update(key.encode())
            sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return sha.hexdigest()


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], used: tuple[str, ...], origin: str) -> None:
    """Load ``state`` non-strictly into ``model``, requiring every parameter of the ``used`` stages."""
    try:
        missing, _ = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise UserError(f"{origin} does not fit this backbone: {first}") from None
    needed = [key for key in missing if key.split(".")[0] in used]
    if needed:
        raise UserError(f"{origin} lacks {len(needed)} parameters the backbone needs (e.g. {needed[0]}): "
                        f"is it a state dict for this --backbone?")


def _fuse_batchnorm(module: nn.Module) -> None:
    """Fold each eval-mode BatchNorm into the convolution before it (ResNet's conv<i>/bn<i> pairs and downsample
    branches): the same function up to float rounding, one pass less over every activation map."""
    for child in module.children():
        _fuse_batchnorm(child)
    for suffix in ("1", "2", "3"):
        conv, norm = getattr(module, f"conv{suffix}", None), getattr(module, f"bn{suffix}", None)
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
            setattr(module, f"conv{suffix}", fuse_conv_bn_eval(conv, norm))
            setattr(module, f"bn{suffix}", nn.Identity())
    if isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[0], nn.Conv2d) \
            and isinstance(module[1], nn.BatchNorm2d):
        module[0], module[1] = fuse_conv_bn_eval(module[0], module[1]), nn.Identity()


def _receptive_field(body: nn.ModuleDict) -> int:
    """The receptive field, in input pixels, of the last used layer: along the longest path (stem, then each block's
    main branch; the 1x1 downsample branches see less), every k x k window adds (k - 1) x the stride so far."""
    field, jump = 1, 1
    for name, module in body.items():
        layers = [module] if name in STEM else [child for block in module for child in
                                                (block.conv1, block.conv2, getattr(block, "conv3", None)) if child]
        for layer in layers:
            if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
                kernel, stride = (_first(getattr(layer, attr)) for attr in ("kernel_size", "stride"))
                field += (kernel - 1) * jump
                jump *= stride
    return field


def _first(value: int | tuple[int, ...]) -> int:
    return value[0] if isinstance(value, tuple) else value


def _out_channels(stage: nn.Sequential) -> int:
    last_block = stage[-1]
    last_bn = last_block.bn3 if hasattr(last_block, "bn3") else last_block.bn2
    return last_bn.num_features
