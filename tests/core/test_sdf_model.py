"""SDF model: state_dict layout (SPEC 4.4), parity with the authors' checkpoint, loader variants."""
import numpy as np
import pytest
import torch
from torch import nn

from core.patch_files import load_grid, normalize_patches
from core.sdf_model import (CheckpointError, SDFModel, load_sdf_checkpoint, save_sdf_checkpoint)
from tests.core.test_memory import SIGMAS, encoder_rounding_scale

# SPEC 4.4, written out in the authors' order.
_BN = {1: 64, 2: 128, 3: 1024, 4: 512, 5: 128}
EXPECTED = (
    [("encoder.conv1.weight", (64, 3, 1)), ("encoder.conv1.bias", (64,)),
     ("encoder.conv2.weight", (128, 64, 1)), ("encoder.conv2.bias", (128,)),
     ("encoder.conv3.weight", (1024, 128, 1)), ("encoder.conv3.bias", (1024,)),
     ("encoder.fc1.weight", (512, 1024)), ("encoder.fc1.bias", (512,)),
     ("encoder.fc2.weight", (128, 512)), ("encoder.fc2.bias", (128,))]
    + [(f"encoder.bn{i}.{name}", (n,) if name != "num_batches_tracked" else ())
       for i, n in _BN.items()
       for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    + [("NIF.fc1.weight", (512, 128)), ("NIF.fc1.bias", (512,)),
       ("NIF.fc2.weight", (512, 3)), ("NIF.fc2.bias", (512,)),
       ("NIF.fc3.weight", (512, 1024)), ("NIF.fc3.bias", (512,))]
    + [(f"NIF.fc4{i}.{name}", shape) for i in range(7)
       for name, shape in (("bias", (512,)), ("weight_g", (512, 1)), ("weight_v", (512, 512)))]
    + [("NIF.fc5.weight", (1, 512)), ("NIF.fc5.bias", (1,))]
)


@pytest.fixture(scope="module")
def parity_ckpt(parity_dir):
    return parity_dir / "sdf_checkpoint.pth"


def test_state_dict_keys_and_shapes_are_spec_4_4(parity_ckpt):
    state = SDFModel().state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == EXPECTED
    assert len(EXPECTED) == 64
    authors = torch.load(parity_ckpt, weights_only=True)["sdf_model"]
    assert [(k, tuple(v.shape)) for k, v in authors.items()] == EXPECTED


def test_geometric_initialisation_spec_4_1():
    torch.manual_seed(0)
    nif = SDFModel().NIF
    assert nif.fc3.bias.abs().max() == 0 and abs(nif.fc3.weight.std().item() - 0.0625) < 1e-3
    for layer in nif.hidden_layers:
        assert torch.allclose(layer.weight_g, layer.weight_v.norm(dim=1, keepdim=True))
        assert torch.allclose(layer.weight, layer.weight_v)          # g = ||v|| at initialisation
        assert abs(layer.weight_v.std().item() - 0.0625) < 1e-3 and layer.bias.abs().max() == 0
    assert abs(nif.fc5.weight.mean().item() - 2 * np.sqrt(np.pi) / np.sqrt(512)) < 1e-6
    assert nif.fc5.weight.std().item() < 1e-5 and nif.fc5.bias.item() == -0.5


def _manual_decoder(sd: dict, latent: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The authors' decoder from raw tensors: tiled latent, concat [h, f], W = g v / ||v||."""
    tiled = latent[:, None, :].expand(-1, points.shape[1], -1)
    f = torch.relu(tiled @ sd["NIF.fc1.weight"].T + sd["NIF.fc1.bias"])
    h = torch.relu(points @ sd["NIF.fc2.weight"].T + sd["NIF.fc2.bias"])
    u = torch.relu(torch.cat([h, f], dim=-1) @ sd["NIF.fc3.weight"].T + sd["NIF.fc3.bias"])
    for i in range(7):
        g, v = sd[f"NIF.fc4{i}.weight_g"], sd[f"NIF.fc4{i}.weight_v"]
        w = g * v / torch.sqrt((v * v).sum(dim=1, keepdim=True))
        u = torch.relu(u @ w.T + sd[f"NIF.fc4{i}.bias"])
    return u @ sd["NIF.fc5.weight"].T + sd["NIF.fc5.bias"]


def _manual_encoder(sd: dict, points: torch.Tensor) -> torch.Tensor:
    """Eval-mode PointNet from raw tensors (1x1 convs as matmuls, BatchNorm with running stats)."""
    def bn(x, i):
        p = f"encoder.bn{i}."
        scale = sd[p + "weight"] / torch.sqrt(sd[p + "running_var"] + 1e-5)
        return (x - sd[p + "running_mean"]) * scale + sd[p + "bias"]

    x = points
    for i in (1, 2, 3):
        x = torch.relu(bn(x @ sd[f"encoder.conv{i}.weight"][:, :, 0].T + sd[f"encoder.conv{i}.bias"], i))
    x = x.amax(dim=1)
    x = torch.relu(bn(x @ sd["encoder.fc1.weight"].T + sd["encoder.fc1.bias"], 4))
    return torch.relu(bn(x @ sd["encoder.fc2.weight"].T + sd["encoder.fc2.bias"], 5))


def test_parity_checkpoint_matches_hand_built_model(parity_ckpt):
    model, iteration = load_sdf_checkpoint(parity_ckpt)
    assert iteration == 2 and not model.training
    sd = torch.load(parity_ckpt, weights_only=True)["sdf_model"]
    gen = torch.Generator().manual_seed(0)
    patches = torch.rand(4, 500, 3, generator=gen) - 0.5
    queries = patches + 0.05 * torch.randn(4, 500, 3, generator=gen)
    with torch.no_grad():
        latent = model.encoder(patches)
        ref_latent = _manual_encoder(sd, patches)
        sdf = model.NIF(latent, queries)
        sdf_code = model.NIF.forward_with_code(model.NIF.latent_code(latent), queries)
        ref = _manual_decoder(sd, latent, queries)
    assert torch.allclose(latent, ref_latent, rtol=1e-5, atol=1e-5)
    assert sdf.shape == (4, 500, 1)
    assert ref.abs().max() > 1e-2 and ref.std() > 1e-3            # a non-trivial output
    assert torch.allclose(sdf, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(sdf, sdf_code)


def test_inference_decoder_equals_forward(parity_ckpt):
    """``abs_sdf`` (the chunked, in-place inference loop) is |forward| exactly, for any chunk."""
    model, _ = load_sdf_checkpoint(parity_ckpt)
    gen = torch.Generator().manual_seed(1)
    latents = torch.rand(7, 128, generator=gen)
    points = torch.rand(7, 500, 3, generator=gen) - 0.5
    with torch.no_grad():
        ref = torch.cat([model.NIF(latents[g:g + 1], points[g:g + 1]) for g in range(7)]).abs().squeeze(-1)
        for chunk in (1, 3, 8):
            out = model.NIF.abs_sdf(latents, points, chunk)
            codes = model.NIF.latent_code(latents)
            same_batches = torch.cat([model.NIF.forward_with_code(codes[s:s + chunk], points[s:s + chunk])
                                      for s in range(0, 7, chunk)]).abs().squeeze(-1)
            assert out.shape == (7, 500)
            assert torch.equal(out, same_batches)            # same GEMM shapes: bit-identical
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)   # other batching: rounding
    assert ref.std() > 1e-3


def test_parity_encoder_features_of_reference_run(parity_ckpt, parity_dir):
    """Our encoder on the first test sample's normalised patches = the reference's ``sdf_features``."""
    inter = np.load(parity_dir / "expected" / "torus" / "intermediates.npz")
    row = 0
    cls, _, defect, _, png = inter["sample_paths"][row].split("/")
    grid = parity_dir / "grids" / cls / "test" / defect / "npz" / png.replace(".png", ".npz")
    points, _ = load_grid(grid)
    model, _ = load_sdf_checkpoint(parity_ckpt)
    with torch.no_grad():
        feats = model.encoder(normalize_patches(torch.from_numpy(points))).numpy()
    lo, hi = inter["patch_offsets"][row], inter["patch_offsets"][row + 1]
    np.testing.assert_allclose(feats, inter["sdf_features"][lo:hi], rtol=1e-4, atol=1e-5)


def test_save_load_round_trip_is_exact(tmp_path):
    torch.manual_seed(3)
    model = SDFModel()
    path = tmp_path / "ckpt_000007.pth"
    save_sdf_checkpoint(path, model, 7, optimizer={"state": {}, "param_groups": []}, epochs_done=8)
    loaded, iteration = load_sdf_checkpoint(path)
    assert iteration == 7
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert not list(tmp_path.glob("*.part*"))


def _parametrized_state(model: SDFModel) -> dict:
    """The model re-expressed with ``torch.nn.utils.parametrizations.weight_norm`` layers, 'module.' prefixed."""
    clone = SDFModel()
    clone.load_state_dict(model.state_dict())
    for i in range(7):
        old = getattr(clone.NIF, f"fc4{i}")
        lin = nn.Linear(512, 512)
        with torch.no_grad():
            lin.weight.copy_(old.weight)
            lin.bias.copy_(old.bias)
        setattr(clone.NIF, f"fc4{i}", nn.utils.parametrizations.weight_norm(lin, dim=0))
    return {f"module.{k}": v for k, v in clone.state_dict().items()}


def test_parametrized_weight_norm_checkpoint_round_trips(tmp_path, parity_ckpt):
    model, _ = load_sdf_checkpoint(parity_ckpt)
    state = _parametrized_state(model)
    assert "module.NIF.fc43.parametrizations.weight.original0" in state
    assert state["module.NIF.fc43.parametrizations.weight.original1"].shape == (512, 512)
    path = tmp_path / "parametrized.pth"
    torch.save({"sdf_model": state, "current_iteration": 5}, path)
    loaded, iteration = load_sdf_checkpoint(path)
    assert iteration == 5
    gen = torch.Generator().manual_seed(1)
    latent = torch.rand(3, 128, generator=gen)
    pts = torch.rand(3, 200, 3, generator=gen) - 0.5
    with torch.no_grad():
        for i in range(7):
            a, b = getattr(model.NIF, f"fc4{i}").weight, getattr(loaded.NIF, f"fc4{i}").weight
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
        assert torch.allclose(model.NIF(latent, pts), loaded.NIF(latent, pts), rtol=1e-5, atol=1e-6)
    # and back: our checkpoint of it loads into a parametrised module
    out = tmp_path / "ours.pth"
    save_sdf_checkpoint(out, loaded, 5)
    again, _ = load_sdf_checkpoint(out)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), again.state_dict().values()))


