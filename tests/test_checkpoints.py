"""load_model / save_model: project folders (safetensors) and released GLIDE `.pt` files, and their error messages.

Released files are 1.5 GB; here they are stood in for by state dicts whose tensors are broadcast views of a tiny
storage (`expand`), so `torch.save` writes a few hundred kB while the loader sees every key at its full shape.
A test with a real full-size random file runs only with RUN_SLOW=1.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipelines.checkpoints import CheckpointError, load_model, save_model
from pipelines.models.glide import GlideConfig, GlideUNet

try:  # tests/ is a plain folder (rootdir on sys.path) or a package
    from tests.test_tokenizer import MERGES, synthetic_vocab, write_gpt2_files, write_word_level
except ImportError:
    from test_tokenizer import MERGES, synthetic_vocab, write_gpt2_files, write_word_level


def tiny_config(**kw) -> GlideConfig:
    d = dict(image_size=16, num_channels=32, channel_mult="1,2", num_res_blocks=1, attention_resolutions="8",
             num_head_channels=32, dropout=0.0, text_ctx=8, xf_width=32, xf_layers=1, xf_heads=2, n_vocab=20)
    d.update(kw)
    return GlideConfig(**d)


def tiny_model(seed=0, **kw) -> GlideUNet:
    torch.manual_seed(seed)
    model = GlideUNet(tiny_config(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move the zero-initialised convs off zero so outputs mean something
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def model_inputs(config: GlideConfig, batch=2):
    g = torch.Generator().manual_seed(1)
    S, T = config.image_size, config.text_ctx
    kw = dict(x=torch.randn(batch, 3, S, S, generator=g), timesteps=torch.tensor([3, 900])[:batch],
              tokens=torch.randint(0, config.n_vocab, (batch, T), generator=g),
              mask=torch.arange(T)[None].expand(batch, T) < 5)
    if config.super_res:
        kw["low_res"] = torch.rand(batch, 3, S // 4, S // 4, generator=g) * 2 - 1
    if config.inpaint:
        kw["inpaint_image"] = torch.rand(batch, 3, S, S, generator=g)
        kw["inpaint_mask"] = torch.ones(batch, 1, S, S)
    return kw


@pytest.fixture
def word_tokenizer(tmp_path):
    path = tmp_path / "src" / "tokenizer.json"
    path.parent.mkdir()
    write_word_level(path, ["a", "red", "circle"])
    return path


# -----------------------------------------------------------------------------
# Project folders


@pytest.mark.parametrize("kw", [{}, {"inpaint": True}, {"super_res": True}])
def test_round_trip_exact(tmp_path, word_tokenizer, kw):
    model = tiny_model(**kw)
    training = {"data": "shapes", "steps": 12, "final_loss": 0.25}
    save_model(model, tmp_path / "m", noise_schedule="linear", tokenizer_file=word_tokenizer, training=training,
               name="tiny", dtype=torch.float32)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors",
                                                                   "tokenizer.json"]
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["architecture"] == "glide" and meta["tokenizer"] == "tokenizer.json"

    loaded = load_model(tmp_path / "m", device="cpu")
    assert loaded.config == model.config
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu") and not loaded.training
    info = loaded.info
    assert (info.name, info.noise_schedule, info.training) == ("tiny", "linear", training)
    assert info.source == str(tmp_path / "m")
    assert info.tokenizer is not None and info.tokenizer(["A red circle"], 8).mask.sum() == 3
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    inputs = model_inputs(model.config)
    with torch.no_grad():
        # on the CPU load_model lays the weights out channels_last (faster convolutions): the same
        # maths in another summation order, and the output comes back in the usual NCHW layout
        assert loaded.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        out = loaded(**inputs)
        assert out.is_contiguous()
        torch.testing.assert_close(out, model(**inputs), rtol=1e-5, atol=1e-5)


def test_round_trip_fp16_storage(tmp_path):
    model = tiny_model()
    save_model(model, tmp_path / "m", noise_schedule="squaredcos_cap_v2")  # default: fp16 weights on disk
    size = (tmp_path / "m" / "model.safetensors").stat().st_size
    n = sum(p.numel() for p in model.parameters())
    assert 2 * n <= size < 2 * n + 100_000
    loaded = load_model(tmp_path / "m" / "model.safetensors", device="cpu")  # the weights file works too
    assert loaded.dtype == torch.float32 and loaded.info.tokenizer is None and loaded.info.name == "m"
    inputs = model_inputs(model.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs), model(**inputs), atol=2e-3, rtol=2e-2)
    half = load_model(tmp_path / "m", device="cpu", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_save_replaces_existing_folder(tmp_path):
    save_model(tiny_model(seed=0), tmp_path / "m", noise_schedule="linear", dtype=torch.float32)
    (tmp_path / "m" / "stale.txt").write_text("x")
    model = tiny_model(seed=1)
    save_model(model, tmp_path / "m", noise_schedule="linear", dtype=torch.float32)
    assert not (tmp_path / "m" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left behind
    loaded = load_model(tmp_path / "m", device="cpu")
    assert torch.equal(loaded.time_embed[0].weight, model.time_embed[0].weight)


def test_load_from_string_path(tmp_path):
    save_model(tiny_model(), tmp_path / "m", noise_schedule="linear")
    assert isinstance(load_model(str(tmp_path / "m"), device="cpu"), GlideUNet)


def test_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError, match="no model at .*nothere"):
        load_model(tmp_path / "nothere")
    assert issubclass(CheckpointError, ValueError)


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "m"
    save_model(tiny_model(), folder, noise_schedule="linear")
    return folder


def test_folder_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(saved, device="cpu")


def test_folder_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_model(saved, device="cpu")


@pytest.mark.parametrize("keep", [0, 7, 100, -1000])
def test_folder_truncated_weights(saved, keep):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(saved, device="cpu")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"architecture": "glide"}', "\xff\xfe garbage",
                                  '{"config": {"image_size": 16, "hidden_size": 4}}'])
def test_folder_bad_config(saved, text):
    (saved / "config.json").write_text(text, encoding="latin-1")
    with pytest.raises(CheckpointError, match="not a valid model config"):
        load_model(saved, device="cpu")


def test_folder_unknown_architecture(saved):
    meta = json.loads((saved / "config.json").read_text())
    meta["architecture"] = "pixart-alpha"
    meta["config"] = {"hidden_size": 1152, "depth": 28, "patch_size": 2}  # another architecture's fields
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="'pixart-alpha' model"):
        load_model(saved, device="cpu")


def test_folder_config_weights_mismatch(saved):
    meta = json.loads((saved / "config.json").read_text())
    meta["config"]["num_res_blocks"] = 2  # more blocks than the weights have
    meta["config"]["xf_width"] = 64
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"missing keys .*input_blocks.*keys with other shapes .*file \(") as e:
        load_model(saved, device="cpu")
    assert "does not match the model" in str(e.value)


def test_folder_missing_or_bad_tokenizer(saved):
    meta = json.loads((saved / "config.json").read_text())
    meta["tokenizer"] = "tokenizer.json"
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_model(saved, device="cpu")
    (saved / "tokenizer.json").write_text("garbage")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_model(saved, device="cpu")


# -----------------------------------------------------------------------------
# Released `.pt` files: error paths


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("content", [os.urandom(4096), png_bytes(), b"model weights go here\n", b""],
                         ids=["random", "png", "text", "empty"])
def test_released_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "base.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_model(path, device="cpu")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_released_truncated(tmp_path, fraction):
    buf = io.BytesIO()
    torch.save(tiny_model().state_dict(), buf)
    data = buf.getvalue()
    path = tmp_path / "base.pt"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_model(path, device="cpu")


class _Sneaky:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (Path.touch, (self.marker,))


def test_released_pickled_code_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "base.pt"
    torch.save({"input_blocks.0.0.weight": torch.zeros(1), "x": _Sneaky(marker)}, path)
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump(_Sneaky(marker), f, protocol=2)
    for p in (path, tmp_path / "plain.pkl"):
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
            load_model(p, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("obj", [{"a": 1, "b": "x"}, [torch.zeros(2)], {"w": torch.zeros(2), "step": 3},
                                 torch.zeros(3)], ids=["non-tensors", "list", "mixed", "tensor"])
def test_released_not_a_state_dict(tmp_path, obj):
    path = tmp_path / "base.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="does not hold a state dict of tensors"):
        load_model(path, device="cpu")


@pytest.mark.parametrize("state", [{"conv.weight": torch.zeros(2, 3, 3, 3)},
                                   {"input_blocks.0.0.weight": torch.zeros(192, 5, 3, 3)},
                                   {"input_blocks.0.0.weight": torch.zeros(192, 3)}],
                         ids=["no-input-conv", "five-channels", "not-a-conv"])
def test_released_not_glide(tmp_path, state):
    path = tmp_path / "model.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="not a GLIDE U-Net checkpoint"):
        load_model(path, device="cpu")


def test_released_tiny_model_keys(tmp_path):
    """A (tiny) project model's state dict saved as .pt: missing and unexpected keys are named."""
    state = tiny_model().state_dict()
    del state["out.2.bias"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "base.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as e:
        load_model(path, device="cpu")
    msg = str(e.value)
    assert "does not match the model" in msg
    assert "missing keys" in msg and "input_blocks." in msg  # the base preset has many more blocks
    assert "unexpected keys" in msg and "extra.weight" in msg
    assert "keys with other shapes" in msg and "model (" in msg


# -----------------------------------------------------------------------------
# Released `.pt` files: full-size layouts without full-size files


def broadcast_state(preset: str, seed: int = 0) -> dict:
    """Every key of the released file at its full shape, each a broadcast view of one small random row."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GlideUNet(GlideConfig.preset(preset)).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s[-1], generator=g).expand(s) for k, s in shapes.items()}


@pytest.mark.parametrize("preset,file", [("base", "base.pt"), ("upsample", "upsample.pt"),
                                         ("base-inpaint", "base_inpaint.pt"),
                                         ("upsample-inpaint", "upsample_inpaint.pt")])
def test_released_variant_inferred(tmp_path, preset, file):
    state = broadcast_state(preset)
    path = tmp_path / file
    torch.save(state, path)
    assert path.stat().st_size < 5_000_000
    model = load_model(path, device="cpu")
    assert model.config == GlideConfig.preset(preset)
    assert model.info.name == preset and model.info.source == str(path)
    assert model.info.noise_schedule == ("linear" if preset.startswith("upsample") else "squaredcos_cap_v2")
    assert model.info.tokenizer is None  # no encoder.json / vocab.bpe beside it
    assert model.dtype == torch.float32
    params = list(model.parameters())
    assert all(p.device.type == "cpu" and p.requires_grad for p in params)  # nothing left on "meta"
    loaded = model.state_dict()
    for k in ("input_blocks.0.0.weight", "token_embedding.weight", "output_blocks.5.1.encoder_kv.weight",
              "out.2.bias", "padding_embedding"):
        assert torch.equal(loaded[k], state[k]), k


def test_a_named_released_file_wins_over_its_siblings(tmp_path):
    """`--models dir/my_base.pt` uses that file, even with the released base.pt beside it."""
    from pipelines import ModelStore

    torch.save(broadcast_state("base", seed=0), tmp_path / "base.pt")
    mine = tmp_path / "my_finetuned_base.pt"
    state = broadcast_state("base", seed=1)
    torch.save(state, mine)
    model = ModelStore(mine, device="cpu").get("base")
    assert model.info.source == str(mine)
    assert torch.equal(model.state_dict()["out.2.bias"], state["out.2.bias"])


def test_released_nested_model_key_and_gpt2_files(tmp_path):
    """{"model": state} is accepted, and GPT-2 tokenizer files beside the weights (here .gz) are picked up."""
    path = tmp_path / "base_inpaint.pt"
    torch.save({"model": broadcast_state("base-inpaint")}, path)
    write_gpt2_files(tmp_path, synthetic_vocab(), MERGES, gz=True)
    model = load_model(path, device="cpu", dtype=torch.bfloat16)
    assert model.info.name == "base-inpaint" and model.dtype == torch.bfloat16
    tok = model.info.tokenizer
    assert tok is not None and tok.pad_id == len(synthetic_vocab()) - 1
    assert tok(["a red"], model.config.text_ctx).tokens.shape == (1, 128)


def test_released_corrupt_gpt2_files(tmp_path):
    path = tmp_path / "upsample.pt"
    torch.save(broadcast_state("upsample"), path)
    (tmp_path / "encoder.json").write_text("{not json")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n")
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_model(path, device="cpu")


def test_released_wrong_shape(tmp_path):
    state = broadcast_state("base")
    state["transformer_proj.weight"] = torch.zeros(768, 256)
    path = tmp_path / "base.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"1 keys with other shapes \(e\.g\. transformer_proj\.weight: "
                                              r"file \(768, 256\), model \(768, 512\)\)"):
        load_model(path, device="cpu")


def test_released_missing_and_extra_keys(tmp_path):
    state = broadcast_state("upsample")
    del state["middle_block.1.qkv.weight"]
    state["middle_block.1.qkv_typo.weight"] = torch.zeros(1)
    path = tmp_path / "upsample.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError,
                       match=r"1 missing keys \(e\.g\. \['middle_block\.1\.qkv\.weight'\]\); "
                             r"1 unexpected keys \(e\.g\. \['middle_block\.1\.qkv_typo\.weight'\]\)"):
        load_model(path, device="cpu")


@pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="slow (writes and loads a 770 MB file); RUN_SLOW=1")
def test_released_full_random_file(tmp_path):
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GlideUNet(GlideConfig.preset("base")).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=g) * 0.02).half() for k, s in shapes.items()}
    path = tmp_path / "base.pt"
    torch.save(state, path)
    model = load_model(path, device="cpu")
    assert model.info.name == "base" and model.dtype == torch.float32
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k].float()), k
    config = model.config
    kw = model_inputs(config, batch=1)
    kw["tokens"] = torch.randint(0, config.n_vocab, (1, config.text_ctx), generator=torch.Generator().manual_seed(2))
    kw["mask"] = torch.arange(config.text_ctx)[None] < 7
    with torch.no_grad():
        out = model(**kw)
    assert out.shape == (1, 6, 64, 64) and torch.isfinite(out).all() and out.abs().max() > 0


@pytest.mark.parametrize("change, message", [({"num_channels": "32"}, "num_channels must be int"),
                                             ({"num_channels": 0}, "at least 1"),
                                             ({"channel_mult": "a,b"}, "list of integers"),
                                             ({"num_head_channels": 7}, "cannot be built")])
def test_a_malformed_config_is_named(tmp_path, change, message):
    folder = tmp_path / "model"
    save_model(GlideUNet(tiny_config()), folder, noise_schedule="squaredcos_cap_v2")
    meta = json.loads((folder / "config.json").read_text())
    meta["config"].update(change)
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        load_model(folder, device="cpu")
