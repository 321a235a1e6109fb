"""Projects on disk (studio/projects.py), the fine-tune backend's file handling, and the controller's
UI-value conversions and Stop, without a web server.

What is pinned down: a project saved after an edit reopens identically from a fresh store (an app
restart); ids cannot name paths outside the projects folder; variations survive a restart and
"use this" adds a sibling node; the exported PNG carries the whole recipe; a zip round trip
replays bit-exactly; unsafe or foreign zips are refused; the mask is read from layer alpha.
"""

from __future__ import annotations

import json
import threading
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from pipelines import InpaintPipeline, ModelStore, Text2ImagePipeline
from studio.finetune import FineTuneError, FineTuner, read_log, training_data_roots
from studio.projects import ProjectError, ProjectStore, read_recipe
from studio.session import (Studio, check_image, editor_composite, editor_layers_alpha, mask_image_from, read_upload)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

FAST = dict(num_inference_steps=3)


@pytest.fixture(scope="module")
def store(tiny_models):
    return ModelStore(tiny_models)


def _edited_project(projects: ProjectStore, store) -> tuple:
    """A project with generate (2 variations) → inpaint, saved like the studio does."""
    project = projects.create("cozy room")
    gen = Text2ImagePipeline(store)("a red circle", seed=3, num_images=2, upsample=False, **FAST)
    node = project.scene.apply(gen, op="generate", index=0)
    project.save()
    project.save_last_run(gen, node_id=node.id, parent_id=None, op="generate")
    image = project.scene.image(node.id)
    mask = np.zeros(image.size[::-1], np.uint8)
    mask[4:10, 5:12] = 255
    inp = InpaintPipeline(store)("a blue star", image, Image.fromarray(mask), seed=5, **FAST)
    project.scene.apply(inp, op="inpaint", mask_image=Image.fromarray(mask))
    project.save()
    return project, gen, inp


def test_create_list_open_delete(tmp_path):
    projects = ProjectStore(tmp_path)
    a, b = projects.create("first"), projects.create("")
    listed = {p["id"]: p for p in projects.list()}
    assert set(listed) == {a.id, b.id} and listed[a.id]["name"] == "first" and listed[b.id]["name"]
    assert projects.open(a.id) is a  # one shared object per project
    projects.rename(a.id, "renamed")
    assert ProjectStore(tmp_path).open(a.id).name == "renamed"
    projects.delete(a.id)
    assert not projects.exists(a.id) and [p["id"] for p in projects.list()] == [b.id]
    with pytest.raises(ProjectError, match="does not exist"):
        projects.open(a.id)
    (tmp_path / "finetuned").mkdir()  # other folders are never listed as projects
    assert [p["id"] for p in projects.list()] == [b.id]


@pytest.mark.parametrize("bad", ["../etc", "..", "/tmp/x", "abc", "ABCDEF012345", None, 12, "0123456789ab/.."])
def test_ids_cannot_name_other_paths(tmp_path, bad):
    projects = ProjectStore(tmp_path)
    assert not projects.exists(bad)
    with pytest.raises(ProjectError, match="not a project id"):
        projects.open(bad)


def test_project_survives_a_restart_with_its_variations(tmp_path, store):
    projects = ProjectStore(tmp_path)
    project, gen, inp = _edited_project(projects, store)
    ids = list(project.scene.nodes)
    assert project.scene.current.op == "inpaint" and project.scene.current.changed_outside_mask == 0

    again = ProjectStore(tmp_path).open(project.id)  # a fresh process: everything from disk
    assert list(again.scene.nodes) == ids and again.scene.current_id == ids[-1]
    assert np.array_equal(np.asarray(again.scene.image(ids[-1])), np.asarray(inp.images[0]))
    assert np.array_equal(np.asarray(again.scene.mask(ids[-1])), np.asarray(project.scene.mask(ids[-1])))
    assert again.scene.can_undo
    # the last run's variations came back too; "use this" on the 2nd adds a sibling of the 1st
    assert len(again.last_run_images()) == 2
    node_id = again.use_variation(1)
    node = again.scene[node_id]
    assert node.parent is None and node.index == 1 and node.op == "generate"
    assert np.array_equal(np.asarray(again.scene.image(node_id)), np.asarray(gen.images[1]))
    assert again.use_variation(1) == node_id  # a second click checks the same node out
    with pytest.raises(ProjectError, match="does not exist"):
        again.use_variation(5)


