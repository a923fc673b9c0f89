"""What main.py writes (core/outputs.py)."""
from __future__ import annotations

import numpy as np
import torch

from core.outputs import upsample_map


def test_upsample_map_bilinear_half_pixel():
    m = np.zeros((224, 224), np.float32)
    m[100:124, 50:60] = 1.0
    up = upsample_map(m, (400, 448))
    assert up.shape == (400, 448) and up.dtype == np.float32
    expected = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(400, 448), mode="bilinear",
                                               align_corners=False)[0, 0].numpy()
    np.testing.assert_array_equal(up, expected)
    assert up[:, 400].max() == 0 and up.max() == 1.0  # far from the box / inside it
