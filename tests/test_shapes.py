"""Tests of the shapes world (pipelines/shapes.py) and its benchmark
(pipelines/bench/shapes.py).  CPU only; the whole file runs in well under a
minute on two cores."""

import collections
import dataclasses
import json
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from pipelines import shapes as W
from pipelines.bench import shapes as B


# ---------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------


def test_deterministic_per_seed():
    for seed in (0, 1, 12345):
        a, b = W.random_scene(seed), W.random_scene(seed)
        assert a == b
        assert np.array_equal(np.asarray(W.render(a)), np.asarray(W.render(b)))
        assert W.captions(a) == W.captions(b)
    assert W.random_scene(0) != W.random_scene(1)
    x1, c1 = W.scene_batch(7, 16)
    x2, c2 = W.scene_batch(7, 16)
    assert x1.shape == (16, 64, 64, 3) and x1.dtype == np.uint8
    assert np.array_equal(x1, x2) and c1 == c2
    # a Generator is consumed, not reset
    rng = np.random.default_rng(3)
    assert W.random_scene(rng) != W.random_scene(rng)
    for seed in range(20):
        assert W.inpaint_case(seed)[2] == W.inpaint_case(seed)[2]
        assert W.sdedit_case(seed)[1] == W.sdedit_case(seed)[1]


def _check_layout(spec):
    assert spec.background in W.BACKGROUNDS
    n = len(spec.objects)
    assert 1 <= n <= 3
    assert len({o.cell for o in spec.objects}) == n
    assert len({o.pair for o in spec.objects}) == n
    for o in spec.objects:
        assert o.shape in W.SHAPES and o.color in W.COLORS and o.size in W.SIZES
        lo, hi = W.SIZES[o.size] * 0.9, W.SIZES[o.size] * 1.1
        assert lo - 1e-9 <= o.scale <= hi + 1e-9
        row, col = o.row_col
        cx, cy = o.center
        assert col / 3 + W.CELL_MARGIN - 1e-9 <= cx <= (col + 1) / 3 - W.CELL_MARGIN + 1e-9
        assert row / 3 + W.CELL_MARGIN - 1e-9 <= cy <= (row + 1) / 3 - W.CELL_MARGIN + 1e-9
        x0, y0, x1, y1 = o.bbox()
        assert x0 >= W.CANVAS_PAD - 1e-9 and y0 >= W.CANVAS_PAD - 1e-9
        assert x1 <= 1 - W.CANVAS_PAD + 1e-9 and y1 <= 1 - W.CANVAS_PAD + 1e-9
    for a, b in zip(spec.objects, spec.objects[1:] + spec.objects[:1]):
        if a is not b:
            assert not W._boxes_conflict(a, b)


def test_held_out_never_in_training_and_layout_rules():
    seen = collections.Counter()
    rng = np.random.default_rng(0)
    for _ in range(4000):
        spec = W.random_scene(rng)
        _check_layout(spec)
        for o in spec.objects:
            assert o.pair not in W.HELD_OUT
            seen[o.pair] += 1
            seen[o.size] += 1
            seen[o.cell] += 1
        seen[spec.background] += 1
        seen[len(spec.objects)] += 1
    # every training pair, size, cell, background and count shows up
    for key in (*W.TRAIN_PAIRS, *W.SIZES, *W.CELLS, *W.BACKGROUNDS, 1, 2, 3):
        assert seen[key] > 0, key
    assert len(W.HELD_OUT) == 4 and len(W.TRAIN_PAIRS) == 28
    for seed in range(500):
        spec = W.random_scene(seed, held_out=True)
        _check_layout(spec)
        assert any(o.pair in W.HELD_OUT for o in spec.objects)


def test_speed_64():
    W.scene_batch(0, 20)  # warm up
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < 1.5:
        W.scene_batch(n, 50)
        n += 50
    rate = n / (time.perf_counter() - t0)
    cpu_rate = n / max(1e-9, time.process_time() - c0)
    print(f"\nshapes world: {rate:.0f} scenes/s at 64x64 wall clock, {cpu_rate:.0f} per CPU second "
          "(scene + render + captions, one process)")
    assert rate >= 150