def test_export_png_has_the_whole_recipe(tmp_path, store):
    project, gen, inp = _edited_project(ProjectStore(tmp_path / "p"), store)
    path = project.export_png(tmp_path / "out")
    with Image.open(path) as im:
        assert im.format == "PNG" and json.loads(im.text["parameters"])["op"] == "inpaint"
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(inp.images[0]))
    recipe = read_recipe(path)
    assert [s["op"] for s in recipe["steps"]] == ["generate", "inpaint"]
    assert recipe["steps"][0]["params"]["seed"] == 3 and recipe["steps"][1]["params"]["prompt"] == "a blue star"
    assert "mask_png_b64" in recipe["steps"][1] and recipe["steps"][1]["changed_outside_mask"] == 0


def test_zip_round_trip_replays_bit_exactly(tmp_path, store):
    projects = ProjectStore(tmp_path / "p")
    project, _, _ = _edited_project(projects, store)
    zpath = project.export_zip(tmp_path / "out")
    with zipfile.ZipFile(zpath) as zf:
        names = zf.namelist()
    assert "project.json" in names and "scene/scene.json" in names
    assert not any(n.startswith(".") or "/." in n for n in names)

    other = ProjectStore(tmp_path / "elsewhere")
    imported = other.import_zip(zpath)
    assert imported.id != project.id and imported.name == "cozy room"
    assert [n.op for n in imported.scene.nodes.values()] == ["generate", "inpaint"]
    report = imported.scene.replay(store)
    assert report.all_reproduced and len(report) == 2, report.errors


def test_unsafe_or_foreign_zips_are_refused(tmp_path):
    projects = ProjectStore(tmp_path / "p")
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("project.json", "{}")
        zf.writestr("scene/scene.json", "{}")
        zf.writestr("../../outside.txt", "x")
    with pytest.raises(ProjectError, match="unsafe path"):
        projects.import_zip(evil)
    assert not (tmp_path / "outside.txt").exists()
    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(ProjectError, match="not a studio project"):
        projects.import_zip(foreign)
    notzip = tmp_path / "not.zip"
    notzip.write_bytes(b"PK\x03\x04 nope")
    with pytest.raises(ProjectError, match="not a readable zip"):
        projects.import_zip(notzip)
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(damaged, "w") as zf:
        zf.writestr("project.json", "{}")
        zf.writestr("scene/scene.json", "{not json")
    with pytest.raises(ProjectError, match="damaged"):
        projects.import_zip(damaged)
    assert projects.list() == []


def test_mask_comes_from_layer_alpha_and_composite_is_built_here():
    bg = np.zeros((20, 30, 4), np.uint8)
    bg[..., :3], bg[..., 3] = 100, 255
    layer = np.zeros((20, 30, 4), np.uint8)
    layer[5:8, 10:20] = (255, 45, 149, 140)  # the semi-transparent mask brush
    value = {"background": bg, "layers": [layer], "composite": None}
    alpha = editor_layers_alpha(value)
    assert alpha.sum() == 30 and alpha[5:8, 10:20].all()
    assert editor_layers_alpha({"background": bg, "layers": [], "composite": None}) is None
    comp = np.asarray(editor_composite(value))
    assert comp.shape == (20, 30, 3) and (comp[0, 0] == 100).all() and (comp[6, 12] != 100).any()
    m = mask_image_from(alpha, (60, 40))
    assert m.size == (60, 40) and m.mode == "L" and set(np.unique(np.asarray(m))) == {0, 255}