def test_wrong_keys_and_shapes_are_listed(tmp_path, parity_ckpt):
    state = dict(torch.load(parity_ckpt, weights_only=True)["sdf_model"])
    state["NIF.fc40.weight_gain"] = state.pop("NIF.fc40.weight_g")
    bad = tmp_path / "bad.pth"
    torch.save({"sdf_model": state, "current_iteration": 1}, bad)
    with pytest.raises(CheckpointError) as err:
        load_sdf_checkpoint(bad)
    msg = str(err.value)
    assert str(bad) in msg and "missing keys: ['NIF.fc40.weight_g']" in msg
    assert "unexpected keys: ['NIF.fc40.weight_gain']" in msg

    state["NIF.fc40.weight_g"] = state.pop("NIF.fc40.weight_gain")
    state["NIF.fc5.weight"] = torch.zeros(2, 512)
    torch.save({"sdf_model": state}, bad)
    with pytest.raises(CheckpointError, match=r"NIF\.fc5\.weight: \(2, 512\) != \(1, 512\)"):
        load_sdf_checkpoint(bad)

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: not a PyTorch checkpoint"):
        load_sdf_checkpoint(tmp_path / "junk.pth")
    (tmp_path / "cut.pth").write_bytes(parity_ckpt.read_bytes()[:5000])        # a truncated zip
    with pytest.raises(CheckpointError, match=r"cut.pth: cannot read checkpoint \(\w+: [^\n]+\)$"):
        load_sdf_checkpoint(tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_sdf_checkpoint(tmp_path / "absent.pth")


def test_forward_with_gradient_is_the_autograd_gradient(parity_ckpt):
    model, _ = load_sdf_checkpoint(parity_ckpt)
    nif = model.NIF
    gen = torch.Generator().manual_seed(2)
    code = nif.latent_code(torch.rand(2, 128, generator=gen))
    pts = (torch.rand(2, 100, 3, generator=gen) - 0.5).requires_grad_(True)
    sdf, grad = nif.forward_with_gradient(code, pts)
    ref_sdf = nif.forward_with_code(code, pts)
    ref_grad, = torch.autograd.grad(ref_sdf.sum(), pts)
    assert torch.equal(sdf, ref_sdf)
    assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert grad.abs().mean() > 1e-3
    with torch.no_grad():                                             # finite differences, float64
        m64 = SDFModel().double()
        m64.load_state_dict(model.state_dict())
        c64, p64 = code.double(), pts.detach().double()
        eps = 1e-8                 # the network is piecewise linear: exact unless a ReLU kink is within eps
        fd = torch.stack([(m64.NIF.forward_with_code(c64, p64 + eps * e) -
                           m64.NIF.forward_with_code(c64, p64 - eps * e))[..., 0] / (2 * eps)
                          for e in torch.eye(3, dtype=torch.float64)], dim=-1)
        _, g64 = m64.NIF.forward_with_gradient(c64, p64)
    assert torch.allclose(g64, fd, rtol=1e-5, atol=1e-6)


def _parity_patches(parity_dir, n):
    points, _ = load_grid(parity_dir / "grids" / "torus" / "test" / "bump" / "npz" / "000.npz")
    return normalize_patches(torch.from_numpy(points))[:n]


def _within_rounding(out: torch.Tensor, ref: torch.Tensor, encoder, points: torch.Tensor) -> bool:
    """``out`` and ``ref`` differ by at most the float32 rounding of two encoder evaluations."""
    return bool(((out - ref).abs() <= SIGMAS * encoder_rounding_scale(encoder, points)).all())


def test_encoder_latents_are_the_forward(parity_ckpt, parity_dir):
    """SPEC 12.3: BatchNorm + ReLU after the max over points is the module's forward. The per-element
    map is the same, so the bits agree where the CPU's BatchNorm kernel computes a (B, 1024, 1) and a
    (B, 1024, 500) tensor alike (AVX-512 here: bit for bit); a scalar kernel may round one of them
    differently, so the test allows the rounding of two evaluations."""
    model, _ = load_sdf_checkpoint(parity_ckpt)
    points = _parity_patches(parity_dir, 23)
    with torch.no_grad():
        for chunk in (4, 5):                        # 23 = 5 x 4 + 3, 4 x 5 + 3: a short last chunk
            ref = torch.cat([model.encoder(part) for part in points.split(chunk)])
            out = model.encoder.latents(points, chunk)
            assert out.dtype == torch.float32 and _within_rounding(out, ref, model.encoder, points)


def test_encoder_latents_take_the_min_where_batchnorm_flips(parity_ckpt, parity_dir):
    """A negative BatchNorm weight turns the max into a min (SPEC 12.3); the result is still the forward's."""
    model, _ = load_sdf_checkpoint(parity_ckpt)
    bn3 = model.encoder.bn3
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        bn3.weight.copy_(torch.randn(1024, generator=gen))
        bn3.running_mean.copy_(torch.randn(1024, generator=gen) * 0.1)
        assert (bn3.weight < 0).sum() > 400
        points = _parity_patches(parity_dir, 8)
        ref = model.encoder(points)
        assert _within_rounding(model.encoder.latents(points, 4), ref, model.encoder, points)
        # the max alone would be wrong: the min branch is what makes it right
        x = points.transpose(1, 2)
        x = model.encoder.conv3(torch.relu(model.encoder.bn2(model.encoder.conv2(
            torch.relu(model.encoder.bn1(model.encoder.conv1(x)))))))
        max_only = torch.relu(bn3(x.amax(2, keepdim=True))).squeeze(2)
        truth = torch.relu(bn3(x)).amax(2)
        assert float((max_only - truth).abs().max()) > 0.1 * float(truth.abs().max())


def test_folded_encoder_equals_forward_up_to_rounding(parity_ckpt, parity_dir):
    """The folded layers (SPEC 12.4) are the same function: float32 agrees to rounding, bfloat16 to ~2%."""
    model, _ = load_sdf_checkpoint(parity_ckpt)
    points = _parity_patches(parity_dir, 40)
    with torch.no_grad():
        ref = model.encoder(points)
        layers = model.encoder.folded_layers(torch.float32)
        folded = torch.cat([model.encoder._folded(part, layers) for part in points.split(8)])
        torch.testing.assert_close(folded, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        bf16 = model.encoder.latents(points, 8, torch.bfloat16)
    assert bf16.dtype == torch.float32 and bf16.shape == ref.shape
    rel = float((bf16 - ref).abs().max() / ref.abs().max())
    assert 1e-4 < rel < 0.05                         # really bfloat16 (8-bit mantissa), and close (measured 2.2e-2)
    model.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        model.encoder.latents(points, 4)


def test_bfloat16_decoder_is_close_and_returns_float32(parity_ckpt, parity_dir):
    model, _ = load_sdf_checkpoint(parity_ckpt)
    points = _parity_patches(parity_dir, 24)
    with torch.no_grad():
        latents = model.encoder(points)
        ref = model.NIF.abs_sdf(latents, points, 8)
        out = model.NIF.abs_sdf(latents, points, 8, torch.bfloat16)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    rel = float((out - ref).abs().max() / ref.max())
    assert 1e-4 < rel < 0.08                         # measured 3.1e-2 of the largest |SDF|
