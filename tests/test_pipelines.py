"""Pipelines on CPU with tiny random models (conftest), and the shipped models when present.

What is pinned down: shapes/dtypes; same seed → same pixels, other seed → other pixels; replay
from `result.params`; pixels outside the mask bit-exact (odd sizes, odd modes); strength 0 / 1;
the bad inputs of the issue; interrupt and progress; model resolution; the CLI.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import (CheckpointError, EmptyMaskError, GenerationInterrupted, InpaintPipeline, ModelStore,
                       NonFiniteOutputError, PipelineInputError, SDEditPipeline, Text2ImagePipeline,
                       UpsamplePipeline)
from pipelines.base import MaskedCrop, feather
from pipelines.defaults import DEFAULT_GUIDANCE, DEFAULT_GUIDANCE_MIN_T, DEFAULT_GUIDANCE_MIN_T_INPAINT, DEFAULT_SAMPLER
from pipelines.io import ImageInputError

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

FAST = dict(num_inference_steps=3, upsample_steps=3)


def arr(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def noise_image(w=517, h=333, seed=0, mode="RGB") -> Image.Image:
    a = np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    if mode == "RGBA":
        alpha = np.random.RandomState(seed + 1).randint(0, 256, (h, w), dtype=np.uint8)
        img = Image.fromarray(np.dstack([a, alpha]), "RGBA")
    elif mode == "L":
        img = img.convert("L")
    elif mode == "P":
        img = img.convert("P", palette=Image.ADAPTIVE)
    elif mode == "I;16":
        img = Image.fromarray((a[..., 0].astype(np.uint16) * 257), "I;16")
    return img


def box_mask(w=517, h=333, box=(200, 100, 300, 150)) -> Image.Image:
    m = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    return Image.fromarray(m)


def pipeline_fixture(cls, name: str):
    """A module-scoped fixture `name`: `cls` on the tiny models, on CPU (they share one ModelStore)."""
    return pytest.fixture(lambda tiny_models: cls.from_pretrained(tiny_models, device="cpu"), scope="module",
                          name=name)


t2i = pipeline_fixture(Text2ImagePipeline, "t2i")
inpaint = pipeline_fixture(InpaintPipeline, "inpaint")
sdedit = pipeline_fixture(SDEditPipeline, "sdedit")
upsampler = pipeline_fixture(UpsamplePipeline, "upsampler")


# -----------------------------------------------------------------------------
# Text to image


def test_text2image_shapes_params_and_timings(t2i):
    out = t2i("a red circle", seed=1, num_images=2, **FAST)
    assert len(out.images) == 2
    assert all(im.mode == "RGB" and im.size == (64, 64) for im in out.images)  # 16 base → 64 upsampler
    assert out.working_size == 64
    p = out.params
    json.dumps(p)  # JSON-serialisable
    assert p["pipeline"] == "text2image" and p["seed"] == 1 and p["sampler"] == DEFAULT_SAMPLER == "ddpm"
    assert p["guidance_scale"] == DEFAULT_GUIDANCE == 5.0 and p["upsample"] is True and p["upsample_temperature"] == 0.997
    assert set(p["models"]) == {"base", "upsampler"} and p["models"]["base"].startswith("base@")
    assert p["device"] == "cpu" and p["dtype"] == "float32" and p["num_threads"] == torch.get_num_threads()
    assert {"base_s", "upsample_s", "total_s", "per_image_s"} <= set(out.timings)
    small = t2i("a red circle", seed=1, upsample=False, num_inference_steps=3)
    assert small.images[0].size == (16, 16) and small.params["upsample"] is False


def test_text2image_determinism_and_replay(t2i):
    a = t2i("a red circle", seed=7, **FAST)
    b = t2i("a red circle", generator=torch.Generator().manual_seed(7), **FAST)
    c = t2i("a red circle", seed=8, **FAST)
    assert np.array_equal(arr(a.images[0]), arr(b.images[0]))
    assert not np.array_equal(arr(a.images[0]), arr(c.images[0]))
    replay = t2i(**a.params)
    assert np.array_equal(arr(a.images[0]), arr(replay.images[0]))
    assert replay.warnings == []
    # no seed: one is drawn and recorded, and it replays
    d = t2i("a red circle", **FAST)
    assert isinstance(d.params["seed"], int)
    assert np.array_equal(arr(d.images[0]), arr(t2i(**d.params).images[0]))


@pytest.mark.parametrize("sampler,steps", [("ddpm", 3), ("ddim", "ddim4"), ("dpm++", "4")])
def test_text2image_samplers_and_step_specs(t2i, sampler, steps):
    out = t2i("a blue square", seed=3, sampler=sampler, num_inference_steps=steps, upsample=False)
    assert out.params["num_inference_steps"] == steps
    assert np.array_equal(arr(out.images[0]), arr(t2i(**out.params).images[0]))


def test_text2image_negative_prompt_and_guidance(t2i):
    base = t2i("a red circle", seed=5, upsample=False, num_inference_steps=3)
    neg = t2i("a red circle", negative_prompt="blue square", seed=5, upsample=False, num_inference_steps=3)
    unguided = t2i("a red circle", seed=5, guidance_scale=1.0, upsample=False, num_inference_steps=3)
    assert not np.array_equal(arr(base.images[0]), arr(neg.images[0]))
    assert not np.array_equal(arr(base.images[0]), arr(unguided.images[0]))


@pytest.mark.parametrize("name", ["t2i", "sdedit", "inpaint"])
def test_guidance_interval_is_recorded_and_1000_means_unguided(request, name):
    pipe = request.getfixturevalue(name)
    image = Image.fromarray(np.full((16, 16, 3), 200, np.uint8))
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    inputs = {} if name == "t2i" else {"image": image, "mask_image": Image.fromarray(mask)}
    strength = {"strength": 1.0} if name == "sdedit" else {}

    def run(**kw):
        return pipe("a red circle", seed=4, upsample=False, num_inference_steps=4, **inputs, **strength, **kw)

    default = run()
    # fine-tuned inpainting guides only while the object is placed; the others from t = 300
    assert default.params["guidance_min_t"] == (700 if name == "inpaint" else 300)
    if name == "inpaint":
        assert DEFAULT_GUIDANCE_MIN_T_INPAINT == 700 and DEFAULT_GUIDANCE_MIN_T == 300
        assert run(mode="replace").params["guidance_min_t"] == 300
        assert run(strength=0.8).params["guidance_min_t"] == 300  # its run may start below t = 700: still guided
        assert np.array_equal(arr(default.images[0]), arr(run(guidance_min_t=700).images[0]))
    everywhere, never = run(guidance_min_t=0), run(guidance_min_t=1000)
    unguided = run(guidance_scale=1.0)
    assert np.array_equal(arr(never.images[0]), arr(unguided.images[0]))
    assert not np.array_equal(arr(everywhere.images[0]), arr(unguided.images[0]))
    replay = pipe(**everywhere.params, **inputs)
    assert np.array_equal(arr(replay.images[0]), arr(everywhere.images[0]))
    for bad in (-1, 1001, 2.5, True, "300"):
        with pytest.raises(PipelineInputError, match="guidance_min_t must be a timestep from 0 to 1000"):
            run(guidance_min_t=bad)


def test_used_generator_is_replayed_from_its_seed(t2i):
    g = torch.Generator().manual_seed(11)
    torch.randn(3, generator=g)
    out = t2i("a star", generator=g, upsample=False, num_inference_steps=2)
    assert out.params["seed"] == 11 and any("already been used" in w for w in out.warnings)
    assert np.array_equal(arr(out.images[0]), arr(t2i(**out.params).images[0]))
    for wrong in (7, np.random.default_rng(0)):
        with pytest.raises(PipelineInputError, match="torch.Generator"):
            t2i("a star", generator=wrong, upsample=False, num_inference_steps=2)


def test_an_empty_prompt_runs_with_one_warning(t2i):
    out = t2i("", seed=1, num_inference_steps=2, upsample_steps=2)  # base and upsampler: one warning
    assert sum("prompt is empty" in w for w in out.warnings) == 1


def test_long_prompt_is_truncated_with_a_warning(t2i):
    out = t2i("a red circle on the left of a big blue square and a green star", seed=1, upsample=False,
              num_inference_steps=2)
    assert any("truncated" in w for w in out.warnings)


def test_words_the_model_does_not_know_are_named(t2i):
    out = t2i("a crimson circle beside a dog.", seed=1, upsample=False, num_inference_steps=2)
    unknown = [w for w in out.warnings if "does not know" in w]
    assert len(unknown) == 1 and "'crimson', 'beside', 'dog'" in unknown[0] and "circle" in unknown[0]
    clean = t2i("a red circle.", seed=1, upsample=False, num_inference_steps=2)
    assert not any("does not know" in w for w in clean.warnings)
    same = t2i("a red circle", seed=1, upsample=False, num_inference_steps=2)
    assert np.array_equal(arr(clean.images[0]), arr(same.images[0]))  # the full stop changes nothing


def test_progress_callback_and_interrupt(t2i):
    seen = []
    t2i("a red circle", seed=1, callback_on_step_end=lambda i, n, x: seen.append((i, n, tuple(x.shape))), **FAST)
    # 3 base steps + the upsampler's lowest round(0.4 * 3) = 1 step (it starts part-way)
    assert [s[0] for s in seen] == list(range(4)) and {s[1] for s in seen} == {4}
    assert seen[0][2] == (1, 3, 16, 16) and seen[-1][2] == (1, 3, 64, 64)

    def stop(i, n, x):
        if i == 1:
            t2i.interrupt()

    with pytest.raises(GenerationInterrupted):
        t2i("a red circle", seed=1, callback_on_step_end=stop, **FAST)
    # the next call runs normally
    assert t2i("a red circle", seed=1, upsample=False, num_inference_steps=2).images


def test_bad_arguments_raise_value_errors(t2i):
    for kwargs in (dict(sampler="euler"), dict(num_inference_steps="fastest"), dict(num_inference_steps=0),
                   dict(guidance_scale=-1), dict(num_images=0), dict(seed=-5), dict(upsample_temperature=0),
                   dict(upsample_strength=1.5)):
        with pytest.raises(PipelineInputError):
            t2i("a red circle", **kwargs)
    with pytest.raises(PipelineInputError):
        t2i(**{"pipeline": "inpaint", "prompt": "x"})
    with pytest.raises(PipelineInputError):
        t2i("a red circle", num_threads=0)


def test_nan_in_model_output_stops_with_a_clear_error(tiny_models):
    store = ModelStore(tiny_models, device="cpu")  # private store: the poisoned model is not shared
    with torch.no_grad():
        store.get("base").out[2].bias.fill_(float("nan"))
    pipe = Text2ImagePipeline(store)
    with pytest.raises(NonFiniteOutputError, match="step 1 of 3"):
        pipe("a red circle", seed=1, num_inference_steps=3, upsample=False)
    with pytest.raises(ValueError, match="float32"):
        SDEditPipeline(store)("a red circle", noise_image(40, 30), strength=1.0, num_inference_steps=3)


# -----------------------------------------------------------------------------
# Model resolution


def test_model_store_sharing_and_single_folders(tiny_models, t2i, inpaint, sdedit):
    assert t2i.store is inpaint.store is sdedit.store
    single = Text2ImagePipeline.from_pretrained(tiny_models / "base", device="cpu")
    out = single("a red circle", seed=1, num_inference_steps=2)
    assert out.images[0].size == (16, 16) and out.params["upsample"] is False
    assert any("no upsampler" in w for w in out.warnings)
    with pytest.raises(CheckpointError, match="replace"):
        InpaintPipeline.from_pretrained(tiny_models / "base", device="cpu")(
            "a star", noise_image(40, 30), box_mask(40, 30, (5, 5, 20, 20)))
    # replace mode works with the plain base model
    out = InpaintPipeline.from_pretrained(tiny_models / "base", device="cpu")(
        "a star", noise_image(40, 30), box_mask(40, 30, (5, 5, 20, 20)), mode="replace", seed=1,
        num_inference_steps=2)
    assert out.changed_outside_mask == [0]


def test_missing_models_raise_checkpoint_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no models at"):
        Text2ImagePipeline.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    pipe = Text2ImagePipeline.from_pretrained(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no base or base-inpaint model"):
        pipe("a red circle")
    monkeypatch.setenv("STUDIO_MODELS_DIR", str(tmp_path / "empty"))
    assert Text2ImagePipeline.from_pretrained().store.path == tmp_path / "empty"


def test_released_files_are_found_by_name(tmp_path):
    for name in ("base.pt", "upsample.pt", "base_inpaint.pt"):
        (tmp_path / name).write_bytes(b"not loaded here")
    store = ModelStore(tmp_path / "base.pt")
    assert store.describe().keys() == {"base", "upsampler", "base-inpaint"}
    assert store.image_size("upsampler") == 256 and not store.has("upsampler-inpaint")
    with pytest.raises(CheckpointError):  # loading the fake file fails cleanly
        store.get("base")


# -----------------------------------------------------------------------------
# Inpainting


@pytest.mark.parametrize("mode", ["finetuned", "replace"])
@pytest.mark.parametrize("image_mode", ["RGB", "RGBA", "L", "P", "I;16"])
def test_inpaint_preserves_pixels_outside_the_mask_exactly(inpaint, mode, image_mode):
    image = noise_image(mode=image_mode)
    from pipelines.io import load_image

    original = np.asarray(load_image(image, "RGB"))
    mask = box_mask()
    out = inpaint("a blue star", image, mask, mode=mode, seed=4, num_inference_steps=2)
    result = arr(out.images[0])
    assert out.images[0].size == (517, 333) and out.images[0].mode == "RGB"
    keep = np.asarray(mask) < 128
    assert np.array_equal(result[keep], original[keep])
    assert out.changed_outside_mask == [0]
    assert (result[~keep] != original[~keep]).any()
    assert out.params["mode"] == mode and out.working_size == 16


def test_inpaint_determinism_replay_and_batch(inpaint):
    image, mask = noise_image(), box_mask()
    a = inpaint("a blue star", image, mask, seed=1, num_images=2, num_inference_steps=3)
    assert len(a.images) == 2 and a.changed_outside_mask == [0, 0]
    assert not np.array_equal(arr(a.images[0]), arr(a.images[1]))
    b = inpaint(image=image, mask_image=mask, **a.params)
    assert all(np.array_equal(arr(x), arr(y)) for x, y in zip(a.images, b.images))
    c = inpaint("a blue star", image, mask, seed=2, num_images=2, num_inference_steps=3)
    assert not np.array_equal(arr(a.images[0]), arr(c.images[0]))
    json.dumps(a.params)


def test_inpaint_strength_zero_and_one(inpaint):
    image, mask = noise_image(), box_mask()
    zero = inpaint("a blue star", image, mask, strength=0.0, seed=1)
    assert np.array_equal(arr(zero.images[0]), arr(image)) and zero.changed_outside_mask == [0]
    assert not zero.warnings
    tiny = inpaint("a blue star", image, mask, strength=0.02, seed=1, num_inference_steps=10)  # rounds to 0 steps
    assert np.array_equal(arr(tiny.images[0]), arr(image)) and any("0 of the 10 steps" in w for w in tiny.warnings)
    # strength 1 ignores what was under the mask (mask_blur 0: no blend band with the original)
    other = np.array(image)
    other[100:150, 200:300] = 255 - other[100:150, 200:300]
    kw = dict(strength=1.0, mask_blur=0, seed=3, num_inference_steps=3)
    a = inpaint("a blue star", image, mask, **kw)
    b = inpaint("a blue star", Image.fromarray(other), mask, **kw)
    assert np.array_equal(arr(a.images[0])[100:150, 200:300], arr(b.images[0])[100:150, 200:300])
    # part strength starts from the image: it differs from both
    half = inpaint("a blue star", image, mask, strength=0.5, seed=3, num_inference_steps=4)
    assert half.changed_outside_mask == [0]


def test_inpaint_mask_edge_cases(inpaint):
    image = noise_image(40, 30)
    with pytest.raises(EmptyMaskError, match="nothing to regenerate"):
        inpaint("a star", image, Image.new("L", (40, 30), 0))
    # all white: text-to-image through the inpainting model
    full = inpaint("a star", image, Image.new("L", (40, 30), 255), seed=1, num_inference_steps=2)
    assert full.changed_outside_mask == [0] and full.images[0].size == (40, 30)
    # mask of another size: resized with a warning
    out = inpaint("a star", image, box_mask(80, 60, (10, 10, 40, 40)), seed=1, num_inference_steps=2)
    assert any("resized" in w for w in out.warnings) and out.changed_outside_mask == [0]
    # model-sized image, full mask: the working box is the image itself
    sq = inpaint("a star", noise_image(16, 16), Image.new("L", (16, 16), 255), seed=1, num_inference_steps=2)
    assert sq.working_box == (0, 0, 16, 16)


def test_corrupt_image_bytes_raise_a_value_error(inpaint, sdedit, upsampler):
    bad = b"\x89PNG\r\n\x1a\nthis is not a png"
    with pytest.raises(ImageInputError):
        inpaint("a star", bad, box_mask())
    with pytest.raises(ValueError):
        sdedit("a star", io.BytesIO(bad).getvalue())
    with pytest.raises(ValueError):
        upsampler("a star", bad)
    with pytest.raises(PipelineInputError):
        inpaint("a star", noise_image(), None)


def test_inpaint_through_the_10_channel_upsampler(tiny_models_full):
    pipe = InpaintPipeline.from_pretrained(tiny_models_full, device="cpu")
    image, mask = noise_image(), box_mask()
    out = pipe("a blue star", image, mask, seed=1, num_inference_steps=2, upsample_steps=3)
    assert out.params["upsample"] is True and out.working_size == 64
    assert out.params["models"]["upsampler"].startswith("upsampler-inpaint@")
    assert out.changed_outside_mask == [0]
    again = pipe(image=image, mask_image=mask, **out.params)
    assert np.array_equal(arr(out.images[0]), arr(again.images[0]))
    # replace mode with upsample=True: the plain upsampler, known region replaced each step
    plain = pipe("a blue star", image, mask, mode="replace", upsample=True, seed=1, num_inference_steps=2,
                 upsample_steps=3)
    assert plain.params["models"]["upsampler"].startswith("upsampler@") and plain.changed_outside_mask == [0]


# -----------------------------------------------------------------------------
# Crop and paste helpers


def test_masked_crop_box_is_square_covers_the_mask_and_pastes_exactly():
    rng = np.random.RandomState(0)
    for _ in range(20):
        H, W = rng.randint(5, 120, size=2)
        regen = np.zeros((H, W), bool)
        y0, x0 = rng.randint(0, H), rng.randint(0, W)
        regen[y0:y0 + rng.randint(1, H), x0:x0 + rng.randint(1, W)] = True
        image = rng.randint(0, 256, (H, W, 3)).astype(np.uint8)
        crop = MaskedCrop.build(image, regen, padding=int(rng.randint(0, 20)), mask_blur=float(rng.randint(0, 5)))
        bx0, by0, bx1, by1 = crop.box
        assert bx1 - bx0 == by1 - by0 == crop.side
        ys, xs = np.nonzero(regen)
        assert bx0 <= xs.min() and xs.max() < bx1 and by0 <= ys.min() and ys.max() < by1
        out = crop.paste(image, rng.randint(0, 256, (16, 16, 3)).astype(np.uint8))
        assert np.array_equal(out[~regen], image[~regen])


def test_feather_band_lies_inside_the_mask():
    regen = np.zeros((50, 50), bool)
    regen[10:40, 10:40] = True
    a = feather(regen, 6)
    assert (a[~regen] == 0).all() and a[25, 25] == 1 and 0 < a[10, 25] < 1
    assert np.array_equal(feather(regen, 0), regen.astype(np.float32))


# -----------------------------------------------------------------------------
# SDEdit


def test_sdedit_strength_zero_is_the_input_without_a_model_call(tiny_models):
    store = ModelStore(tiny_models, device="cpu")
    image = noise_image(mode="RGB")
    out = SDEditPipeline(store)("a red circle", image, strength=0.0)
    assert np.array_equal(arr(out.images[0]), arr(image))
    assert not any(store.is_loaded(r) for r in ("base", "upsampler"))


def test_sdedit_strength_one_ignores_the_input(sdedit):
    kw = dict(strength=1.0, seed=2, num_inference_steps=3, upsample=False)
    a = sdedit("a red circle", noise_image(64, 64, seed=1), **kw)
    b = sdedit("a red circle", noise_image(64, 64, seed=2), **kw)
    assert np.array_equal(arr(a.images[0]), arr(b.images[0]))
    c = sdedit("a red circle", noise_image(64, 64, seed=1), strength=0.5, seed=2, num_inference_steps=4,
               upsample=False)
    d = sdedit("a red circle", noise_image(64, 64, seed=2), strength=0.5, seed=2, num_inference_steps=4,
               upsample=False)
    assert not np.array_equal(arr(c.images[0]), arr(d.images[0]))


def test_sdedit_blank_canvas_with_strokes_and_upsampling(sdedit):
    canvas = np.full((64, 64, 3), 255, np.uint8)
    canvas[10:30, 10:30] = (255, 0, 0)
    canvas[35:55, 30:60] = (0, 0, 255)
    out = sdedit("a red square and a blue square", Image.fromarray(canvas), strength=0.6, seed=1,
                 num_inference_steps=5, upsample_steps=4)
    assert out.images[0].size == (64, 64) and out.changed_outside_mask is None
    assert out.params["upsample"] is True and out.working_size == 64  # crop 64 >= upsampler size
    again = sdedit(image=Image.fromarray(canvas), **out.params)
    assert np.array_equal(arr(out.images[0]), arr(again.images[0]))


@pytest.mark.parametrize("image_mode", ["RGBA", "P", "I;16"])
def test_sdedit_with_mask_preserves_outside_exactly(sdedit, image_mode):
    from pipelines.io import load_image

    image = noise_image(mode=image_mode)
    original = np.asarray(load_image(image, "RGB"))
    mask = box_mask(box=(10, 20, 90, 300))
    out = sdedit("a green star", image, strength=0.7, mask_image=mask, seed=1, num_inference_steps=4,
                 upsample_steps=4)
    keep = np.asarray(mask) < 128
    assert np.array_equal(arr(out.images[0])[keep], original[keep]) and out.changed_outside_mask == [0]
    with pytest.raises(EmptyMaskError):
        sdedit("a green star", image, mask_image=Image.new("L", image.size, 0))


# -----------------------------------------------------------------------------
# Upsampler


def test_upsample_any_image(upsampler):
    small = noise_image(16, 16)
    out = upsampler("a red circle", small, seed=1, num_inference_steps=3)
    assert out.images[0].size == (64, 64) and out.warnings == []
    assert out.params["temperature"] == 0.997 and out.params["sampler"] == "ddim"
    assert np.array_equal(arr(out.images[0]), arr(upsampler(image=small, **out.params).images[0]))
    odd = upsampler("a red circle", noise_image(30, 20), seed=1, num_inference_steps=2)
    assert odd.images[0].size == (64, 64) and any("stretched" in w for w in odd.warnings)


# -----------------------------------------------------------------------------
# CLI


def test_cli_generate_inpaint_and_clean_errors(tiny_models, tmp_path, capsys):
    from pipelines.__main__ import main

    out = tmp_path / "gen.png"
    assert main(["generate", "--prompt", "a red circle", "--seed", "1", "--steps", "2", "--upsample-steps", "2",
                 "--models", str(tiny_models), "--device", "cpu", "--out", str(out), "--quiet", "--json"]) == 0
    printed = capsys.readouterr().out
    params = json.loads(printed[printed.index("{"):])
    assert params["seed"] == 1 and Image.open(out).size == (64, 64)
    assert json.loads(Image.open(out).text["parameters"])["seed"] == 1

    image, mask = tmp_path / "in.png", tmp_path / "m.png"
    noise_image(60, 40).save(image)
    box_mask(60, 40, (10, 10, 30, 30)).save(mask)
    assert main(["inpaint", "--image", str(image), "--mask", str(mask), "--prompt", "a star", "--mode", "replace",
                 "--steps", "2", "--models", str(tiny_models), "--out", str(tmp_path / "ip.png"), "--quiet"]) == 0
    assert "0 pixels changed outside the mask" in capsys.readouterr().out

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    assert main(["sdedit", "--image", str(bad), "--prompt", "x", "--models", str(tiny_models), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert main(["generate", "--prompt", "x", "--models", str(tmp_path / "none")]) == 2
    assert main(["generate", "--prompt", "x", "--sampler", "dpm++", "--steps", "fastest",
                 "--models", str(tiny_models)]) == 2
    capsys.readouterr()
    for option, message in [(["--device", "foo"], "unknown device"), (["--dtype", "int8"], "unknown dtype")] + \
            ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA GPU")]):
        assert main(["generate", "--prompt", "x", "--models", str(tiny_models), *option]) == 2, option
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_pipelines_and_cli_take_the_one_set_of_defaults():
    import inspect

    from pipelines import defaults as D
    from pipelines.__main__ import build_parser

    assert (D.DEFAULT_STEPS, D.DEFAULT_STEPS_INPAINT) == ("ddim15", 25)
    defaults = {Text2ImagePipeline: (D.DEFAULT_STEPS, D.DEFAULT_GUIDANCE),
                SDEditPipeline: (D.DEFAULT_STEPS, D.DEFAULT_GUIDANCE),
                InpaintPipeline: (D.DEFAULT_STEPS_INPAINT, D.DEFAULT_GUIDANCE_INPAINT)}
    for cls, (steps, scale) in defaults.items():
        params = inspect.signature(cls.__call__).parameters
        assert params["num_inference_steps"].default == steps
        assert params["sampler"].default == D.DEFAULT_SAMPLER == "ddpm"
        assert params["guidance_scale"].default == scale
        # None: InpaintPipeline picks it by mode and strength (tested above)
        assert params["guidance_min_t"].default == (None if cls is InpaintPipeline else D.DEFAULT_GUIDANCE_MIN_T)
    files = ["--image", "in.png", "--mask", "mask.png"]
    cli = {"generate": ([], D.DEFAULT_STEPS, D.DEFAULT_GUIDANCE),
           "sdedit": (files, D.DEFAULT_STEPS, D.DEFAULT_GUIDANCE),
           "inpaint": (files, D.DEFAULT_STEPS_INPAINT, D.DEFAULT_GUIDANCE_INPAINT)}
    for command, (extra, steps, scale) in cli.items():
        args = build_parser().parse_args([command, "--prompt", "x", *extra])
        assert (args.steps, args.sampler, args.guidance_scale) == (steps, D.DEFAULT_SAMPLER, scale)
        assert args.guidance_min_t == (None if command == "inpaint" else D.DEFAULT_GUIDANCE_MIN_T)


# -----------------------------------------------------------------------------
# The shipped default models (skipped until they are trained)


def test_shipped_models_text2image_and_inpaint(shipped_models):
    t2i = Text2ImagePipeline.from_pretrained(shipped_models, device="cpu")
    out = t2i("a red circle", seed=1, num_inference_steps=4, upsample_steps="ddim4")
    assert out.images[0].size == (256, 256)
    assert np.array_equal(arr(out.images[0]), arr(t2i(**out.params).images[0]))
    pipe = InpaintPipeline.from_pretrained(shipped_models, device="cpu")
    image, mask = noise_image(), box_mask()
    for mode in ("finetuned", "replace"):
        res = pipe("a blue star", image, mask, mode=mode, seed=1, num_inference_steps=4)
        assert res.changed_outside_mask == [0]
        keep = np.asarray(mask) < 128
        assert np.array_equal(arr(res.images[0])[keep], arr(image)[keep])
    sd = SDEditPipeline.from_pretrained(shipped_models, device="cpu")
    res = sd("a red circle", noise_image(64, 64), strength=0.5, seed=1, num_inference_steps=4)
    assert res.images[0].size == (64, 64)


def test_shipped_upsampler_keeps_the_picture(shipped_models):
    """The upsampler starts part-way from the enlarged input: the 256 result, shrunk back to 64, is
    the input within a few levels; the objects stay where they were, in their colours."""
    from pipelines import shapes

    up = UpsamplePipeline.from_pretrained(shipped_models, device="cpu")
    spec = shapes.random_scene(1000)
    small = shapes.render_array(spec, 64)
    out = up(shapes.captions(spec)["dense"], Image.fromarray(small), seed=0)
    assert out.params["strength"] == 0.4 and out.images[0].size == (256, 256)
    shrunk = np.asarray(out.images[0].resize((64, 64), Image.BOX), dtype=np.float32)
    assert np.abs(shrunk - small).mean() < 4.0
    found = shapes.detect(out.images[0])
    assert sorted((o.color, o.shape) for o in found.objects) == sorted((o.color, o.shape) for o in spec.objects)
