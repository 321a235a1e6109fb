"""Projects on disk: one folder per project, holding the edit graph (a pipelines Scene) and metadata.

    PROJECTS_DIR/
      <id>/                      id: 12 lowercase hex digits (nothing else is ever opened as a project)
        project.json             {"format", "version", "id", "name", "created", "updated"}
        scene/                   pipelines.scene.Scene.save(): scene.json + images/*.png
        last_run/                the latest run's variations (run.json + 0.png, 1.png, ...), so the
                                 gallery and "use this" survive a refresh or a restart
      finetuned/                 the Fine-tune tab's runs (studio.finetune), never listed as projects

Every write is atomic (pipelines.io). The browser keeps only the id; everything else is here.
Exports: the current image as a PNG with the full edit recipe in its text chunks, and the whole
project as a zip that `import_zip` reads back (under a new id) and `replay` re-runs.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipelines.scene import IMAGES_DIR, NODE_ID_RE  # no torch: the project list is read before it loads


def _pl():
    """The pipelines package, imported on first use: it brings torch (seconds of import), and the
    studio serves its page before that (see studio.ui.launch_studio)."""
    # the package imports its public names lazily: load them (and torch) here, all at once
    import pipelines
    import pipelines.inpaint
    import pipelines.io
    import pipelines.scene
    import pipelines.sdedit
    import pipelines.text2image
    import pipelines.upsample

    return pipelines

FORMAT = "glide-studio-project"
VERSION = 1
PROJECT_FILE = "project.json"
SCENE_DIR = "scene"
LAST_RUN_DIR = "last_run"
RECIPE_KEY = "glide-studio-recipe"  # PNG text chunk of an exported image: the whole lineage
ID_RE = re.compile(r"^[0-9a-f]{12}$")
MAX_ZIP_BYTES = 1 << 30  # uncompressed size of an imported project zip
MAX_ZIP_FILES = 20000


class ProjectError(ValueError):
    """A project cannot be opened, imported or changed; the message says why."""


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def check_id(project_id) -> str:
    if not isinstance(project_id, str) or not ID_RE.match(project_id):
        raise ProjectError(f"{project_id!r} is not a project id (12 hex digits)")
    return project_id


@dataclass
class Project:
    """An open project: its folder, metadata and scene. Use `ProjectStore.lock(id)` around edits."""

    id: str
    folder: Path
    name: str
    created: float
    updated: float
    scene: object  # a pipelines.Scene

    @property
    def scene_dir(self) -> Path:
        return self.folder / SCENE_DIR

    def meta(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "id": self.id, "name": self.name,
                "created": self.created, "updated": self.updated}

    def save(self) -> None:
        """Scene first (new node PNGs, then scene.json), then project.json: each step atomic."""
        self.updated = time.time()
        self.scene.save(self.scene_dir)
        _pl().io.atomic_write_json(self.folder / PROJECT_FILE, self.meta())

    # -- the latest run's variations -------------------------------------------------------------

    def save_last_run(self, result, *, node_id: str, parent_id: str | None, op: str) -> None:
        """Keep every variation of the latest run (the first one is already node `node_id`)."""
        record = {"node": node_id, "parent": parent_id, "op": op, "params": result.params,
                  "changed_outside_mask": result.changed_outside_mask, "warnings": list(result.warnings),
                  "timings": result.timings, "working_box": list(result.working_box) if result.working_box else None,
                  "working_size": result.working_size, "count": len(result.images), "used": {"0": node_id}}

        def build(tmp: Path):
            for i, image in enumerate(result.images):
                image.save(tmp / f"{i}.png", format="PNG")
            (tmp / "run.json").write_text(json.dumps(record, indent=2, default=str))

        _pl().io.atomic_replace_dir(build, self.folder / LAST_RUN_DIR)

    def last_run(self) -> dict | None:
        _pl().io.restore_interrupted_dir(self.folder / LAST_RUN_DIR)
        path = self.folder / LAST_RUN_DIR / "run.json"
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if record.get("node") not in self.scene.nodes:
            return None
        return record

    def last_run_images(self) -> list[Path]:
        record = self.last_run()
        if record is None:
            return []
        paths = [self.folder / LAST_RUN_DIR / f"{i}.png" for i in range(int(record.get("count", 0)))]
        return [p for p in paths if p.is_file()]

    def use_variation(self, index: int) -> str:
        """Make variation `index` of the latest run the current node (adding it as a sibling of the
        first one the first time) and return its node id."""
        record = self.last_run()
        if record is None:
            raise ProjectError("there is no recent run to pick a variation from")
        used = record.setdefault("used", {})
        if str(index) in used and used[str(index)] in self.scene.nodes:
            self.scene.checkout(used[str(index)])
            return used[str(index)]
        images = self.last_run_images()
        if not 0 <= index < len(images):
            raise ProjectError(f"variation {index + 1} does not exist (the last run made {len(images)})")
        first = record["node"]
        result = _pl().PipelineOutput(images=[_pl().io.load_image(p) for p in images], params=record["params"],
                                changed_outside_mask=record.get("changed_outside_mask"),
                                warnings=record.get("warnings") or [], timings=record.get("timings") or {},
                                working_box=tuple(record["working_box"]) if record.get("working_box") else None,
                                working_size=record.get("working_size"))
        node = self.scene.apply(result, op=record["op"], index=index, parent=record["parent"],
                                input_image=self.scene.input_image(first) if record["op"] != "generate" else None,
                                mask_image=self.scene.mask(first))
        used[str(index)] = node.id
        _pl().io.atomic_write_json(self.folder / LAST_RUN_DIR / "run.json", record)
        return node.id

    # -- exports --------------------------------------------------------------------------------

    def recipe(self, node_id: str | None = None) -> dict:
        """The full edit recipe of a node: every step from the root, with params, the picked
        variation, and the masks / painted inputs as base64 PNG (so the chain can be re-run)."""
        node_id = node_id or self.scene.current_id
        if node_id is None:
            raise ProjectError("the project is empty: generate or open an image first")
        steps = []
        for node in self.scene.lineage(node_id):
            step = {"id": node.id, "parent": node.parent, "op": node.op, "index": node.index,
                    "params": node.params, "changed_outside_mask": node.changed_outside_mask,
                    "duration_s": node.duration}
            mask = self.scene.mask(node.id)
            if mask is not None:
                step["mask_png_b64"] = base64.b64encode(_pl().io.png_bytes(mask)).decode()
            if node.has_input:
                step["input_png_b64"] = base64.b64encode(_pl().io.png_bytes(self.scene.input_image(node.id))).decode()
            if node.op == "import":
                step["image_png_b64"] = base64.b64encode(_pl().io.png_bytes(self.scene.image(node.id))).decode()
            steps.append(step)
        return {"format": "glide-studio-recipe", "version": 1, "project": self.id, "name": self.name,
                "node": node_id, "steps": steps}

    def export_png(self, out_dir: Path, node_id: str | None = None) -> Path:
        """The node's image as PNG; text chunks: "parameters" (its own call) and RECIPE_KEY (the chain)."""
        recipe = self.recipe(node_id)
        node = self.scene[recipe["node"]]
        info = PngInfo()
        info.add_text("parameters", json.dumps({"op": node.op, **node.params}, sort_keys=True))
        info.add_text(RECIPE_KEY, json.dumps(recipe, sort_keys=True), zip=True)
        path = Path(out_dir) / f"{_slug(self.name)}-{node.id}.png"
        _pl().io.atomic_save_png(path, self.scene.image(node.id), pnginfo=info)
        return path

    def export_zip(self, out_dir: Path) -> Path:
        """project.json + scene/ (+ last_run/) as a zip; `ProjectStore.import_zip` reads it back."""
        path = Path(out_dir) / f"{_slug(self.name)}-{self.id}.zip"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:  # PNGs are compressed already
            for f in sorted(self.folder.rglob("*")):
                rel = f.relative_to(self.folder)
                if f.is_file() and not any(part.startswith(".") for part in rel.parts):
                    zf.write(f, rel.as_posix())
        tmp.replace(path)
        return path


