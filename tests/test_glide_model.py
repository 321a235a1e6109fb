"""GlideUNet: the released layouts (keys, shapes, parameter counts) and behaviour on tiny configs."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch

from pipelines.models.glide import GlideConfig, GlideUNet

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "glide"

# preset -> (manifest file, state-dict keys, parameters, in-channels of the first conv); from the reference README §1
RELEASED = {
    "base": ("manifest_base.tsv", 783, 385_030_726, 3),
    "upsample": ("manifest_upsample.tsv", 797, 398_361_286, 6),
    "base-inpaint": ("manifest_base_inpaint.tsv", 783, 385_037_638, 7),
    "upsample-inpaint": ("manifest_upsample_inpaint.tsv", 797, 398_368_198, 10),
}


def build_meta(preset: str) -> GlideUNet:
    with torch.device("meta"):  # no memory: only names and shapes
        return GlideUNet(GlideConfig.preset(preset))


# -----------------------------------------------------------------------------
# Released layouts


@pytest.mark.parametrize("preset", sorted(RELEASED))
def test_preset_counts(preset):
    _, n_keys, n_params, in_ch = RELEASED[preset]
    model = build_meta(preset)
    state = model.state_dict()
    assert len(state) == n_keys
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert sum(1 for _ in model.buffers()) == 0  # every state-dict entry is a parameter, as released
    assert tuple(state["input_blocks.0.0.weight"].shape) == (192, in_ch, 3, 3)
    assert tuple(state["out.2.weight"].shape) == (6, 192, 3, 3)
    assert model.config.in_channels == in_ch


@pytest.mark.parametrize("preset", sorted(RELEASED))
def test_preset_matches_manifest(preset):
    manifest_file = REFERENCE / RELEASED[preset][0]
    if not manifest_file.is_file():
        pytest.skip(f"reference manifest {manifest_file} not present")
    with open(manifest_file, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    expected = {r["key"]: tuple(int(s) for s in r["shape"].strip("[]").split(",") if s.strip()) for r in rows}
    got = {k: tuple(v.shape) for k, v in build_meta(preset).state_dict().items()}
    assert sorted(set(expected) - set(got)) == []  # missing in the model
    assert sorted(set(got) - set(expected)) == []  # not in the released file
    wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert wrong == {}
    assert sum(int(r["numel"]) for r in rows) == RELEASED[preset][2]


def test_preset_details():
    base = GlideConfig.preset("base")
    assert base.attention_downsample_factors == {2, 4, 8}
    assert base.channel_multipliers == (1, 2, 3, 4)
    up = GlideConfig.preset("upsample")
    assert up.attention_downsample_factors == {8, 16, 32}
    assert up.channel_multipliers == (1, 1, 2, 2, 4, 4)
    assert GlideConfig.preset("upsample-inpaint").in_channels == 10
    with pytest.raises(ValueError, match="unknown GLIDE preset"):
        GlideConfig.preset("large")
    # heads as released: channels / 64
    model = build_meta("base")
    heads = sorted({m.heads for m in model.modules() if type(m).__name__ == "AttentionBlock"})
    assert heads == [6, 9, 12]


def test_config_round_trip():
    c = GlideConfig.preset("upsample-inpaint")
    assert GlideConfig.from_dict(c.to_dict()) == c
    assert GlideConfig.from_dict({"channel_mult": [1, 2]}).channel_multipliers == (1, 2)
    with pytest.raises(ValueError, match="unknown GlideConfig fields"):
        GlideConfig.from_dict({"image_size": 64, "hidden_size": 3})


# -----------------------------------------------------------------------------
# Tiny configs


def tiny_config(**kw) -> GlideConfig:
    d = dict(image_size=16, num_channels=32, channel_mult="1,2", num_res_blocks=1, attention_resolutions="8",
             num_head_channels=32, dropout=0.0, text_ctx=8, xf_width=32, xf_layers=1, xf_heads=2, n_vocab=50)
    d.update(kw)
    return GlideConfig(**d)


def perturb(model: GlideUNet, seed: int = 0, std: float = 0.05) -> GlideUNet:
    """Add noise to every parameter, so the zero-initialised output convs let signal through."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tiny_model(seed: int = 0, **kw) -> GlideUNet:
    torch.manual_seed(seed)  # the model's own init uses the global RNG; fixed here for repeatability
    return GlideUNet(tiny_config(**kw)).eval()


