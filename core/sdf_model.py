"""The 3D expert: PointNet encoder + local implicit (NIF) SDF decoder (SPEC 4.1, 4.4).

Parameter names, shapes and registration order equal the authors' checkpoints
(``encoder.*`` and ``NIF.*``, weight-normalised ``NIF.fc40`` ... ``NIF.fc46`` stored as
``weight_g`` / ``weight_v``), so the published ``ckpt_000601.pth`` loads as it is.
"""
from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import ShapeGuidedError, first_line
from utils.io import atomic_path, torch_file_format

LATENT_DIM = 128
HIDDEN = 512
N_WN_LAYERS = 7


class PointNetEncoder(nn.Module):
    """PointNet with BatchNorm: (B, P, 3) points -> (B, 128) non-negative latent (SPEC 4.1)."""

    def __init__(self, latent_dim: int = LATENT_DIM):
        super().__init__()
        # Registration order matches the authors' state_dict: convs, fcs, then batch norms.
        self.conv1 = nn.Conv1d(3, 64, 1)
        self.conv2 = nn.Conv1d(64, 128, 1)
        self.conv3 = nn.Conv1d(128, 1024, 1)
        self.fc1 = nn.Linear(1024, 512)
        self.fc2 = nn.Linear(512, latent_dim)
        self.bn1 = nn.BatchNorm1d(64)
        self.bn2 = nn.BatchNorm1d(128)
        self.bn3 = nn.BatchNorm1d(1024)
        self.bn4 = nn.BatchNorm1d(512)
        self.bn5 = nn.BatchNorm1d(latent_dim)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        x = points.transpose(1, 2)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = torch.amax(x, dim=2)
        x = F.relu(self.bn4(self.fc1(x)))
        return F.relu(self.bn5(self.fc2(x)))

    @torch.no_grad()
    def latents(self, points: torch.Tensor, chunk: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Inference latents (G, 128) float32 of patches (G, P, 3), ``chunk`` patches per call (eval mode).

        float32: :meth:`forward`'s function (SPEC 12.3; the same bits where the CPU's BatchNorm kernel
        rounds every tensor shape alike, as with AVX-512), with the max over points taken
        before the last BatchNorm + ReLU. Another ``dtype`` (bfloat16): :meth:`folded_layers`,
        the three point-wise layers in ``dtype``, the pooled head in float32 (SPEC 12.4). The dtypes
        are explicit: an enclosing autocast region does not change them.
        """
        if self.training:
            raise RuntimeError("PointNetEncoder.latents needs eval mode (BatchNorm running statistics)")
        with torch.autocast(points.device.type, enabled=False):   # the dtypes are explicit here
            if dtype == torch.float32:
                return torch.cat([self._exact(part) for part in points.split(chunk)])
            layers = self.folded_layers(dtype)
            return torch.cat([self._folded(part, layers) for part in points.split(chunk)])

    def _exact(self, points: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` in eval mode without two passes over the (B, 1024, P) activation.

        BatchNorm in eval mode and ReLU act on each channel by a monotone function (rounding
        included): non-decreasing where the BatchNorm weight is >= 0, non-increasing where it is
        negative. Such a function commutes with the max over points (with the min where it is
        non-increasing), so it is applied to the (B, 1024) extremes instead of every point.
        """
        x = points.transpose(1, 2)
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x = self.conv3(x)
        pooled = torch.amax(x, dim=2, keepdim=True)
        negative = self.bn3.weight < 0
        if bool(negative.any()):
            pooled = torch.where(negative[:, None], torch.amin(x, dim=2, keepdim=True), pooled)
        x = F.relu(self.bn3(pooled), inplace=True).squeeze(2)
        x = F.relu(self.bn4(self.fc1(x)), inplace=True)
        return F.relu(self.bn5(self.fc2(x)), inplace=True)

    def folded_layers(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weight, bias) of the five layers with their eval-mode BatchNorm folded in, as linear maps.

        ``BN(W x + c) = (a W) x + (a (c - mean) + beta)`` with ``a = gamma / sqrt(var + eps)``,
        computed in float32; the point-wise layers (conv1-3) are cast to ``dtype``.
        """
        out = []
        for i, (layer, bn) in enumerate(zip((self.conv1, self.conv2, self.conv3, self.fc1, self.fc2),
                                            (self.bn1, self.bn2, self.bn3, self.bn4, self.bn5))):
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            weight = layer.weight.reshape(layer.weight.shape[0], -1) * scale[:, None]
            bias = (layer.bias - bn.running_mean) * scale + bn.bias
            out.append((weight.to(dtype), bias.to(dtype)) if i < 3 else (weight, bias))
        return out

    @staticmethod
    def _folded(points: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Latents (B, 128) float32 from :meth:`folded_layers`, points-major ((B, P, C) activations).

        The third layer's bias and ReLU are applied after the max over points, where they
        commute with it (a per-channel increasing map).
        """
        (w1, b1), (w2, b2), (w3, b3), (w4, b4), (w5, b5) = layers
        x = F.linear(points.to(w1.dtype), w1, b1).relu_()
        x = F.linear(x, w2, b2).relu_()
        x = torch.amax(F.linear(x, w3), dim=1).float()
        x = F.relu(x + b3.float())
        x = F.relu(F.linear(x, w4, b4))
        return F.relu(F.linear(x, w5, b5))


