"""Shared fixtures: tiny random GLIDE models saved as model folders (fast on CPU).

`tiny_models`      a models folder like the shipped one: base/, base-inpaint/, upsampler/
                   (base 16x16, upsampler 16→64, text_ctx 8, a 30-word vocabulary)
`tiny_models_full` the same plus upsampler-inpaint/ (the 10-channel variant)
`shipped_models`   assets/models when the trained default models exist there, else skipped
`one_thread`, `one_thread_per_module`
                   torch on one CPU thread for each test / for a whole module (then restored):
                   use with `pytestmark = pytest.mark.usefixtures(...)`
Other engineers' tests may reuse these (session-scoped, built once, about a second).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

WORDS = ("a an the red green blue yellow purple orange white black circle square triangle star "
         "on of and with left right top bottom big small background gray scene picture").split()
TEXT_CTX = 8


def build_tiny_tokenizer(path: Path) -> Path:
    """A word-level tokenizers file with [PAD] (id 0) and [UNK] (id 1)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def tiny_config(role: str, n_vocab: int):
    from pipelines.models.glide import GlideConfig

    common = dict(num_channels=32, num_res_blocks=1, num_head_channels=32, dropout=0.0, text_ctx=TEXT_CTX,
                  xf_width=32, xf_layers=1, xf_heads=2, n_vocab=n_vocab, resblock_updown=False)
    if role.startswith("upsampler"):
        return GlideConfig(image_size=64, channel_mult="1,1,2", attention_resolutions="16", super_res=True,
                           inpaint=role == "upsampler-inpaint", **common)
    return GlideConfig(image_size=16, channel_mult="1,2", attention_resolutions="8",
                       inpaint=role == "base-inpaint", **common)


def save_tiny_model(role: str, folder: Path, tokenizer_file: Path, seed: int = 0) -> Path:
    """A random model whose zero-initialised output layers are perturbed, so that it responds to
    its inputs (text, mask, low-res image) like a trained one would, only meaninglessly."""
    from pipelines.checkpoints import save_model
    from pipelines.models.glide import GlideUNet

    torch.manual_seed(seed)
    n_vocab = len(WORDS) + 2
    model = GlideUNet(tiny_config(role, n_vocab))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    schedule = "linear" if role.startswith("upsampler") else "squaredcos_cap_v2"
    save_model(model, folder, noise_schedule=schedule, tokenizer_file=tokenizer_file, name=role,
               training={"note": "tiny random test model"}, dtype=torch.float32)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_models")
    tok = build_tiny_tokenizer(root / "tokenizer.json")
    for i, role in enumerate(("base", "base-inpaint", "upsampler")):
        save_tiny_model(role, root / "models" / role, tok, seed=i)
    return root / "models"


@pytest.fixture(scope="session")
def tiny_models_full(tmp_path_factory, tiny_models) -> Path:
    root = tmp_path_factory.mktemp("tiny_models_full")
    for role in ("base", "base-inpaint", "upsampler"):
        shutil.copytree(tiny_models / role, root / role)
    save_tiny_model("upsampler-inpaint", root / "upsampler-inpaint", tiny_models.parent / "tokenizer.json", seed=3)
    return root


@pytest.fixture(scope="session")
def shipped_models() -> Path:
    from pipelines.base import default_models_dir

    path = default_models_dir()
    if not (path / "base" / "model.safetensors").is_file():
        pytest.skip(f"the shipped default models are not in {path} yet")
    return path


def _one_torch_thread():
    # why: tiny models run faster on one thread, the 2-core test machine is shared, and bit-exact
    # checks need a fixed thread count (CPU kernels reduce in a thread-count dependent order)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


one_thread = pytest.fixture(_one_torch_thread, name="one_thread")
one_thread_per_module = pytest.fixture(_one_torch_thread, scope="module", name="one_thread_per_module")
