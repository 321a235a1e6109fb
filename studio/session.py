"""The studio's controller: every Gradio handler is a method of `Studio`.

A handler converts UI values (editor dicts, sliders, the project id) into a pipeline call, runs it,
records the result in the project's Scene, saves the project, and converts the result back into
UI values. No diffusion maths here: that is all in `pipelines`.

Handlers return tuples in the order of the name lists below (`RUN_OUTPUTS`, ...); studio/ui.py
builds its `outputs=` lists from the same names, so the two cannot drift apart.

Threading: Gradio runs handlers in worker threads. Model work is serialised by the queue
(`concurrency_id="model"`, one at a time); project edits take the project's lock; a run's
pipeline object is registered under the browser session so that Stop interrupts only that run.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import os
import queue
import random
import shutil
import threading
import time
import uuid
from pathlib import Path

import cv2
import gradio as gr
import numpy as np
from PIL import Image

from pipelines.defaults import (DEFAULT_GUIDANCE, DEFAULT_GUIDANCE_INPAINT, DEFAULT_MASK_BLUR, DEFAULT_SAMPLER,
                                DEFAULT_SDEDIT_STRENGTH, DEFAULT_STEPS, DEFAULT_STEPS_INPAINT,
                                DEFAULT_UPSAMPLE_STEPS, DEFAULT_UPSAMPLE_STRENGTH, SAMPLERS, steps_from_text)

from .finetune import FineTuneError, FineTuner
from .projects import Project, ProjectError, ProjectStore, _pl, check_id

log = logging.getLogger("studio")

MIN_SIDE = 16  # smallest accepted image side (px)
MAX_SIDE = 4096  # largest accepted image side (px)
DEFAULT_MODEL = "default"
BLANK_SIZE = 256  # the blank sketch canvas of an empty project
PREVIEWS_PER_RUN = 10  # live previews per run (the progress bar moves every step)

# Output names, in the order handlers return them (ui.py maps names to components).
WORKSPACE_OUTPUTS = ("project_id", "mask_canvas", "sketch_canvas", "compare", "node_info", "history",
                     "history_tree", "undo", "redo")
RUN_OUTPUTS = ("preview", "status", "results", "seed") + WORKSPACE_OUTPUTS
LOAD_OUTPUTS = WORKSPACE_OUTPUTS + ("results", "projects", "project_name", "model", "status", "prompt")
# The settings panel, in the order every run handler takes them after its own inputs.
SETTINGS = ("steps", "sampler", "guidance", "seed_mode", "seed", "num_images", "mask_blur", "inpaint_mode",
            "upsample", "upsample_strength", "model")

# op -> pipeline class name in `pipelines` (imported on first use: see projects._pl)
OPS = {"generate": "Text2ImagePipeline", "inpaint": "InpaintPipeline", "sdedit": "SDEditPipeline",
       "upsample": "UpsamplePipeline"}
# the pipelines' input, checkpoint, scene and image errors are all ValueErrors with user-readable text
USER_ERRORS = (ValueError, ProjectError, FineTuneError)


class Stopped(Exception):
    """The user pressed Stop: the pipeline raised GenerationInterrupted."""


class _ReplayStop:
    """What Stop interrupts during a replay: the pipeline running now, and the steps not started."""

    def __init__(self, pipes):
        self.pipes, self.requested = list(pipes), False

    def interrupt(self) -> None:
        self.requested = True
        for pipe in self.pipes:
            pipe.interrupt()


def pipeline(op: str, store):
    return getattr(_pl(), OPS[op]).from_pretrained(store)


def pack(names, **values) -> tuple:
    """A handler's return tuple: the given values by name, gr.skip() for the others."""
    unknown = set(values) - set(names)
    if unknown:
        raise KeyError(f"not outputs of this handler: {sorted(unknown)}")
    return tuple(values[n] if n in values else gr.skip() for n in names)


def check_image(image: Image.Image, what: str = "the image", min_side: int = MIN_SIDE) -> Image.Image:
    w, h = image.size
    if min(w, h) < min_side:
        raise gr.Error(f"{what} is {w}x{h} pixels; the studio needs at least {min_side}x{min_side}")
    if max(w, h) > MAX_SIDE:
        raise gr.Error(f"{what} is {w}x{h} pixels; the largest accepted side is {MAX_SIDE} px "
                       "(downscale it first: the models work at 64 and 256 px)")
    return image


def _file_path(value) -> str:
    """A Gradio file value (a path string, or an object with .path / .name) → a path string."""
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return str(getattr(value, "path", None) or getattr(value, "name"))


def read_upload(path, what: str = "the uploaded image", mask: bool = False) -> Image.Image:
    """An uploaded file → RGB image (`mask`: L, transparent = black, any size as it is resized to
    the image), or a gr.Error that says what is wrong with it."""
    if path is None:
        raise gr.Error(f"{what} is missing")
    path = _file_path(path)
    min_side = 1 if mask else MIN_SIDE
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        if head.startswith(b"%PDF"):
            raise gr.Error(f"{what} is a PDF; upload an image (PNG or JPEG)")
        try:  # the header alone: an 8000x8000 image is refused before it is decoded
            with Image.open(path) as im:
                check_image(im, what, min_side)
        except (OSError, SyntaxError, ValueError) as e:
            if isinstance(e, gr.Error):
                raise
        image = _pl().io.load_mask_image(path) if mask else _pl().io.load_image(path, "RGB")
    except _pl().io.ImageInputError as e:
        raise gr.Error(f"{what}: {e}") from None
    except Image.DecompressionBombError:
        raise gr.Error(f"{what} is far too large (decompression bomb protection); the largest side "
                       f"accepted is {MAX_SIDE} px") from None
    return check_image(image, what, min_side)


