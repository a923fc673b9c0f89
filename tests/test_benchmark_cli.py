"""tools/benchmark.py: stage dependencies and reuse of an earlier run's outputs (no timing here)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tools.bench import BenchContext
from tools.bench import suite

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tools_benchmark", REPO / "tools" / "benchmark.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _ctx(out: Path) -> BenchContext:
    return BenchContext(raw=out / "data", work=out / "work", classes=["bagel"], device=torch.device("cpu"))


def test_stage_without_its_inputs_exits_2_before_generating_data(tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path), "--stages", "inference", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "inference needs grids (patches stage)" in err and "inference needs ckpt (training stage)" in err
    assert not (tmp_path / "data").exists()          # failed before the (slow) data generation


def test_finished_stages_are_reused_only_for_the_same_data(tmp_path):
    args, _ = bench.parse_args(["--out", str(tmp_path), "--classes", "bagel"])
    ctx = _ctx(tmp_path)
    ctx.work.mkdir(parents=True)
    grids, ckpt = tmp_path / "work" / "grids", tmp_path / "work" / "ckpt.pth"
    grids.mkdir()
    ckpt.write_bytes(b"x")
    ctx.grids, ctx.pretrain_grids, ctx.ckpt = grids, None, ckpt
    suite.save_state(ctx, args, "patches")
    suite.save_state(ctx, args, "training")
    state = json.loads((ctx.work / suite.STATE_FILE).read_text())
    assert state["paths"] == {"grids": str(grids), "pretrain_grids": None, "ckpt": str(ckpt)}

    again = _ctx(tmp_path)
    suite.load_state(again, args)
    assert (again.grids, again.ckpt, again.pretrain_grids, again.preprocessed) == (grids, ckpt, None, None)

    other = _ctx(tmp_path)                            # another --size: nothing is reused
    suite.load_state(other, bench.parse_args(["--out", str(tmp_path), "--classes", "bagel", "--size", "400"])[0])
    assert other.grids is None and other.ckpt is None

    ckpt.unlink()                                     # a recorded path that is gone is not reused
    gone = _ctx(tmp_path)
    suite.load_state(gone, args)
    assert gone.grids == grids and gone.ckpt is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_without_gpu_exits_2(tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path), "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_tf32_on_cpu_exits_2_before_generating_data(tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path), "--device", "cpu", "--precision", "fp32", "tf32"]) == 2
    assert "--precision tf32 needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
    cfg, _ = bench.parse_args(["--precision", "bf16"])
    assert cfg.precision == ["bf16"] and bench.parse_args([])[0].precision == ["fp32"]
