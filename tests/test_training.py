"""Tests for pipelines.training: CPU, tiny configs, seconds each.

Covers: loss goes down on a fixed batch; zero-initialised widening leaves the output unchanged;
grafting a base's update onto its inpainting model;
kill-and-resume equals an uninterrupted run bit for bit (in-process and with a real SIGTERM);
position-indexed batches do not depend on the worker count; two DDP processes (gloo) end with
identical weights; a folder with a corrupt image, a missing caption and a 1x1 image trains on the
rest and reports the three; finetune-inpaint / upsampler stages export loadable models.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import load_model, shapes
from pipelines.checkpoints import CheckpointError, save_model
from pipelines.diffusion import grounding_loss, make_schedule
from pipelines.models.glide import AttentionBlock, GlideConfig, GlideUNet
from pipelines.tokenizer import PromptTokenizer
from pipelines.training import TrainingDataset, ShapesSource, load_checkpoint, random_mask, run, widen_for_inpainting
from pipelines.training.__main__ import build_parser
from pipelines.training.data import make_loader, sample_rng
from pipelines.training.graft import graft_update, main as main_graft
from pipelines.training.relabel import main as main_relabel
from pipelines.training.widen import FIRST_CONV
from pipelines.training.train import (PRESETS, TrainConfig, caption_gain, compute_losses, draw_timesteps, get_lr,
                                      to_model_inputs, unknown_word_fraction)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(preset="tiny", batch_size=4, lr=1e-3, warmup=2, log_every=2, sample_every=0, checkpoint_every=1000,
            workers=0, device="cpu", quiet=True)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(shapes.build_tokenizer(None).backend_tokenizer.to_str())
    return path


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def tiny_model(preset: str, n_vocab: int = 40, perturb: bool = True) -> GlideUNet:
    torch.manual_seed(0)
    model = GlideUNet(GlideConfig.from_dict({**PRESETS[preset], "n_vocab": n_vocab})).eval()
    if perturb:  # the output convs start at zero; make every weight matter
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model


def states_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            if not (x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)):
                return False
        elif isinstance(x, dict):
            if not states_equal(x, y):
                return False
        elif isinstance(x, list):
            if len(x) != len(y) or not all(states_equal({0: u}, {0: v}) for u, v in zip(x, y)):
                return False
        elif x != y:
            return False
    return True


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- the loss and the widening


def fit_fixed_batch(model, dataset, items: int, steps: int, **loss_options) -> list[dict]:
    """`steps` AdamW steps on the first `items` of `dataset` with the same t and noise each time: the losses."""
    inputs = to_model_inputs(torch.utils.data.default_collate([dataset[i] for i in range(items)]), torch.device("cpu"))
    schedule = make_schedule("squaredcos_cap_v2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for _ in range(steps):
        torch.manual_seed(0)
        out = compute_losses(model, inputs, schedule, torch.Generator().manual_seed(1), contextlib.nullcontext(),
                             **loss_options)
        optimizer.zero_grad()
        out["loss"].mean().backward()
        optimizer.step()
        history.append({k: v.mean().item() for k, v in out.items()})
    return history


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tokenizer_file):
    tok = PromptTokenizer.from_tokenizer_json(tokenizer_file)
    model = tiny_model("tiny", tok.vocab_size, perturb=False).train()
    losses = [h["loss"] for h in fit_fixed_batch(model, TrainingDataset(ShapesSource(16), tok, 48, seed=0), 8, 25)]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.6 * losses[0], losses


def noise_test_setup(tokenizer_file):
    """A tiny model, a batch of 32 shapes scenes at 16 px, and a list that each forward appends its (x_t, t) to."""
    tok = PromptTokenizer.from_tokenizer_json(tokenizer_file)
    model = tiny_model("tiny", tok.vocab_size)
    dataset = TrainingDataset(ShapesSource(16), tok, 48, seed=0)
    inputs = to_model_inputs(torch.utils.data.default_collate([dataset[i] for i in range(32)]), torch.device("cpu"))
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append((args[0].clone(), args[1].clone())))
    return model, inputs, make_schedule("squaredcos_cap_v2"), contextlib.nullcontext(), seen


def test_grounding_loss_is_the_share_of_a_named_tokens_attention_outside_its_object():
    masks = torch.zeros(1, 3, 4, 4)
    masks[0, 0, :2, :2] = 1  # object 0: the top-left quarter
    masks[0, 1, 2:, 2:] = 1  # object 1: the bottom-right quarter
    objects = torch.tensor([[-1, 0, 1, -1]])  # token 1 names object 0, token 2 object 1
    weights = torch.zeros(1, 4, 4, 4)
    weights[0, 1, :2, :2] = 0.25  # token 1 attended only on its object
    weights[0, 2] = 1 / 16  # token 2 everywhere: three quarters of it outside
    weights[0, 0] = weights[0, 3] = 1.0  # tokens that name nothing do not count
    torch.testing.assert_close(grounding_loss([weights], objects, masks), torch.tensor([(0 + 0.75) / 2]))
    coarse = weights.reshape(1, 4, 2, 2, 2, 2).sum((3, 5))  # a 2x2 layer: the masks are area-averaged to it
    torch.testing.assert_close(grounding_loss([weights, coarse], objects, masks), torch.tensor([0.375]))
    assert grounding_loss([weights], torch.full((1, 4), -1), masks).item() == 0  # a dropped caption


def test_grounded_items_name_each_objects_words_and_leave_the_data_as_it_was(tokenizer_file):
    tok = PromptTokenizer.from_tokenizer_json(tokenizer_file)
    source = ShapesSource(32, "dense=1,relational=1,short=0.5,short_bg=0.5")
    grounded = TrainingDataset(source, tok, 48, seed=3, grounding=True)
    plain = TrainingDataset(source, tok, 48, seed=3)
    vocab = {i: w for w, i in tok.hf.get_vocab().items()}
    named = 0
    for i in range(40):
        g, p = grounded[i], plain[i]
        assert torch.equal(g["image"], p["image"]) and torch.equal(g["tokens"], p["tokens"])
        spec = shapes.random_scene(sample_rng(3, i), held_out=False)  # the item's scene: its first draw
        assert g["object_masks"].shape == (3, 32, 32) and g["object_masks"].dtype == torch.uint8
        for k, o in enumerate(spec.objects):  # each mask lies on its object's centre (unless covered later)
            x, y = (int(c * 32) for c in o.center)
            covered = any(b.bbox()[0] <= o.center[0] <= b.bbox()[2] and b.bbox()[1] <= o.center[1] <= b.bbox()[3]
                          for b in spec.objects[k + 1:])
            assert covered or g["object_masks"][k, y, x] > 128
        assert not g["object_masks"][len(spec.objects):].any()
        for token, obj in zip(g["tokens"][g["token_mask"]].tolist(), g["token_objects"].tolist()):
            if obj >= 0:
                o = spec.objects[obj]
                assert vocab[token] in {o.size, o.color, o.shape, *o.cell.split()}, (vocab[token], o)
                named += 1
            else:
                assert vocab[token] not in shapes.SHAPES  # every shape word names its object
    assert named > 100
    with pytest.raises(ValueError, match="mix"):
        TrainingDataset(ShapesSource(32, "dense"), tok, 48, seed=0, grounding=True)[0]


def test_grounding_moves_each_named_words_attention_onto_its_object_and_is_recorded(tmp_path, tokenizer_file):
    tok = PromptTokenizer.from_tokenizer_json(tokenizer_file)
    model = tiny_model("tiny", tok.vocab_size, perturb=False).train()
    for block in model.modules():
        if isinstance(block, AttentionBlock):
            block.keep_text_attention = True
    dataset = TrainingDataset(ShapesSource(16, "dense=1"), tok, 48, seed=0, caption_drop=0.0, grounding=True)
    ground = [h["ground"] for h in fit_fixed_batch(model, dataset, 16, 30, grounding_weight=1.0)]
    assert ground[-1] < 0.7 * ground[0], ground  # at the start a word's attention is spread over the image

    common = {**TINY, "tokenizer": str(tokenizer_file), "max_steps": 2, "captions": "dense=1,relational=1"}
    result = run("pretrain", **common, grounding_weight=0.05, out=str(tmp_path / "grounded"))
    assert load_model(result.model_dir, device="cpu").info.training["grounding_weight"] == 0.05
    assert all(0 <= r["ground"] <= 1 for r in read_log(tmp_path / "grounded") if "loss" in r)
    for bad, message in [({"grounding_weight": -1.0}, "--grounding-weight must be"),
                         ({"grounding_weight": 0.05, "captions": "dense"}, "--grounding-weight needs"),
                         ({"grounding_weight": 0.05, "data": str(tmp_path)}, "--grounding-weight needs")]:
        with pytest.raises(ValueError, match=message):
            run("pretrain", **{**common, **bad}, out=str(tmp_path / "bad"))


def test_offset_noise_moves_each_image_and_channel_and_is_recorded(tmp_path, tokenizer_file):
    model, inputs, schedule, no_amp, seen = noise_test_setup(tokenizer_file)

    def noise_means(offset):
        # the noise the model learns to predict, recovered from x_t, averaged per image and channel
        compute_losses(model, inputs, schedule, torch.Generator().manual_seed(3), no_amp, offset)
        x_t, t = seen.pop()
        return schedule.eps_from_x0(x_t, t, inputs["x0"]).mean(dim=(2, 3))

    plain, offset = noise_means(0.0), noise_means(0.5)
    assert plain.std() < 0.12 < 0.3 < offset.std()  # 16x16 pixels: plain noise averages to ~1/16
    with torch.no_grad():  # 0 is exactly the plain objective (runs without the option are unchanged)
        a = compute_losses(model, inputs, schedule, torch.Generator().manual_seed(3), no_amp)["loss"]
        b = compute_losses(model, inputs, schedule, torch.Generator().manual_seed(3), no_amp, 0.0)["loss"]
    assert torch.equal(a, b)

    common = {**TINY, "tokenizer": str(tokenizer_file), "max_steps": 1}
    result = run("pretrain", **common, offset_noise=0.1, out=str(tmp_path / "offset"))
    assert load_model(result.model_dir, device="cpu").info.training["offset_noise"] == 0.1
    with pytest.raises(ValueError, match="--offset-noise"):
        run("pretrain", **common, offset_noise=2.0, out=str(tmp_path / "bad"))


def test_layout_noise_adds_coarse_noise_and_is_recorded(tmp_path, tokenizer_file):
    """--layout-noise: the noise the model learns to predict gets extra energy on coarse grids (block means
    of 4x4 pixels vary far more than plain noise's), barely any at the pixel level; 0 is the plain objective."""
    model, inputs, schedule, no_amp, seen = noise_test_setup(tokenizer_file)

    def training_noise(**kw):
        compute_losses(model, inputs, schedule, torch.Generator().manual_seed(3), no_amp, **kw)
        x_t, t = seen.pop()
        return schedule.eps_from_x0(x_t, t, inputs["x0"])

    plain, layout = training_noise(), training_noise(layout_noise=0.3)
    block_var = lambda noise: torch.nn.functional.avg_pool2d(noise, 4).var().item()  # noqa: E731
    assert block_var(plain) < 0.08 and block_var(layout) > 2 * block_var(plain)  # plain: 1/16 for 16-pixel blocks
    assert layout.var().item() < 1.5
    with torch.no_grad():
        a = compute_losses(model, inputs, schedule, torch.Generator().manual_seed(3), no_amp)["loss"]
        b = compute_losses(model, inputs, schedule, torch.Generator().manual_seed(3), no_amp, layout_noise=0.0)["loss"]
    assert torch.equal(a, b)

    common = {**TINY, "tokenizer": str(tokenizer_file), "max_steps": 1}
    result = run("pretrain", **common, layout_noise=0.1, out=str(tmp_path / "layout"))
    assert load_model(result.model_dir, device="cpu").info.training["layout_noise"] == 0.1
    with pytest.raises(ValueError, match="--layout-noise"):
        run("pretrain", **common, layout_noise=-0.1, out=str(tmp_path / "bad"))


def test_high_noise_weight_makes_the_loss_v_like_up_to_its_cap_and_is_recorded(tmp_path, tokenizer_file):
    """--high-noise-weight C: each example's eps loss is weighted by min(1 / alpha-bar_t, C), so low t keeps
    weight ~1 and high t gets C; the logged "mse" stays the plain eps loss; 1 is the plain objective."""
    model, inputs, schedule, no_amp, seen = noise_test_setup(tokenizer_file)
    with torch.no_grad():
        plain = compute_losses(model, inputs, schedule, torch.Generator().manual_seed(3), no_amp)
        _, t = seen.pop()
        weighted = compute_losses(model, inputs, schedule, torch.Generator().manual_seed(3), no_amp,
                                  high_noise_weight=20.0)
    torch.testing.assert_close(weighted["mse"], plain["mse"])
    weight = (weighted["loss"] - weighted["vb"]) / weighted["mse"]
    abar = torch.as_tensor(schedule.alphas_cumprod)[t]
    assert torch.allclose(weight[t < 100], torch.ones(1), atol=0.03)  # alpha-bar ~1 at low noise
    assert torch.allclose(weight[t > 900], torch.full((1,), 20.0))  # 1 / alpha-bar > 40 there: capped
    mid = (t > 300) & (t < 800)
    torch.testing.assert_close(weight[mid], (1 / abar[mid]).float())
    assert (t < 100).any() and (t > 900).any() and mid.any()

    common = {**TINY, "tokenizer": str(tokenizer_file), "max_steps": 1}
    result = run("pretrain", **common, high_noise_weight=20.0, out=str(tmp_path / "weighted"))
    assert load_model(result.model_dir, device="cpu").info.training["high_noise_weight"] == 20.0
    with pytest.raises(ValueError, match="--high-noise-weight"):
        run("pretrain", **common, high_noise_weight=0.5, out=str(tmp_path / "bad"))


def test_high_timestep_sampling_draws_more_high_noise_and_is_recorded(tmp_path, tokenizer_file):
    """--timesteps high: p(t) proportional to t + 1 (mean about 2T/3, three times as many draws in the top
    half as in the bottom); uniform stays torch.randint's draw, so existing runs resume unchanged."""
    T = 1000
    high = draw_timesteps(200_000, T, torch.Generator().manual_seed(0), "cpu", "high")
    assert high.min() >= 0 and high.max() == T - 1
    assert abs(high.float().mean().item() - 2 * T / 3) < 5
    top, bottom = (high >= T // 2).sum().item(), (high < T // 2).sum().item()
    assert 2.9 < top / bottom < 3.1  # integral of 2u over [1/2, 1] against [0, 1/2]: 3/4 against 1/4
    uniform = draw_timesteps(1000, T, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(uniform, torch.randint(0, T, (1000,), generator=torch.Generator().manual_seed(0)))

    common = {**TINY, "tokenizer": str(tokenizer_file), "max_steps": 1}
    result = run("pretrain", **common, timesteps="high", out=str(tmp_path / "high"))
    assert load_model(result.model_dir, device="cpu").info.training["timesteps"] == "high"
    with pytest.raises(ValueError, match="--timesteps"):
        run("pretrain", **common, timesteps="low", out=str(tmp_path / "bad"))


def test_min_timestep_trains_only_at_the_top_of_the_schedule_and_is_recorded(tmp_path, tokenizer_file):
    """--min-timestep m: both samplings draw only from {m..T-1} (uniform evenly, high still rising with t),
    every timestep of the range is reachable, 0 leaves the draws as they were, and a bad m is refused."""
    T, m = 1000, 850
    uniform = draw_timesteps(100_000, T, torch.Generator().manual_seed(0), "cpu", "uniform", m)
    high = draw_timesteps(100_000, T, torch.Generator().manual_seed(0), "cpu", "high", m)
    for t in (uniform, high):
        assert t.min() == m and t.max() == T - 1 and len(t.unique()) == T - m
    assert abs(uniform.float().mean().item() - (m + T - 1) / 2) < 1
    assert high.float().mean() > uniform.float().mean() + 1  # p(t) proportional to t + 1 on the range
    for sampling in ("uniform", "high"):
        assert torch.equal(draw_timesteps(500, T, torch.Generator().manual_seed(4), "cpu", sampling, 0),
                           draw_timesteps(500, T, torch.Generator().manual_seed(4), "cpu", sampling))

    common = {**TINY, "tokenizer": str(tokenizer_file), "max_steps": 1}
    result = run("pretrain", **common, min_timestep=m, out=str(tmp_path / "top"))
    assert load_model(result.model_dir, device="cpu").info.training["min_timestep"] == m
    with pytest.raises(ValueError, match="--min-timestep"):
        run("pretrain", **common, min_timestep=1000, out=str(tmp_path / "bad"))


def test_lr_decays_after_warm_up_to_the_end_of_a_continued_run_and_is_recorded(tmp_path, tokenizer_file):
    """--lr-schedule cosine/linear: warm-up, then a decay from --lr to --lr-min that ends at --max-steps,
    counted from where a warm start continues; the step log shows it and the export records it."""
    common = {**TINY, "tokenizer": str(tokenizer_file), "log_every": 1}
    first = run("pretrain", **common, max_steps=3, out=str(tmp_path / "first"))
    assert load_model(first.model_dir, device="cpu").info.training["lr_schedule"] == "constant"
    # the warm start continues at step 3, so --max-steps 11 leaves 8 steps: 2 of warm-up and 6 of decay
    second = run("pretrain", **common, init=str(first.model_dir), max_steps=11, lr_schedule="cosine",
                 lr_min=1e-5, out=str(tmp_path / "second"))
    lrs = [r["lr"] for r in read_log(tmp_path / "second") if "loss" in r]
    assert len(lrs) == 8 and lrs[:3] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))  # decreasing after the warm-up
    assert lrs[5] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # half-way down the cosine
    record = load_model(second.model_dir, device="cpu").info.training
    assert (record["lr_schedule"], record["lr_min"], record["lr_decay_steps"]) == ("cosine", 1e-5, 6)

    cfg = TrainConfig(lr=1e-3, warmup=0, lr_schedule="linear", lr_min=0.0)
    assert [get_lr(cfg, s, 4) for s in range(6)] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0, 0.0])
    with pytest.raises(ValueError, match="--lr-decay-steps"):  # no end to decay towards
        run("pretrain", **common, lr_schedule="linear", max_minutes=1, out=str(tmp_path / "endless"))
    with pytest.raises(ValueError, match="--lr-decay-steps"):  # --max-steps already behind the warm start
        run("pretrain", **common, init=str(first.model_dir), max_steps=3, lr_schedule="linear",
            out=str(tmp_path / "behind"))


