"""Orchestration helpers of main.py (core/pipeline.py)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from core.pipeline import prefetch, reference_sample_orders, upsample_map
from utils.io import configuration_text


def test_reference_orders_of_parity_fixture():
    """The parity README's fit and align orders of the 8 torus training samples (Appendix A)."""
    state = torch.random.get_rng_state()
    fit, align = reference_sample_orders(8, seed=0)
    assert fit == [6, 7, 2, 1, 4, 5, 0, 3]
    assert align == [4, 6, 1, 2, 5, 0, 7, 3]
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched


@pytest.mark.parametrize("n", [1, 8, 40])
def test_orders_equal_shuffled_dataloaders(n):
    """Same draws as two real shuffled DataLoaders iterated after the same RNG consumption."""
    from core.pipeline import _replay_reference_sdf_init

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        _replay_reference_sdf_init()
        data = list(range(n))
        orders = [[int(b) for b in DataLoader(data, batch_size=1, shuffle=True, num_workers=0)] for _ in range(2)]
    assert reference_sample_orders(n, seed=3) == tuple(orders)


def test_prefetch_keeps_order_and_propagates_errors():
    def slow(i):
        time.sleep(0.01 * (5 - i % 5))
        if i == 7:
            raise ValueError("bad item 7")
        return i * i

    assert list(prefetch(slow, range(6), depth=3)) == [i * i for i in range(6)]
    with pytest.raises(ValueError, match="bad item 7"):
        list(prefetch(slow, range(10)))


def test_configuration_text_format():
    text = configuration_text({"k_number": 10, "BS": 1, "classes": ["a", "b"]})
    assert text == "%30s: %s\n%30s: %s\n%30s: %s\n" % ("BS", 1, "classes", ["a", "b"], "k_number", 10)


def test_upsample_map_bilinear_half_pixel():
    m = np.zeros((224, 224), np.float32)
    m[100:124, 50:60] = 1.0
    up = upsample_map(m, (400, 448))
    assert up.shape == (400, 448) and up.dtype == np.float32
    expected = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(400, 448), mode="bilinear",
                                               align_corners=False)[0, 0].numpy()
    np.testing.assert_array_equal(up, expected)
    assert up[:, 400].max() == 0 and up.max() == 1.0  # far from the box / inside it
