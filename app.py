"""Start the editing studio: `python app.py` opens it on http://127.0.0.1:7860 with the shipped models.

    python app.py                                   # local only, default models in assets/models
    python app.py --models-dir /data/glide          # released GLIDE .pt files (base.pt, upsample.pt, ...)
    python app.py --listen --auth me:secret         # reachable from the network, with a login
    python app.py --device cuda --port 7861

No inference code lives here: the layout and wiring are in studio/ui.py, the handlers in studio/session.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
SHIPPED_MODELS = Path(__file__).resolve().parent / "assets" / "models"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="GLIDE-style image-editing studio (Gradio).")
    p.add_argument("--models-dir", default=os.environ.get("STUDIO_MODELS_DIR") or str(SHIPPED_MODELS),
                   help="models dir with base/, base-inpaint/, upsampler/ (or released GLIDE .pt files); "
                        "default: the shipped models ($STUDIO_MODELS_DIR overrides)")
    p.add_argument("--projects-dir", default="projects",
                   help="where projects (and fine-tuned models under finetuned/) are saved")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--listen", action="store_true", help="listen on 0.0.0.0 instead of 127.0.0.1")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    p.add_argument("--finetune-data", default=None, metavar="FOLDER",
                   help="with --listen, the Fine-tune tab trains only on folders inside PROJECTS_DIR/datasets "
                        "and this one (on 127.0.0.1, any folder)")
    p.add_argument("--max-upload-mb", type=float, default=20, help="largest accepted upload")
    p.add_argument("--queue-size", type=int, default=16, help="most waiting jobs before new ones are refused")
    p.add_argument("--no-preload", action="store_true", help="load models on first use, not in the background")
    args = p.parse_args(argv)
    if args.auth is not None and ":" not in args.auth:
        p.error("--auth takes USER:PASS")
    return args


def main(argv=None) -> None:
    t0 = time.perf_counter()
    args = parse_args(argv)
    from studio.ui import launch_studio

    demo, url = launch_studio(
        models_dir=args.models_dir, projects_dir=args.projects_dir, device=args.device,
        server_name="0.0.0.0" if args.listen else "127.0.0.1", port=args.port,
        auth=tuple(args.auth.split(":", 1)) if args.auth else None,
        max_upload_mb=args.max_upload_mb, queue_size=args.queue_size, preload=not args.no_preload,
        finetune_data=args.finetune_data)
    print(f"studio ready at {url} in {time.perf_counter() - t0:.1f} s", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        demo.studio.finetuner.close()  # a training run is stopped with a checkpoint; Resume continues it
        demo.close()


if __name__ == "__main__":
    main()
