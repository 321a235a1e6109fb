"""Training data: the shapes world (generated on the fly) and a folder of the user's captioned images.

Everything is POSITION-INDEXED: sample i of a run is a pure function of (seed, i), and step s of
rank r of W ranks takes the global indices  pos_s + r + W*j  (j < batch) with pos_s = s*B*W
(rank-strided). So a resumed run continues at exactly the next index (nothing repeated or
skipped), and a batch is the same whatever the number of DataLoader workers.

    source.example(index, rng) -> (uint8 [S, S, 3], caption)      one image + caption
    ShapesSource.grounded_example(index, rng)                      + which words name which object, its masks
    TrainingDataset[i]         -> dict of tensors                  + caption drop, tokens, low-res, mask
    PositionSampler            -> lists of global indices          one list per step, forever
"""

from __future__ import annotations

import json
import os
import signal
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from .. import shapes
from ..io import ImageInputError, load_image
from ..tokenizer import PromptTokenizer
from .masks import random_mask

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_FORMS = ("mix", "dense", "short", "short_bg")
MAX_OBJECTS = len(shapes.N_OBJECTS_P)  # a shapes scene holds 1 to 3 objects


class DataError(ValueError):
    """The training data cannot be used; the message says why and what to do."""


def sample_rng(seed: int, *index: int) -> np.random.Generator:
    """The generator of one sample (or one step): a pure function of (seed, *index)."""
    # why SeedSequence: it hashes the tuple, so neighbouring indices get unrelated streams
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *map(int, index)]))


def derived_seed(seed: int, *index: int) -> int:
    """A 63-bit integer seed (for torch generators) from (seed, *index)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *map(int, index)]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def area_resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxWx3 -> size x size with area averaging (the downsampling that makes upsampler pairs)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


# -----------------------------------------------------------------------------
# Sources


class ShapesSource:
    """The procedural shapes world (pipelines.shapes), rendered on the fly at `size`."""

    def __init__(self, size: int, captions: str = "mix"):
        self.size = size
        self.captions = captions
        self.mix = None  # caption form weights for caption_for_training; None = the one form `captions` names
        if captions == "mix":
            self.mix = shapes.CAPTION_PROBS
        elif "=" in captions:
            try:
                self.mix = shapes.parse_caption_mix(captions)
            except ValueError as e:
                raise DataError(f"{e}; or give one caption form of {list(CAPTION_FORMS)}") from None
        elif captions not in CAPTION_FORMS:
            raise DataError(f"unknown caption form {captions!r}; choose one of {list(CAPTION_FORMS)}, "
                            "or weights such as 'dense=0.3,relational=0.5,short=0.2'")
        self.skipped: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return 0  # unbounded

    def describe(self) -> str:
        return f"shapes(captions={self.captions})"

    def _scene(self, rng: np.random.Generator) -> tuple[shapes.SceneSpec, np.ndarray]:
        """The first draws of every example, so that `example` and `grounded_example` agree."""
        spec = shapes.random_scene(rng, held_out=False)
        return spec, shapes.render_array(spec, self.size)

    def example(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        spec, image = self._scene(rng)
        if self.mix is not None:
            caption = shapes.caption_for_training(spec, rng, self.mix)
        else:
            caption = shapes.captions(spec)[self.captions]
        return image, caption

    def grounded_example(self, index: int, rng: np.random.Generator
                         ) -> tuple[np.ndarray, str, list[tuple[int, int, int]], np.ndarray]:
        """``example`` (the same draws, image and caption) with the (start, end, object) character spans of
        the words that name each object and the objects' masks, uint8 (MAX_OBJECTS, S, S)."""
        if self.mix is None:
            raise DataError("grounding needs captions drawn from a mix of forms: --captions mix, or weights "
                            "such as 'dense=1'")
        spec, image = self._scene(rng)
        caption, spans = shapes.tagged_caption_for_training(spec, rng, self.mix)
        masks = np.zeros((MAX_OBJECTS, self.size, self.size), np.uint8)
        masks[:len(spec.objects)] = np.rint(shapes.object_masks(spec, self.size) * 255)
        return image, caption, spans, masks


