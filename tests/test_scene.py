"""Scene: the edit graph (undo/redo/branches), atomic folder save/load, bit-exact replay on CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import (InpaintPipeline, ModelStore, PipelineInputError, Scene, SceneError, SDEditPipeline,
                       Text2ImagePipeline, UpsamplePipeline)
from pipelines.scene import Node

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

STEPS = dict(num_inference_steps=2)


@pytest.fixture(scope="module")
def store(tiny_models):
    return ModelStore.shared(tiny_models, device="cpu")


def mask_of(size, box) -> Image.Image:
    m = Image.new("L", size, 0)
    m.paste(255, box)
    return m


def build_scene(store) -> tuple[Scene, dict]:
    """generate → inpaint → sdedit (sketch input, masked) ; branch: inpaint (replace) ; upsample."""
    t2i, ip, sd, up = (Text2ImagePipeline(store), InpaintPipeline(store), SDEditPipeline(store), UpsamplePipeline(store))
    scene = Scene()
    ids = {}
    ids["gen"] = scene.run(t2i, prompt="a red circle", seed=1, num_inference_steps=2, upsample_steps=2).id
    size = scene.image(ids["gen"]).size
    ids["ip"] = scene.run(ip, prompt="a blue star", mask_image=mask_of(size, (8, 8, 40, 40)), seed=2, **STEPS).id
    sketch = np.array(scene.image(ids["ip"]))
    sketch[40:60, 5:25] = (0, 200, 0)
    ids["sd"] = scene.run(sd, prompt="a green square", input_image=Image.fromarray(sketch), strength=0.7,
                          mask_image=mask_of(size, (0, 36, 30, 64)), seed=3, num_inference_steps=4,
                          upsample=False).id
    scene.checkout(ids["ip"])
    ids["branch"] = scene.run(ip, prompt="a yellow triangle", mode="replace",
                              mask_image=mask_of(size, (30, 30, 60, 60)), seed=4, **STEPS).id
    ids["small"] = scene.import_image(Image.new("RGB", (16, 16), (200, 30, 30)), source="red.png").id
    ids["up"] = scene.run(up, prompt="a red square", seed=5, **STEPS).id
    return scene, ids


def test_graph_undo_redo_and_branches(store):
    scene, ids = build_scene(store)
    assert [n.id for n in scene.children(ids["ip"])] == [ids["sd"], ids["branch"]]
    assert [n.op for n in scene.nodes.values()] == ["generate", "inpaint", "sdedit", "inpaint", "import", "upsample"]
    assert scene.nodes[ids["sd"]].has_input and scene.nodes[ids["sd"]].has_mask
    assert scene.nodes[ids["ip"]].changed_outside_mask == 0 and not scene.nodes[ids["ip"]].has_input
    # back on the first tree: undo / redo follow the branch visited last
    scene.checkout(ids["branch"])
    assert scene.undo().id == ids["ip"] and scene.redo().id == ids["branch"]
    scene.checkout(ids["sd"])
    assert scene.undo().id == ids["ip"] and scene.redo().id == ids["sd"]
    assert scene.undo().id == ids["ip"] and scene.undo().id == ids["gen"] and scene.undo().id == ids["gen"]
    assert not scene.can_undo and scene.can_redo
    assert scene.redo().id == ids["ip"]
    assert [n.id for n in scene.lineage(ids["sd"])] == [ids["gen"], ids["ip"], ids["sd"]]
    assert {n.id for n in scene.roots()} == {ids["gen"], ids["small"]}
    with pytest.raises(SceneError):
        scene.checkout("nope")


def test_failed_call_leaves_the_scene_unchanged(store):
    scene, ids = build_scene(store)
    before = (list(scene.nodes), scene.current_id)
    with pytest.raises(PipelineInputError):
        scene.run(InpaintPipeline(store), prompt="x", mask_image=Image.new("L", (64, 64), 0))
    with pytest.raises(ValueError):
        scene.run(SDEditPipeline(store), prompt="x", sampler="nope")
    assert (list(scene.nodes), scene.current_id) == before
    with pytest.raises(SceneError):
        Scene().run(InpaintPipeline(store), prompt="x", mask_image=Image.new("L", (8, 8), 255))


def test_save_load_replay_bit_exact(store, tmp_path):
    scene, ids = build_scene(store)
    folder = scene.save(tmp_path / "scene")
    files = sorted(p.name for p in (folder / "images").iterdir())
    assert f"{ids['sd']}.input.png" in files and f"{ids['sd']}.mask.png" in files
    assert f"{ids['ip']}.input.png" not in files  # its input is its parent's image
    data = json.loads((folder / "scene.json").read_text())
    assert data["format"] == "glide-studio-scene" and data["current"] == ids["up"]
    assert json.loads(Image.open(folder / f"images/{ids['ip']}.png").text["parameters"])["seed"] == 2

    loaded = Scene.load(folder)
    assert loaded.warnings == [] and list(loaded.nodes) == list(scene.nodes)
    assert loaded.current_id == scene.current_id
    for nid in scene.nodes:
        assert np.array_equal(np.asarray(loaded.image(nid)), np.asarray(scene.image(nid)))
        assert loaded[nid].params == scene[nid].params
    seen = []
    # the scene was made with 1 CPU thread; params carry it, so replay matches under another count
    assert all(n.params["num_threads"] == 1 for n in scene.nodes.values() if n.op != "import")
    torch.set_num_threads(2)
    try:
        report = loaded.replay(store, progress=lambda i, n, nid: seen.append(i))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert report.errors == {}
    assert [r.node_id for r in report] == list(scene.nodes)
    assert all(r.reproduced and r.max_abs_diff == 0 for r in report), report
    assert seen[-1] == len(scene.nodes)


def test_save_writes_only_new_files_and_replay_detects_tampering(store, tmp_path):
    scene, ids = build_scene(store)
    folder = scene.save(tmp_path / "s")
    stamp = {p.name: p.stat().st_mtime_ns for p in (folder / "images").iterdir()}
    # a new edit: only its PNG is written, existing node files are not rewritten
    scene.checkout(ids["gen"])
    new = scene.run(SDEditPipeline(store), prompt="a star", strength=0.5, seed=9, num_inference_steps=4,
                    upsample=False)
    scene.save()
    after = {p.name: p.stat().st_mtime_ns for p in (folder / "images").iterdir()}
    assert set(after) - set(stamp) == {f"{new.id}.png"}
    assert all(after[k] == v for k, v in stamp.items())
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left
    # tamper with one saved image: replay reports it, the others still reproduce
    path = folder / f"images/{ids['ip']}.png"
    img = np.array(Image.open(path))
    img[0, 0] = 255 - img[0, 0]
    Image.fromarray(img).save(path)
    loaded = Scene.load(folder)
    report = {r.node_id: r for r in loaded.replay(store, nodes=[ids["ip"], new.id])}
    assert not report[ids["ip"]].reproduced and report[ids["ip"]].max_abs_diff > 0
    assert report[new.id].reproduced


def test_replay_with_a_missing_model_reports_instead_of_crashing(store, tmp_path):
    scene, ids = build_scene(store)
    folder = scene.save(tmp_path / "s")
    (tmp_path / "no_models").mkdir()
    report = Scene.load(folder).replay(tmp_path / "no_models")
    assert not report.all_reproduced
    assert report[0].reproduced is False and "CheckpointError" in report.errors[ids["gen"]]
    assert {r.node_id for r in report if r.reproduced} == {ids["small"]}  # import nodes need no model


def test_params_recorded_before_part_way_upsampling_replay_from_noise():
    # scenes saved before upsample_strength existed ran the upsampler from pure noise
    old = {"id": "n1", "parent": None, "op": "generate",
           "params": {"pipeline": "text2image", "upsample_steps": "fast27"}}
    assert Node.from_json(old).params["upsample_strength"] == 1.0
    old_up = {"id": "n2", "parent": "n1", "op": "upsample", "params": {"pipeline": "upsample", "temperature": 0.997}}
    assert Node.from_json(old_up).params["strength"] == 1.0
    new = {"id": "n3", "parent": None, "op": "generate",
           "params": {"pipeline": "text2image", "upsample_steps": 25, "upsample_strength": 0.4}}
    assert Node.from_json(new).params["upsample_strength"] == 0.4


def test_params_recorded_before_the_guidance_interval_replay_guided_at_every_step(store, tmp_path):
    t2i = Text2ImagePipeline(store)
    scene = Scene()
    node = scene.run(t2i, prompt="a red circle", seed=1, guidance_min_t=0, num_inference_steps=4, upsample=False)
    del node.params["guidance_min_t"]  # as a scene saved before the option existed
    loaded = Scene.load(scene.save(tmp_path / "s"))
    assert loaded.nodes[node.id].params["guidance_min_t"] == 0
    assert loaded.replay(store).all_reproduced
    recent = {"id": "n", "parent": None, "op": "generate",
              "params": {"pipeline": "text2image", "upsample_steps": 25, "guidance_min_t": 300}}
    assert Node.from_json(recent).params["guidance_min_t"] == 300


def test_load_errors_and_missing_files(store, tmp_path):
    with pytest.raises(SceneError, match="not a scene folder"):
        Scene.load(tmp_path)
    (tmp_path / "scene.json").write_text("{ truncated")
    with pytest.raises(SceneError, match="unreadable"):
        Scene.load(tmp_path)
    scene, ids = build_scene(store)
    folder = scene.save(tmp_path / "ok")
    (folder / f"images/{ids['small']}.png").unlink()
    loaded = Scene.load(folder)
    assert any(ids["small"] in w for w in loaded.warnings)
    with pytest.raises(SceneError, match="missing"):
        loaded.image(ids["small"])
    data = json.loads((folder / "scene.json").read_text())
    data["nodes"][1]["parent"] = "ghost"
    (folder / "scene.json").write_text(json.dumps(data))
    with pytest.raises(SceneError, match="parent"):
        Scene.load(folder)


def test_node_ids_that_name_paths_are_refused(store, tmp_path):
    """A node's files are images/<id>.png: a scene.json (from an imported zip) whose id walks out
    of the folder must not read a file there."""
    secret = tmp_path / "outside.png"
    Image.new("RGB", (8, 8), "red").save(secret)
    scene, _ = build_scene(store)
    folder = scene.save(tmp_path / "scene")
    data = json.loads((folder / "scene.json").read_text())
    for bad in ("../../outside", "a/b", "..", "", "x" * 65):
        data["nodes"][0]["id"] = bad
        (folder / "scene.json").write_text(json.dumps(data))
        with pytest.raises(SceneError, match="not a plain name"):
            Scene.load(folder)


def test_a_mask_with_transparency_is_recorded_as_the_pipeline_read_it(store, tmp_path):
    """White strokes on a transparent layer whose hidden colour is white too: the pipeline keeps the
    transparent pixels, and the scene must record that mask, or the replay would regenerate more."""
    scene = Scene()
    scene.import_image(Image.new("RGB", (32, 32), (90, 120, 200)))
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[8:16, 8:20, 3] = 255
    node = scene.run(InpaintPipeline(store), prompt="a red circle", mask_image=Image.fromarray(rgba, "RGBA"),
                     seed=1, **STEPS)
    assert (np.asarray(scene.mask(node.id)) >= 128).sum() == 8 * 12
    scene.save(tmp_path / "s")
    report = Scene.load(tmp_path / "s").replay(store)
    assert report.all_reproduced, report.errors