def editor_layers_alpha(value) -> np.ndarray | None:
    """Union of the editor's painted layers as a HxW bool (alpha > 0), or None if nothing is painted."""
    if not value:
        return None
    alpha = None
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        arr = np.asarray(layer)
        if arr.ndim != 3 or arr.shape[2] != 4:
            continue
        a = arr[..., 3] > 0
        if alpha is None:
            alpha = a
        elif a.shape == alpha.shape:
            alpha |= a
    return alpha if alpha is not None and alpha.any() else None


def editor_composite(value) -> Image.Image | None:
    """background + layers, composited here (the client's `composite` cannot be trusted over the API)."""
    if not value or value.get("background") is None:
        return None
    out = Image.fromarray(np.asarray(value["background"])).convert("RGBA")
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        im = Image.fromarray(np.asarray(layer)).convert("RGBA")
        if im.size != out.size:
            im = im.resize(out.size, Image.NEAREST)
        out = Image.alpha_composite(out, im)
    return out.convert("RGB")


def mask_image_from(bool_mask: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """HxW bool (True = regenerate) → an L image (white = regenerate) of `size`."""
    m = Image.fromarray(bool_mask.astype(np.uint8) * 255, "L")
    return m if m.size == tuple(size) else m.resize(tuple(size), Image.NEAREST)


def skipped_if_stopped_in_queue(run):
    """A UI run handler that does nothing (says so on the status line) when its browser tab clicked Stop
    after submitting it, while it waited in the queue (Studio.stop)."""
    signature = inspect.signature(run)

    @functools.wraps(run)
    def guarded(self, *args, **kwargs):
        given = signature.bind(self, *args, **kwargs).arguments
        if self._stopped_while_queued(given.get("request"), given.get("stop_count")):
            yield pack(RUN_OUTPUTS, status="Stopped before it started (it was waiting in the queue); "
                                           "nothing was changed.", preview=None)
            return
        yield from run(self, *args, **kwargs)
    return guarded


class Models:
    """The model list: the models dir (`default`) and every fine-tuned run's model set. Stores are
    created once and kept (strong references), so models load once and stay loaded."""

    def __init__(self, models_dir, finetuner: FineTuner, device=None):
        self.models_dir = Path(models_dir)
        self.finetuner = finetuner
        self.device = device
        self._stores: dict = {}  # label -> (weights files' mtimes, pipelines.ModelStore)
        self._lock = threading.Lock()

    def paths(self) -> dict[str, Path]:
        return {DEFAULT_MODEL: self.models_dir, **self.finetuner.model_sets()}

    def choices(self) -> list[str]:
        return list(self.paths())

    def store(self, label: str | None):
        """The ModelStore of a model-list entry; a new one when its weights files changed (a resumed
        fine-tuning run exported again)."""
        label = label or DEFAULT_MODEL
        paths = self.paths()
        if label not in paths:
            raise gr.Error(f"unknown model {label!r}; choose one of: {', '.join(paths)}")
        stamp = self._stamp(paths[label])
        with self._lock:
            if label not in self._stores or self._stores[label][0] != stamp:
                try:
                    self._stores[label] = (stamp, _pl().ModelStore(paths[label], device=self.device))
                except ValueError as e:  # CheckpointError: no models there
                    raise gr.Error(str(e)) from None
            return self._stores[label][1]

    @staticmethod
    def _stamp(path: Path) -> tuple:
        files = [path / role / "model.safetensors" for role in ("base", "base-inpaint", "upsampler",
                                                                 "upsampler-inpaint")]
        return tuple(f.stat().st_mtime_ns if f.is_file() else 0 for f in files)

    def preload(self) -> None:
        """Load the default models (in a background thread at startup, so the first click is fast)."""
        try:
            store = self.store(DEFAULT_MODEL)
            for role in ("base", "base-inpaint", "upsampler"):
                if store.has(role):
                    store.get(role)
            log.info("default models loaded from %s", store.path)
        except Exception as e:  # no models yet: the page still works and says so on first use
            log.warning("could not preload the default models: %s", e)


class Studio:
    """The controller behind the UI and the API (one per app)."""

    def __init__(self, models_dir="assets/models", projects_dir="projects", device=None, finetune_data_roots=None,
                 max_upload_mb=None):
        """finetune_data_roots: where the Fine-tune tab may read training folders (None = anywhere);
        max_upload_mb: the server's upload limit (an export larger than it gets a warning)."""
        self.max_upload_mb = max_upload_mb
        self.projects = ProjectStore(projects_dir)
        self.finetuner = FineTuner(self.projects.root / "finetuned", models_dir, data_roots=finetune_data_roots)
        self.models = Models(models_dir, self.finetuner, device)
        self.exports = self.projects.root / "_exports"
        self._active: dict[str, object] = {}  # session hash -> running pipeline (for Stop)
        self._stop_counts: dict[str, int] = {}  # session hash -> its tab's Stop clicks (see stop)
        self._active_lock = threading.Lock()

    # ------------------------------------------------------------------ projects & workspace view

    def _project(self, pid) -> Project:
        try:
            return self.projects.open(check_id(pid))
        except ValueError as e:  # ProjectError, or a SceneError from a damaged scene.json
            raise gr.Error(f"{e}; reload the page to start a new project") from None

    def _image_path(self, project: Project, node_id: str, kind: str = "") -> str:
        return str(project.scene_dir / "images" / f"{node_id}{kind}.png")

    def _workspace(self, project: Project) -> tuple:
        scene = project.scene
        node = scene.current
        if node is None:
            blank = Image.new("RGB", (BLANK_SIZE, BLANK_SIZE), "white")
            return pack(WORKSPACE_OUTPUTS, project_id=project.id,
                        mask_canvas=None,
                        sketch_canvas={"background": blank, "layers": [], "composite": None},
                        compare=None, node_info="*Empty project: type a prompt and click **Generate**, "
                                                "open an image, or sketch on the blank canvas.*",
                        history=gr.Gallery(value=[], selected_index=None), history_tree="",
                        undo=gr.update(interactive=False), redo=gr.update(interactive=False))
        current = self._image_path(project, node.id)
        canvas = {"background": current, "layers": [], "composite": None}
        before = None
        if node.has_input:
            before = self._image_path(project, node.id, ".input")
        elif node.parent is not None:
            before = self._image_path(project, node.parent)
        history = [(self._image_path(project, n.id), self._caption(i, n, n.id == node.id))
                   for i, n in enumerate(scene.nodes.values(), 1)]
        # why selected_index: else the gallery keeps highlighting the last clicked thumbnail after an
        # undo, a redo or a new edit, while the current step is another one
        history = gr.Gallery(value=history, selected_index=list(scene.nodes).index(node.id))
        return pack(WORKSPACE_OUTPUTS, project_id=project.id, mask_canvas=canvas, sketch_canvas=dict(canvas),
                    compare=(before, current) if before else None, node_info=self._node_info(project, node.id),
                    history=history, history_tree=self._tree(project),
                    undo=gr.update(interactive=scene.can_undo), redo=gr.update(interactive=scene.can_redo))

    @staticmethod
    def _caption(i: int, node, current: bool) -> str:
        prompt = node.params.get("prompt") or node.params.get("source") or ""
        prompt = prompt if len(prompt) <= 28 else prompt[:27] + "…"
        return f"{'● ' if current else ''}{i} · {node.op}" + (f": {prompt}" if prompt else "")

    def _node_info(self, project: Project, node_id: str) -> str:
        scene = project.scene
        node = scene[node_id]
        number = list(scene.nodes).index(node_id) + 1
        image = scene.image(node_id)
        p = node.params
        parts = [f"**#{number} {node.op}**"]
        if p.get("prompt"):  # a 2,000-word prompt would push the page thousands of pixels down
            prompt = p["prompt"] if len(p["prompt"]) <= 300 else p["prompt"][:299] + "…"
            parts.append(f"“{prompt}”")
        if "seed" in p:
            parts.append(f"seed {p['seed']}")
        if p.get("num_images", 1) > 1:
            parts.append(f"variation {node.index + 1} of {p['num_images']}")
        parts.append(f"{image.width}×{image.height}")
        if node.duration is not None:
            parts.append(f"{node.duration:.1f} s")
        if node.changed_outside_mask is not None:
            parts.append(f"pixels changed outside the mask: **{node.changed_outside_mask}**")
        if p.get("models"):
            parts.append("model " + ", ".join(f"`{v}`" for v in p["models"].values()))
        text = " · ".join(parts)
        if node.warnings:
            text += "\n\n" + "\n".join(f"⚠ {w}" for w in node.warnings)
        return text

    def _tree(self, project: Project) -> str:
        """The edit graph as text: a chain stays in its column, a branch point fans out with ├─ / └─;
        the current node is marked."""
        scene = project.scene
        numbers = {nid: i for i, nid in enumerate(scene.nodes, 1)}
        lines = []

        def walk(node, prefix, connector, inner):
            here = "   ◀ current" if node.id == scene.current_id else ""
            lines.append(prefix + connector + self._caption(numbers[node.id], node, False) + here)
            kids = scene.children(node.id)
            if len(kids) == 1:
                walk(kids[0], inner, "", inner)
            for j, kid in enumerate(kids if len(kids) > 1 else []):
                last = j == len(kids) - 1
                walk(kid, inner, "└─ " if last else "├─ ", inner + ("   " if last else "│  "))

        for root in scene.roots():
            walk(root, "", "", "")
        return "```text\n" + "\n".join(lines) + "\n```" if lines else ""

    def _project_choices(self, current: str | None = None) -> list[tuple[str, str]]:
        """The project list, newest first; empty projects (every new browser makes one) are left
        out unless open."""
        out = []
        for p in self.projects.list():
            if p["nodes"] == 0 and p["id"] != current:
                continue
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(p["updated"]))
            out.append((f"{p['name']} · {p['nodes']} edits · {when}", p["id"]))
        return out

    def _last_results(self, project: Project) -> list:
        record = project.last_run()
        if record is None:
            return []
        images = project.last_run_images()
        changed = record.get("changed_outside_mask")
        out = []
        for i, path in enumerate(images):
            cap = f"{i + 1}"
            if changed is not None and i < len(changed):
                cap += f" · {changed[i]} px changed outside"
            out.append((str(path), cap))
        return out

    def on_load(self, stored_pid, request: gr.Request = None):
        """Page load: reopen the browser's project (its id is all the browser keeps), else a new one."""
        status = "New project."
        if isinstance(stored_pid, str) and self.projects.exists(stored_pid):
            try:
                return self._load_view(self.projects.open(stored_pid), "Project restored.")
            except (ValueError, OSError) as e:  # ProjectError, SceneError (a damaged scene or a missing image)
                log.warning("could not reopen project %s: %s", stored_pid, e)
                status = (f"Your last project could not be opened ({e}). Nothing was deleted: it is still in "
                          f"{self.projects.folder(stored_pid)}. A new project was started.")
        return self._load_view(self.projects.create(), status)

    def _load_view(self, project: Project, status: str = "") -> tuple:
        ws = dict(zip(WORKSPACE_OUTPUTS, self._workspace(project)))
        current = project.scene.current
        return pack(LOAD_OUTPUTS, **ws, results=self._last_results(project),
                    projects=gr.update(choices=self._project_choices(project.id), value=project.id),
                    project_name=project.name, model=gr.update(choices=self.models.choices()), status=status,
                    prompt=current.params.get("prompt", "") if current is not None else "")

    def new_project(self, name: str = ""):
        return self._load_view(self.projects.create(name or ""), "New project.")

    def open_project(self, pid):
        if not pid:
            raise gr.Error("pick a project in the list first")
        return self._load_view(self._project(pid), "Project opened.")

    def project_list(self, pid):
        """The project dropdown, refreshed (node counts change with every edit)."""
        return gr.update(choices=self._project_choices(pid), value=pid)

    def rename_project(self, pid, name):
        project = self.projects.rename(check_id(pid), name or "")
        return gr.update(choices=self._project_choices(project.id), value=project.id), project.name

    def delete_project(self, to_delete, current_pid):
        """Delete a project; if it was the open one, open the newest other one (or a new one)."""
        if not to_delete:
            raise gr.Error("pick a project in the list first")
        try:
            self.projects.delete(check_id(to_delete))
        except ProjectError as e:
            raise gr.Error(str(e)) from None
        if to_delete != current_pid and self.projects.exists(current_pid):
            project = self._project(current_pid)
        else:
            others = self.projects.list()
            project = self.projects.open(others[0]["id"]) if others else self.projects.create()
        return self._load_view(project, "Project deleted.")

    def reset_mask(self, pid):
        """Clear mask: the canvas again shows the current image with no strokes."""
        return dict(zip(WORKSPACE_OUTPUTS, self._workspace(self._project(pid))))["mask_canvas"]

    def reset_sketch(self, pid):
        return dict(zip(WORKSPACE_OUTPUTS, self._workspace(self._project(pid))))["sketch_canvas"]

    # ------------------------------------------------------------------ history

    def _change(self, project, change) -> tuple:
        """Run `change()` under the project's lock, save the project (unless it raised) and return
        the refreshed workspace."""
        with self.projects.lock(project.id):
            change()
            project.save()
        return self._workspace(project)

    def undo(self, pid):
        project = self._project(pid)
        return self._change(project, lambda: project.scene.undo())

    def redo(self, pid):
        project = self._project(pid)
        return self._change(project, lambda: project.scene.redo())

    def jump(self, pid, evt: gr.SelectData):
        """A click on a history thumbnail: that node becomes current; the next edit branches from it."""
        project = self._project(pid)

        def checkout():
            ids = list(project.scene.nodes)
            if not 0 <= evt.index < len(ids):
                raise gr.Error("that history entry no longer exists; reload the page")
            project.scene.checkout(ids[evt.index])

        return self._change(project, checkout)

    def select_variation(self, pid, evt: gr.SelectData):
        """A click on a result: remember which, and compare it with the image it was made from."""
        project = self._project(pid)
        record = project.last_run()
        images = project.last_run_images()
        compare = gr.skip()
        if record is not None and 0 <= evt.index < len(images):
            first = record["node"]
            before = project.scene.input_image(first) if record["op"] != "generate" else None
            if before is not None:
                compare = (before, str(images[evt.index]))
        return evt.index, compare

    def use_variation(self, pid, index):
        """"Use this": the picked variation becomes the canvas (a sibling node of the first one)."""
        project = self._project(pid)
        if index is None:
            raise gr.Error("click a result in the gallery first")

        def use():
            try:
                project.use_variation(int(index))
            except ValueError as e:  # ProjectError, SceneError
                raise gr.Error(str(e)) from None

        return self._change(project, use)

    def import_image(self, pid, file):
        """Open an image file as a new root of the project's graph."""
        image = read_upload(file)
        project = self._project(pid)
        return self._change(project, lambda: project.scene.import_image(image, source=Path(_file_path(file)).name))

    # ------------------------------------------------------------------ runs (UI, with live previews)

    def stop(self, stop_count=None, request: gr.Request = None):
        """Stop button (outside the queue): interrupt this browser session's running generation. Runs
        of the session still waiting in the queue are stopped too: each carries the tab's count of Stop
        clicks when it was submitted (`stop_count`), and one that starts after a later Stop does nothing."""
        key = request.session_hash if request is not None else None
        with self._active_lock:
            pipe = self._active.get(key)
            if stop_count is not None:
                self._stop_counts[key] = int(stop_count)
        if pipe is None:
            return "Nothing of yours is running; a run of yours still waiting in the queue will not start."
        pipe.interrupt()
        return "Stopping…"

    def _stopped_while_queued(self, request, stop_count) -> bool:
        if stop_count is None or request is None:
            return False
        with self._active_lock:
            return self._stop_counts.get(request.session_hash, 0) > int(stop_count)

    @staticmethod
    def _settings(*values) -> dict:
        s = dict(zip(SETTINGS, values))
        seed = random.randrange(2**32) if s["seed_mode"] == "random" or s["seed"] in (None, "") else int(s["seed"])
        if not 0 <= seed < 2**63:
            raise gr.Error(f"seed must be a non-negative integer, got {seed}")
        s["seed"] = seed
        # "auto": each action's own default (DEFAULT_STEPS, or DEFAULT_STEPS_INPAINT for inpainting)
        s["steps"] = None if str(s["steps"] or "auto").strip() == "auto" else steps_from_text(s["steps"])
        s["num_images"] = int(s["num_images"])
        # "auto": each action's own default (DEFAULT_GUIDANCE, or DEFAULT_GUIDANCE_INPAINT for inpainting)
        if str(s["guidance"] or "auto").strip() == "auto":
            s["guidance"] = None
        else:
            try:
                s["guidance"] = float(s["guidance"])
            except ValueError:
                raise gr.Error(f"guidance scale must be a number or auto, got {s['guidance']!r}") from None
        s["mask_blur"] = float(s["mask_blur"])
        s["upsample_strength"] = float(s["upsample_strength"])
        if not 0 < s["upsample_strength"] <= 1:
            raise gr.Error(f"upsampler strength must be in (0, 1], got {s['upsample_strength']}")
        if s["sampler"] not in SAMPLERS:
            raise gr.Error(f"unknown sampler {s['sampler']!r}")
        return s

    @staticmethod
    def _upsample_flag(choice: str, op: str):
        if op == "generate":
            return choice != "off"
        return {"auto": None, "on": True, "off": False}.get(choice)

    # Run handlers take the settings panel's values as named parameters, in SETTINGS order (Gradio
    # injects gr.Request / gr.Progress only into positional parameters, so no *args here).
    @skipped_if_stopped_in_queue
    def generate(self, pid, prompt, negative, steps, sampler, guidance, seed_mode, seed, num_images, mask_blur,
                 inpaint_mode, upsample, upsample_strength, model, stop_count=None,
                 request: gr.Request = None, progress=gr.Progress()):
        s = self._settings(steps, sampler, guidance, seed_mode, seed, num_images, mask_blur, inpaint_mode,
                           upsample, upsample_strength, model)
        kwargs = self._sampling_kwargs("generate", prompt, negative, s)
        yield from self._ui_run("generate", pid, s, kwargs, request, progress)

    @skipped_if_stopped_in_queue
    def inpaint(self, pid, canvas, prompt, negative, invert, steps, sampler, guidance, seed_mode, seed,
                num_images, mask_blur, inpaint_mode, upsample, upsample_strength, model, stop_count=None,
                request: gr.Request = None, progress=gr.Progress()):
        s = self._settings(steps, sampler, guidance, seed_mode, seed, num_images, mask_blur, inpaint_mode,
                           upsample, upsample_strength, model)
        image = self._current_image(self._project(pid), "inpaint")
        painted = editor_layers_alpha(canvas)
        if painted is None and not invert:
            raise gr.Error("paint the area to regenerate on the canvas (Mask tab) first")
        if painted is None:  # inverted nothing: regenerate everything
            painted = np.zeros(image.size[::-1], bool)
        mask = mask_image_from(~painted if invert else painted, image.size)
        kwargs = dict(self._sampling_kwargs("inpaint", prompt, negative, s), image=image, mask_image=mask,
                      mode=s["inpaint_mode"], mask_blur=s["mask_blur"])
        yield from self._ui_run("inpaint", pid, s, kwargs, request, progress, mask=mask)

    @skipped_if_stopped_in_queue
    def sdedit(self, pid, canvas, prompt, negative, strength, only_sketched, steps, sampler, guidance, seed_mode,
               seed, num_images, mask_blur, inpaint_mode, upsample, upsample_strength, model, stop_count=None,
               request: gr.Request = None, progress=gr.Progress()):
        s = self._settings(steps, sampler, guidance, seed_mode, seed, num_images, mask_blur, inpaint_mode,
                           upsample, upsample_strength, model)
        project = self._project(pid)
        sketch = editor_composite(canvas)
        if sketch is None:
            raise gr.Error("nothing to edit: sketch on the canvas (Sketch tab) first")
        check_image(sketch, "the sketch")
        painted = editor_layers_alpha(canvas)
        mask = None
        if only_sketched:
            if painted is None:
                raise gr.Error("nothing is sketched yet: draw strokes on the canvas, or untick "
                               "“change only the sketched area” to re-draw the whole image")
            grow = max(2, int(round(s["mask_blur"])))  # the stroke's edge should be regenerated too
            # a square max filter, as cv2 runs it: PIL's MaxFilter takes minutes on a 4096 px canvas
            grown = cv2.dilate(painted.astype(np.uint8) * 255, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8))
            mask = Image.fromarray(grown, "L")
            if mask.size != sketch.size:
                mask = mask.resize(sketch.size, Image.NEAREST)
        # sketching on the blank canvas: it becomes the first node, once the edit has succeeded
        blank = None
        if project.scene.current is None:
            blank = Image.fromarray(np.asarray(canvas["background"])).convert("RGB")
        kwargs = dict(self._sampling_kwargs("sdedit", prompt, negative, s), image=sketch, strength=float(strength),
                      mask_image=mask, mask_blur=s["mask_blur"])
        yield from self._ui_run("sdedit", pid, s, kwargs, request, progress, mask=mask, input_image=sketch,
                                blank_canvas=blank)

    @skipped_if_stopped_in_queue
    def upsample(self, pid, prompt, negative, steps, sampler, guidance, seed_mode, seed, num_images, mask_blur,
                 inpaint_mode, upsample, upsample_strength, model, stop_count=None,
                 request: gr.Request = None, progress=gr.Progress()):
        s = self._settings(steps, sampler, guidance, seed_mode, seed, num_images, mask_blur, inpaint_mode,
                           upsample, upsample_strength, model)
        kwargs = dict(prompt=prompt or "", negative_prompt=negative or "",
                      image=self._current_image(self._project(pid), "upsample"), num_images=s["num_images"],
                      seed=s["seed"], strength=s["upsample_strength"])
        yield from self._ui_run("upsample", pid, s, kwargs, request, progress)

    @staticmethod
    def _current_image(project, action: str):
        if project.scene.current is None:
            raise gr.Error(f"there is no image to {action}: generate or open one first")
        return project.scene.image(project.scene.current_id)

    def _sampling_kwargs(self, op, prompt, negative, s) -> dict:
        """The settings-panel values every diffusion action (generate, inpaint, sdedit) passes on."""
        chosen = {} if s["steps"] is None else {"num_inference_steps": s["steps"]}
        if s["guidance"] is not None:
            chosen["guidance_scale"] = s["guidance"]
        return dict(prompt=prompt or "", negative_prompt=negative or "", num_images=s["num_images"],
                    sampler=s["sampler"], seed=s["seed"],
                    upsample=self._upsample_flag(s["upsample"], op), upsample_strength=s["upsample_strength"],
                    **chosen)

    def _ui_run(self, op, pid, s, kwargs, request, progress, mask=None, input_image=None, blank_canvas=None):
        """Run a pipeline with live previews, then record the result and send the new workspace.
        `blank_canvas`: an empty project's canvas, recorded as the edit's parent once it succeeds."""
        try:
            yield from self._ui_run_steps(op, pid, s, kwargs, request, progress, mask, input_image, blank_canvas)
        except USER_ERRORS as e:  # a gr.Error is a ValueError too: it passes through unchanged
            raise self._user_error(e) from None

    def _ui_run_steps(self, op, pid, s, kwargs, request, progress, mask, input_image, blank_canvas):
        project = self._project(pid)
        parent = project.scene.current_id  # the edit belongs where it started, even if the user moves on
        store = self.models.store(s["model"])
        pipe = pipeline(op, store)
        yield pack(RUN_OUTPUTS, status=f"Running {op}… (seed {s['seed']})", preview=None, seed=s["seed"])
        try:
            result = yield from self._execute(pipe, kwargs, request, progress)
        except Stopped as e:
            yield pack(RUN_OUTPUTS, status=f"Stopped ({e}); nothing was changed.", preview=None)  # no half-made image
            return
        with self.projects.lock(project.id):
            if parent is None and blank_canvas is not None:
                parent = project.scene.import_image(blank_canvas, source="blank canvas").id
            node_id = self._record(project, op, result, parent, mask=mask, input_image=input_image)
        took = result.timings.get("total_s", 0.0)
        status = f"{op} done in {took:.1f} s · seed {result.params['seed']}"
        if result.changed_outside_mask is not None:
            status += f" · pixels changed outside the mask: {', '.join(map(str, result.changed_outside_mask))}"
        if result.warnings:
            status += "\n\n" + "\n".join(f"⚠ {w}" for w in result.warnings)
        log.info("%s node %s in project %s (%.1f s)", op, node_id, project.id, took)
        ws = dict(zip(WORKSPACE_OUTPUTS, self._workspace(project)))
        yield pack(RUN_OUTPUTS, **ws, status=status, results=self._last_results(project),
                   seed=result.params["seed"])

    def _execute(self, pipe, kwargs, request, progress):
        """Run `pipe(**kwargs)` in a worker thread; yield live previews; return the PipelineOutput."""
        events: queue.Queue = queue.Queue()
        state = {"every": 1, "last": 0.0}

        def on_step(step, total, preview):
            state["every"] = max(1, total // PREVIEWS_PER_RUN)
            if step % state["every"] == 0 or step == total - 1:
                events.put(("preview", step, total, _pl().base.tensor_to_pil(preview[:1])[0]))
            else:
                events.put(("step", step, total, None))

        def work():
            try:
                events.put(("done", pipe(**kwargs, callback_on_step_end=on_step), None, None))
            except BaseException as e:  # handed to the generator, which re-raises it
                events.put(("error", e, None, None))

        with self._stoppable(request, pipe):
            worker = threading.Thread(target=work, name="studio-run", daemon=True)
            worker.start()
            try:
                while True:
                    kind, a, b, c = events.get()
                    if kind == "done":
                        return a
                    if kind == "error":
                        if isinstance(a, _pl().GenerationInterrupted):
                            raise Stopped(str(a)) from None
                        raise self._user_error(a)
                    progress((a + 1, b), desc=f"step {a + 1}/{b}", unit="steps")
                    if kind == "preview":
                        yield pack(RUN_OUTPUTS, preview=c)
            finally:
                if worker.is_alive():  # the client went away mid-run: stop the model work too
                    pipe.interrupt()
                    worker.join()

    @contextlib.contextmanager
    def _stoppable(self, request, target):
        """While inside, Stop from this browser session calls `target.interrupt()`."""
        key = request.session_hash if request is not None else uuid.uuid4().hex
        with self._active_lock:
            self._active[key] = target
        try:
            yield
        finally:
            with self._active_lock:
                if self._active.get(key) is target:
                    del self._active[key]

    @staticmethod
    def _user_error(e: BaseException) -> BaseException:
        if isinstance(e, gr.Error):
            return e
        if isinstance(e, USER_ERRORS):
            return gr.Error(str(e))
        log.exception("generation failed", exc_info=e)
        return gr.Error(f"the generation failed ({type(e).__name__}: {e}); see the server log")

    def _record(self, project: Project, op: str, result, parent: str | None, *, mask=None,
                input_image=None) -> str:
        """Variation 0 becomes a child of `parent`; every variation is kept for "use this"; saved."""
        with self.projects.lock(project.id):
            if op != "generate" and parent is None:
                raise gr.Error("the project has no image to edit")
            node = project.scene.apply(result, op=op, index=0, parent=parent, input_image=input_image,
                                       mask_image=mask)
            project.save()
            project.save_last_run(result, node_id=node.id, parent_id=parent, op=op)
            return node.id

    # ------------------------------------------------------------------ exports & replay

    def _export_dir(self) -> Path:
        self.exports.mkdir(parents=True, exist_ok=True)
        cutoff = time.time() - 3600
        for old in self.exports.iterdir():  # exports are downloads, not storage: keep an hour
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        out = self.exports / uuid.uuid4().hex[:12]
        out.mkdir()
        return out

    def export_png(self, pid):
        project = self._project(pid)
        if project.scene.current is None:
            raise gr.Error("nothing to export yet")
        return str(project.export_png(self._export_dir()))

    def export_zip(self, pid):
        project = self._project(pid)
        with self.projects.lock(project.id):
            path = project.export_zip(self._export_dir())
        mb = path.stat().st_size / 2**20
        if self.max_upload_mb is not None and mb > self.max_upload_mb:
            gr.Warning(f"The zip is {mb:.0f} MB, over this studio's upload limit of {self.max_upload_mb:g} MB: "
                       f"to import it back, start the studio with --max-upload-mb {math.ceil(mb) + 1}.")
        return str(path)

    def import_zip(self, file):
        if file is None:
            raise gr.Error("choose a project .zip first")
        try:
            project = self.projects.import_zip(_file_path(file))
        except ProjectError as e:
            raise gr.Error(str(e)) from None
        return self._load_view(project, f"Imported “{project.name}”. Click Replay to check it reproduces.")

    def replay(self, pid, model=None, request: gr.Request = None, progress=gr.Progress()):
        """Re-run every edit of the project from its recorded params; a table of which reproduced.
        Stop ends it (an imported project may hold many long steps)."""
        project = self._project(pid)
        if not project.scene.nodes:
            raise gr.Error("the project is empty: nothing to replay")
        store = self.models.store(model)
        pipes = {op: pipeline(op, store) for op in OPS}
        stop = _ReplayStop(pipes.values())

        def on_node(i, n, node_id):
            if stop.requested:  # pressed between two steps
                raise Stopped(f"after {i} of {n} steps")
            progress((i, n), desc=f"replaying node {i + 1}/{n}" if i < n else "done", unit="nodes")

        try:
            with self._stoppable(request, stop):
                report = project.scene.replay(pipes, progress=on_node)
        except (Stopped, _pl().GenerationInterrupted) as e:
            return f"**Replay stopped** ({e}); nothing was changed.", {"project_id": project.id, "stopped": True}
        return self._replay_markdown(project, report), self._replay_json(project, report)

    @staticmethod
    def _replay_json(project: Project, report) -> dict:
        return {"project_id": project.id, "all_reproduced": report.all_reproduced,
                "nodes": [{"node": r.node_id, "op": project.scene[r.node_id].op, "reproduced": r.reproduced,
                           "max_abs_diff": r.max_abs_diff, "error": report.errors.get(r.node_id)} for r in report]}

    @staticmethod
    def _replay_markdown(project: Project, report) -> str:
        numbers = {nid: i for i, nid in enumerate(project.scene.nodes, 1)}
        ok = sum(r.reproduced for r in report)
        lines = [f"**Replay: {ok} of {len(report)} steps reproduced bit-exactly.**", "",
                 "| # | step | reproduced | max pixel diff | note |", "|---|---|---|---|---|"]
        for r in report:
            node = project.scene[r.node_id]
            note = report.errors.get(r.node_id, "; ".join(report.warnings.get(r.node_id, [])))
            lines.append(f"| {numbers[r.node_id]} | {node.op} | {'✓ yes' if r.reproduced else '✗ no'} | "
                         f"{'—' if r.max_abs_diff is None else r.max_abs_diff} | {note.replace('|', '/')} |")
        return "\n".join(lines)

    # ------------------------------------------------------------------ scriptable API (gradio_client)

    def _api_call(self, op, kwargs, model, project_id, image=None, mask=None):
        """Shared by the /generate, /inpaint, /sdedit, /upsample endpoints: no previews, returns
        (gallery of PNGs, info JSON). With a project id the first image is recorded in that project."""
        project = None
        if project_id:
            project = self._project(project_id)
            if op != "generate" and image is None:
                if project.scene.current is None:
                    raise gr.Error(f"project {project_id} has no image; pass an image")
                image = project.scene.image(project.scene.current_id)
        if op != "generate":
            if image is None:
                raise gr.Error("an image is required")
            kwargs["image"] = image
        if mask is not None:
            kwargs["mask_image"] = mask
        pipe = pipeline(op, self.models.store(model))
        try:
            result = pipe(**kwargs)
        except Exception as e:
            raise self._user_error(e) from None
        info = {"op": op, "seed": result.params["seed"], "params": result.params,
                "changed_outside_mask": result.changed_outside_mask, "warnings": result.warnings,
                "timings": result.timings, "size": list(result.images[0].size)}
        if project is not None:
            with self.projects.lock(project.id):
                parent = project.scene.current_id
                given = kwargs.get("image")
                if op != "generate" and parent is None:
                    parent = project.scene.import_image(given, source="api upload").id
                node_id = self._record(project, op, result, parent, mask=mask,
                                       input_image=given if op != "generate" else None)
            info.update(project_id=project.id, node_id=node_id)
        gallery = [(im, f"{i + 1}") for i, im in enumerate(result.images)]
        return gallery, info

    @staticmethod
    def _api_seed(seed) -> int | None:
        if seed is None or seed == "":
            return None
        if not math.isfinite(float(seed)) or float(seed) != int(float(seed)):
            raise gr.Error(f"seed must be a whole number (or -1 for a random one), got {seed}")
        if int(float(seed)) < 0:
            return None  # the pipeline draws one and reports it in info["seed"]
        return int(float(seed))

    def api_generate(self, prompt, negative_prompt="", steps=DEFAULT_STEPS, sampler=DEFAULT_SAMPLER,
                     guidance_scale=DEFAULT_GUIDANCE, seed=-1, num_images=1, upsample=True, model=DEFAULT_MODEL,
                     project_id=""):
        kwargs = dict(prompt=prompt or "", negative_prompt=negative_prompt or "",
                      num_inference_steps=steps_from_text(steps or DEFAULT_STEPS), sampler=sampler,
                      guidance_scale=float(guidance_scale), seed=self._api_seed(seed), num_images=int(num_images),
                      upsample=bool(upsample))
        return self._api_call("generate", kwargs, model, project_id)

    def api_inpaint(self, prompt, image=None, mask=None, negative_prompt="", mode="finetuned", strength=1.0,
                    mask_blur=DEFAULT_MASK_BLUR, steps=DEFAULT_STEPS_INPAINT, sampler=DEFAULT_SAMPLER,
                    guidance_scale=DEFAULT_GUIDANCE_INPAINT, seed=-1, num_images=1, model=DEFAULT_MODEL, project_id=""):
        img = read_upload(image, "the image") if image is not None else None
        if mask is None:
            raise gr.Error("the mask is missing (white = regenerate)")
        m = read_upload(mask, "the mask", mask=True)
        kwargs = dict(prompt=prompt or "", negative_prompt=negative_prompt or "", mode=mode, strength=float(strength),
                      mask_blur=float(mask_blur), num_inference_steps=steps_from_text(steps or DEFAULT_STEPS_INPAINT),
                      sampler=sampler, guidance_scale=float(guidance_scale), seed=self._api_seed(seed),
                      num_images=int(num_images))
        return self._api_call("inpaint", kwargs, model, project_id, image=img, mask=m)

    def api_sdedit(self, prompt, image=None, strength=DEFAULT_SDEDIT_STRENGTH, mask=None, negative_prompt="",
                   mask_blur=DEFAULT_MASK_BLUR,
                   steps=DEFAULT_STEPS, sampler=DEFAULT_SAMPLER, guidance_scale=DEFAULT_GUIDANCE, seed=-1,
                   num_images=1, model=DEFAULT_MODEL, project_id=""):
        img = read_upload(image, "the image") if image is not None else None
        m = read_upload(mask, "the mask", mask=True) if mask is not None else None
        kwargs = dict(prompt=prompt or "", negative_prompt=negative_prompt or "", strength=float(strength),
                      mask_blur=float(mask_blur), num_inference_steps=steps_from_text(steps or DEFAULT_STEPS),
                      sampler=sampler, guidance_scale=float(guidance_scale), seed=self._api_seed(seed),
                      num_images=int(num_images))
        return self._api_call("sdedit", kwargs, model, project_id, image=img, mask=m)

    def api_upsample(self, prompt, image=None, steps=DEFAULT_UPSAMPLE_STEPS, seed=-1, num_images=1,
                     model=DEFAULT_MODEL, project_id="", strength=DEFAULT_UPSAMPLE_STRENGTH):
        img = read_upload(image, "the image") if image is not None else None
        kwargs = dict(prompt=prompt or "", seed=self._api_seed(seed), num_images=int(num_images),
                      num_inference_steps=steps_from_text(steps or DEFAULT_UPSAMPLE_STEPS),
                      strength=DEFAULT_UPSAMPLE_STRENGTH if strength is None else float(strength))
        return self._api_call("upsample", kwargs, model, project_id, image=img)

    def api_new_project(self, name=""):
        project = self.projects.create(name or "")
        return {"project_id": project.id, "name": project.name}

    def api_project(self, project_id):
        """A project's graph: nodes (op, parent, params, changed_outside_mask) and the current node."""
        project = self._project(project_id)
        scene = project.scene
        return {"project_id": project.id, "name": project.name, "current": scene.current_id,
                "nodes": [{"id": n.id, "parent": n.parent, "op": n.op, "index": n.index, "params": n.params,
                           "changed_outside_mask": n.changed_outside_mask, "duration_s": n.duration}
                          for n in scene.nodes.values()]}

    def api_projects(self):
        return [{k: v for k, v in p.items() if k != "thumbnail"} for p in self.projects.list()]

    def api_replay(self, project_id, model=DEFAULT_MODEL):
        return self.replay(project_id, model or None)[1]

    # ------------------------------------------------------------------ fine-tune tab

    def ft_start(self, data, name, init, steps, batch_size, lr, sample_every):
        name = (name or "").strip() or time.strftime("inpaint-%Y%m%d-%H%M%S")
        try:
            self.finetuner.start(data=data, name=name, init=init or "", steps=steps, batch_size=batch_size,
                                 lr=lr, sample_every=sample_every, device=self.models.device)
        except FineTuneError as e:
            raise gr.Error(str(e)) from None
        return gr.update(choices=self.finetuner.runs(), value=name), f"Training run “{name}” started."

    def ft_stop(self):
        return self.finetuner.stop()

    def ft_resume(self, name, steps):
        if not name:
            raise gr.Error("pick a run to resume")
        try:
            self.finetuner.resume(name, steps or None)
        except FineTuneError as e:
            raise gr.Error(str(e)) from None
        return f"Run “{name}” resumed."

    def ft_poll(self, name):
        """Timer tick: loss plot data, sample grids, state line, and the model list (new exports)."""
        import pandas as pd

        st = self.finetuner.status(name)
        steps = st["steps"]
        frame = pd.DataFrame({"step": [r["step"] for r in steps], "loss": [r["loss"] for r in steps]})
        line = f"**{st['state']}**"
        if st.get("step"):
            line += f" · step {st['step']} · loss {st['loss']:.4f}"
        if st.get("model"):
            line += f" · exported model: `{Path(st['model']).parent.name}` (in the model list)"
        # loaded here (the fine-tune folder is not served: it holds checkpoints)
        samples = [(_pl().io.load_image(p), Path(p).stem) for p in st["samples"]]
        return frame, samples, line, st["tail"], gr.update(choices=self.models.choices())

    def ft_runs(self):
        return gr.update(choices=self.finetuner.runs())