def test_a_warm_start_can_grow_zero_initialised_parts_and_refuses_other_shape_changes(tmp_path, tokenizer_file):
    """--init with --model-config '{"attention_pos_emb": true, "text_layout": 4}' fine-tunes a trained
    model with position features and a layout map added (they start at zero, so training starts from its
    output); any other config change with --init is named, not silently ignored."""
    common = {**TINY, "tokenizer": str(tokenizer_file)}
    first = run("pretrain", **common, max_steps=2, out=str(tmp_path / "first"))
    grown = run("pretrain", **common, init=str(first.model_dir), model={"attention_pos_emb": True, "text_layout": 4},
                max_steps=4, out=str(tmp_path / "grown"))
    model = load_model(grown.model_dir, device="cpu")
    assert model.config.attention_pos_emb and model.config.text_layout == 4
    for part in (".pos_proj.", "layout_proj."):  # the new parts trained
        moved = [p.abs().max().item() for n, p in model.named_parameters() if part in n]
        assert moved and max(moved) > 0, part
    with pytest.raises(ValueError, match="num_channels"):
        run("pretrain", **common, init=str(first.model_dir), model={"num_channels": 64}, max_steps=4,
            out=str(tmp_path / "wider"))
    with pytest.raises(ValueError, match="text_layout=8"):  # a trained map cannot be resized
        run("pretrain", **common, init=str(grown.model_dir), model={"text_layout": 8}, max_steps=6,
            out=str(tmp_path / "resized"))