def test_uploads_are_checked(tmp_path):
    import gradio as gr

    (tmp_path / "a.pdf").write_bytes(b"%PDF-1.4 hello")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.new("RGB", (1, 1)).save(tmp_path / "one.png")
    Image.new("RGB", (40, 30), "red").save(tmp_path / "ok.png")
    for name, message in [("a.pdf", "PDF"), ("bad.png", "not a readable image"), ("one.png", "1x1")]:
        with pytest.raises(gr.Error, match=message):
            read_upload(tmp_path / name)
    assert read_upload(tmp_path / "ok.png").size == (40, 30)
    with pytest.raises(gr.Error, match="largest accepted side"):
        check_image(Image.new("L", (5000, 20)))


def test_finetune_log_reader_and_model_sets(tmp_path, tiny_models):
    run = tmp_path / "finetuned" / "myrun"
    run.mkdir(parents=True)
    lines = [json.dumps({"event": "start", "step": 0})] + [json.dumps({"step": s, "loss": 1.0 / (s + 1)})
                                                           for s in range(1, 6)]
    (run / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "lo')  # a half-written last line
    steps, events = read_log(run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5] and events[0]["event"] == "start"
    (run / "run.json").write_text("{}")
    tuner = FineTuner(tmp_path / "finetuned", tiny_models)
    assert tuner.runs() == ["myrun"] and tuner.model_sets() == {}  # no export yet
    import shutil

    shutil.copytree(tiny_models / "base-inpaint", run / "model")
    sets = tuner.model_sets()
    models = sets["fine-tuned: myrun"]
    assert (models / "base-inpaint").resolve() == (run / "model").resolve()
    assert (models / "base" / "config.json").is_file()
    assert ModelStore(models).has("base-inpaint") and ModelStore(models).has("base")
    st = tuner.status("myrun")
    assert st["step"] == 5 and st["model"] and st["state"] == "idle"
    with pytest.raises(ValueError, match="run name"):
        tuner.run_dir("../escape")
    with pytest.raises(ValueError, match="not a folder"):
        tuner.start(data=str(tmp_path / "missing"), name="x")


class _Request:
    def __init__(self, key):
        self.session_hash = key


def _settings(**changes) -> list:
    """The Settings panel's values, in SETTINGS order: a fixed seed, 3 ddim steps, no upsampler."""
    from studio.session import SETTINGS

    values = dict(steps="3", sampler="ddim", guidance="auto", seed_mode="fixed", seed=1, num_images=1, mask_blur=4,
                  inpaint_mode="finetuned", upsample="off", upsample_strength=0.4, model="default")
    return [{**values, **changes}[k] for k in SETTINGS]


def _run_until_registered(studio, target, key="me") -> threading.Thread:
    """Start `target` in a thread and return once its run is registered for Stop under `key`."""
    worker = threading.Thread(target=target)
    worker.start()
    deadline = time.time() + 60
    while key not in studio._active and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    return worker


def test_stop_interrupts_only_that_sessions_run(tmp_path, tiny_models):
    """Stop (outside the queue) interrupts the running pipeline of the same browser session within
    a step; another session's Stop does nothing; nothing is recorded in the project."""
    studio = Studio(tiny_models, tmp_path)
    project = studio.projects.create()
    from studio.session import RUN_OUTPUTS

    frames = []

    def run():
        gen = studio.generate(project.id, "a red circle", "", *_settings(steps=200, guidance=3.0),
                              request=_Request("me"), progress=lambda *a, **k: None)
        for frame in gen:
            frames.append(dict(zip(RUN_OUTPUTS, frame)))

    worker = _run_until_registered(studio, run)
    assert studio.stop(request=_Request("someone else")).startswith("Nothing of yours is running")
    t0 = time.perf_counter()
    assert studio.stop(request=_Request("me")) == "Stopping…"
    worker.join(30)
    assert not worker.is_alive() and time.perf_counter() - t0 < 10
    assert "Stopped" in frames[-1]["status"]
    assert len(project.scene) == 0 and "me" not in studio._active


def test_stop_also_reaches_that_sessions_runs_waiting_in_the_queue(tmp_path, tiny_models):
    """A run carries its tab's Stop count from when it was submitted: after a later Stop from that tab it
    does nothing when its turn comes; a run submitted after the Stop, or another tab's run, goes ahead."""
    studio = Studio(tiny_models, tmp_path)
    project = studio.projects.create()
    from studio.session import RUN_OUTPUTS

    def run(stop_count, session="me"):
        frames = studio.generate(project.id, "a red circle", "", *_settings(steps=3, guidance=3.0), stop_count,
                                 request=_Request(session), progress=lambda *a, **k: None)
        return [dict(zip(RUN_OUTPUTS, f)) for f in frames][-1]["status"]

    # nothing runs yet: both queued runs below were submitted before this Stop (count 0 -> 1)
    assert "will not start" in studio.stop(1, request=_Request("me"))
    assert "Stopped before it started" in run(0)
    assert len(project.scene) == 0
    assert "generate done" in run(0, session="another tab")
    assert "generate done" in run(1)  # submitted after the Stop
    assert len(project.scene) == 2


def test_settings_panel_steps_and_upsampler_strength_reach_the_pipelines(tmp_path, tiny_models):
    """The Settings panel's steps ("auto" = the action's default) and upsampler strength are used by
    Generate and recorded with the node (so a replay uses them); a value the pipelines refuse (a
    strength outside (0, 1], an impossible spacing) gets a message and records nothing."""
    import gradio as gr

    from pipelines.defaults import DEFAULT_STEPS
    from studio.session import RUN_OUTPUTS

    studio = Studio(tiny_models, tmp_path)
    project = studio.projects.create()
    def generate(**changes):
        values = _settings(**{"steps": "auto", "guidance": 3.0, "upsample": "on", "upsample_strength": 0.25,
                              **changes})
        frames = list(studio.generate(project.id, "a red circle", "", *values, request=_Request("me"),
                                      progress=lambda *a, **k: None))
        return dict(zip(RUN_OUTPUTS, frames[-1]))

    assert "done" in generate()["status"]
    node = project.scene.current
    assert node.params["num_inference_steps"] == DEFAULT_STEPS
    assert node.params["upsample_strength"] == 0.25 and project.scene.image(node.id).size == (64, 64)  # 16 -> 64
    with pytest.raises(gr.Error, match="upsampler strength"):
        generate(upsample_strength=0)
    with pytest.raises(gr.Error, match="ddim37"):
        generate(steps="ddim37")
    assert "done" in generate(steps="4")["status"] and project.scene.current.params["num_inference_steps"] == 4
    assert len(project.scene) == 2


STUB_TRAINER = r'''
import json, os, shutil, signal, sys, time
args = sys.argv[1:]
out = args[args.index("--out") + 1]
os.makedirs(out, exist_ok=True)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
log = open(os.path.join(out, "log.jsonl"), "a")
step = sum(1 for line in open(os.path.join(out, "log.jsonl")) if '"loss"' in line)
json.dump({"args": args}, open(os.path.join(out, "run.json"), "w"))
log.write(json.dumps({"event": "start", "step": step, "resumed": "--resume" in args}) + "\n"); log.flush()
deadline = time.time() + 60  # never outlive a failed test for long
while not stop and time.time() < deadline:
    step += 1
    log.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n"); log.flush()
    time.sleep(0.02)
shutil.copytree(os.environ["STUB_MODEL"], os.path.join(out, "model"), dirs_exist_ok=True)
log.write(json.dumps({"event": "end", "step": step, "reason": "signal"}) + "\n"); log.flush()
'''


def test_finetune_reachable_from_the_network_trains_only_inside_its_data_folders(tmp_path, tiny_models):
    import sys

    assert training_data_roots("127.0.0.1", tmp_path / "projects") is None  # local: any folder
    roots = training_data_roots("0.0.0.0", tmp_path / "projects", tmp_path / "shared")
    assert roots == [tmp_path / "projects" / "datasets", tmp_path / "shared"]
    allowed, outside = roots[0] / "mine", tmp_path / "elsewhere"
    allowed.mkdir(parents=True)
    outside.mkdir()
    (roots[0] / "link").symlink_to(outside)
    tuner = FineTuner(tmp_path / "finetuned", tiny_models, trainer=[sys.executable, "-c", "pass"], data_roots=roots)
    try:
        for i, folder in enumerate([outside, roots[0] / "link", allowed / ".." / ".." / ".." / "elsewhere"]):
            with pytest.raises(FineTuneError, match="reachable from the network.*--finetune-data"):
                tuner.start(data=str(folder), name=f"refused{i}")
            assert not (tuner.root / f"refused{i}").exists()
        assert tuner.start(data=str(allowed), name="inside") == "inside"
    finally:
        tuner.close()


def test_finetune_start_stop_resume_with_a_stub_trainer(tmp_path, tiny_models, monkeypatch):
    """Subprocess management of the Fine-tune tab: start, SIGTERM stop (the trainer saves and
    exports), resume, the live log, and the exported model joining the model list."""
    import sys

    stub = tmp_path / "stub_trainer.py"
    stub.write_text(STUB_TRAINER)
    monkeypatch.setenv("STUB_MODEL", str(tiny_models / "base-inpaint"))
    data = tmp_path / "data"
    data.mkdir()
    tuner = FineTuner(tmp_path / "finetuned", tiny_models, trainer=[sys.executable, str(stub)])

    def wait_for_steps(n):
        deadline = time.time() + 30
        while tuner.status("run1")["step"] < n and time.time() < deadline:
            time.sleep(0.05)
        return tuner.status("run1")

    tuner.start(data=str(data), name="run1", steps=50)
    try:
        _start_stop_resume(tuner, data, wait_for_steps)
    finally:
        tuner.close()  # a failed assertion must not leave the trainer running


def _start_stop_resume(tuner, data, wait_for_steps):
    assert tuner.running == "run1"
    with pytest.raises(ValueError, match="still training"):
        tuner.start(data=str(data), name="run2")
    assert wait_for_steps(3)["state"] == "training"
    assert tuner.model_sets() == {}  # nothing exported yet
    assert "stopped and saved" in tuner.stop()
    st = tuner.status("run1")
    assert tuner.running is None and "stopped at step" in st["state"] and st["model"]
    assert "fine-tuned: run1" in tuner.model_sets()
    first = st["step"]
    with pytest.raises(ValueError, match="exists"):
        tuner.start(data=str(data), name="run1")
    tuner.resume("run1")
    assert wait_for_steps(first + 3)["step"] > first  # the log continues where it stopped
    tuner.stop()
    args = json.loads((tuner.root / "run1" / "run.json").read_text())["args"]
    assert "--resume" in args and "--init" not in args
    assert "$ " in tuner.status("run1")["tail"]


def _zip_of(project_folder, zpath, edit=lambda name, data: data):
    """A zip of a project folder, each entry passed through `edit(name, bytes)` (None drops it)."""
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(project_folder.rglob("*")):
            name = f.relative_to(project_folder).as_posix()
            if f.is_file() and not name.startswith(".") and "/." not in name:
                data = edit(name, f.read_bytes())
                if data is not None:
                    zf.writestr(name, data)
    return zpath


def test_damaged_or_hostile_project_zips_are_refused_with_a_message(tmp_path, store):
    """A zip that a studio did not write whole: a node id that walks out of the folder (it would
    read any PNG on the server), a project.json that is not an object, a missing or broken image,
    a CRC error. Each is refused with a message, and nothing is imported."""
    Image.new("RGB", (8, 8), "red").save(tmp_path / "secret.png")
    project, _, _ = _edited_project(ProjectStore(tmp_path / "p"), store)
    first = next(iter(project.scene.nodes))
    image = f"scene/images/{first}.png"

    def traversal(name, data):
        hops = "../" * 6  # from p/<id>/scene/images/ up to tmp_path
        return data.replace(f'"{first}"'.encode(), f'"{hops}secret"'.encode()) if name == "scene/scene.json" else data

    cases = {
        "traversal": (traversal, "not a plain name"),
        "list": (lambda n, d: b"[]" if n == "project.json" else d, "not a JSON object"),
        "missing": (lambda n, d: None if n == image else d, "incomplete"),
        "broken": (lambda n, d: b"\x89PNG\r\n\x1a\nnope" if n == image else d, "not a readable image"),
    }
    projects = ProjectStore(tmp_path / "dest")
    for name, (edit, message) in cases.items():
        with pytest.raises(ProjectError, match=message):
            projects.import_zip(_zip_of(project.folder, tmp_path / f"{name}.zip", edit))
    crc = _zip_of(project.folder, tmp_path / "crc.zip")
    raw = bytearray(crc.read_bytes())
    raw[raw.index(b"IDAT") + 8] ^= 0xFF  # a byte of a stored PNG flipped: the zip's CRC check fails on read
    crc.write_bytes(bytes(raw))
    with pytest.raises(ProjectError, match="damaged or in a form"):
        projects.import_zip(crc)
    assert projects.list() == [] and list(projects.root.iterdir()) == []


def test_uploaded_masks_keep_transparent_pixels_and_may_be_small(tmp_path):
    strokes = np.zeros((32, 32, 4), np.uint8)
    strokes[..., :3] = 255  # transparent white
    strokes[8:16, 8:24] = 255
    Image.fromarray(strokes, "RGBA").save(tmp_path / "mask.png")
    m = np.asarray(read_upload(tmp_path / "mask.png", "the mask", mask=True))
    assert m.shape == (32, 32) and (m >= 128).sum() == 8 * 16
    Image.new("L", (4, 4), 255).save(tmp_path / "tiny.png")  # resized to the image later
    assert read_upload(tmp_path / "tiny.png", "the mask", mask=True).size == (4, 4)


def test_a_killed_variation_swap_loses_nothing(tmp_path, store):
    projects = ProjectStore(tmp_path)
    project, gen, _ = _edited_project(projects, store)
    import os

    last_run = project.folder / "last_run"
    os.replace(last_run, project.folder / ".last_run.old")  # killed between the swap's two renames
    again = ProjectStore(tmp_path).open(project.id)
    assert len(again.last_run_images()) == 2 and again.last_run()["count"] == 2


def test_a_project_that_cannot_be_reopened_is_named_not_hidden(tmp_path, tiny_models):
    from studio.session import LOAD_OUTPUTS

    studio = Studio(tiny_models, tmp_path)
    project = studio.projects.create("kept")
    (project.folder / "scene").mkdir(exist_ok=True)
    (project.folder / "scene" / "scene.json").write_text("{ damaged")
    fresh = Studio(tiny_models, tmp_path)  # a restart: nothing cached
    view = dict(zip(LOAD_OUTPUTS, fresh.on_load(project.id)))
    assert "could not be opened" in view["status"] and str(project.folder) in view["status"]
    assert view["project_id"] != project.id and (project.folder / "project.json").is_file()


def test_sketch_needs_strokes_for_only_sketched_and_a_failed_run_records_nothing(tmp_path, tiny_models):
    import gradio as gr

    studio = Studio(tiny_models, tmp_path)
    project = studio.projects.create()
    background = np.full((16, 16, 4), 255, np.uint8)
    layer = np.zeros((16, 16, 4), np.uint8)
    layer[4:9, 4:9] = (255, 0, 0, 255)

    def sketch(canvas, only_sketched, **changes):
        values = _settings(**{"guidance": 3.0, **changes})
        return list(studio.sdedit(project.id, canvas, "a red circle", "", 0.6, only_sketched, *values,
                                  request=_Request("me"), progress=lambda *a, **k: None))

    bare = {"background": background, "layers": [], "composite": None}
    with pytest.raises(gr.Error, match="nothing is sketched"):
        sketch(bare, True)
    drawn = {"background": background, "layers": [layer], "composite": None}
    with pytest.raises(gr.Error):
        sketch(drawn, True, steps="ddim37")  # refused by the pipeline: the blank canvas is not kept
    assert len(project.scene) == 0 and len(ProjectStore(tmp_path).open(project.id).scene) == 0
    sketch(drawn, True)
    assert [n.op for n in project.scene.nodes.values()] == ["import", "sdedit"]
    node = project.scene.current
    mask = np.asarray(project.scene.mask(node.id)) > 0
    assert mask[0:13, 0:13].all() and mask.sum() == 13 * 13  # the 5 px strokes, grown by mask_blur (4 px)


def test_finetune_start_checks_its_numbers_and_hands_the_trainer_absolute_paths(tmp_path, tiny_models,
                                                                               monkeypatch):
    import sys

    data = tmp_path / "work" / "data"
    data.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")  # the studio's folder; the trainer runs in the repository
    tuner = FineTuner(tmp_path / "finetuned", tiny_models, trainer=[sys.executable, "-c", "pass"])
    try:
        for lr in (float("nan"), -1e-4, 0, None, "fast"):
            with pytest.raises(FineTuneError, match="learning rate"):
                tuner.start(data="data", name="bad-lr", lr=lr)
        with pytest.raises(FineTuneError, match="samples every"):
            tuner.start(data="data", name="bad-lr", sample_every=-1)
        assert not (tuner.root / "bad-lr").exists()
        tuner.start(data="data", name="rel")
        tuner._proc.wait(30)
        command = (tuner.root / "rel" / "studio.log").read_text()
        assert f"--data {data.resolve()}" in command
        # the stub wrote no run.json (like a trainer that failed at once): the name can be used again
        tuner.start(data="data", name="rel")
        tuner._proc.wait(30)
        assert (tuner.root / "rel" / "studio.log").read_text().count("$ ") == 2
        (tuner.root / "rel" / "run.json").write_text("{}")
        with pytest.raises(FineTuneError, match="whole number"):
            tuner.resume("rel", "many")
    finally:
        tuner.close()


def test_the_browser_secret_is_written_whole_and_kept(tmp_path):
    from studio.ui import _secret

    first = _secret(tmp_path)
    assert len(first) == 64 and _secret(tmp_path) == first  # kept across restarts
    assert (tmp_path / ".studio_secret").stat().st_mode & 0o077 == 0  # its owner's only
    (tmp_path / ".studio_secret").write_text("")  # what a kill mid-write left before
    again = _secret(tmp_path)
    assert len(again) == 64 and again != first


@pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a browser session
def test_ui_errors_stay_on_the_status_line_and_leave_the_workspace(tmp_path, tiny_models):
    """In the browser a raised gr.Error paints a bare "Error" over every output (the canvas and the
    history look lost) and its toast fades; the UI's handlers instead keep every output and put the
    message on the status line."""
    import gradio as gr

    from studio.session import RUN_OUTPUTS
    from studio.ui import WORKSPACE_STATUS, shows_errors, with_status

    studio = Studio(tiny_models, tmp_path)
    project = studio.projects.create()
    inpaint = shows_errors(studio.inpaint, RUN_OUTPUTS)
    frames = list(inpaint(project.id, None, "a star", "", False, *_settings(), request=_Request("me"),
                          progress=lambda *a, **k: None))
    last = dict(zip(RUN_OUTPUTS, frames[-1]))
    assert last["status"].startswith("⚠ there is no image to inpaint")
    assert all(v == gr.skip() for k, v in last.items() if k != "status")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    open_image = with_status(studio.import_image, "Image opened.")
    opened = dict(zip(WORKSPACE_STATUS, open_image(project.id, str(tmp_path / "bad.png"))))
    assert "not a readable image" in opened["status"] and opened["history"] == gr.skip()
    good = tmp_path / "ok.png"
    Image.new("RGB", (32, 32), "red").save(good)
    opened = dict(zip(WORKSPACE_STATUS, open_image(project.id, str(good))))
    assert opened["status"] == "Image opened." and len(project.scene) == 1
    # the Fine-tune tab: its status line is its one output (Gradio takes a lone value bare)
    assert shows_errors(studio.ft_resume, ("status",))("nope", 5).startswith("⚠ run 'nope' has nothing to resume")


def test_guidance_auto_is_each_actions_own_default(tmp_path, tiny_models):
    from pipelines.defaults import DEFAULT_GUIDANCE, DEFAULT_GUIDANCE_INPAINT

    studio = Studio(tiny_models, tmp_path)
    project = studio.projects.create()

    def values(**changes):
        return _settings(**{"mask_blur": 0, **changes})

    run = dict(request=_Request("me"), progress=lambda *a, **k: None)
    list(studio.generate(project.id, "a red circle", "", *values(), **run))
    assert project.scene.current.params["guidance_scale"] == DEFAULT_GUIDANCE
    layer = np.zeros((16, 16, 4), np.uint8)
    layer[2:8, 2:8, 3] = 255
    canvas = {"background": np.zeros((16, 16, 4), np.uint8), "layers": [layer], "composite": None}
    list(studio.inpaint(project.id, canvas, "a star", "", False, *values(), **run))
    assert project.scene.current.params["guidance_scale"] == DEFAULT_GUIDANCE_INPAINT
    list(studio.inpaint(project.id, canvas, "a star", "", False, *values(guidance="7.5"), **run))
    assert project.scene.current.params["guidance_scale"] == 7.5
    import gradio as gr

    with pytest.raises(gr.Error, match="number or auto"):
        list(studio.generate(project.id, "a red circle", "", *values(guidance="strong"), **run))


def test_stop_ends_a_replay(tmp_path, tiny_models, store):
    """A replay (an imported project may hold many long steps) holds the model slot: Stop ends it
    within a step and nothing is changed."""
    studio = Studio(tiny_models, tmp_path)
    project = studio.projects.create()
    gen = Text2ImagePipeline(store)("a red circle", seed=1, upsample=False, num_inference_steps=300, sampler="ddim")
    project.scene.apply(gen, op="generate")
    project.save()
    result = {}
    worker = _run_until_registered(studio, lambda: result.update(
        out=studio.replay(project.id, None, _Request("me"), progress=lambda *a, **k: None)))
    assert studio.stop(request=_Request("me")) == "Stopping…"
    worker.join(30)
    assert not worker.is_alive()
    markdown, info = result["out"]
    assert "Replay stopped" in markdown and info["stopped"] and "me" not in studio._active
    assert len(project.scene) == 1


def test_a_2000_word_prompt_is_shortened_in_the_step_info(tmp_path, tiny_models):
    studio = Studio(tiny_models, tmp_path)
    project = studio.projects.create()
    prompt = "a red circle " * 700
    list(studio.generate(project.id, prompt, "", *_settings(steps="2"), request=_Request("me"),
                         progress=lambda *a, **k: None))
    node = project.scene.current
    assert node.params["prompt"] == prompt  # recorded whole: the replay needs it
    info = studio._node_info(project, node.id)
    assert len(info) < 1500 and "truncated" in info