class FolderSource:
    """A folder of the user's images with captions: `name.png` + `name.txt` (one caption per line;
    one line is drawn per sample), or a `captions.jsonl` with {"file": ..., "caption": ...} lines.

    Files that cannot be used are skipped and listed in `skipped` as (path, reason): unreadable or
    corrupt images, images smaller than `min_size` on their short side, images without a caption,
    caption lines naming files that are not there. Images are resized (short side to `size`) and
    cropped to a square at a position drawn per sample.
    """

    def __init__(self, folder, size: int, min_size: int | None = None):
        self.folder = Path(folder)
        self.size = size
        self.min_size = max(1, size // 2 if min_size is None else int(min_size))
        if not self.folder.is_dir():
            raise DataError(f"data folder {self.folder} does not exist; give a folder of images with captions "
                            "(image.png + image.txt, or a captions.jsonl), or 'shapes'")
        self.items: list[tuple[str, list[str]]] = []  # (path, captions)
        self.skipped: list[tuple[str, str]] = []
        self._scan()
        if not self.items:
            details = "; ".join(f"{Path(p).name}: {r}" for p, r in self.skipped[:10]) or "no image files found"
            raise DataError(f"no usable training images in {self.folder} ({details}); add images "
                            f"(PNG/JPEG/WebP, at least {self.min_size}px on the short side) with captions")

    def _scan(self) -> None:
        listed = self._read_jsonl()
        files = sorted(p for p in self.folder.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        for path in files:
            key = path.relative_to(self.folder).as_posix()
            caps = listed.pop(key, None) or listed.pop(path.name, None)
            if caps is None:
                txt = path.with_suffix(".txt")
                if txt.is_file():
                    try:
                        text = txt.read_text(encoding="utf-8", errors="replace")
                    except OSError as e:  # unreadable (permissions): skip the image, as a corrupt one
                        self.skipped.append((str(path), f"caption file {txt.name} is unreadable: {e}"))
                        continue
                    caps = [c for c in (line.strip() for line in text.splitlines()) if c]
                    if not caps:
                        self.skipped.append((str(path), f"caption file {txt.name} is empty"))
                        continue
            if caps is None:
                self.skipped.append((str(path), f"no caption: add {path.with_suffix('.txt').name} "
                                                 "or a line in captions.jsonl"))
                continue
            try:
                image = load_image(path)
            except ImageInputError as e:
                self.skipped.append((str(path), f"unreadable image: {e}"))
                continue
            if min(image.size) < self.min_size:
                self.skipped.append((str(path), f"too small: {image.size[0]}x{image.size[1]} "
                                                 f"(needs at least {self.min_size}px on the short side)"))
                continue
            self.items.append((str(path), caps))
        for name in sorted(listed):
            self.skipped.append((str(self.folder / name), "listed in captions.jsonl but the file is not there"))

    def _read_jsonl(self) -> dict[str, list[str]]:
        path = self.folder / "captions.jsonl"
        out: dict[str, list[str]] = {}
        if not path.is_file():
            return out
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = row.get("file") or row.get("file_name") or row.get("image")
                caption = row.get("caption") or row.get("text")
            except (json.JSONDecodeError, AttributeError):
                name = caption = None
            if not name or not isinstance(caption, (str, list)):
                self.skipped.append((f"{path}:{n}", 'bad line: expected {"file": ..., "caption": ...}'))
                continue
            caps = [caption] if isinstance(caption, str) else [str(c) for c in caption]
            out.setdefault(str(name), []).extend(c.strip() for c in caps if str(c).strip())
        return out

    def __len__(self) -> int:
        return len(self.items)

    def describe(self) -> str:
        return f"folder:{self.folder.resolve()} ({len(self.items)} images)"

    def report(self) -> str:
        lines = [f"{len(self.items)} images used from {self.folder}, {len(self.skipped)} skipped"]
        lines += [f"  skipped {p}: {r}" for p, r in self.skipped]
        return "\n".join(lines)

    @lru_cache(maxsize=4)
    def _epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        return sample_rng(seed, 0x5EED, epoch).permutation(len(self.items))

    def example(self, index: int, rng: np.random.Generator, seed: int = 0) -> tuple[np.ndarray, str]:
        # why: a per-epoch permutation shows every image once per epoch, still a pure function of index
        epoch, within = divmod(index, len(self.items))
        path, caps = self.items[int(self._epoch_order(seed, epoch)[within])]
        try:
            image = load_image(path)
        except ImageInputError as e:
            raise DataError(f"{path} became unreadable during training: {e}") from e
        w, h = image.size
        scale = self.size / min(w, h)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        # why: area averaging when shrinking (no aliasing), bicubic when enlarging
        image = image.resize((nw, nh), Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC)
        left = int(rng.integers(0, nw - self.size + 1))
        top = int(rng.integers(0, nh - self.size + 1))
        array = np.asarray(image.crop((left, top, left + self.size, top + self.size)), dtype=np.uint8)
        return array, caps[int(rng.integers(len(caps)))]


def make_source(data: str, size: int, captions: str = "mix", min_image_size: int | None = None):
    if data == "shapes":
        return ShapesSource(size, captions)
    return FolderSource(data, size, min_image_size)


# -----------------------------------------------------------------------------
# Dataset and sampler


class TrainingDataset(torch.utils.data.Dataset):
    """Global sample index -> dict(image uint8 [3,S,S], tokens, token_mask[, low_res][, inpaint_mask]).

    The per-sample generator draws, in this order: the example (scene/crop/caption), the caption
    drop, the inpainting mask. Nothing else is random here, so item i never depends on i-1.
    """

    def __init__(self, source, tokenizer: PromptTokenizer, text_ctx: int, seed: int, caption_drop: float = 0.2,
                 low_res_size: int | None = None, masks: dict[str, float] | None = None, grounding: bool = False):
        if grounding and not isinstance(source, ShapesSource):
            raise DataError("grounding needs the shapes world (--data shapes): a folder of images has no "
                            "object masks")
        self.source = source
        self.tokenizer = tokenizer
        self.text_ctx = text_ctx
        self.seed = seed
        self.caption_drop = caption_drop
        self.low_res_size = low_res_size
        self.masks = masks
        self.grounding = grounding

    def __getitem__(self, index: int) -> dict:
        rng = sample_rng(self.seed, index)
        spans = object_masks = None
        if isinstance(self.source, FolderSource):
            image, caption = self.source.example(index, rng, self.seed)
        elif self.grounding:
            image, caption, spans, object_masks = self.source.grounded_example(index, rng)
        else:
            image, caption = self.source.example(index, rng)
        if rng.random() < self.caption_drop:
            caption = ""  # GLIDE §4.2: the empty sequence, so one model also predicts unconditionally
        batch = self.tokenizer([caption], self.text_ctx)
        item = {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                "tokens": batch.tokens[0], "token_mask": batch.mask[0], "index": index}
        if self.grounding:
            item["token_objects"] = torch.from_numpy(self._token_objects(caption, spans))
            item["object_masks"] = torch.from_numpy(object_masks)
        if self.low_res_size:
            # quantised to uint8 as the 64px images the upsampler gets at inference
            low = area_resize(image, self.low_res_size)
            item["low_res"] = torch.from_numpy(np.ascontiguousarray(low.transpose(2, 0, 1)))
        if self.masks is not None:
            item["inpaint_mask"] = torch.from_numpy(random_mask(rng, image.shape[0], self.masks))[None]
        return item

    def _token_objects(self, caption: str, spans: list[tuple[int, int, int]]) -> np.ndarray:
        """(text_ctx,) int64: per token slot, the object its word names, or -1."""
        out = np.full(self.text_ctx, -1, np.int64)
        for k, (a, _) in enumerate(self.tokenizer.token_spans(caption)[:self.text_ctx]):
            out[k] = next((obj for start, end, obj in spans if start <= a < end), -1)
        return out

    def caption(self, index: int) -> str:
        """The caption of item `index` before the drop (for sample-grid labels)."""
        rng = sample_rng(self.seed, index)
        if isinstance(self.source, FolderSource):
            return self.source.example(index, rng, self.seed)[1]
        return self.source.example(index, rng)[1]


class PositionSampler:
    """Yields, forever, the global indices of each step for one rank (a DataLoader batch_sampler)."""

    def __init__(self, start: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.start, self.batch_size, self.rank, self.world_size = start, batch_size, rank, world_size

    def __iter__(self):
        position = self.start
        while True:
            yield [position + self.rank + self.world_size * j for j in range(self.batch_size)]
            position += self.batch_size * self.world_size


def _worker_init(_):
    # why: each worker is one process on one core; torch's thread pool would oversubscribe them.
    # (OpenCV's pool is already 1 thread: pipelines.shapes sets it at import. Resetting it here would
    # hang: a forked child cannot tear down a pool whose threads stayed in the parent.)
    torch.set_num_threads(1)
    # why: Ctrl-C, `timeout` and torchrun signal the whole process group; the main process must finish
    # its step and save, so the workers may not die first (they exit when the loader shuts them down,
    # or on their own when the main process is gone)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset: TrainingDataset, start: int, batch_size: int, rank: int = 0, world_size: int = 1,
                workers: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """An endless loader whose k-th batch holds global indices start + k*B*W + rank + W*j."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after the tokenizer is used
    kwargs = {}
    if workers > 0:
        # timeout: a stuck worker becomes an error instead of a run that hangs without saving
        kwargs = dict(worker_init_fn=_worker_init, prefetch_factor=4, persistent_workers=True, timeout=300)
    return torch.utils.data.DataLoader(dataset, batch_sampler=PositionSampler(start, batch_size, rank, world_size),
                                       num_workers=workers, pin_memory=pin_memory, **kwargs)
