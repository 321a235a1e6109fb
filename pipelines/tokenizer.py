"""Prompt tokenizers: GLIDE's GPT-2 byte-level BPE, and the shapes models' own word-level vocabulary.

Both give the model what GLIDE's text encoder expects: `text_ctx` token ids and a mask that is
True on real tokens. Padded slots are ignored by the model (`xf_padding` swaps in the padding
embedding), so the pad id only has to be valid. The unconditional prompt (classifier-free
guidance) is the empty prompt: all padding, mask all False.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

GPT2_FILES = ("encoder.json", "vocab.bpe")


@dataclass
class TokenBatch:
    tokens: torch.Tensor  # (B, text_ctx) long
    mask: torch.Tensor  # (B, text_ctx) bool, True on real tokens
    truncated: list[bool]  # per prompt: was it longer than text_ctx?

    def to(self, device) -> "TokenBatch":
        return TokenBatch(self.tokens.to(device), self.mask.to(device), self.truncated)

    @staticmethod
    def cat(batches: list["TokenBatch"]) -> "TokenBatch":
        return TokenBatch(torch.cat([b.tokens for b in batches]), torch.cat([b.mask for b in batches]),
                          [t for b in batches for t in b.truncated])


class PromptTokenizer:
    """Wraps a `transformers` tokenizer; `__call__(prompts, text_ctx)` returns a TokenBatch."""

    def __init__(self, hf_tokenizer, pad_id: int, lowercase: bool = True, source: str = "",
                 unk_id: int | None = None):
        self.hf = hf_tokenizer
        self.pad_id = pad_id
        self.unk_id = unk_id  # word-level vocabularies map unknown words here; GPT-2's BPE has none
        self.lowercase = lowercase
        self.source = source

    @classmethod
    def from_gpt2_files(cls, folder: str | Path) -> "PromptTokenizer":
        """GLIDE's tokenizer: `encoder.json` + `vocab.bpe` (plain or .gz) from a local folder."""
        from transformers import GPT2TokenizerFast

        folder = Path(folder)
        found = {name: find_gpt2_file(folder, name) for name in GPT2_FILES}
        missing = [name for name, p in found.items() if p is None]
        if missing:
            raise FileNotFoundError(
                f"GLIDE's GPT-2 tokenizer files {missing} (or .gz) are not in {folder}; copy encoder.json "
                "and vocab.bpe (from the glide_text2im package, glide_text2im/ folder) beside the weights")
        # transformers 5 ignores vocab_file=/merges_file= in the constructor (an empty vocabulary results), so the
        # files are laid out under transformers' own names (vocab.json, merges.txt) and read with from_pretrained.
        with tempfile.TemporaryDirectory() as tmp:
            for name, hf_name in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
                _copy_plain(found[name], Path(tmp) / hf_name)
            hf = GPT2TokenizerFast.from_pretrained(tmp, local_files_only=True)
        end_token = len(hf.get_vocab()) - 1  # <|endoftext|> = 50256 pads, as released
        return cls(hf, pad_id=end_token, lowercase=True, source=str(folder))

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> "PromptTokenizer":
        """The shapes models' tokenizer: a `tokenizers` tokenizer.json with a [PAD] token."""
        from transformers import PreTrainedTokenizerFast

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found; it ships beside the model as tokenizer.json")
        hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
        pad_id = hf.convert_tokens_to_ids("[PAD]")
        if pad_id is None or pad_id == hf.unk_token_id and hf.unk_token_id is not None:
            raise ValueError(f"{path} has no [PAD] token; rebuild it with pipelines.shapes.build_tokenizer")
        return cls(hf, pad_id=pad_id, lowercase=True, source=str(path), unk_id=hf.convert_tokens_to_ids("[UNK]"))

    @property
    def vocab_size(self) -> int:
        return len(self.hf.get_vocab())

    def _pieces(self, prompt: str) -> list[tuple[int, str, tuple[int, int]]]:
        """(token id, the prompt text it came from, that text's (start, end) in the prompt) for each token."""
        text = prompt.lower() if self.lowercase else prompt
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        return [(i, text[a:b], (a, b)) for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]

    def _is_unknown(self, token_id: int) -> bool:
        return self.unk_id is not None and token_id == self.unk_id

    def _kept(self, prompt: str) -> list[tuple[int, str, tuple[int, int]]]:
        # Punctuation a word-level vocabulary lacks (a full stop, say) is dropped: as [UNK] it would be a token
        # the model never saw in training, and "a red circle." should mean "a red circle".
        return [p for p in self._pieces(prompt) if not (self._is_unknown(p[0]) and not _has_word(p[1]))]

    def encode(self, prompt: str) -> list[int]:
        return [i for i, _, _ in self._kept(prompt)]

    def token_spans(self, prompt: str) -> list[tuple[int, int]]:
        """The (start, end) character span in `prompt` of each token `encode` returns."""
        return [span for _, _, span in self._kept(prompt)]

    def unknown_words(self, prompt: str) -> list[str]:
        """Words of `prompt` outside the vocabulary (read as [UNK]), in order, each once."""
        words = [piece for i, piece, _ in self._pieces(prompt) if self._is_unknown(i) and _has_word(piece)]
        return list(dict.fromkeys(words))

    def known_words(self) -> list[str]:
        """The vocabulary's words, special tokens left out (useful only for small word-level vocabularies)."""
        return sorted(w for w in self.hf.get_vocab() if _has_word(w) and not w.startswith("["))

    def __call__(self, prompts: list[str], text_ctx: int) -> TokenBatch:
        rows, masks, truncated = [], [], []
        for prompt in prompts:
            ids = self.encode(prompt)
            truncated.append(len(ids) > text_ctx)
            ids = ids[:text_ctx]
            rows.append(ids + [self.pad_id] * (text_ctx - len(ids)))
            masks.append([True] * len(ids) + [False] * (text_ctx - len(ids)))
        return TokenBatch(torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.bool), truncated)

    def unconditional(self, batch_size: int, text_ctx: int) -> TokenBatch:
        return self([""] * batch_size, text_ctx)


def _has_word(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def find_gpt2_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _copy_plain(path: Path, out: Path) -> None:
    """Copy `path` to `out`, un-gzipping a `.gz` file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