class WeightNormLinear(nn.Module):
    """Linear layer with weight normalisation along dim 0: ``W = g * v / ||v||_row``.

    Stores ``bias``, ``weight_g`` (out, 1) and ``weight_v`` (out, in) exactly as the
    legacy ``torch.nn.utils.weight_norm`` does, in the same order.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))

    @property
    def weight(self) -> torch.Tensor:
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class LocalNIF(nn.Module):
    """Local implicit decoder: (latent, point) -> signed distance (SPEC 4.1, geometric init)."""

    def __init__(self, latent_dim: int = LATENT_DIM, hidden: int = HIDDEN):
        super().__init__()
        self.fc1 = nn.Linear(latent_dim, hidden)
        self.fc2 = nn.Linear(3, hidden)
        self.fc3 = nn.Linear(2 * hidden, hidden)
        for i in range(N_WN_LAYERS):
            setattr(self, f"fc4{i}", WeightNormLinear(hidden, hidden))
        self.fc5 = nn.Linear(hidden, 1)
        self._geometric_init(hidden)

    @torch.no_grad()
    def _geometric_init(self, hidden: int) -> None:
        std = math.sqrt(2) / math.sqrt(hidden)
        nn.init.normal_(self.fc3.weight, 0.0, std)
        nn.init.zeros_(self.fc3.bias)
        for layer in self.hidden_layers:
            nn.init.normal_(layer.weight_v, 0.0, std)
            layer.weight_g.copy_(layer.weight_v.norm(dim=1, keepdim=True))
        nn.init.normal_(self.fc5.weight, 2 * math.sqrt(math.pi) / math.sqrt(hidden), 1e-6)
        nn.init.constant_(self.fc5.bias, -0.5)

    @property
    def hidden_layers(self) -> list[WeightNormLinear]:
        return [getattr(self, f"fc4{i}") for i in range(N_WN_LAYERS)]

    def latent_code(self, latent: torch.Tensor) -> torch.Tensor:
        """The latent's contribution to fc3, computed once per patch: (B, 128) -> (B, 512).

        fc3 acts on ``[relu(fc2(x)), relu(fc1(z))]``; its latent half (plus bias) is the same
        for every point of a patch, so it is evaluated once instead of once per point.
        """
        f = F.relu(self.fc1(latent))
        return F.linear(f, self.fc3.weight[:, self.fc2.out_features:], self.fc3.bias)

    def point_layers(self, dtype: Optional[torch.dtype] = None) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """(weight, bias) of the per-point layers in order: ``fc2``, the point half of ``fc3`` (no
        bias), the seven weight-normalised layers, ``fc5``; cast to ``dtype`` when given.

        Computed once for many :meth:`forward_with_code` calls (the weight-normalised weights
        are otherwise recomputed on every call).
        """
        split = self.fc2.out_features
        layers = [(self.fc2.weight, self.fc2.bias), (self.fc3.weight[:, :split], None)]
        layers += [(layer.weight, layer.bias) for layer in self.hidden_layers]
        layers.append((self.fc5.weight, self.fc5.bias))
        if dtype is None:
            return layers
        return [(w.to(dtype), None if b is None else b.to(dtype)) for w, b in layers]

    def forward_with_code(self, code: torch.Tensor, points: torch.Tensor,
                          layers: Optional[list[tuple[torch.Tensor, Optional[torch.Tensor]]]] = None) -> torch.Tensor:
        """Decode points (B, P, 3) given ``code = latent_code(z)`` (B, 512) -> sdf (B, P, 1).

        ``layers``: :meth:`point_layers`, computed by the caller once for many calls; their
        dtype is the dtype of the computation (``points`` and ``code`` are cast to it).
        """
        if layers is None:
            layers = self.point_layers()
        (w2, b2), (w3, _), *hidden, (w5, b5) = layers
        h = F.relu(F.linear(points.to(w2.dtype), w2, b2))
        u = F.linear(h, w3).add_(code.to(w3.dtype).unsqueeze(1)).relu_()
        for weight, bias in hidden:
            u = F.linear(u, weight, bias).relu_()
        return F.linear(u, w5, b5)

    @torch.no_grad()
    def abs_sdf(self, latents: torch.Tensor, points: torch.Tensor, chunk: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """|sdf| (G, P) float32 of points (G, P, 3) under latents (G, 128), for inference.

        :meth:`forward_with_code` on ``chunk`` patches at a time, with the weights computed once
        and each chunk written into one preallocated output. ``dtype`` (e.g. bfloat16) is the
        dtype of the per-point layers; the per-patch latent code is computed in float32 (SPEC 12.4).
        The dtypes are explicit: an enclosing autocast region does not change them.
        """
        with torch.autocast(points.device.type, enabled=False):   # the dtypes are explicit here
            codes = self.latent_code(latents)
            layers = self.point_layers(None if dtype == torch.float32 else dtype)
            out = torch.empty(points.shape[:2], dtype=torch.float32, device=codes.device)
            for start in range(0, points.shape[0], chunk):
                sdf = self.forward_with_code(codes[start:start + chunk], points[start:start + chunk], layers)
                out[start:start + chunk].copy_(sdf.squeeze(-1)).abs_()
        return out

    def forward(self, latent: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """sdf (B, P, 1) of points (B, P, 3) under per-patch latents (B, 128)."""
        return self.forward_with_code(self.latent_code(latent), points)

    def forward_with_gradient(self, code: torch.Tensor, points: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """sdf (B, P, 1) and its gradient with respect to ``points`` (B, P, 3) (SPEC 4.2).

        The gradient is the exact chain rule of the ReLU network written out
        (``w5 -> mask * w -> ... -> W2``), so it equals ``autograd.grad(sdf.sum(), points,
        create_graph=True)`` and stays differentiable in the parameters: one ordinary
        backward pass of a loss built on it gives the second-order terms of the reference's
        double backprop, and the whole computation can be ``torch.compile``-d.
        """
        split = self.fc2.out_features
        weights = [self.fc2.weight, self.fc3.weight[:, :split]]
        pre = self.fc2(points)
        masks = [pre > 0]
        pre = F.linear(F.relu(pre), weights[1]) + code.unsqueeze(1)
        masks.append(pre > 0)
        for layer in self.hidden_layers:
            weight = layer.weight
            weights.append(weight)
            pre = F.linear(F.relu(pre), weight, layer.bias)
            masks.append(pre > 0)
        sdf = self.fc5(F.relu(pre))
        grad = self.fc5.weight                                   # d sdf / d u, (1, 512)
        for mask, weight in zip(reversed(masks), reversed(weights)):
            grad = (grad * mask) @ weight
        return sdf, grad


class SDFModel(nn.Module):
    """The 3D expert: ``encoder`` (PointNet) and ``NIF`` (decoder), as in the authors' checkpoints."""

    def __init__(self, latent_dim: int = LATENT_DIM):
        super().__init__()
        self.encoder = PointNetEncoder(latent_dim)
        self.NIF = LocalNIF(latent_dim)

    def forward(self, surface: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """sdf (B, P, 1) of ``queries`` for the shape encoded from ``surface`` (B, 500, 3)."""
        return self.NIF(self.encoder(surface), queries)


# ----------------------------------------------------------------------------- checkpoints
class CheckpointError(ShapeGuidedError, RuntimeError):
    """A checkpoint file that cannot be loaded into :class:`SDFModel`."""


_PARAMETRIZED = {"parametrizations.weight.original0": "weight_g",
                 "parametrizations.weight.original1": "weight_v"}


def normalize_state_dict(state: dict) -> dict:
    """Map the accepted key variants onto this module's names.

    Accepts the legacy weight-norm names (``weight_g``/``weight_v``, the authors' format),
    the parametrised names (``parametrizations.weight.original0/1``) and a ``module.``
    prefix left by ``DataParallel``.
    """
    out = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module."):]
        for new, old in _PARAMETRIZED.items():
            if key.endswith(new):
                key = key[: -len(new)] + old
        out[key] = value
    return out


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint file as a dict (tensors only, ``weights_only``); :class:`CheckpointError` if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if torch_file_format(path) is None:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip format nor a pickle); "
                              f"pass the .pth file written by train_3Dmodel.py or the authors' ckpt_000601.pth")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:   # torch's message is several lines of weights_only advice
        raise CheckpointError(f"{path}: holds Python objects besides tensors, which are not loaded for safety; "
                              f"save it as {{'sdf_model': model.state_dict()}}") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({first_line(exc)})") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(ckpt).__name__}")
    return ckpt


