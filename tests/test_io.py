"""pipelines/io.py: folder swaps that survive a kill, masks with transparency, float images and arrays.

What is pinned down: a folder swap interrupted between its two renames is undone by the next
write or read (the previous version comes back, nothing is lost); a mask drawn as white strokes
on a transparent layer regenerates only the strokes, whatever colour its transparent pixels hide.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from pipelines.base import load_mask
from pipelines.io import atomic_replace_dir, load_image, load_mask_image, restore_interrupted_dir


def _write(folder, text):
    (folder / "a.txt").write_text(text)


def test_a_folder_swap_killed_between_its_renames_is_restored(tmp_path):
    final = tmp_path / "last_run"
    atomic_replace_dir(lambda d: _write(d, "v1"), final)
    assert (final / "a.txt").read_text() == "v1"
    # the state a kill leaves after the first rename: only the previous version, beside the name
    os.replace(final, tmp_path / ".last_run.old")
    assert restore_interrupted_dir(final) and (final / "a.txt").read_text() == "v1"
    assert not (tmp_path / ".last_run.old").exists() and not restore_interrupted_dir(final)
    # the next write finishes an interrupted swap first, then replaces the folder
    os.replace(final, tmp_path / ".last_run.old")
    atomic_replace_dir(lambda d: _write(d, "v2"), final)
    assert (final / "a.txt").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_run"]


def test_a_failed_build_keeps_the_previous_folder(tmp_path):
    final = tmp_path / "model"
    atomic_replace_dir(lambda d: _write(d, "good"), final)

    def broken(d):
        _write(d, "half")
        raise RuntimeError("killed")

    try:
        atomic_replace_dir(broken, final)
    except RuntimeError:
        pass
    assert (final / "a.txt").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_transparent_mask_pixels_count_as_keep(tmp_path):
    strokes = np.zeros((16, 16, 4), np.uint8)
    strokes[..., :3] = 255  # transparent white: the colour a "save transparent" often hides
    strokes[4:8, 4:12] = (255, 255, 255, 255)
    Image.fromarray(strokes, "RGBA").save(tmp_path / "rgba.png")
    palette = Image.fromarray(strokes, "RGBA").quantize(2)  # a palette PNG with a transparent entry
    palette.save(tmp_path / "palette.png", transparency=palette.getpixel((0, 0)))
    for name in ("rgba.png", "palette.png"):
        m = np.asarray(load_mask_image(tmp_path / name))
        assert m.shape == (16, 16) and m[4:8, 4:12].min() == 255 and (m >= 128).sum() == 32, name
        regen, _ = load_mask(tmp_path / name, (16, 16))
        assert regen.sum() == 32, name
    plain = Image.fromarray(np.where(strokes[..., 3] > 0, 255, 0).astype(np.uint8), "L")
    assert np.array_equal(np.asarray(load_mask_image(plain)), np.asarray(plain))  # no alpha: unchanged


def test_float_images_keep_their_range():
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    for scale in (1.0, 255.0):  # 0..1 from most tools, 0..255 from PIL's own "F" conversion
        out = np.asarray(load_image(Image.fromarray(ramp * scale, "F"), "L"))
        assert out.min() == 0 and out.max() == 255, scale


def test_arrays_and_tensors_in_any_common_layout_or_range():
    import pytest
    import torch

    from pipelines.io import ImageInputError

    rgb = np.random.default_rng(0).integers(0, 256, (8, 9, 3)).astype(np.uint8)
    for variant in (rgb.astype(np.float32) / 255, rgb.astype(np.float32),  # 0..1 and 0..255 floats
                    rgb.transpose(2, 0, 1), torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float()[None] / 255):
        assert np.array_equal(np.asarray(load_image(variant, "RGB")), rgb)
    for bad, message in [(np.full((4, 4, 3), np.nan, np.float32), "NaN"), (np.zeros((8, 8, 2)), "shape")]:
        with pytest.raises(ImageInputError, match=message):
            load_image(bad)