def test_render_contract():
    spec = W.SceneSpec("beige", [], noise_seed=1)
    img = np.asarray(W.render(spec, 256)).astype(np.float32)
    assert img.shape == (256, 256, 3)
    bg = np.array(W.BACKGROUNDS["beige"], np.float32)
    top, bottom = img[:4].mean((0, 1)), img[-4:].mean((0, 1))
    assert np.allclose(top, bg * 1.1, atol=2.5) and np.allclose(bottom, bg * 0.9, atol=2.5)
    assert np.allclose(img[126:130].mean((0, 1)), bg, atol=1.5)
    noise = img[100:150] - W.background_model("beige", 256)[100:150, None, :]
    assert 2.5 < noise.std() < 3.5
    # a shadow toward the bottom right, 35% darker
    o = W.ShapeObject("square", "red", "medium", "center", (0.5, 0.5), 0.28)
    spec = W.SceneSpec("gray", [o], noise_seed=2)
    img = W.render_array(spec, 256, noise=False).astype(np.float32)
    y, x = int((0.5 + 0.14) * 256) + 2, int(0.53 * 256)  # just below the square, inside its shadow
    expect = W.background_model("gray", 256)[y] * (1 - W.SHADOW_DARKEN)
    assert np.allclose(img[y, x], expect, atol=4)
    y, x = int((0.5 - 0.14) * 256) - 3, int(0.5 * 256)  # just above it: lit
    assert np.allclose(img[y, x], W.background_model("gray", 256)[y], atol=1)
    assert np.allclose(img[128, 128], W.COLORS["red"], atol=1)
    # other sizes are the 256 canvas area-downsampled
    diffs = []
    for seed in range(30):
        s = W.random_scene(seed)
        a = W.render_array(s, 64, noise=False).astype(np.float32)
        b = cv2.resize(W.render_array(s, 256, noise=False), (64, 64), interpolation=cv2.INTER_AREA)
        diffs.append(np.abs(a - b.astype(np.float32)).mean())
    print(f"\nrender(64) vs render(256) area-downsampled, noise off: mean |diff| {np.mean(diffs):.3f} levels")
    assert np.mean(diffs) < 0.5
    assert W.render(W.random_scene(0), 100).size == (100, 100)


# ---------------------------------------------------------------------------
# The detector, and captions judged true on the drawn image
# ---------------------------------------------------------------------------


def _detector_run(size, seeds, held_out=False):
    tot = collections.Counter()
    ok = collections.Counter()
    for seed in seeds:
        spec = W.random_scene(seed, held_out=held_out)
        det = W.detect(W.render(spec, size))
        tot["scene"] += 1
        ok["background"] += det.background == spec.background
        ok["count"] += len(det.objects) == len(spec.objects)
        for o in spec.objects:
            tot["object"] += 1
            m = [d for d in det.objects if d.cell == o.cell]
            if m:
                for a in ("color", "shape", "cell", "size"):
                    ok[a] += getattr(m[0], a) == getattr(o, a)
        # every caption form is true of the picture, as the benchmark judges it
        forms = dict(W.captions(spec))
        for k, r in enumerate(W.relational_captions(spec)):
            forms[f"relational{k}"] = r
        for form, cap in forms.items():
            res = B.check_prompt(cap, det)
            tot["caption"] += 1
            ok["caption"] += res["full"]
            assert res["full"] or ok["caption"] >= tot["caption"] - 3, (seed, form, cap, res["detected"])
    acc = {a: ok[a] / tot["object"] for a in ("color", "shape", "cell", "size")}
    acc["background"] = ok["background"] / tot["scene"]
    acc["count"] = ok["count"] / tot["scene"]
    acc["captions_true"] = ok["caption"] / tot["caption"]
    return acc, tot