def test_train_only_trains_the_named_parts_and_leaves_the_rest_as_loaded(tmp_path, tokenizer_file):
    """--train-only layout_from_text,layout_proj teaches a grown layout map while every other weight stays
    exactly as the --init model had it; the choice is recorded and kept on resume, and a prefix naming
    nothing is refused."""
    common = {**TINY, "tokenizer": str(tokenizer_file)}
    first = run("pretrain", **common, max_steps=2, out=str(tmp_path / "first"))
    taught = run("pretrain", **common, init=str(first.model_dir), model={"text_layout": 4},
                 train_only="layout_from_text,layout_proj", ema_decay=0.0, max_steps=5, out=str(tmp_path / "taught"))
    before = load_model(first.model_dir, device="cpu").state_dict()
    after = load_model(taught.model_dir, device="cpu")
    assert after.info.training["train_only"] == "layout_from_text,layout_proj"
    assert after.layout_proj.weight.abs().max() > 0  # it started at zero
    for name, value in after.state_dict().items():
        if not name.startswith(("layout_from_text", "layout_proj")):
            assert torch.equal(value, before[name]), name
    with pytest.raises(ValueError, match="xf_blocks"):
        run("pretrain", **common, init=str(first.model_dir), train_only="xf_blocks", max_steps=4,
            out=str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="--train-only"):  # the optimizer state holds only those parts
        run("pretrain", resume=True, out=str(tmp_path / "taught"), train_only="transformer", max_steps=7)


