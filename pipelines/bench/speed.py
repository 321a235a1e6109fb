"""Forward-pass speed of the GLIDE U-Net, with random weights (no download, nothing loaded).

    python -m pipelines.bench.speed                    # shipped default sizes (docs/architecture.md)
    python -m pipelines.bench.speed --full             # + the released GLIDE sizes (385M / 398M parameters)
    python -m pipelines.bench.speed --device cuda      # fp32, fp16 and bf16 on the GPU

Rows: seconds per forward (median of --repeat runs after --warmup runs) for
  * the shipped default base model (batch 2, 64x64) and upsampler (batch 1, 256x256);
  * with --full, GLIDE "base" (batch 2, 64x64, 128 tokens) and "upsample" (batch 1, 256x256, 128 tokens).
On CPU the model runs in fp32; on CUDA in fp32, fp16 and bf16 (the half-precision fast path).

The timed model has the layout the pipelines give it (`checkpoints.use_fast_layout`: channels_last on CPU).
Baselines measured in the same run, with the ratio printed under the table:
  * on CPU, "sdpa nchw": the same model in the default NCHW layout;
  * "naive": the same model with its attention replaced by a plain einsum/softmax implementation
    (softmax in fp32, as the released code does it) instead of torch's scaled_dot_product_attention.
    Its outputs are also compared with the SDPA outputs ("max rel diff"), so the fast path is checked to
    change nothing beyond precision.
  * half precision vs fp32 on CUDA (speed, and the outputs' difference).
On CPU the full-size naive baseline is skipped unless --naive-full (each full-size CPU forward takes 20-40 s).

`naive_attention` / `use_naive_attention` are imported by tests/test_glide_model.py.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoints import use_fast_layout
from ..models import glide
from ..models.glide import GlideConfig, GlideUNet

# docs/architecture.md "Shipped default model sizes"; a shipped assets/models/<name>/config.json wins if present
SHIPPED = {
    "base": dict(image_size=64, num_channels=32, channel_mult="1,2,3,4", num_res_blocks=2,
                 attention_resolutions="16,8", num_head_channels=32, xf_width=128, xf_layers=3, xf_heads=4,
                 text_ctx=48, dropout=0.1, n_vocab=1000),
    "upsampler": dict(image_size=256, num_channels=32, channel_mult="1,1,2,2,4,4", num_res_blocks=1,
                      attention_resolutions="8", num_head_channels=64, resblock_updown=False, xf_width=128,
                      xf_layers=3, xf_heads=4, text_ctx=48, dropout=0.1, super_res=True, n_vocab=1000),
}
ASSETS = Path(__file__).resolve().parents[2] / "assets" / "models"


# -----------------------------------------------------------------------------
# The reference attention


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, written out: q and k each scaled by d**-0.25, softmax in fp32 (as released)."""
    scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))
    weight = torch.einsum("bhtc,bhsc->bhts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).to(q.dtype)
    return torch.einsum("bhts,bhsc->bhtc", weight, v)


class _FunctionalWithNaiveAttention:
    """torch.nn.functional, except scaled_dot_product_attention (which the model looks up at call time)."""

    def __getattr__(self, name):
        return getattr(F, name)

    @staticmethod
    def scaled_dot_product_attention(q, k, v, *args, **kwargs):
        if args or kwargs:
            raise NotImplementedError("the naive reference attention takes q, k, v only")
        return naive_attention(q, k, v)


@contextlib.contextmanager
def use_naive_attention():
    """Within the block, every GlideUNet uses `naive_attention` instead of scaled_dot_product_attention."""
    saved = glide.F
    glide.F = _FunctionalWithNaiveAttention()
    try:
        yield
    finally:
        glide.F = saved


# -----------------------------------------------------------------------------
# Measuring


@dataclass
class Case:
    name: str
    config: GlideConfig
    batch: int


def shipped_config(name: str) -> GlideConfig:
    path = ASSETS / name / "config.json"
    if path.is_file():
        try:
            return GlideConfig.from_dict(json.loads(path.read_text())["config"])
        except (KeyError, ValueError, TypeError):
            pass
    return GlideConfig(**SHIPPED[name])


def make_model(config: GlideConfig, device: torch.device, seed: int = 0) -> GlideUNet:
    """Random weights; the zero-initialised output convs get small values so the outputs are not all zero."""
    torch.manual_seed(seed)  # the modules' default init draws from the global RNG
    with torch.device(device):
        model = GlideUNet(config)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def make_inputs(config: GlideConfig, batch: int, device: torch.device, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    S, T = config.image_size, config.text_ctx
    mask = torch.zeros(batch, T, dtype=torch.bool)
    mask[:, : min(T, 20)] = True
    kw = dict(x=torch.randn(batch, 3, S, S, generator=g), timesteps=torch.randint(0, 1000, (batch,), generator=g),
              tokens=torch.randint(0, config.n_vocab, (batch, T), generator=g), mask=mask)
    if config.super_res:
        kw["low_res"] = torch.rand(batch, 3, S // 4, S // 4, generator=g) * 2 - 1
    if config.inpaint:
        kw["inpaint_image"] = torch.rand(batch, 3, S, S, generator=g) * 2 - 1
        kw["inpaint_mask"] = torch.ones(batch, 1, S, S)
    return {k: v.to(device) for k, v in kw.items()}


def time_forward(model, kw, warmup: int, repeat: int):
    """-> (median seconds per forward, the last output as fp32 on the CPU)."""
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeat):
            sync()
            t0 = time.perf_counter()
            out = model(**kw)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times), out.float().cpu()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def run_case(case: Case, device: torch.device, dtypes, naive: bool, warmup: int, repeat: int, rows: list,
             notes: list) -> None:
    base = make_model(case.config, device)
    params = sum(p.numel() for p in base.parameters())
    kw = make_inputs(case.config, case.batch, device)
    ref = None  # fp32 SDPA output
    timings = {}
    for dtype in dtypes:
        plain = base if dtype == torch.float32 else copy.deepcopy(base).to(dtype)  # cast from fp32 each time
        # the layout load_model gives (channels_last on CPU; a copy, so `plain` stays the NCHW baseline)
        model = use_fast_layout(copy.deepcopy(plain)) if device.type == "cpu" else plain
        variants = [("sdpa", contextlib.nullcontext, model)]
        if model is not plain:
            variants.append(("sdpa nchw", contextlib.nullcontext, plain))
        if naive:
            variants.append(("naive", use_naive_attention, model))
        for attn, ctx, timed in variants:
            with ctx():
                sec, out = time_forward(timed, kw, warmup, repeat)
            if ref is None:
                ref = out
            diff = rel_diff(out, ref)
            timings[(dtype, attn)] = sec
            rows.append((case.name, f"{params / 1e6:.1f}M", case.batch, case.config.image_size, device.type,
                         str(dtype).removeprefix("torch."), attn, sec, diff, bool(torch.isfinite(out).all())))
        del model, plain
    del base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for dtype in dtypes:
        if (dtype, "sdpa nchw") in timings:
            notes.append(f"{case.name} {device.type} {str(dtype).removeprefix('torch.')}: channels_last is "
                         f"{timings[(dtype, 'sdpa nchw')] / timings[(dtype, 'sdpa')]:.2f}x the speed of NCHW")
        if (dtype, "naive") in timings:
            notes.append(f"{case.name} {device.type} {str(dtype).removeprefix('torch.')}: SDPA is "
                         f"{timings[(dtype, 'naive')] / timings[(dtype, 'sdpa')]:.2f}x the speed of naive attention")
        if dtype != torch.float32 and (torch.float32, "sdpa") in timings:
            notes.append(f"{case.name} {device.type}: {str(dtype).removeprefix('torch.')} SDPA is "
                         f"{timings[(torch.float32, 'sdpa')] / timings[(dtype, 'sdpa')]:.2f}x the speed of fp32 SDPA")


def print_table(rows) -> None:
    head = ("model", "params", "batch", "size", "device", "dtype", "attention", "s/forward", "max rel diff", "finite")
    cells = [head] + [(n, p, str(b), f"{s}x{s}", d, dt, a, f"{sec:.4f}", f"{diff:.2e}", "yes" if fin else "NO")
                      for n, p, b, s, d, dt, a, sec, diff, fin in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    for i, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipelines.bench.speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="also the released GLIDE sizes (slow on CPU)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs (default 1)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="timed runs, median reported (default: 10 on CUDA, 3 on CPU, 1 for full-size models on CPU)")
    ap.add_argument("--batch-multiplier", type=int, default=1,
                    help="multiply every batch size (on a GPU batch 1-2 is launch-bound; try 8)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--naive-full", action="store_true", help="on CPU, time the naive baseline at full size too")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("CUDA is not available on this machine; use --device cpu")
    dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, torch.float16, torch.bfloat16]
    warmup = 1 if args.warmup is None else args.warmup

    k = args.batch_multiplier
    cases = [Case("shipped base", shipped_config("base"), 2 * k),
             Case("shipped upsampler", shipped_config("upsampler"), 1 * k)]
    full = [Case("GLIDE base", GlideConfig.preset("base"), 2 * k),
            Case("GLIDE upsample", GlideConfig.preset("upsample"), 1 * k)]
    if device.type == "cuda":
        dev_name = (f"{torch.cuda.get_device_name(device)} (TF32: cudnn {torch.backends.cudnn.allow_tf32}, "
                    f"matmul {torch.backends.cuda.matmul.allow_tf32})")
    else:
        dev_name = f"CPU, {torch.get_num_threads()} threads"
    load = "load average %.1f %.1f %.1f; " % os.getloadavg() if hasattr(os, "getloadavg") else ""
    print(f"torch {torch.__version__}, {dev_name}; {load}warmup {warmup}; random weights\n")
    rows, notes = [], []
    for case in cases + (full if args.full else []):
        is_full = case in full
        slow = is_full and device.type == "cpu"
        repeat = args.repeat if args.repeat is not None else (1 if slow else 3 if device.type == "cpu" else 10)
        naive = not slow or args.naive_full
        run_case(case, device, dtypes, naive, warmup, repeat, rows, notes)
        print(f"  done: {case.name}", flush=True)
    print()
    print_table(rows)
    print("\n'max rel diff' = max |out - out_fp32_sdpa| / max |out_fp32_sdpa| for the same model and inputs.")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
