"""Iterative scene building as data (GLIDE Figure 3): an edit graph with undo/redo, branches,
atomic saving and bit-exact replay.

Every node holds its image, the operation that made it ("import", "generate", "inpaint",
"sdedit", "upsample"), the pipeline's full `params` (seed, sampler, steps, scales, model ids, ...),
its parent, and the mask / input image of the call when there was one. `current` is the node the
user looks at; `apply` adds a child of it; `undo` moves to the parent, `redo` back to the child
visited last (else the newest); `checkout` jumps anywhere, and applying from an older node branches.

On disk a scene is a folder:

    SCENE/
      scene.json                 graph + params, written last, atomically
      images/<id>.png            each node's image (RGB; params also in the PNG's "parameters" text)
      images/<id>.mask.png       the mask of an inpaint / masked sdedit call (L, white = regenerate)
      images/<id>.input.png      the call's input image, when it was not the parent's image
                                 (e.g. the sketch painted over it for SDEdit)

Node ids are unique ("0007-3fa9c2"), so node PNGs are write-once: `save` writes only files that
are not there yet (the new node's) and then scene.json. A crash mid-save leaves the previous
scene.json, which names only files that exist.

`replay(store)` re-runs every edit from its saved params, with the saved parent / input / mask
images as inputs, and reports per node whether the output reproduces bit-exactly on this device.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .io import atomic_save_png, atomic_write_json, load_image, load_mask_image

FORMAT = "glide-studio-scene"
VERSION = 1
SCENE_FILE = "scene.json"
IMAGES_DIR = "images"
# a node's files are images/<id>.png: an id is a plain file name, never a path (a scene from a zip
# must not reach outside its folder)
NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
OPS = ("import", "generate", "inpaint", "sdedit", "upsample")
OP_OF_PIPELINE = {"text2image": "generate", "inpaint": "inpaint", "sdedit": "sdedit", "upsample": "upsample"}
PIPELINE_OF_OP = {v: k for k, v in OP_OF_PIPELINE.items()}


class SceneError(ValueError):
    """A scene folder or graph operation cannot be used; the message says why."""


def _upgraded(params: dict) -> dict:
    """Params recorded before an option existed get the value that ran then: before the upsampler
    could start part-way it started from pure noise; before guidance_min_t every step was guided."""
    if params.get("pipeline") == "upsample":
        params.setdefault("strength", 1.0)
    elif "upsample_steps" in params:
        params.setdefault("upsample_strength", 1.0)
        params.setdefault("guidance_min_t", 0)
    return params


@dataclass
class Node:
    id: str
    parent: str | None
    op: str
    params: dict
    created: float
    duration: float | None = None
    index: int = 0  # which image of the call's output this node keeps
    changed_outside_mask: int | None = None
    warnings: list = field(default_factory=list)
    working_box: list | None = None
    has_mask: bool = False
    has_input: bool = False
    # images in memory (None once saved and not yet read back: they load lazily from the folder)
    _image: Image.Image | None = field(default=None, repr=False)
    _mask: Image.Image | None = field(default=None, repr=False)
    _input: Image.Image | None = field(default=None, repr=False)

    @property
    def image_file(self) -> str:
        return f"{IMAGES_DIR}/{self.id}.png"

    @property
    def mask_file(self) -> str | None:
        return f"{IMAGES_DIR}/{self.id}.mask.png" if self.has_mask else None

    @property
    def input_file(self) -> str | None:
        return f"{IMAGES_DIR}/{self.id}.input.png" if self.has_input else None

    @property
    def label(self) -> str:
        prompt = self.params.get("prompt") or self.params.get("source") or ""
        return f"{self.op}: {prompt}" if prompt else self.op

    def to_json(self) -> dict:
        return {"id": self.id, "parent": self.parent, "op": self.op, "params": self.params, "created": self.created,
                "duration": self.duration, "index": self.index, "changed_outside_mask": self.changed_outside_mask,
                "warnings": list(self.warnings), "working_box": self.working_box, "image": self.image_file,
                "mask": self.mask_file, "input": self.input_file}

    @classmethod
    def from_json(cls, d: dict) -> "Node":
        try:
            op, node_id = d["op"], str(d["id"])
            if not NODE_ID_RE.match(node_id):
                raise SceneError(f"node id {node_id!r} is not a plain name (letters, digits, '-' and '_'); "
                                 "the scene.json was not written by this studio")
            if op not in OPS:
                raise SceneError(f"node {d.get('id')!r} has unknown op {op!r}; expected one of {OPS}")
            return cls(id=node_id, parent=d.get("parent"), op=op, params=_upgraded(dict(d.get("params") or {})),
                       created=float(d.get("created", 0.0)), duration=d.get("duration"), index=int(d.get("index", 0)),
                       changed_outside_mask=d.get("changed_outside_mask"), warnings=list(d.get("warnings") or []),
                       working_box=d.get("working_box"), has_mask=bool(d.get("mask")), has_input=bool(d.get("input")))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, SceneError):
                raise
            raise SceneError(f"a node in scene.json is malformed ({type(e).__name__}: {e})") from e


class ReplayResult(NamedTuple):
    node_id: str
    reproduced: bool
    max_abs_diff: int | None  # None when the node could not be re-run (see ReplayReport.errors)


class ReplayReport(list):
    """A list of ReplayResult, plus `errors` {node_id: message} for nodes that could not be re-run
    and `warnings` {node_id: [...]} from the replayed calls."""

    def __init__(self, items=(), errors=None):
        super().__init__(items)
        self.errors: dict[str, str] = dict(errors or {})
        self.warnings: dict[str, list[str]] = {}  # the replayed calls' warnings (e.g. another model)

    @property
    def all_reproduced(self) -> bool:
        return all(r.reproduced for r in self)


class Scene:
    """An edit graph. Thread-safe for one writer (the studio's session) plus readers."""

    def __init__(self):
        self.nodes: dict[str, Node] = {}  # creation order
        self.current_id: str | None = None
        self._redo: dict[str, str] = {}  # parent id -> child last visited from it
        self.folder: Path | None = None  # where it was last saved to / loaded from
        self.warnings: list[str] = []  # problems found when loading
        self._lock = threading.RLock()

    # -- graph ---------------------------------------------------------------------------------

    @property
    def current(self) -> Node | None:
        return self.nodes.get(self.current_id) if self.current_id else None

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, node_id: str) -> Node:
        return self._node(node_id)

    def _node(self, node_id: str) -> Node:
        if node_id not in self.nodes:
            raise SceneError(f"no node {node_id!r} in this scene")
        return self.nodes[node_id]

    def _new_id(self) -> str:
        return f"{len(self.nodes) + 1:04d}-{uuid.uuid4().hex[:6]}"

    def children(self, node_id: str | None) -> list[Node]:
        """Children of a node in creation order (node_id None: the roots)."""
        return [n for n in self.nodes.values() if n.parent == node_id]

    def roots(self) -> list[Node]:
        return self.children(None)

    def lineage(self, node_id: str) -> list[Node]:
        """The node's ancestors from its root down to the node itself."""
        out, seen = [], set()
        node = self._node(node_id)
        while node is not None and node.id not in seen:
            seen.add(node.id)
            out.append(node)
            node = self.nodes.get(node.parent) if node.parent else None
        return out[::-1]

    def _move_to(self, node: Node | None) -> Node | None:
        self.current_id = node.id if node else None
        if node is not None and node.parent is not None:
            self._redo[node.parent] = node.id
        return node

    def checkout(self, node_id: str) -> Node:
        """Make any node current (a later `apply` branches from it)."""
        with self._lock:
            return self._move_to(self._node(node_id))

    def undo(self) -> Node | None:
        """Move to the parent; at a root, stay. Returns the new current node."""
        with self._lock:
            node = self.current
            if node is not None and node.parent is not None:
                self.current_id = node.parent
                self._redo[node.parent] = node.id
            return self.current

    def redo(self) -> Node | None:
        """Move to the child visited last from here (else the newest); stay if there is none."""
        with self._lock:
            kids = self.children(self.current_id) if self.current_id else []
            if not kids:
                return self.current
            hint = self._redo.get(self.current_id)
            target = next((k for k in kids if k.id == hint), kids[-1])
            return self._move_to(target)

    @property
    def can_undo(self) -> bool:
        return self.current is not None and self.current.parent is not None

    @property
    def can_redo(self) -> bool:
        return bool(self.current_id) and bool(self.children(self.current_id))

    # -- adding nodes --------------------------------------------------------------------------

    def import_image(self, image, source: str = "") -> Node:
        """A user image as a new root node (op "import"); it becomes current."""
        img = load_image(image, "RGB")
        with self._lock:
            node = Node(id=self._new_id(), parent=None, op="import",
                        params={"source": str(source), "size": [img.width, img.height]},
                        created=time.time(), _image=img)
            self.nodes[node.id] = node
            return self._move_to(node)

    def apply(self, result, *, op: str | None = None, index: int = 0, input_image=None, mask_image=None,
              parent: str | None = "current") -> Node:
        """Record a pipeline call's output as a child of `parent` (default: the current node).

        result: a PipelineOutput (its params, image `index`, changed_outside_mask, warnings).
        input_image: the image the call was given, when it was not the parent's image (a sketch
          painted over it); mask_image: the call's mask. Both are stored so `replay` can re-run it.
        """
        params = dict(result.params)
        op = op or OP_OF_PIPELINE.get(params.get("pipeline"))
        if op not in OPS or op == "import":
            raise SceneError(f"cannot tell which operation made this result (op={op!r}); pass op= one of {OPS[1:]}")
        if not 0 <= index < len(result.images):
            raise SceneError(f"index {index} is out of range: the result has {len(result.images)} images")
        with self._lock:
            parent_id = self.current_id if parent == "current" else parent
            if parent_id is not None:
                self._node(parent_id)
            elif op != "generate":
                raise SceneError(f"an {op} node needs a parent image: import or generate one first")
            inp = None
            if input_image is not None and op != "generate":
                inp = load_image(input_image, "RGB")
                if parent_id is not None and _same(inp, self.image(parent_id)):
                    inp = None  # the parent's image itself: no need to store it twice
            if inp is None and op != "generate" and parent_id is None:
                raise SceneError("the input image of this call is unknown")
            changed = result.changed_outside_mask[index] if result.changed_outside_mask is not None else None
            node = Node(id=self._new_id(), parent=parent_id, op=op, params=json.loads(json.dumps(params)),
                        created=time.time(), duration=(result.timings or {}).get("total_s"), index=index,
                        changed_outside_mask=changed, warnings=list(result.warnings),
                        working_box=list(result.working_box) if result.working_box else None,
                        has_mask=mask_image is not None, has_input=inp is not None,
                        _image=result.images[index].convert("RGB"),
                        _mask=load_mask_image(mask_image) if mask_image is not None else None, _input=inp)
            self.nodes[node.id] = node
            return self._move_to(node)

    add = apply

    def run(self, pipeline, *, index: int = 0, input_image=None, mask_image=None, **kwargs) -> Node:
        """Call `pipeline` on the current image (or `input_image`) and record the result.
        On any error the scene is unchanged."""
        name = getattr(pipeline, "name", "")
        input_image = kwargs.pop("image", input_image)
        if name != "text2image":
            image = input_image if input_image is not None else self.image(self._require_current().id)
            kwargs["image"] = image
        if mask_image is not None:
            kwargs["mask_image"] = mask_image
        result = pipeline(**kwargs)
        return self.apply(result, index=index, input_image=input_image, mask_image=mask_image)

    def _require_current(self) -> Node:
        if self.current is None:
            raise SceneError("the scene is empty: import or generate an image first")
        return self.current

    # -- images --------------------------------------------------------------------------------

    def image(self, node_id: str) -> Image.Image:
        node = self._node(node_id)
        if node._image is None:
            node._image = self._read(node.image_file, "RGB")
        return node._image

    def mask(self, node_id: str) -> Image.Image | None:
        node = self._node(node_id)
        if node.has_mask and node._mask is None:
            node._mask = self._read(node.mask_file, "L")
        return node._mask

    def input_image(self, node_id: str) -> Image.Image | None:
        """The image the node's call was given (its own input file, else its parent's image)."""
        node = self._node(node_id)
        if node.has_input:
            if node._input is None:
                node._input = self._read(node.input_file, "RGB")
            return node._input
        return self.image(node.parent) if node.parent else None

    def _read(self, rel: str, mode: str) -> Image.Image:
        if self.folder is None:
            raise SceneError(f"{rel} is not in memory and the scene has no folder")
        path = self.folder / rel
        if not path.is_file():
            raise SceneError(f"{path} is missing from the scene folder")
        return load_image(path, mode)

    # -- files ---------------------------------------------------------------------------------

    def save(self, folder=None) -> Path:
        """Write the scene to `folder` (default: where it was last saved/loaded): the PNGs that
        are not there yet, then scene.json atomically. Cheap to call after every edit."""
        with self._lock:
            folder = Path(folder) if folder is not None else self.folder
            if folder is None:
                raise SceneError("save() needs a folder the first time")
            (folder / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
            for node in self.nodes.values():
                files = [(node.image_file, lambda n=node: self.image(n.id), True)]
                if node.has_mask:
                    files.append((node.mask_file, lambda n=node: self.mask(n.id), False))
                if node.has_input:
                    files.append((node.input_file, lambda n=node: self.input_image(n.id), False))
                for rel, get, with_params in files:
                    target = folder / rel
                    if target.exists():
                        continue  # node files are write-once
                    info = None
                    if with_params:
                        info = PngInfo()
                        info.add_text("parameters", json.dumps({"op": node.op, **node.params}, sort_keys=True))
                    atomic_save_png(target, get(), pnginfo=info)
            atomic_write_json(folder / SCENE_FILE, self.to_json())
            self.folder = folder
            return folder

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "current": self.current_id, "redo": dict(self._redo),
                "nodes": [n.to_json() for n in self.nodes.values()]}

    @classmethod
    def load(cls, folder) -> "Scene":
        """Read a scene folder. Images load lazily; missing ones are listed in `scene.warnings`."""
        folder = Path(folder)
        path = folder / SCENE_FILE
        if not path.is_file():
            raise SceneError(f"{folder} is not a scene folder (no {SCENE_FILE})")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SceneError(f"{path} is unreadable ({e}); restore it from a backup") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SceneError(f"{path} is not a {FORMAT} file")
        if int(data.get("version", 0)) > VERSION:
            raise SceneError(f"{path} is version {data['version']}; this code reads up to version {VERSION}")
        scene = cls()
        scene.folder = folder
        for d in data.get("nodes") or []:
            node = Node.from_json(d if isinstance(d, dict) else {})
            if node.id in scene.nodes:
                raise SceneError(f"{path} has two nodes with id {node.id!r}")
            scene.nodes[node.id] = node
        for node in scene.nodes.values():
            if node.parent is not None and node.parent not in scene.nodes:
                raise SceneError(f"node {node.id} names a parent {node.parent!r} that is not in the scene")
            for rel in (node.image_file, node.mask_file, node.input_file):
                if rel and not (folder / rel).is_file():
                    scene.warnings.append(f"{rel} is missing")
        for node in scene.nodes.values():  # no cycles: every lineage must reach a root
            if scene.lineage(node.id)[0].parent is not None:
                raise SceneError(f"node {node.id}'s parents form a cycle")
        current = data.get("current")
        scene.current_id = current if current in scene.nodes else (next(reversed(scene.nodes)) if scene.nodes else None)
        scene._redo = {k: v for k, v in (data.get("redo") or {}).items() if k in scene.nodes and v in scene.nodes}
        return scene

    # -- replay --------------------------------------------------------------------------------

    def replay(self, pipelines=None, progress: Callable[[int, int, str], object] | None = None,
               nodes: list[str] | None = None) -> ReplayReport:
        """Re-run every edit (or `nodes`) from its saved params and inputs; report per node whether
        the image reproduces bit-exactly here. `pipelines`: a ModelStore, a models path (None = the
        shipped models), or a dict {op or pipeline name: pipeline}. Import nodes count as reproduced."""
        from .base import GenerationInterrupted  # torch: imported by the first replay, not by the scene

        pipes = _pipelines_for(pipelines)
        ids = list(nodes) if nodes is not None else list(self.nodes)
        report = ReplayReport()
        for i, node_id in enumerate(ids):
            node = self._node(node_id)
            if progress is not None:
                progress(i, len(ids), node_id)
            if node.op == "import":
                report.append(ReplayResult(node_id, True, 0))
                continue
            try:
                pipe = pipes(node.op)
                kwargs = dict(node.params)
                if node.op != "generate":
                    kwargs["image"] = self.input_image(node_id)
                if node.has_mask:
                    kwargs["mask_image"] = self.mask(node_id)
                result = pipe(**kwargs)
                got = np.asarray(result.images[node.index].convert("RGB"), dtype=np.int16)
                want = np.asarray(self.image(node_id), dtype=np.int16)
                if got.shape != want.shape:
                    report.errors[node_id] = f"the replayed image is {got.shape[1]}x{got.shape[0]}, the saved one " \
                                             f"{want.shape[1]}x{want.shape[0]}"
                    report.append(ReplayResult(node_id, False, None))
                    continue
                diff = int(np.abs(got - want).max())
                report.append(ReplayResult(node_id, diff == 0, diff))
                if result.warnings:
                    report.warnings[node_id] = list(result.warnings)
            except Exception as e:  # a missing model, a changed pipeline: report it, keep going
                if isinstance(e, GenerationInterrupted):  # the user stopped the replay: stop here
                    raise
                report.errors[node_id] = f"{type(e).__name__}: {e}"
                report.append(ReplayResult(node_id, False, None))
        if progress is not None:
            progress(len(ids), len(ids), "")
        return report


def _same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def _pipelines_for(pipelines) -> Callable[[str], object]:
    """op -> pipeline, building them lazily from one shared ModelStore."""
    from . import base
    from .inpaint import InpaintPipeline
    from .sdedit import SDEditPipeline
    from .text2image import Text2ImagePipeline
    from .upsample import UpsamplePipeline

    classes = {"generate": Text2ImagePipeline, "inpaint": InpaintPipeline, "sdedit": SDEditPipeline,
               "upsample": UpsamplePipeline}
    if isinstance(pipelines, dict):
        def get(op):
            pipe = pipelines.get(op) or pipelines.get(PIPELINE_OF_OP.get(op, ""))
            if pipe is None:
                raise SceneError(f"no pipeline given for {op!r} nodes")
            return pipe
        return get
    store = pipelines if isinstance(pipelines, base.ModelStore) else base.ModelStore.shared(pipelines)
    cache: dict[str, object] = {}

    def get(op):
        if op not in cache:
            cache[op] = classes[op](store)
        return cache[op]
    return get
