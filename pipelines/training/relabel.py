"""Rename the folders a model's training record points at, once those folders are gone or replaced.

Every warm start (--init) and every graft nests its source's record under the path it was read
from, e.g. "runs/base-ft-mixed5/model". When a model ships, those run folders stay on the machine
that trained it, and "assets/models/base" comes to mean the new model. Relabelling each such path,
everywhere in the nesting, keeps the record's chain readable:

    python -m pipelines.training.relabel assets/models/base assets/models/base-inpaint \
        --path "runs/prev6/base=assets/models/base (as shipped at 7321986)"

Only values under a "path" key that equal OLD exactly change; the weights are not touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..checkpoints import CONFIG_FILE, read_model_config
from ..io import atomic_write_bytes


def _relabel(node, renames: dict[str, str], counts: dict[str, int]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "path" and isinstance(value, str) and value in renames:
                node[key] = renames[value]
                counts[value] += 1
            else:
                _relabel(value, renames, counts)
    elif isinstance(node, list):
        for value in node:
            _relabel(value, renames, counts)


def relabel_paths(model_dirs: list[str | Path], renames: dict[str, str]) -> dict[str, int]:
    """Replace each "path" value equal to a key of `renames` in the models' training records, writing
    each config.json atomically. Returns how often each old path was found (in all the models);
    raises ValueError, writing nothing, if one was found nowhere (a typo would otherwise pass unseen)."""
    counts = dict.fromkeys(renames, 0)
    configs = {}
    for folder in map(Path, model_dirs):
        path = folder / CONFIG_FILE
        if not path.is_file():
            raise ValueError(f"no model at {folder}: {CONFIG_FILE} is missing")
        meta = read_model_config(folder)
        _relabel(meta.get("training"), renames, counts)
        configs[path] = meta
    missing = [old for old, n in counts.items() if n == 0]
    if missing:
        raise ValueError(f"no training record path equals {', '.join(map(repr, missing))}; nothing was written")
    for path, meta in configs.items():
        atomic_write_bytes(path, json.dumps(meta, indent=2).encode())
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.training.relabel", description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model folders whose training records to rewrite")
    ap.add_argument("--path", action="append", required=True, metavar="OLD=NEW",
                    help="replace every recorded path equal to OLD by NEW (repeatable)")
    args = ap.parse_args(argv)
    renames = {}
    for item in args.path:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            print(f"error: --path takes OLD=NEW, got {item!r}", file=sys.stderr)
            return 2
        renames[old] = new
    try:
        counts = relabel_paths(args.models, renames)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for old, n in counts.items():
        print(f"{old} -> {renames[old]}: {n} place{'s' if n != 1 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
