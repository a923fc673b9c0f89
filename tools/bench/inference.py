"""Benchmark of memory building and shape-guided inference (SPEC 6-8) against the authors' way.

Both ways (:mod:`tools.authors_way.inference` for the reference's) use the same memory,
the same RGB features and the same alignment, so their outputs must agree up to float
rounding; the agreement is reported beside the times.
"""
from __future__ import annotations

import torch

from core.alignment import N_ALIGN, align
from core.dataset import list_samples
from core.inference import STAGE_NAMES, encode_sample, predict
from core.memory import MemoryBuilder, load_sample_input
from core.patch_files import POINT_NUM
from core.pipeline import RunConfig, reference_sample_orders
from core.rgb_features import build_rgb_extractor
from core.sdf_model import load_sdf_checkpoint
from tools.authors_way.inference import agreement, authors_memory_features, authors_predict
from tools.bench import row
from tools.bench.precision import encoder_flops, gemm_gflops, precision_report, run_precisions
from utils.allocator import keep_freed_memory
from utils.device import Timer

STAGE = "inference"
STAGES = STAGE_NAMES
# Matrix products the encoder is compared with: a large square-ish one, and conv3 at the CPU chunk.
GEMM_SHAPES = (((4000, 1024, 1024), "large product"), ((2000, 128, 1024), "conv3 of 4 patches as a product"))


# ----------------------------------------------------------------------------- benchmark
def benchmark(ctx) -> list[dict]:
    """Per-sample inference time by stage, memory building per training sample, and the authors' way
    on ``ctx.subset`` test samples (same memory, same alignment), with agreement."""
    device = ctx.device
    keep_freed_memory()     # as main.py (utils/allocator.py)
    cls = ctx.classes[0]
    root, grids = ctx.preprocessed or ctx.raw, ctx.grids
    sdf_model, _ = load_sdf_checkpoint(ctx.ckpt, map_location=device)
    rgb = build_rgb_extractor("wide_resnet50_2", ctx.extra.get("rgb_weights", "random"), device, seed=ctx.seed)
    train, test = list_samples(root, cls, "train"), list_samples(root, cls, "test")
    fit_order, align_order = reference_sample_orders(len(train), ctx.seed)
    load = lambda s: load_sample_input(s, grids, rgb.mean, rgb.std)  # noqa: E731

    inputs = [load(train[i]) for i in fit_order]
    with torch.no_grad():   # untimed warm-up: one-time kernel loading / library handles (CUDA) and allocator
        encode_sample(inputs[0], sdf_model, rgb, device)
    with torch.no_grad(), Timer(device) as t_fit:
        builder, encoded = MemoryBuilder(), []
        for inp in inputs:
            encoded.append(encode_sample(inp, sdf_model, rgb, device))
            builder.add(encoded[-1])
        memory = builder.build()
    n_sub = max(1, min(ctx.subset, len(inputs)))
    with torch.no_grad(), Timer(device) as t_fit_authors:
        authors_feats = [authors_memory_features(sdf_model, rgb, inp, device)[0] for inp in inputs[:n_sub]]
    feat_diff = max(float((a - e.sdf_features.cpu()).abs().max()) for a, e in zip(authors_feats, encoded))
    align_enc = [encoded[fit_order.index(i)] for i in align_order[:N_ALIGN]]
    with torch.no_grad(), Timer(device) as t_align:
        alignment = align(memory, sdf_model, align_enc)
    del encoded, align_enc

    ours_times: dict = {s: 0.0 for s in STAGES}
    ours_sub: dict = {s: 0.0 for s in STAGES}
    authors_times: dict = {s: 0.0 for s in STAGES}
    worst: dict = {}
    test_patches = 0
    for n, sample in enumerate(test):
        inp = load(sample)
        test_patches += inp.points.shape[0]
        times: dict = {}
        with torch.no_grad():
            pred = predict(memory, sdf_model, encode_sample(inp, sdf_model, rgb, device, times), "testing",
                           alignment.weight, alignment.bias, times)
        for s in STAGES:
            ours_times[s] += times.get(s, 0.0)
        if n < ctx.subset:
            for s in STAGES:
                ours_sub[s] += times.get(s, 0.0)
            ref = authors_predict(memory, sdf_model, rgb, inp, device, "testing", alignment.weight,
                                  alignment.bias, authors_times)
            for k, v in agreement(pred, ref).items():
                worst[k] = max(worst.get(k, 0.0), v)
    n_test, n_ref = len(test), min(ctx.subset, len(test))
    agree = (f"{n_ref} samples: scores max rel {worst.get('score_rel', 0):.1e}, SDF map max |d| "
             f"{worst.get('sdf_map_abs', 0):.1e}, RGB 28 map max |d| {worst.get('rgb28_abs', 0):.1e}, blurred maps "
             f"<= {worst.get('blur_levels', 0)} level(s) on {worst.get('blur_changed', 0):.2%} of pixels") \
        if n_ref else None
    note = f"class {cls}, {len(train)} train / {n_test} test samples, device {device}"
    rows = [row(STAGE, "memory building (SDF encode + RGB features + footprints)", t_fit.seconds / len(inputs),
                t_fit_authors.seconds / n_sub, unit="s/train sample",
                agree=f"SDF memory features max |d| {feat_diff:.1e} on {n_sub} samples",
                note="authors' way: per-patch encoder and footprint calls (input loading excluded in both)"),
            row(STAGE, "alignment (25 samples, alignment mode)", t_align.seconds / max(1, len(align_order[:N_ALIGN])),
                unit="s/sample", note=note)]
    for s in STAGES:
        rows.append(row(STAGE, f"test: {s}", ours_times[s] / n_test,
                        authors_times[s] / n_ref if n_ref else None, note=f"ours over {n_test} samples"))
    rows.append(row(STAGE, "test: total per sample (same subset)", sum(ours_sub.values()) / max(n_ref, 1),
                    sum(authors_times.values()) / n_ref if n_ref else None, agree=agree, note=note))
    rows += rate_rows(sdf_model, device, test_patches, ours_times["sdf_encode"], ctx.precisions)
    if set(ctx.precisions) - {"fp32"}:
        rows += precision_rows(ctx, cls, root, grids, sdf_model, rgb, test_patches)
    return rows


