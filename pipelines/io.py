"""Atomic file writes and tolerant image reading, shared by training, scenes and the studio.

A crash or a killed process must never leave a half-written file in place of a good one:
every write goes to a temporary file in the same folder, is flushed to disk, then renamed.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def png_bytes(image: Image.Image, pnginfo=None) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=pnginfo)
    return buf.getvalue()


def atomic_save_png(path: str | os.PathLike, image: Image.Image, pnginfo=None) -> None:
    atomic_write_bytes(path, png_bytes(image, pnginfo))


def _fsync_path(path: Path) -> None:
    if path.is_dir() and os.name != "posix":
        return  # only POSIX can open (and so flush) a folder
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, then the folders themselves, before it is renamed into place."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [folder]:
        _fsync_path(path)


def _old_copy(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def restore_interrupted_dir(final: str | os.PathLike) -> bool:
    """Finish a folder swap that a killed process left half done (`final` gone, its previous
    version still beside it): put the previous version back. True if it did."""
    final = Path(final)
    old = _old_copy(final)
    if final.exists() or not old.is_dir():
        return False
    os.replace(old, final)
    return True


def atomic_replace_dir(build, final: str | os.PathLike) -> None:
    """Write a folder atomically: `build(tmp_dir)` fills a fresh folder, which then replaces `final`.

    Two renames swap the folders; a kill between them leaves the previous version as `.NAME.old`,
    which `restore_interrupted_dir` (called here and by the readers) puts back."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted_dir(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        _fsync_tree(tmp)
        old = None
        if final.exists():
            old = _old_copy(final)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_path(final.parent)  # the renames themselves
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ImageInputError(ValueError):
    """An input image could not be used; the message says why and what to do."""


def load_image(source, mode: str = "RGB") -> Image.Image:
    """Open a path, bytes, numpy array or PIL image as an 8-bit image in `mode`.

    Handles the odd cases users bring: EXIF rotation, palette and 16-bit images, alpha
    (composited on white for RGB), 1-pixel and truncated files.
    """
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray) or _is_tensor(source):
        image = Image.fromarray(_to_uint8(_as_hwc(source)))
    else:
        try:
            data = Path(source).read_bytes() if isinstance(source, (str, os.PathLike)) else bytes(source)
        except OSError as e:
            raise ImageInputError(f"could not read the image file: {e}") from e
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except Image.DecompressionBombError as e:
            raise ImageInputError(f"the image is far too large to decode safely ({e}); downscale it first") from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageInputError(
                "the file is not a readable image (corrupt, truncated, or not PNG/JPEG/WebP); "
                "export it again as PNG and retry") from e
        image = ImageOps.exif_transpose(image)
    return _convert_mode(image, mode)


def load_mask_image(source) -> Image.Image:
    """A mask (white = regenerate) as 8-bit L. Transparent pixels count as black (keep): a mask
    drawn in an editor is often white strokes on a transparent layer, whose hidden colour may be
    anything (white, when a palette or "save transparent" chose it)."""
    rgba = load_image(source, "RGBA")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("L")


def _is_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")  # without importing torch here


def _as_hwc(a) -> np.ndarray:
    """A numpy array or torch tensor as HxW or HxWxC: channels-first (CxHxW, or 1xCxHxW as diffusers
    passes tensors) is transposed; anything else is named."""
    a = a.detach().float().cpu().numpy() if _is_tensor(a) else np.asarray(a)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ImageInputError(f"an image array must be HxW, HxWx3 or HxWx4 (or channels first), got shape "
                              f"{tuple(a.shape)}")
    return a


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageInputError("the image array holds NaN or infinite values")
        # floats are 0..1 (diffusers' convention); a maximum above 2 can only mean 0..255
        scale = 1.0 if a.max(initial=0.0) <= 2.0 else 255.0
        return (np.clip(a / scale, 0, 1) * 255).round().astype(np.uint8)
    if a.dtype == np.uint16 or a.max(initial=0) > 255:
        return (a.astype(np.float64) / 257).round().clip(0, 255).astype(np.uint8)
    return a.clip(0, 255).astype(np.uint8)


def _convert_mode(image: Image.Image, mode: str) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit PNGs, float TIFFs
        image = Image.fromarray(_to_uint8(np.asarray(image)))
    if image.mode == "P":
        image = image.convert("RGBA")
    if mode == "RGB" and image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert(mode)
