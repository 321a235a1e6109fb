"""The Fine-tune tab's backend: run `python -m pipelines.training finetune-inpaint` as a subprocess,
stop it (SIGTERM: the trainer checkpoints, exports and exits), resume it, and read its run folder.

    FINETUNE_DIR/                  (PROJECTS_DIR/finetuned by default)
      <run>/                       the trainer's --out: run.json, log.jsonl, samples/, model/, checkpoints
        studio.log                 the subprocess's stdout + stderr
        modelset/                  a models dir for the studio's model list: base-inpaint -> ../model,
                                   base/ and upsampler/ -> the default models' folders (symlinks)

A run's exported `model/` makes it appear in the model list (see `model_sets`). One training
process at a time: the studio's own generations share the same machine.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LOG_FILE = "log.jsonl"
MODEL_DIR = "model"
MODELSET_DIR = "modelset"
STDOUT_FILE = "studio.log"
REPO_ROOT = Path(__file__).resolve().parent.parent


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DATASETS_DIR = "datasets"  # PROJECTS_DIR/datasets: where a studio reachable from the network may train


def training_data_roots(server_name: str, projects_dir, extra=None) -> list[Path] | None:
    """Where the Fine-tune tab may read training folders: anywhere (None) when the studio is served
    to this machine only; else inside PROJECTS_DIR/datasets and `extra`, so that a remote user cannot
    train on (and read back through samples) whatever the server can read."""
    if server_name in LOOPBACK_HOSTS:
        return None
    return [Path(projects_dir) / DATASETS_DIR] + ([Path(extra)] if extra else [])


class FineTuneError(ValueError):
    """A fine-tune run cannot be started / stopped / read; the message says why."""


def read_log(run_dir: Path, max_points: int = 2000) -> tuple[list[dict], list[dict]]:
    """(steps, events) from the run's log.jsonl; a half-written last line is skipped. Steps are
    thinned to at most `max_points` (every k-th) for plotting."""
    steps, events = [], []
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return steps, events
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "event" in rec:
                events.append(rec)
            elif "loss" in rec and "step" in rec:
                steps.append(rec)
    if len(steps) > max_points:
        k = -(-len(steps) // max_points)
        steps = steps[::k] + ([steps[-1]] if (len(steps) - 1) % k else [])
    return steps, events


class FineTuner:
    """Starts, stops and resumes training runs under `root`; tells the UI what a run is doing."""

    def __init__(self, root, default_models_dir, trainer: list[str] | None = None, data_roots=None):
        """data_roots: None = training folders may be anywhere the server can read (a studio on
        127.0.0.1); else a list of folders they must lie inside (a studio reachable from the network)."""
        self.root = Path(root).resolve()
        self.default_models_dir = Path(default_models_dir).resolve()
        self.data_roots = None if data_roots is None else [Path(r).resolve() for r in data_roots]
        self.trainer = trainer or [sys.executable, "-m", "pipelines.training"]  # the command, before its args
        self._proc: subprocess.Popen | None = None
        self._run: str | None = None
        self._lock = threading.Lock()
        atexit.register(self.close)  # the trainer runs in its own session: stop it (with a checkpoint) on exit

    # -- runs -----------------------------------------------------------------------------------

    def run_dir(self, name: str) -> Path:
        if not isinstance(name, str) or not RUN_NAME_RE.match(name):
            raise FineTuneError(f"run name {name!r}: use letters, digits, '.', '_' or '-' (up to 64)")
        return self.root / name

    def runs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        found = [d for d in self.root.iterdir() if d.is_dir() and RUN_NAME_RE.match(d.name)
                 and ((d / "run.json").is_file() or (d / STDOUT_FILE).is_file())]
        return [d.name for d in sorted(found, key=lambda d: d.stat().st_mtime, reverse=True)]

    def init_choices(self) -> list[str]:
        """Model folders to start from: the default base-inpaint (continue) and base (widen)."""
        return [str(self.default_models_dir / r) for r in ("base-inpaint", "base")
                if (self.default_models_dir / r / "config.json").is_file()]

    @property
    def running(self) -> str | None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return self._run
            return None

    def start(self, *, data: str, name: str, init: str = "", steps: int = 500, batch_size: int = 8,
              lr: float = 1e-4, sample_every: int = 100, device: str | None = None,
              extra: list[str] | None = None) -> str:
        """Start a new run (refused if one is running or `name` exists). Returns the run name."""
        data = (data or "").strip()
        if not data:
            raise FineTuneError("give a folder of images with captions (image.png + image.txt, or captions.jsonl)")
        if data != "shapes":
            if not Path(data).is_dir():
                raise FineTuneError(f"{data} is not a folder on the server")
            data = str(Path(data).resolve())  # the trainer runs in REPO_ROOT, not in this process's folder
            if self.data_roots is not None and not any(Path(data).resolve().is_relative_to(r)
                                                       for r in self.data_roots):
                roots = " or ".join(str(r) for r in self.data_roots)
                raise FineTuneError(f"this studio is reachable from the network, so it trains only on folders "
                                    f"inside {roots}; put the images there, or restart it with --finetune-data FOLDER")
        run = self.run_dir(name)
        if (run / "run.json").is_file():  # a start that failed before the trainer wrote it may be retried
            raise FineTuneError(f"a run named {name!r} exists; resume it or pick another name")
        init = init or (self.init_choices() or [""])[0]
        if not init or not (Path(init) / "config.json").is_file():
            raise FineTuneError(f"no model to start from ({init or 'none found'}); the default models dir "
                                f"{self.default_models_dir} needs base/ or base-inpaint/")
        try:
            steps, batch_size, sample_every, lr = int(steps), int(batch_size), int(sample_every), float(lr)
        except (TypeError, ValueError, OverflowError):
            raise FineTuneError("steps, batch size, samples-every and learning rate must be numbers") from None
        if steps < 1 or batch_size < 1:
            raise FineTuneError("steps and batch size must be at least 1")
        if sample_every < 0:
            raise FineTuneError("samples every N steps must be 0 (never) or more")
        if not 0 < lr <= 1:  # also refuses NaN
            raise FineTuneError(f"the learning rate must be a positive number such as 1e-4, got {lr}")
        args = ["finetune-inpaint", "--out", str(run), "--init", str(Path(init).resolve()), "--data", data,
                "--max-steps", str(steps), "--batch-size", str(batch_size), "--lr", str(lr),
                "--sample-every", str(sample_every), "--checkpoint-every", str(max(sample_every, 50)),
                "--samples", "4", "--workers", "0", "--name", name]
        if device:
            args += ["--device", device]
        return self._spawn(name, args + list(extra or []))

    def resume(self, name: str, steps: int | None = None) -> str:
        run = self.run_dir(name)
        if not (run / "run.json").is_file():
            raise FineTuneError(f"run {name!r} has nothing to resume (no run.json in {run})")
        args = ["finetune-inpaint", "--out", str(run), "--resume"]
        if steps:
            try:
                steps = int(steps)
            except (TypeError, ValueError, OverflowError):
                raise FineTuneError(f"steps must be a whole number, got {steps!r}") from None
            if steps < 1:
                raise FineTuneError("steps must be at least 1")
            args += ["--max-steps", str(steps)]
        return self._spawn(name, args)

    def _spawn(self, name: str, args: list[str]) -> str:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                raise FineTuneError(f"run {self._run!r} is still training; stop it first")
            run = self.run_dir(name)
            run.mkdir(parents=True, exist_ok=True)
            log = open(run / STDOUT_FILE, "ab")
            log.write(f"\n$ {' '.join([Path(self.trainer[0]).name, *self.trainer[1:], *args])}\n".encode())
            log.flush()
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            self._proc = subprocess.Popen([*self.trainer, *args], cwd=REPO_ROOT,
                                          stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                          start_new_session=True)
            log.close()
            self._run = name
            return name

    def stop(self, timeout: float = 60.0) -> str:
        """SIGTERM the running trainer (it saves a checkpoint and exports) and wait for it."""
        with self._lock:
            proc, name = self._proc, self._run
        if proc is None or proc.poll() is not None:
            return "nothing is training"
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return f"run {name!r} did not stop within {timeout:.0f} s and was killed; resume from its last checkpoint"
        return f"run {name!r} stopped and saved; Resume continues it"

    def close(self) -> None:
        if self.running:
            self.stop(timeout=30)

    # -- reading a run --------------------------------------------------------------------------

    def status(self, name: str | None) -> dict:
        """What the UI shows: state, step, last loss, samples, exported model, the output tail."""
        if not name:
            return {"state": "no run selected", "steps": [], "samples": [], "model": None, "tail": ""}
        run = self.run_dir(name)
        steps, events = read_log(run)
        with self._lock:
            proc = self._proc if self._run == name else None
        if proc is not None and proc.poll() is None:
            state = "training"
        elif proc is not None:
            state = "finished" if proc.returncode == 0 else f"failed (exit code {proc.returncode})"
        else:
            state = "idle"
        end = next((e for e in reversed(events) if e.get("event") == "end"), None)
        if end is not None and state != "training":
            state = f"stopped at step {end.get('step')} ({end.get('reason', 'done')})"
        samples = sorted((run / "samples").glob("step-*.png")) if (run / "samples").is_dir() else []
        model = run / MODEL_DIR
        tail = ""
        if (run / STDOUT_FILE).is_file():
            tail = "\n".join((run / STDOUT_FILE).read_text(errors="replace").splitlines()[-12:])
        return {"state": state, "steps": steps, "events": events[-5:],
                "step": steps[-1]["step"] if steps else 0, "loss": steps[-1]["loss"] if steps else None,
                "samples": [str(p) for p in samples[-4:]],
                "model": str(model) if (model / "config.json").is_file() else None, "tail": tail}

    # -- the model list -------------------------------------------------------------------------

    def model_sets(self) -> dict[str, Path]:
        """{label: models dir} for every run with an exported model; the run's fine-tuned model is
        the inpainting model, the default models dir provides the others (linked, not copied)."""
        out = {}
        for name in self.runs():
            run = self.root / name
            if (run / MODEL_DIR / "config.json").is_file() and name != self.running:
                try:
                    out[f"fine-tuned: {name}"] = self._modelset(run)
                except OSError:
                    continue
        return out

    def _modelset(self, run: Path) -> Path:
        target = run / MODELSET_DIR
        wanted = {"base-inpaint": run / MODEL_DIR}
        for role in ("base", "upsampler", "upsampler-inpaint"):
            if (self.default_models_dir / role / "config.json").is_file():
                wanted[role] = self.default_models_dir / role
        target.mkdir(exist_ok=True)
        for role, src in wanted.items():
            link = target / role
            if link.is_symlink() and Path(os.readlink(link)) == src.resolve():
                continue
            if link.is_symlink() or link.is_file():
                link.unlink()
            elif link.is_dir():
                shutil.rmtree(link)
            try:
                link.symlink_to(src.resolve(), target_is_directory=True)
            except OSError:  # no symlinks here (e.g. Windows without developer mode): copy
                shutil.copytree(src, link)
        return target
