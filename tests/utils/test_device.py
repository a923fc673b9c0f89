"""utils.device.resolve_device: every bad --device value is a DeviceUnavailableError with a fix."""
import pytest
import torch

from utils.device import DeviceUnavailableError, resolve_device


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name, message", [("gpu", "not a device name"), ("meta", "not supported"),
                                           ("cuda:99", "cuda")])
def test_bad_names_are_clear_errors(name, message):
    with pytest.raises(DeviceUnavailableError, match=message):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_without_gpu_says_what_to_use():
    with pytest.raises(DeviceUnavailableError, match="--device cpu or auto"):
        resolve_device("cuda")