def test_widening_for_inpainting_leaves_the_output_unchanged_to_the_last_bit():
    for preset in ("tiny", "base"):
        model = tiny_model(preset)
        wide = widen_for_inpainting(model).eval()
        assert wide.config.inpaint and wide.input_blocks[0][0].weight.shape[1] == 7
        S = model.config.image_size
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(2, 3, S, S, generator=g), torch.tensor([3, 900])
        tokens, mask = torch.randint(0, 40, (2, 48), generator=g), torch.rand(2, 48, generator=g) > 0.5
        image, known = torch.randn(2, 3, S, S, generator=g), (torch.rand(2, 1, S, S, generator=g) > 0.5).float()
        with torch.no_grad():
            before = model(x, t, tokens, mask)
            after = wide(x, t, tokens, mask, inpaint_image=image, inpaint_mask=known)
        assert before.abs().mean() > 0.01
        assert torch.equal(before, after), (after - before).abs().max()
        with pytest.raises(ValueError, match="already"):
            widen_for_inpainting(wide)


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_widening_an_upsampler_moves_the_low_res_columns():
    model = tiny_model("tiny-upsampler")
    wide = widen_for_inpainting(model).eval()
    assert wide.input_blocks[0][0].weight.shape[1] == 10
    S = model.config.image_size
    g = torch.Generator().manual_seed(0)
    x, low = torch.randn(2, 3, S, S, generator=g), torch.randn(2, 3, S // 4, S // 4, generator=g)
    tokens, mask, t = torch.randint(0, 40, (2, 48), generator=g), torch.ones(2, 48, dtype=torch.bool), torch.tensor([5, 500])
    image, known = torch.randn(2, 3, S, S, generator=g), (torch.rand(2, 1, S, S, generator=g) > 0.5).float()
    # oneDNN blocks the 10-channel reduction differently (1e-6 apart); the reference conv is exact
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        before = model(x, t, tokens, mask, low_res=low)
        after = wide(x, t, tokens, mask, low_res=low, inpaint_image=image, inpaint_mask=known)
    assert torch.equal(before, after)


def test_graft_carries_the_base_update_to_its_inpainting_model(tmp_path, tokenizer_file):
    """A freshly widened model grafted with the base's update equals the widened new base; a
    fine-tuned one moves by exactly the base's update; mismatched models are refused by name."""
    n_vocab = PromptTokenizer.from_tokenizer_json(tokenizer_file).vocab_size
    old, new = tiny_model("tiny", n_vocab), tiny_model("tiny", n_vocab)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    tuned = widen_for_inpainting(old)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folders = {}
    for label, model in (("old", old), ("new", new), ("fresh", widen_for_inpainting(old)), ("tuned", tuned),
                         ("new-wide", widen_for_inpainting(new))):
        folders[label] = tmp_path / label
        save_model(model, folders[label], noise_schedule="squaredcos_cap_v2", tokenizer_file=tokenizer_file,
                   training={"stage": label}, dtype=torch.float32)
    grafted = graft_update(folders["fresh"], folders["old"], folders["new"], tmp_path / "g1", dtype=torch.float32)
    want = load_model(folders["new-wide"], device="cpu", dtype=torch.float32).state_dict()
    got = load_model(grafted, device="cpu", dtype=torch.float32).state_dict()
    assert all(torch.allclose(got[k].float(), want[k].float(), atol=1e-6) for k in want)
    assert got[FIRST_CONV][:, 3:].abs().max() == 0  # the inpainting inputs' columns stay zero

    exit_code = main_graft(["--target", str(folders["tuned"]), "--old-base", str(folders["old"]),
                            "--new-base", str(folders["new"]), "--out", str(tmp_path / "g2")])
    assert exit_code == 0
    got = load_model(tmp_path / "g2", device="cpu", dtype=torch.float32)
    a, b, t = old.state_dict(), new.state_dict(), tuned.state_dict()
    for k, v in got.state_dict().items():
        delta = b[k] - a[k]
        expect = t[k].clone()
        if k == FIRST_CONV:
            expect[:, :3] += delta
        else:
            expect += delta
        assert torch.equal(v, expect.half().float()), k  # the CLI stores fp16, as shipped
    record = got.info.training
    assert record["stage"] == "graft" and record["target"]["training"] == {"stage": "tuned"}
    assert record["old_base"]["training"] == {"stage": "old"} and record["new_base"]["training"] == {"stage": "new"}

    with pytest.raises(CheckpointError, match="different configs"):
        graft_update(folders["tuned"], folders["old"], folders["fresh"], tmp_path / "bad")
    save_model(tiny_model("tiny-upsampler", n_vocab), tmp_path / "up", noise_schedule="squaredcos_cap_v2",
               tokenizer_file=tokenizer_file)
    with pytest.raises(CheckpointError, match="not the base's architecture"):
        graft_update(tmp_path / "up", folders["old"], folders["new"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_relabel_renames_a_shipped_models_run_paths_at_every_depth(tmp_path, tokenizer_file, capsys):
    """After shipping, a record's "runs/..." init paths are relabelled everywhere they nest; weights stay;
    a path found nowhere (a typo) writes nothing."""
    chain = {"steps": 9, "init": {"path": "runs/prev/base", "training": {
        "init": {"path": "runs/leg1/model", "training": {"init": {"path": "runs/prev/base", "training": None}}}}}}
    folder = tmp_path / "base"
    save_model(tiny_model("tiny"), folder, noise_schedule="squaredcos_cap_v2", tokenizer_file=tokenizer_file,
               training=chain)
    weights = (folder / "model.safetensors").read_bytes()
    before = (folder / "config.json").read_text()
    label = "assets/models/base (as shipped at abc1234)"
    assert main_relabel([str(folder), "--path", f"runs/prev/base={label}", "--path", "runs/typo=x"]) == 2
    assert "runs/typo" in capsys.readouterr().err and (folder / "config.json").read_text() == before
    assert main_relabel([str(folder), "--path", f"runs/prev/base={label}"]) == 0
    assert "2 places" in capsys.readouterr().out
    record = load_model(folder, device="cpu").info.training
    assert record["init"]["path"] == label and record["steps"] == 9
    assert record["init"]["training"]["init"]["path"] == "runs/leg1/model"
    assert record["init"]["training"]["init"]["training"]["init"]["path"] == label
    assert (folder / "model.safetensors").read_bytes() == weights
    assert main_relabel([str(folder), "--path", "no-equals-sign"]) == 2
    capsys.readouterr()
    (folder / "config.json").write_text("{ truncated")
    assert main_relabel([str(folder), "--path", f"{label}=x"]) == 2
    assert str(folder / "config.json") in capsys.readouterr().err
    assert (folder / "config.json").read_text() == "{ truncated"


def test_masks_follow_glide_convention_and_are_deterministic():
    for kind in ("box", "ellipse", "brush", "outpaint", "whole"):
        for seed in range(5):
            m = random_mask(np.random.default_rng(seed), 32, {kind: 1.0})
            assert m.shape == (32, 32) and m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0}
            assert (m == 0).any()  # something is always erased
            if kind == "whole":
                assert not m.any()
            else:
                assert m.any()  # and something known
            assert np.array_equal(m, random_mask(np.random.default_rng(seed), 32, {kind: 1.0}))


# --------------------------------------------------------------------------- data


def test_batches_are_position_indexed_and_independent_of_workers(tokenizer_file):
    tok = PromptTokenizer.from_tokenizer_json(tokenizer_file)
    dataset = TrainingDataset(ShapesSource(16), tok, 48, seed=3, masks={"box": 1.0})

    def first(workers, start=0, rank=0, world=1, n=2):
        it = iter(make_loader(dataset, start, 4, rank, world, workers))
        return [next(it) for _ in range(n)]

    a, b = first(0), first(2)
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert a[0]["index"].tolist() == [0, 1, 2, 3] and a[1]["index"].tolist() == [4, 5, 6, 7]
    later = first(0, start=4, n=1)[0]  # a resumed loader continues with exactly the next samples
    assert torch.equal(later["image"], a[1]["image"])
    r0, r1 = first(0, rank=0, world=2, n=1)[0], first(0, rank=1, world=2, n=1)[0]
    assert r0["index"].tolist() == [0, 2, 4, 6] and r1["index"].tolist() == [1, 3, 5, 7]
    drops = sum(bool(dataset[i]["token_mask"].any()) is False for i in range(200))
    assert 20 <= drops <= 60  # about 20% empty captions


def test_folder_with_bad_files_trains_on_the_rest_and_reports_them(tmp_path, tokenizer_file):
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(data / f"good{i}.png")
        (data / f"good{i}.txt").write_text("a red circle\na red circle on a gray background\n")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(data / "listed.jpg")
    (data / "captions.jsonl").write_text(json.dumps({"file": "listed.jpg", "caption": "a blue star"}) + "\n")
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (data / "corrupt.txt").write_text("a green square")
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(data / "no_caption.png")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(data / "tiny.png")
    (data / "tiny.txt").write_text("a red square")

    out = tmp_path / "run"
    result = run("pretrain", **{**TINY, "out": str(out), "data": str(data), "max_steps": 2,
                                "tokenizer": str(tokenizer_file)})
    assert result.step == 2 and result.stop_reason == "max_steps"
    skipped = {Path(p).name: reason for p, reason in result.skipped}
    assert set(skipped) == {"corrupt.png", "no_caption.png", "tiny.png"}
    assert "unreadable" in skipped["corrupt.png"] and "no caption" in skipped["no_caption.png"]
    assert "too small" in skipped["tiny.png"] and "1x1" in skipped["tiny.png"]
    report = json.loads((out / "data_report.json").read_text())
    assert report["used"] == 4 and len(report["skipped"]) == 3
    assert read_log(out)[0]["skipped"]  # the log's start event carries the report for the studio


# --------------------------------------------------------------------------- runs that survive


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, tokenizer_file):
    common = {**TINY, "tokenizer": str(tokenizer_file), "seed": 5}
    full = run("pretrain", **common, out=str(tmp_path / "full"), max_steps=6)
    # stopped at 3 (sharded checkpoint), resumed with other workers/log settings to 6
    part = run("pretrain", **common, out=str(tmp_path / "part"), max_steps=3, checkpoint_shard_mb=0.5)
    assert part.step == 3 and len(json.loads((tmp_path / "part/checkpoint.json").read_text())["files"]) > 1
    resumed = run("pretrain", out=str(tmp_path / "part"), resume=True, max_steps=6, workers=2, log_every=5,
                  quiet=True)
    assert resumed.step == full.step == 6
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    for key in ("model", "ema", "optimizer"):
        assert states_equal(a[key], b[key]), key
    assert a["data_position"] == b["data_position"] == 24 and a["loss_ema"] == b["loss_ema"]
    steps_a = [r["loss"] for r in read_log(tmp_path / "full") if "loss" in r]
    steps_b = [r["loss"] for r in read_log(tmp_path / "part") if "loss" in r]
    assert steps_a == steps_b and len(steps_a) == 6
    # the export loads with the shared loader and carries the training record and tokenizer
    model = load_model(tmp_path / "part/model", device="cpu")
    assert model.info.tokenizer is not None and model.config.n_vocab == model.info.tokenizer.vocab_size
    record = model.info.training
    assert record["steps"] == 6 and record["images_seen"] == 24 and record["stage"] == "pretrain"
    assert {"data", "wall_time_s", "hardware", "final_loss", "batch_size", "lr"} <= set(record)
    with pytest.raises(ValueError, match="batch"):  # a resumed run must keep what decides its data
        run("pretrain", out=str(tmp_path / "part"), resume=True, batch_size=8, quiet=True)
    with pytest.raises(FileExistsError):
        run("pretrain", **common, out=str(tmp_path / "part"), max_steps=1)


def test_sigterm_saves_and_resume_matches_uninterrupted(tmp_path, tokenizer_file):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipelines.training", "pretrain", "--preset", "tiny", "--out", str(out),
           "--batch-size", "4", "--lr", "1e-3", "--warmup", "2", "--log-every", "1", "--sample-every", "0",
           "--workers", "2", "--device", "cpu", "--max-steps", "10000", "--seed", "9",
           "--tokenizer", str(tokenizer_file)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        log = out / "log.jsonl"
        if log.is_file() and sum('"loss"' in line for line in log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)  # as Ctrl-C or `timeout` do: the DataLoader workers get it too
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "stopped by user; saved at step" in output
    k = load_checkpoint(out)["step"]
    assert 3 <= k < 10000
    resumed = run("pretrain", out=str(out), resume=True, max_steps=k + 2, workers=0, quiet=True)
    full = run("pretrain", **{**TINY, "log_every": 1}, out=str(tmp_path / "full"), max_steps=k + 2, seed=9,
               tokenizer=str(tokenizer_file))
    assert resumed.step == full.step == k + 2
    a, b = load_checkpoint(out), load_checkpoint(tmp_path / "full")
    assert states_equal(a["model"], b["model"]) and states_equal(a["ema"], b["ema"])


def test_two_ddp_processes_end_with_identical_weights(tmp_path, tokenizer_file):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pipelines.training", "pretrain", "--preset", "tiny", "--out", str(out), "--batch-size", "2",
           "--max-steps", "3", "--log-every", "1", "--sample-every", "0", "--workers", "0", "--device", "cpu",
           "--tokenizer", str(tokenizer_file), "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = read_log(out)
    start = next(r for r in log if r.get("event") == "start")
    end = next(r for r in log if r.get("event") == "end")
    assert start["world_size"] == 2 and start["global_batch"] == 4
    hashes = end["rank_weight_hashes"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    assert load_checkpoint(out)["data_position"] == 12


# --------------------------------------------------------------------------- the other stages


def test_finetune_inpaint_and_upsampler_stages_export_loadable_models(tmp_path, tokenizer_file):
    common = {**TINY, "tokenizer": str(tokenizer_file), "max_steps": 2}
    base = run("pretrain", **common, out=str(tmp_path / "base"))
    finetune = {k: v for k, v in common.items() if k not in ("preset", "tokenizer")}
    inpaint = run("finetune-inpaint", **{**finetune, "sample_every": 2, "samples": 2, "sample_steps": 2},
                  init=base.model_dir, out=str(tmp_path / "inpaint"))
    model = load_model(inpaint.model_dir, device="cpu")
    assert model.config.inpaint and model.input_blocks[0][0].weight.shape[1] == 7
    assert model.info.name == "base-inpaint" and model.info.training["init"]["stage"] == "pretrain"
    assert (tmp_path / "inpaint/samples/step-00000002.png").is_file()
    events = [json.loads(line) for line in (tmp_path / "inpaint/log.jsonl").read_text().splitlines()]
    gains = [e["caption_gain"] for e in events if e.get("event") == "samples"]
    assert gains and all(np.isfinite(g) for g in gains)

    up = run("upsampler", **{**common, "preset": "tiny-upsampler"}, out=str(tmp_path / "up"))
    upsampler = load_model(up.model_dir, device="cpu")
    assert upsampler.config.super_res and upsampler.info.noise_schedule == "linear"
    up_inpaint = run("finetune-inpaint", **finetune, init=up.model_dir, upsampler=True, out=str(tmp_path / "up-inpaint"))
    wide = load_model(up_inpaint.model_dir, device="cpu")
    assert wide.config.inpaint and wide.config.super_res and wide.input_blocks[0][0].weight.shape[1] == 10

    # --init of an export from the same stage continues its data position and counters
    more = run("pretrain", **{**common, "max_steps": 3}, out=str(tmp_path / "more"), init=base.model_dir)
    assert more.step == 3 and more.images_seen == 12
    # the warm start's whole record is kept, so a chain of runs on different machines stays traceable
    chained = load_model(more.model_dir, device="cpu").info.training
    assert chained["init"]["training"] == load_model(base.model_dir, device="cpu").info.training


def test_cli_has_help_for_every_stage():
    parser = build_parser()
    for stage in ("pretrain", "finetune-inpaint", "upsampler"):
        with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stdout(open(os.devnull, "w")):
            parser.parse_args([stage, "--help"])
        assert exit_info.value.code == 0
    args = vars(parser.parse_args(["pretrain", "--max-steps", "5", "--compile"]))
    assert args == {"stage": "pretrain", "max_steps": 5, "compile": True}  # only what was given is passed on


def cut_text_from_image(model) -> None:
    """Zero every path from the caption to the image: attention's text keys and values, the pooled
    vector's projection and the layout map's convolution."""
    for name, p in model.named_parameters():
        if "encoder_kv" in name or "transformer_proj" in name or name.startswith("layout_proj"):
            p.data.zero_()


def test_caption_gain_measures_how_much_the_text_is_used(shipped_models):
    model = load_model(shipped_models / "base", device="cpu", dtype=torch.float32)
    data = TrainingDataset(ShapesSource(64), model.info.tokenizer, model.config.text_ctx, seed=7919, caption_drop=0.0)
    schedule, cpu, no_amp = make_schedule(model.info.noise_schedule), torch.device("cpu"), contextlib.nullcontext()
    assert caption_gain(model, data, schedule, cpu, no_amp, n=32) > 0.02  # the shipped base uses its text a little
    cut_text_from_image(model)
    assert caption_gain(model, data, schedule, cpu, no_amp, n=32) == 0.0


def test_caption_part_use_finds_which_words_the_model_reads(shipped_models):
    """bench.caption_use --parts: a wrong colour raises the shipped base's error at t = 700 (it reads
    colours); with the text cut off from the image no wrong word changes anything."""
    from pipelines.bench.caption_use import CAPTION_PARTS, caption_part_use
    model = load_model(shipped_models / "base", device="cpu", dtype=torch.float32)
    (row,) = caption_part_use(model, items=8, timesteps=(700,))
    assert row["color"] > 0.05 and {*CAPTION_PARTS, "relation"} <= row.keys()
    cut_text_from_image(model)
    (row,) = caption_part_use(model, items=8, timesteps=(700,))
    assert all(row[part] == 0.0 for part in (*CAPTION_PARTS, "relation"))


def test_relation_part_says_the_opposite_relation():
    """The relation column's wrong caption is the true one with the opposite relation, which is false."""
    from pipelines.bench.caption_use import _relation_flipped
    from pipelines.bench.shapes import check_prompt
    rng = np.random.default_rng(5)
    flipped = 0
    while flipped < 20:
        spec = shapes.random_scene(rng)
        for caption in shapes.relational_captions(spec):
            wrong = _relation_flipped(caption)
            assert wrong != caption and check_prompt(wrong, spec)["relation"] is False, (caption, wrong)
            flipped += 1


def test_caption_use_measures_at_the_noise_levels_asked_for(shipped_models, capsys):
    """--timesteps picks the rows (the top of the schedule is where position words would count);
    a level off the schedule or a non-number is refused by name."""
    from pipelines.bench.caption_use import main
    main(["--model", str(shipped_models), "--parts", "--items", "2", "--timesteps", "960,990"])
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["960", "990"]
    for bad in ("1000", "high"):
        with pytest.raises(SystemExit):
            main(["--model", str(shipped_models), "--timesteps", bad])
        assert "--timesteps" in capsys.readouterr().err


def test_unknown_caption_words_are_counted(tokenizer_file):
    tok = PromptTokenizer.from_tokenizer_json(tokenizer_file)
    assert unknown_word_fraction(tok, ["a red circle", "a blue star."]) == 0.0  # a full stop is not a word
    assert unknown_word_fraction(tok, ["a fluffy dog", "a red circle"]) == 2 / 6


@pytest.mark.parametrize("option, value", [("grad_clip", -1.0), ("ema_decay", float("nan")), ("ema_decay", -3.0),
                                           ("checkpoint_every", 0), ("sample_steps", 0), ("max_steps", -1),
                                           ("max_minutes", -1.0), ("precision", "fp16"), ("lr", float("inf")),
                                           ("lr", 0.0), ("masks", "box=nan"), ("lr_schedule", "step"),
                                           ("lr_min", 1.0), ("lr_decay_steps", -5)])
def test_options_that_would_train_wrongly_in_silence_are_refused(tmp_path, tokenizer_file, option, value):
    stage = "finetune-inpaint" if option == "masks" else "pretrain"
    extra = {"init": str(tmp_path / "none")} if stage == "finetune-inpaint" else {}
    with pytest.raises(ValueError, match=option.split("_")[0].replace("masks", "mask")):
        run(stage, **{**TINY, "tokenizer": str(tokenizer_file), option: value, "out": str(tmp_path / "r"), **extra})
    assert not (tmp_path / "r" / "checkpoint.json").exists()


def test_a_diverged_run_stops_without_saving_over_its_checkpoint(tmp_path, tokenizer_file, monkeypatch):
    """A NaN loss (here forced from step 4 on) stops the run with a message; the checkpoint and
    export of step 2 stay as they were, and --resume continues from them."""
    import pipelines.training.train as train_module

    common = {**TINY, "tokenizer": str(tokenizer_file), "checkpoint_every": 2, "log_every": 1}
    out = tmp_path / "run"
    run("pretrain", **common, out=str(out), max_steps=2)
    manifest, weights = (out / "checkpoint.json").read_bytes(), (out / "model" / "model.safetensors").read_bytes()
    real = train_module.compute_losses
    calls = []

    def nan_from_the_second_call(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls.append(1)
        return {k: v * float("nan") for k, v in losses.items()} if len(calls) >= 2 else losses

    monkeypatch.setattr(train_module, "compute_losses", nan_from_the_second_call)
    with pytest.raises(train_module.TrainingDiverged, match="diverged at step 4.*intact"):
        run("pretrain", resume=True, out=str(out), max_steps=6, quiet=True)
    assert (out / "checkpoint.json").read_bytes() == manifest
    assert (out / "model" / "model.safetensors").read_bytes() == weights
    monkeypatch.setattr(train_module, "compute_losses", real)
    assert run("pretrain", resume=True, out=str(out), max_steps=3, quiet=True).step == 3


def test_overwrite_starts_a_clean_run(tmp_path, tokenizer_file):
    common = {**TINY, "tokenizer": str(tokenizer_file), "log_every": 1}
    out = tmp_path / "run"
    run("pretrain", **{**common, "checkpoint_every": 1}, out=str(out), max_steps=3)
    run("pretrain", **common, out=str(out), max_steps=1, overwrite=True)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1]  # the old run's steps are gone
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-00000001.pt"]


def test_training_cli_names_bad_devices_configs_and_init_files(tmp_path, capsys):
    from pipelines.training.__main__ import main

    model_file = ROOT / "assets" / "models" / "base" / "model.safetensors"
    cases = [(["pretrain", "--device", "foo"], "unknown device"),
             (["pretrain", "--model-config", "[1]"], "JSON object"),
             (["pretrain", "--model-config", '{"num_channels": 0}'], "at least 1"),
             (["pretrain", "--model-config", '{"num_head_channels": 7}'], "cannot be built"),
             (["finetune-inpaint", "--init", str(model_file)], "not a model folder"),
             (["pretrain", "--captions", "longest"], "unknown caption form"),
             (["pretrain", "--captions", "dense=0.5,relational=lots"], "must be a number")]
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path / "r"), "--max-steps", "1", "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