@pytest.mark.parametrize("size,seeds,held_out", [
    (64, range(100_000, 101_000), False),
    (64, range(200_000, 200_200), True),
    (256, range(300_000, 300_300), False),
])
def test_detector_accuracy(size, seeds, held_out):
    acc, tot = _detector_run(size, seeds, held_out)
    print(f"\ndetector @{size} held_out={held_out}: {tot['scene']} scenes, {tot['object']} objects, "
          f"{tot['caption']} captions: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    for a in ("color", "shape", "cell"):
        assert acc[a] >= 0.99, (a, acc)
    assert acc["size"] >= 0.98 and acc["background"] >= 0.99
    assert acc["captions_true"] >= 0.99


def test_detector_rejects_non_world_images():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert W.detect(noise).objects == [] and W.detect(noise).background is None
    blank = W.render(W.SceneSpec("light blue", [], 5), 64)
    det = W.detect(blank)
    assert det.objects == [] and det.background == "light blue"
    # a float CHW tensor-like array in [-1, 1] is accepted too
    spec = W.random_scene(4)
    arr = np.asarray(W.render(spec, 64)).astype(np.float32) / 127.5 - 1
    det = W.detect(np.moveaxis(arr, -1, 0))
    assert sorted(o.pair for o in det.objects) == sorted(o.pair for o in spec.objects)


# ---------------------------------------------------------------------------
# Captions, prompts, tokenizer
# ---------------------------------------------------------------------------


def test_captions_and_parse():
    spec = W.SceneSpec("beige", [
        W.ShapeObject("circle", "red", "large", "top left", (0.22, 0.22), 0.4),
        W.ShapeObject("star", "blue", "small", "center", (0.5, 0.55), 0.18),
    ])
    c = W.captions(spec)
    assert c["dense"] == ("a large red circle at the top left and a small blue star in the center, "
                          "on a beige background")
    assert c["short"] == "a red circle and a blue star"
    assert c["short_bg"] == "a red circle and a blue star on a beige background"
    assert c["relational"] == "a red circle to the left of a blue star"
    assert set(W.relational_captions(spec)) == {
        "a red circle to the left of a blue star", "a red circle above a blue star",
        "a blue star to the right of a red circle", "a blue star below a red circle"}
    r = W.parse_prompt(c["dense"])
    assert r.background == "beige" and r.relation is None
    assert [(o.size, o.color, o.shape, o.cell) for o in r.objects] == [
        ("large", "red", "circle", "top left"), ("small", "blue", "star", "center")]
    r = W.parse_prompt("An orange square below a purple star on a light green background.")
    assert [(o.color, o.shape) for o in r.objects] == [("orange", "square"), ("purple", "star")]
    assert r.relation == (0, "below", 1) and r.background == "light green" and r.held_out
    assert W.parse_prompt("a blue triangle on the right").objects[0].cell == "right"
    assert W.parse_prompt("a circle").objects[0].color is None
    assert "an orange" in W.short_caption([W.ShapeObject("star", "orange", "small", "top", (0.5, 0.2), 0.18)])


def test_caption_for_training():
    rng = np.random.default_rng(0)
    forms = collections.Counter()
    for i in range(600):
        spec = W.random_scene(i)
        cap = W.caption_for_training(spec, rng)
        assert cap
        assert B.check_prompt(cap, spec)["full"], cap  # true of the scene itself
        all_forms = W.captions(spec)
        if any(w in cap for w in (" of ", " above ", " below ")):
            kind = "relational"
        elif ", on " in cap:
            kind = "dense"
        elif " at the " in cap or " on the " in cap or " in the center" in cap:
            kind = "dense_without_background"
        else:
            kind = "short_bg" if cap.endswith("background") else "short"
        forms[kind] += 1
        assert len(cap) >= len(all_forms["short"]) - 5
    assert all(forms[k] > 30 for k in ("dense", "dense_without_background", "short", "short_bg", "relational")), forms


def test_caption_mix_weights_choose_the_training_caption_forms():
    """Weights such as 'relational=1' (training captions leaning on one form): every two-object scene gets
    one of its true relational captions, and a scene without one its dense caption; bad weights are refused."""
    mix = W.parse_caption_mix("relational=1")
    rng = np.random.default_rng(0)
    forms = collections.Counter()
    for i in range(200):
        spec = W.random_scene(i)
        cap = W.caption_for_training(spec, rng, mix)
        assert B.check_prompt(cap, spec)["full"], cap
        if len(spec.objects) == 2:
            assert cap in W.relational_captions(spec)
            forms["relational"] += 1
        else:
            assert any(cell in cap for cell in W.CELL_PHRASES.values()), cap
            forms["dense"] += 1
    assert forms["relational"] > 40 and forms["dense"] > 80, forms
    assert W.parse_caption_mix("dense=0.3, relational=0.5,short=0.2") == {"dense": 0.3, "relational": 0.5, "short": 0.2}
    for bad, named in (("dense", "FORM=WEIGHT"), ("long=1", "FORM=WEIGHT"), ("dense=x", "a number"),
                       ("dense=-1", "0 or more"), ("dense=0,short=0", "no form")):
        with pytest.raises(ValueError, match=named):
            W.parse_caption_mix(bad)


def test_tagged_captions_are_the_training_captions_with_each_objects_words_marked():
    """tagged_caption_for_training draws what caption_for_training draws, and its spans cover the words that
    name each object: size, colour and shape, and the name of its cell; nothing else (articles, relation
    words, the background)."""
    mix = W.parse_caption_mix("dense=1,short=0.5,short_bg=0.5,relational=1")
    for i in range(300):
        spec = W.random_scene(i)
        cap = W.caption_for_training(spec, np.random.default_rng(i), mix)
        tagged, spans = W.tagged_caption_for_training(spec, np.random.default_rng(i), mix)
        assert tagged == cap
        named = collections.defaultdict(list)
        for start, end, k in spans:
            o = spec.objects[k]
            assert cap[start:end] in (f"{o.color} {o.shape}", f"{o.size} {o.color} {o.shape}", o.cell), cap
            named[k].append(cap[start:end])
        assert set(named) == set(range(len(spec.objects))), cap
        assert sum(len(v) for v in named.values()) in (2 * len(spec.objects), len(spec.objects), 2), cap
        assert sum(end - start for start, end, _ in spans) < len(cap)


def test_object_masks_show_where_each_object_is_drawn():
    for i in range(50):
        spec = W.random_scene(i)
        masks = W.object_masks(spec, 64)
        assert masks.shape == (len(spec.objects), 64, 64) and masks.min() >= 0 and masks.sum(0).max() <= 1 + 1e-6
        image = W.render_array(spec, 64, noise=False)
        plain = W.render_array(dataclasses.replace(spec, objects=[]), 64, noise=False)
        for k, o in enumerate(spec.objects):  # where an object covers a pixel wholly, the pixel is its colour
            assert (masks[k] > 0.99).any() or k < len(spec.objects) - 1  # the last drawn is never covered
            assert np.abs(image[masks[k] > 0.99].astype(int) - W.COLORS[o.color]).max(initial=0) <= 1
        # where most of a pixel is an object, the picture differs from the empty scene's
        assert (np.abs(image.astype(int) - plain).max(-1)[masks.sum(0) > 0.5] > 0).all()


def test_tokenizer_round_trip(tmp_path):
    from transformers import PreTrainedTokenizerFast

    W.build_tokenizer(tmp_path / "tok")
    W.build_tokenizer(str(tmp_path / "file" / "tokenizer.json"))
    for path in (tmp_path / "tok" / "tokenizer.json", tmp_path / "file" / "tokenizer.json"):
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        vocab = tok.get_vocab()
        assert len(vocab) < 100
        assert vocab["[PAD]"] == 0 and vocab["[UNK]"] == 1 and vocab["[END]"] == 2
        rng = np.random.default_rng(1)
        for i in range(300):
            spec = W.random_scene(rng, held_out=(i % 3 == 0))
            for cap in [*W.captions(spec).values(), *W.relational_captions(spec)]:
                ids = tok(cap)["input_ids"]
                assert ids[-1] == vocab["[END]"] and vocab["[UNK]"] not in ids
                text = tok.decode(ids, skip_special_tokens=True).replace(" ,", ",")
                assert text == cap
        assert tok("A RED Star")["input_ids"] == tok("a red star")["input_ids"]
        assert tok("a red zebra")["input_ids"][2] == vocab["[UNK]"]
    tok = W.load_tokenizer(tmp_path / "tok")
    batch = tok(["a red star", "a large blue circle at the top left"], padding="max_length", max_length=12)
    assert batch["input_ids"][0][4:] == [0] * 8 and tok.pad_token_id == 0 and tok.eos_token_id == 2


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------


def test_prompt_set_v1():
    pset = B.load_prompts()
    assert pset["version"] == "shapes_prompts_v1"
    assert set(pset["groups"]) == {"single", "pair", "relation", "background", "held_out"}
    for group, prompts in pset["groups"].items():
        assert len(prompts) == len(set(prompts)) >= 8
        for p in prompts:
            req = W.parse_prompt(p)
            assert req.objects and all(o.color and o.shape for o in req.objects), p
            assert req.held_out == (group == "held_out"), p
            if group == "relation":
                assert req.relation is not None
            if group == "background":
                assert req.background is not None
            # the oracle can draw it, and then the checker agrees
            spec = W.spec_from_prompt(p, 0)
            assert B.check_prompt(p, spec)["full"], p


def test_noise_model_scores_near_zero_and_oracle_near_one():
    gen_noise, inp_noise, sd_noise = B.noise_model()
    res = B.eval_text2image(gen_noise, B.load_prompts(), seeds=(0, 1), keep_images=False)
    s = res["summary"]["all"]
    print("\nnoise model t2i:", {k: s[k] for k in ("color", "shape", "object", "full")})
    assert s["full"] <= 0.02 and s["object"] <= 0.02
    assert s["color"] <= 0.05 and s["shape"] <= 0.05
    assert res["summary"]["held_out"]["full"] <= 0.02

    gen_or, inp_or, sd_or = B.oracle_model()
    pset = B.load_prompts()
    res = B.eval_text2image(gen_or, pset, seeds=(0,), keep_images=False)
    s = res["summary"]
    assert s["all"]["full"] >= 0.98 and s["held_out"]["full"] >= 0.98
    assert s["held_out"]["n_images"] == len(pset["groups"]["held_out"])


def test_inpaint_benchmark():
    for seed in range(30):
        image, mask, prompt, exp = W.inpaint_case(seed)
        m = np.asarray(mask) > 127
        new = [o for o in exp.after.objects if o.cell == exp.cell][0]
        assert m[int(new.center[1] * 64), int(new.center[0] * 64)]
        for o in exp.after.objects:  # objects that stay are outside the mask
            if o.cell != exp.cell:
                assert not m[int(o.center[1] * 64), int(o.center[0] * 64)]
        assert W.parse_prompt(prompt).objects
    _, inp_or, _ = B.oracle_model()
    res = B.eval_inpaint(inp_or, 24)
    s = res["summary"]
    assert s["found"] >= 0.95 and s["changed_outside_max"] == 0 and abs(s["seam"]) < 1.0
    assert abs(s["seam_median"]) < 1.0
    assert s["found_add"] is not None and s["found_replace"] is not None
    _, inp_noise, _ = B.noise_model()
    s = B.eval_inpaint(inp_noise, 24, keep_images=False)["summary"]
    assert s["found"] <= 0.05 and s["changed_outside_max"] == 0 and s["seam"] > 20 and s["seam_median"] > 20

    def sloppy(image, mask, prompt, seed):  # touches the whole image
        return Image.fromarray(np.clip(np.asarray(image).astype(int) + 3, 0, 255).astype(np.uint8))

    s = B.eval_inpaint(sloppy, 4, keep_images=False)["summary"]
    assert s["changed_outside_mean"] > 1000 and s["untouched_outside"] == 0


def test_sdedit_benchmark():
    _, _, sd_or = B.oracle_model()
    _, _, sd_noise = B.noise_model()
    a = B.eval_sdedit(sd_or, 24)["summary"]
    b = B.eval_sdedit(sd_noise, 24, keep_images=False)["summary"]
    assert a["found"] >= 0.95 and b["found"] <= 0.05
    assert a["stray"] < b["stray"]


def test_guidance_sweep_and_cli(tmp_path):
    gen, _, _ = B.noise_model()
    res = B.guidance_sweep(gen, ["a red star", "a blue circle"], seeds=(0, 1, 2), scales=(1, 4, 8))
    assert [r["scale"] for r in res["rows"]] == [1, 4, 8]
    assert all(r["full"] == 0 and r["diversity"] > 0.2 for r in res["rows"])
    out = tmp_path / "bench"
    B.main(["--noise", "--seeds", "1", "--limit", "2", "--out", str(out), "--inpaint-cases", "3",
            "--sdedit-cases", "3", "--sweep-prompts", "2", "--sweep-seeds", "2", "--sweep-scales", "1,3"])
    data = json.loads((out / "shapes_bench.json").read_text())
    assert data["prompt_set"] == "shapes_prompts_v1" and data["model"] == "noise"
    assert set(data["tasks"]) == {"t2i", "inpaint", "sdedit", "sweep"}
    assert data["tasks"]["t2i"]["summary"]["all"]["full"] == 0
    for name in ("t2i_samples.png", "inpaint_samples.png", "sdedit_samples.png", "sweep_samples.png"):
        assert Image.open(out / name).size[0] > 0