def model_from_checkpoint(ckpt: dict, source: str | os.PathLike = "checkpoint") -> SDFModel:
    """Build an :class:`SDFModel` (CPU, train mode) from a checkpoint dict or a bare state_dict.

    Raises :class:`CheckpointError` naming ``source`` and listing missing/unexpected keys
    or wrong shapes on any mismatch.
    """
    state = ckpt.get("sdf_model", ckpt)
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: 'sdf_model' is not a state_dict")
    state = normalize_state_dict(state)
    model = SDFModel()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: not an SDF model checkpoint of this architecture; "
                              f"missing keys: {missing}; unexpected keys: {unexpected}")
    wrong = [f"{k}: {tuple(getattr(state[k], 'shape', ()))} != {tuple(v.shape)}"
             for k, v in expected.items()
             if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{source}: wrong tensor shapes: {wrong}")
    model.load_state_dict(state)
    return model


def load_sdf_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                        ) -> tuple[SDFModel, int]:
    """Load a checkpoint ``{'sdf_model': state_dict, 'current_iteration': int}`` (or a bare state_dict).

    Returns the model (on ``map_location``, eval mode) and its iteration (-1 if absent).
    Extra keys (this project's ``optimizer`` / ``epochs_done``) are ignored.
    Raises :class:`CheckpointError` naming the file and listing missing/unexpected keys
    or wrong shapes on any mismatch.
    """
    ckpt = read_checkpoint(path, map_location)
    iteration = int(ckpt.get("current_iteration", -1)) if "sdf_model" in ckpt else -1
    model = model_from_checkpoint(ckpt, path)
    return model.to(map_location).eval(), iteration


def _to_cpu(state):
    """A copy of nested dicts / lists / tuples with every tensor detached and on the CPU."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_cpu(v) for v in state)
    return state


def save_sdf_checkpoint(path: str | os.PathLike, model: SDFModel, iteration: int, **extra) -> None:
    """Atomically write ``{'sdf_model': state_dict, 'current_iteration': iteration, **extra}``.

    Every tensor, in ``extra`` too (e.g. the optimiser state), is stored on the CPU, so the
    file loads on any machine without ``map_location``.
    """
    with atomic_path(path) as tmp:
        torch.save(_to_cpu({"sdf_model": model.state_dict(), "current_iteration": int(iteration), **extra}), tmp)