def read_recipe(png_path) -> dict | None:
    """The edit recipe embedded in an exported PNG (None if it has none)."""
    with Image.open(png_path) as im:
        text = getattr(im, "text", {}) or {}
        raw = text.get(RECIPE_KEY)
    return json.loads(raw) if raw else None


class ProjectStore:
    """The projects folder: create / open / list / delete / import; one lock per project."""

    def __init__(self, root):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()
        self._open: dict[str, Project] = {}

    def lock(self, project_id: str) -> threading.RLock:
        with self._guard:
            return self._locks.setdefault(project_id, threading.RLock())

    def folder(self, project_id: str) -> Path:
        return self.root / check_id(project_id)

    def exists(self, project_id) -> bool:
        try:
            return (self.folder(project_id) / PROJECT_FILE).is_file()
        except ProjectError:
            return False

    def create(self, name: str = "") -> Project:
        pid = new_id()
        now = time.time()
        project = Project(id=pid, folder=self.folder(pid), name=name.strip() or time.strftime("Project %Y-%m-%d %H:%M"),
                          created=now, updated=now, scene=_pl().Scene())
        project.folder.mkdir(parents=True)
        project.save()
        with self._guard:
            self._open[pid] = project
        return project

    def open(self, project_id: str) -> Project:
        """The project (cached in memory once read; all sessions share the same object)."""
        pid = check_id(project_id)
        with self._guard:
            if pid in self._open:
                return self._open[pid]
        folder = self.folder(pid)
        try:
            meta = json.loads((folder / PROJECT_FILE).read_text())
        except FileNotFoundError:
            raise ProjectError(f"project {pid} does not exist (deleted?)") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ProjectError(f"project {pid} is unreadable: {e}") from e
        Scene = _pl().Scene
        scene = Scene.load(folder / SCENE_DIR) if (folder / SCENE_DIR / "scene.json").is_file() else Scene()
        project = Project(id=pid, folder=folder, name=str(meta.get("name") or pid),
                          created=float(meta.get("created", 0)),
                          updated=float(meta.get("updated", 0)), scene=scene)
        with self._guard:
            return self._open.setdefault(pid, project)

    def list(self) -> list[dict]:
        """Projects, newest first: id, name, updated, number of nodes, thumbnail path (or None)."""
        out = []
        for folder in self.root.iterdir():
            if not (folder.is_dir() and ID_RE.match(folder.name) and (folder / PROJECT_FILE).is_file()):
                continue
            try:
                meta = json.loads((folder / PROJECT_FILE).read_text())
                scene = json.loads((folder / SCENE_DIR / "scene.json").read_text()) \
                    if (folder / SCENE_DIR / "scene.json").is_file() else {"nodes": []}
            except (OSError, json.JSONDecodeError):
                continue
            nodes = {n.get("id"): n for n in scene.get("nodes") or []}
            current = nodes.get(scene.get("current"))
            thumb = None  # from the node's id, never from a path written in scene.json
            if current and NODE_ID_RE.match(str(current.get("id"))):
                thumb = folder / SCENE_DIR / IMAGES_DIR / f"{current['id']}.png"
            out.append({"id": folder.name, "name": meta.get("name") or folder.name,
                        "updated": float(meta.get("updated", 0)), "nodes": len(nodes),
                        "thumbnail": str(thumb) if thumb is not None and thumb.is_file() else None})
        return sorted(out, key=lambda p: p["updated"], reverse=True)

    def rename(self, project_id: str, name: str) -> Project:
        with self.lock(project_id):
            project = self.open(project_id)
            project.name = name.strip() or project.name
            _pl().io.atomic_write_json(project.folder / PROJECT_FILE, project.meta())
            return project

    def delete(self, project_id: str) -> None:
        folder = self.folder(project_id)
        if not (folder / PROJECT_FILE).is_file():
            raise ProjectError(f"project {project_id} does not exist")
        with self.lock(project_id):
            trash = self.root / f".deleted-{project_id}-{uuid.uuid4().hex[:6]}"
            folder.replace(trash)  # atomic: the project disappears at once, then the files go
            with self._guard:
                self._open.pop(project_id, None)
            shutil.rmtree(trash, ignore_errors=True)

    def import_zip(self, zip_path, name: str | None = None) -> Project:
        """Read an exported project zip into a new project (new id). Checks every entry: no absolute
        paths or '..', a size cap, a readable scene."""
        try:
            zf = zipfile.ZipFile(zip_path)
        except (zipfile.BadZipFile, OSError) as e:
            raise ProjectError(f"not a readable zip file ({e}); export the project again") from e
        with zf:
            infos = zf.infolist()
            if len(infos) > MAX_ZIP_FILES or sum(i.file_size for i in infos) > MAX_ZIP_BYTES:
                raise ProjectError("the zip is too large to be a studio project")
            names = []
            for info in infos:
                rel = Path(info.filename)
                unsafe = info.filename.startswith(("/", "\\")) or rel.is_absolute() or ".." in rel.parts
                if unsafe or ":" in info.filename or "\\" in info.filename:
                    raise ProjectError(f"unsafe path {info.filename!r} in the zip; refusing to import it")
                names.append(info.filename)
            prefix = _common_prefix(names)
            if f"{prefix}{PROJECT_FILE}" not in names or f"{prefix}{SCENE_DIR}/scene.json" not in names:
                raise ProjectError(f"the zip is not a studio project (no {PROJECT_FILE} and {SCENE_DIR}/scene.json)")
            pid = new_id()
            with tempfile.TemporaryDirectory(dir=self.root, prefix=".import-") as tmp:
                tmp = Path(tmp)
                try:
                    for info in infos:
                        if info.is_dir() or not info.filename.startswith(prefix):
                            continue
                        target = tmp / info.filename[len(prefix):]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with zf.open(info) as src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                # a CRC mismatch or truncation (BadZipFile, EOFError, zlib.error), a password
                # (RuntimeError), an unknown compression method (NotImplementedError)
                except (zipfile.BadZipFile, EOFError, zlib.error, RuntimeError, NotImplementedError, OSError) as e:
                    raise ProjectError(f"the zip is damaged or in a form this studio cannot read "
                                       f"({type(e).__name__}: {e}); export the project again") from e
                try:
                    meta = json.loads((tmp / PROJECT_FILE).read_text())
                    scene = _pl().Scene.load(tmp / SCENE_DIR)
                except (json.JSONDecodeError, UnicodeDecodeError, _pl().SceneError) as e:
                    raise ProjectError(f"the project in the zip is damaged: {e}") from e
                if not isinstance(meta, dict):
                    raise ProjectError(f"the project in the zip is damaged: {PROJECT_FILE} is not a JSON object")
                _check_scene_images(scene, tmp / SCENE_DIR)
                now = time.time()
                meta.update(format=FORMAT, version=VERSION, id=pid, updated=now,
                            name=(name or meta.get("name") or "Imported project"))
                _pl().io.atomic_write_json(tmp / PROJECT_FILE, meta)

                def build(dest: Path):
                    for item in tmp.iterdir():
                        shutil.move(str(item), dest / item.name)

                _pl().io.atomic_replace_dir(build, self.folder(pid))
        return self.open(pid)


def _check_scene_images(scene, folder: Path) -> None:
    """Every image the scene names is in `folder` and reads as an image (a project with holes
    would fail later, when opened or edited)."""
    if scene.warnings:
        missing = "; ".join(scene.warnings[:3]) + (" ..." if len(scene.warnings) > 3 else "")
        raise ProjectError(f"the project in the zip is incomplete ({missing}); export it again")
    for node in scene.nodes.values():
        for rel in filter(None, (node.image_file, node.mask_file, node.input_file)):
            try:
                with Image.open(folder / rel) as im:
                    im.verify()
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                raise ProjectError(f"{rel} in the zip is not a readable image ({e}); export the project again") from e


def _common_prefix(names: list[str]) -> str:
    """'' or 'folder/' when every entry of the zip sits under one top folder."""
    if any(n == PROJECT_FILE for n in names):
        return ""
    tops = {n.split("/", 1)[0] for n in names}
    return f"{tops.pop()}/" if len(tops) == 1 else ""


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:40] or "project"
