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
    elif isinstance(source, np.ndarray):
        image = Image.fromarray(_to_uint8(source))
    else:
        try:
            data = Path(source).read_bytes() if isinstance(source, (str, os.PathLike)) else bytes(source)
        except OSError as e:
            raise ImageInputError(f"could not read the image file: {e}") from e
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
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


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        return (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    if a.dtype == np.uint16 or a.max(initial=0) > 255:
        return (a.astype(np.float64) / 257).round().clip(0, 255).astype(np.uint8)
    return a.clip(0, 255).astype(np.uint8)


def _convert_mode(image: Image.Image, mode: str) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = Image.fromarray(_to_uint8(np.asarray(image)))
    if image.mode == "F":  # float TIFFs: 0..1 (most tools) or 0..255 (PIL's own "L" -> "F")
        a = np.asarray(image, np.float32)
        image = Image.fromarray(_to_uint8(a if np.nanmax(a, initial=0.0) <= 1.0 else a / 255.0))
    if image.mode == "P":
        image = image.convert("RGBA")
    if mode == "RGB" and image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert(mode)