def rate_rows(sdf_model, device, patches: int, encode_seconds: float, precisions: list[str]) -> list[dict]:
    """The machine's matrix-product rates beside the float32 encoder's rate in the test loop (GFLOPS)."""
    enc = encoder_flops(sdf_model.encoder, patches, POINT_NUM) / encode_seconds / 1e9
    rows = [row(STAGE, f"GEMM rate float32 {m}x{k} @ {k}x{n}", gemm_gflops(m, k, n, device=device), unit="GFLOPS",
                note=note) for (m, k, n), note in GEMM_SHAPES]
    if "bf16" in precisions:
        rows += [row(STAGE, f"GEMM rate bfloat16 {m}x{k} @ {k}x{n}", gemm_gflops(m, k, n, torch.bfloat16, device),
                     unit="GFLOPS", note=note) for (m, k, n), note in GEMM_SHAPES]
    rows.append(row(STAGE, "SDF encoder rate float32 (test: sdf_encode)", enc, unit="GFLOPS",
                    note=f"{patches} test patches x {encoder_flops(sdf_model.encoder, 1, POINT_NUM) / 1e6:.1f} MFLOP"))
    return rows


def precision_rows(ctx, cls: str, root, grids, sdf_model, rgb, patches: int) -> list[dict]:
    """``main.py``'s per-class run in fp32 and each of ``ctx.precisions``
    (:func:`tools.bench.precision.run_precisions`, :func:`~tools.bench.precision.precision_report`): test
    time per sample by stage, ratio to fp32, the encoder's rate on the class's ``patches`` test patches,
    and the fidelity of each reduced mode against fp32."""
    device = ctx.device
    cfg = RunConfig(root, grids, ctx.ckpt, classes=[cls], device=str(device), seed=ctx.seed)
    report = precision_report(run_precisions(cfg, ctx.precisions, sdf_model, rgb, device, [cls]), [cls], device)
    n_test = report["test_samples"]
    rows = []
    for mode, r in report["modes"].items():
        per_sample, speed = r["test_seconds_per_sample"], r["speed_vs_fp32"]
        label = mode if r["precision"] == mode else f"{mode} (ran {r['precision']})"
        for s in STAGES:
            rows.append(row(STAGE, f"main.py test {label}: {s}", per_sample[s],
                            note=f"{speed[s]:.2f}x the fp32 speed" if s in speed else ""))
        agree = None
        if mode != "fp32":
            f = r["fidelity_vs_fp32"]
            agree = (f"vs fp32: table cells max |d| {f['table_cell_abs']:.3f} ({f['cells']} cells), image scores "
                     f"max rel {f['image_score_rel']:.1e}, blurred maps <= {f['map_levels']:.2f} levels "
                     f"(p99 {f['map_levels_p99']:.2f})")
        rows.append(row(STAGE, f"main.py test {label}: total per sample", sum(per_sample.values()), agree=agree,
                        note=f"{r['total_speed_vs_fp32']:.2f}x the fp32 speed; class {cls}, {n_test} test samples"))
        rows.append(row(STAGE, f"SDF encoder rate {label} (main.py test: sdf_encode)",
                        encoder_flops(sdf_model.encoder, patches, POINT_NUM) / (per_sample["sdf_encode"] * n_test) / 1e9,
                        unit="GFLOPS"))
    return rows
