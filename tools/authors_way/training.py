"""The authors' way of pretraining the 3D expert (SPEC 4.2-4.3), as an oracle for tests and the benchmark.

Per-patch float64 arrays in Python lists; a ``DataLoader`` item draws a random noise copy
with Python ``random``; the latent is tiled to every point and pushed through fc1 and the
full fc3 per point, and the SDF gradient comes from ``autograd.grad(create_graph=True)``.
From the same weights and batch, loss and gradients must equal :func:`core.sdf_training.pcp_loss`'s
up to float rounding.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from core.sdf_model import SDFModel

POINT_NUM = 500
N_COPIES = 20


class AuthorsPretrainData(torch.utils.data.Dataset):
    """The reference's pretraining data set: per-patch float64 arrays, a random copy per fetch."""

    def __init__(self, files: list[Path]):
        self.samples, self.points = [], []
        for path in files:
            with np.load(path) as data:
                self.samples.extend(np.asarray(data["samples_all"], np.float64))
                self.points.extend(np.asarray(data["points_all"], np.float64))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        rt = random.randint(0, N_COPIES - 1)
        rows = slice(rt * POINT_NUM, (rt + 1) * POINT_NUM)
        return self.points[i][rows], self.samples[i][rows]


def authors_loss(model: SDFModel, points: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """The reference's forward and loss: tiled latent, fc1 and full fc3 per point, double backprop."""
    nif = model.NIF
    feature = model.encoder(points)
    tiled = torch.tile(feature[:, None, :], [1, samples.shape[1], 1])
    samples = samples.requires_grad_(True)
    net = torch.cat([torch.relu(nif.fc2(samples)), torch.relu(nif.fc1(tiled))], dim=2)
    net = torch.relu(nif.fc3(net))
    for layer in nif.hidden_layers:
        net = torch.relu(layer(net))
    sdf = nif.fc5(net)
    grad = torch.autograd.grad(sdf, samples, torch.ones_like(sdf), create_graph=True, retain_graph=True,
                               only_inputs=True)[0]
    length = torch.sqrt(torch.sum(grad ** 2, dim=-1) + 1e-12).unsqueeze(-1)
    g_points = samples - sdf * (grad / length)
    return torch.linalg.norm(points - g_points, ord=2, dim=-1).mean()