def inputs(config: GlideConfig, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    S, T = config.image_size, config.text_ctx
    x = torch.randn(batch, 3, S, S, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    tokens = torch.randint(0, config.n_vocab, (batch, T), generator=g)
    mask = torch.zeros(batch, T, dtype=torch.bool)
    mask[:, :5] = True
    return x, t, tokens, mask


@pytest.mark.parametrize("kw", [{}, {"resblock_updown": False}, {"use_scale_shift_norm": False},
                                {"xf_padding": False, "xf_final_ln": False}])
def test_forward_shape_and_zero_init(kw):
    model = tiny_model(**kw)
    x, t, tokens, mask = inputs(model.config)
    with torch.no_grad():
        out = model(x, t, tokens, mask)
    assert out.shape == (2, 6, 16, 16)
    assert out.dtype == torch.float32
    assert torch.count_nonzero(out) == 0  # the final conv starts at zero
    with torch.no_grad():
        out = perturb(model)(x, t, tokens, mask)
    assert out.abs().mean() > 0 and torch.isfinite(out).all()


def test_inpaint_inputs():
    model = perturb(tiny_model(inpaint=True))
    assert model.input_blocks[0][0].weight.shape[1] == 7
    x, t, tokens, mask = inputs(model.config)
    g = torch.Generator().manual_seed(5)
    image = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    keep = torch.zeros(2, 1, 16, 16)
    keep[:, :, :8] = 1
    with torch.no_grad():
        out = model(x, t, tokens, mask, inpaint_image=image, inpaint_mask=keep)
        free = model(x, t, tokens, mask)  # missing inputs = nothing known
        zeros = model(x, t, tokens, mask, inpaint_image=torch.zeros_like(image), inpaint_mask=torch.zeros_like(keep))
        # only the known pixels of the image are seen: changing the unknown ones changes nothing
        image2 = image.clone()
        image2[:, :, 8:] = 0.3
        out2 = model(x, t, tokens, mask, inpaint_image=image2, inpaint_mask=keep)
    assert out.shape == (2, 6, 16, 16)
    assert torch.equal(free, zeros)
    assert not torch.allclose(out, free)
    assert torch.equal(out, out2)


def test_attention_positions_start_silent_then_tell_pixels_apart():
    """attention_pos_emb (not in the released GLIDE): off, the weights keep the released layout; on, its
    projections start at zero, so the output is the plain model's until training moves them."""
    from pipelines.models.glide import position_features
    plain = perturb(tiny_model())
    assert not any("pos_proj" in k for k in plain.state_dict())
    grown = tiny_model(attention_pos_emb=True)
    missing, unexpected = grown.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(".pos_proj." in k for k in missing) and not unexpected
    x, t, tokens, mask = inputs(plain.config)
    with torch.no_grad():
        assert torch.equal(plain(x, t, tokens, mask), grown(x, t, tokens, mask))
        for name, p in grown.named_parameters():
            if ".pos_proj." in name:
                p.add_(torch.randn_like(p) * 0.05)
        assert not torch.allclose(plain(x, t, tokens, mask), grown(x, t, tokens, mask))
    features = position_features(8, 8)  # every pixel of the grid gets its own feature vector
    assert features.shape == (32, 64) and torch.cdist(features.T, features.T).add(torch.eye(64)).min() > 0.1


def test_text_layout_starts_silent_then_places_by_caption():
    """text_layout (not in the released GLIDE): off, no parameters are added; on, its projection starts
    at zero, so the output is the plain model's; once trained, the map differs between captions, and the
    encoded text given once gives the same output as tokens given at every call."""
    plain = perturb(tiny_model())
    assert not any("layout" in k for k in plain.state_dict())
    grown = tiny_model(text_layout=4)
    missing, unexpected = grown.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all("layout" in k for k in missing) and not unexpected
    x, t, tokens, mask = inputs(plain.config)
    with torch.no_grad():
        assert torch.equal(plain(x, t, tokens, mask), grown(x, t, tokens, mask))
        grown.layout_proj.weight.add_(torch.randn_like(grown.layout_proj.weight) * 0.05)
        out = grown(x, t, tokens, mask)
        assert not torch.allclose(plain(x, t, tokens, mask), out)
        assert torch.equal(out, grown(x, t, text=grown.encode_text(tokens, mask)))
        _, _, layout = grown.encode_text(tokens, mask)
        side = grown.config.image_size // 2 ** (len(grown.config.channel_multipliers) - 1)
        assert layout.shape == (2, 4, side, side) and not torch.allclose(layout[0], layout[1])
        _, _, empty = grown.encode_text(tokens, torch.zeros_like(mask))  # no words: the learnt bias alone
        assert torch.allclose(empty[0], empty[1]) and torch.allclose(
            empty[0], grown.layout_from_text.bias.reshape(4, side, side))
    with pytest.raises(ValueError, match="text_layout"):
        tiny_model(text_layout=-1)


def test_super_res_inputs():
    model = perturb(tiny_model(super_res=True))
    assert model.input_blocks[0][0].weight.shape[1] == 6
    x, t, tokens, mask = inputs(model.config)
    low = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        out = model(x, t, tokens, mask, low_res=low)
        out_other = model(x, t, tokens, mask, low_res=-low)
    assert out.shape == (2, 6, 16, 16)
    assert not torch.allclose(out, out_other)
    with pytest.raises(ValueError, match="low_res"):
        model(x, t, tokens, mask)


def test_super_res_inpaint_inputs():
    model = tiny_model(super_res=True, inpaint=True)
    assert model.input_blocks[0][0].weight.shape[1] == 10
    x, t, tokens, mask = inputs(model.config, batch=1)
    out = model(x, t, tokens, mask, low_res=torch.zeros(1, 3, 8, 8), inpaint_image=torch.zeros_like(x),
                inpaint_mask=torch.ones_like(x[:, :1]))
    assert out.shape == (1, 6, 16, 16)


def test_wrong_image_size():
    model = tiny_model()
    _, t, tokens, mask = inputs(model.config)
    with pytest.raises(ValueError, match=r"\(32, 32\).*16x16"):
        model(torch.zeros(2, 3, 32, 32), t, tokens, mask)
    with pytest.raises(ValueError, match=r"\(16, 8\)"):
        model(torch.zeros(2, 3, 16, 8), t, tokens, mask)


@pytest.mark.parametrize("length", [7, 9])
def test_wrong_token_length(length):
    model = tiny_model()
    x, t, _, _ = inputs(model.config)
    tokens = torch.zeros(2, length, dtype=torch.long)
    mask = torch.ones(2, length, dtype=torch.bool)
    with pytest.raises(ValueError, match=rf"length {length}.*text_ctx is 8"):
        model(x, t, tokens, mask)


def test_text_conditioning_changes_output():
    model = perturb(tiny_model())
    x, t, tokens, mask = inputs(model.config)
    other = tokens.clone()
    other[:, :5] = (other[:, :5] + 7) % model.config.n_vocab
    with torch.no_grad():
        a = model(x, t, tokens, mask)
        b = model(x, t, other, mask)
        c = model(x, t, tokens, torch.zeros_like(mask))  # unconditional
    assert (a - b).abs().max() > 1e-4
    assert (a - c).abs().max() > 1e-4


def test_prompt_encoded_once_gives_the_same_output():
    # the pipelines encode the prompt once per call and pass `text` at every step
    model = perturb(tiny_model())
    x, t, tokens, mask = inputs(model.config)
    with torch.no_grad():
        text = model.encode_text(tokens, mask)
        assert torch.equal(model(x, t, text=text), model(x, t, tokens, mask))


def test_timestep_changes_output():
    model = perturb(tiny_model())
    x, t, tokens, mask = inputs(model.config)
    with torch.no_grad():
        assert (model(x, t, tokens, mask) - model(x, t + 1, tokens, mask)).abs().max() > 1e-5


def test_padded_slots_are_ignored():
    model = perturb(tiny_model())
    x, t, tokens, mask = inputs(model.config)  # slots 5..7 are padding
    other = tokens.clone()
    other[:, 5:] = (other[:, 5:] + 11) % model.config.n_vocab
    with torch.no_grad():
        assert torch.equal(model(x, t, tokens, mask), model(x, t, other, mask))
        # without xf_padding the token ids in those slots do count
        plain = perturb(tiny_model(xf_padding=False))
        assert not torch.allclose(plain(x, t, tokens, mask), plain(x, t, other, mask))


def test_batch_rows_independent():
    model = perturb(tiny_model())
    x, t, tokens, mask = inputs(model.config, batch=3)
    with torch.no_grad():
        full = model(x, t, tokens, mask)
        one = model(x[1:2], t[1:2], tokens[1:2], mask[1:2])
    torch.testing.assert_close(full[1:2], one, atol=1e-5, rtol=1e-4)


def test_dropout_only_in_train_mode():
    model = perturb(tiny_model(dropout=0.5))
    x, t, tokens, mask = inputs(model.config)
    with torch.no_grad():
        assert torch.equal(model(x, t, tokens, mask), model(x, t, tokens, mask))
        model.train()
        torch.manual_seed(0)
        a = model(x, t, tokens, mask)
        b = model(x, t, tokens, mask)
    assert not torch.equal(a, b)


def test_dtype_and_device_properties():
    model = tiny_model()
    assert model.dtype == torch.float32 and model.device == torch.device("cpu")
    assert model.to(torch.bfloat16).dtype == torch.bfloat16


def test_bf16_close_to_fp32():
    """A half-precision copy (the fast-path dtype handling: norms in fp32, inputs cast inside) stays close."""
    model = perturb(tiny_model(inpaint=True), std=0.02)
    half = copy.deepcopy(model).to(torch.bfloat16)
    x, t, tokens, mask = inputs(model.config)
    image, keep = torch.rand_like(x) * 2 - 1, torch.ones_like(x[:, :1])
    with torch.no_grad():
        ref = model(x, t, tokens, mask, inpaint_image=image, inpaint_mask=keep)
        out = half(x, t, tokens, mask, inpaint_image=image, inpaint_mask=keep)  # fp32 inputs, cast inside
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05, f"bf16 relative error {err:.4f}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_close_to_fp32():
    model = perturb(tiny_model(super_res=True), std=0.02)
    x, t, tokens, mask = inputs(model.config)
    low = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ref = model(x, t, tokens, mask, low_res=low)
        gpu = copy.deepcopy(model).to("cuda", torch.float16)
        args = [a.cuda() for a in (x, t, tokens, mask)]
        out = gpu(*args, low_res=low.cuda())
        ref32 = copy.deepcopy(model).cuda()(*args, low_res=low.cuda())
    assert out.dtype == torch.float16 and out.is_cuda
    assert torch.isfinite(out).all()
    err = (out.float().cpu() - ref).abs().max() / ref.abs().max()
    assert err < 0.01, f"fp16 relative error {err:.4f}"
    torch.testing.assert_close(ref32.cpu(), ref, atol=1e-3, rtol=1e-3)


def test_bench_naive_attention_matches_sdpa():
    """The benchmark's reference attention (einsum, softmax in fp32, as released) gives the model's outputs."""
    from pipelines.bench.speed import naive_attention, use_naive_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 16, generator=g) for _ in range(3))
    k, v = torch.cat([torch.randn(2, 3, 4, 16, generator=g), k], 2), torch.cat([torch.randn(2, 3, 4, 16), v], 2)
    torch.testing.assert_close(naive_attention(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)

    model = perturb(tiny_model(), std=0.05)
    x, t, tokens, mask = inputs(model.config)
    with torch.no_grad():
        fast = model(x, t, tokens, mask)
        with use_naive_attention():
            slow = model(x, t, tokens, mask)
        again = model(x, t, tokens, mask)  # the patch is undone
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=1e-4)
    assert torch.equal(again, fast)
