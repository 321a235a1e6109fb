"""The studio's layout and wiring: one `build_ui(studio)`; the handlers are `Studio` methods.

Gradio facts this relies on (see shared/reference/editing-uis.md):
* the mask is the alpha of the editor's layer (image_mode="RGBA"), never its colour;
* format="png" on every image component of the edit chain (the default WebP is lossy);
* the canonical images live on the server (the project's Scene); the browser keeps only the
  project id (gr.BrowserState with a fixed key and a secret stored in the projects folder, so the
  id survives a refresh, a closed tab and a restart of the app);
* Stop runs outside the queue and interrupts the pipeline of this browser session;
* every model call shares one queue slot (concurrency_id="model").
"""

from __future__ import annotations

import functools
import inspect
import os
import secrets
import threading
from pathlib import Path

import gradio as gr

from pipelines.defaults import (DEFAULT_GUIDANCE, DEFAULT_GUIDANCE_INPAINT, DEFAULT_MASK_BLUR, DEFAULT_SAMPLER,
                                DEFAULT_SDEDIT_STRENGTH, DEFAULT_STEPS, DEFAULT_STEPS_INPAINT,
                                DEFAULT_UPSAMPLE_STEPS, DEFAULT_UPSAMPLE_STRENGTH, SAMPLERS)
from pipelines.io import atomic_write_bytes

from .finetune import training_data_roots
from .projects import _pl
from .session import LOAD_OUTPUTS, RUN_OUTPUTS, SETTINGS, WORKSPACE_OUTPUTS, Studio, pack

MODEL_QUEUE = dict(concurrency_id="model", concurrency_limit=1)
UI_ONLY = dict(api_visibility="undocumented")
# Stop also reaches this tab's runs still waiting in the queue: the tab counts its Stop clicks, each run
# carries the count at its submission as its last input, and the server skips a run that started after
# a later Stop (Studio.stop). Counted in the page, so a click needs no round trip to be in order.
COUNT_STOP_JS = "() => (window.studioStops = (window.studioStops || 0) + 1)"
WITH_STOP_COUNT_JS = "(...values) => [...values.slice(0, -1), window.studioStops || 0]"
MASK_COLOR = ("#ff2d95", 0.55)  # the mask is drawn semi-transparent over the image
EXAMPLES = ["a red circle on a gray background", "a blue star at the top left and a yellow square in the center",
            "a green triangle", "a purple star on a beige background"]

CSS = """
#preview img, #compare img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;}
#results img, #history img {image-rendering: pixelated;}
#actions button {min-width: 110px;}
#status {min-height: 4em;}
"""


def shows_errors(fn, names):
    """Wrap a UI handler whose outputs are `names` (one of them "status"): a gr.Error becomes a toast
    and the status line's text, and every other output keeps its value. Raised instead, Gradio paints
    a bare "Error" badge over each output (the canvas and history look lost) and the toast's text is
    gone after 10 s. The API endpoints are not wrapped: clients get the error."""
    def failed(e: gr.Error):
        gr.Warning(e.message)
        values = pack(names, status=f"⚠ {e.message}")
        return values[0] if len(values) == 1 else values  # Gradio takes a lone output's value bare

    if inspect.isgeneratorfunction(fn):  # Gradio streams a generator's yields: the wrapper must be one
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error as e:
                yield failed(e)
        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as e:
            return failed(e)
    return call


def with_status(fn, done: str):
    """A handler of the workspace outputs, made to fill WORKSPACE_STATUS: the status line says `done`
    (the last run's line would describe a step that may no longer be current)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        return (*fn(*args, **kwargs), done)
    return shows_errors(call, WORKSPACE_STATUS)


WORKSPACE_STATUS = WORKSPACE_OUTPUTS + ("status",)


def _secret(projects_dir: Path) -> str:
    """The BrowserState secret, stored once per projects folder so the id survives restarts."""
    path = projects_dir / ".studio_secret"
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        secret = ""
    if not secret:  # first start, or an empty file left by an older version killed mid-write
        # written whole or not at all, readable by its owner only (mkstemp's mode)
        atomic_write_bytes(path, secrets.token_hex(32).encode())
        secret = path.read_text().strip()
    return secret


def build_ui(studio: Studio) -> gr.Blocks:
    c: dict[str, gr.components.Component] = {}  # output components by the names session.py uses

    def outs(names):
        return [c[n] for n in names]

    with gr.Blocks(title="GLIDE Studio", analytics_enabled=False) as demo:
        c["project_id"] = gr.BrowserState(None, storage_key="glide-studio-project",
                                          secret=_secret(studio.projects.root))
        selected = gr.State(None)  # index of the result clicked in the gallery

        gr.Markdown("## GLIDE Studio · text-guided generation, inpainting and sketch editing")
        with gr.Tabs():
            # ==================================================================== the workspace
            with gr.Tab("Studio", id="studio") as studio_tab:
                with gr.Row(equal_height=False):
                    with gr.Column(scale=5):
                        with gr.Tabs():
                            with gr.Tab("Mask", id="mask"):
                                c["mask_canvas"] = gr.ImageEditor(
                                    label="Canvas · paint the area to regenerate", elem_id="mask_canvas",
                                    type="numpy", image_mode="RGBA", format="png", sources=(), transforms=(),
                                    layers=False, height=520, interactive=True,
                                    brush=gr.Brush(colors=[MASK_COLOR], color_mode="fixed", default_size=16),
                                    eraser=gr.Eraser(default_size=16))
                                with gr.Row():
                                    invert = gr.Checkbox(False, label="Invert mask (regenerate what is NOT painted)")
                                    clear_mask = gr.Button("Clear mask", size="sm")
                            with gr.Tab("Sketch", id="sketch"):
                                c["sketch_canvas"] = gr.ImageEditor(
                                    label="Canvas · sketch coloured strokes, then Sketch → image",
                                    elem_id="sketch_canvas", type="numpy", image_mode="RGBA", format="png",
                                    sources=(), transforms=(), layers=False, height=520, interactive=True,
                                    brush=gr.Brush(color_mode="defaults", default_size=12,
                                                   colors=["#e53935", "#1e88e5", "#43a047", "#fdd835", "#8e24aa",
                                                           "#fb8c00", "#ffffff", "#000000", "#9e9e9e"]),
                                    eraser=gr.Eraser(default_size=16))
                                with gr.Row():
                                    strength = gr.Slider(0.05, 1.0, value=DEFAULT_SDEDIT_STRENGTH, step=0.05,
                                                         label="Sketch strength",
                                                         info="how far from the sketch: 0 = keep it, 1 = ignore it")
                                    only_sketched = gr.Checkbox(True, label="Change only the sketched area")
                                    clear_sketch = gr.Button("Clear sketch", size="sm")
                        prompt = c["prompt"] = gr.Textbox(label="Prompt",
                                                          placeholder="e.g. a red circle on a gray background",
                                                          lines=2, elem_id="prompt")
                        with gr.Accordion("Negative prompt", open=False):
                            negative = gr.Textbox(label="Negative prompt", show_label=False,
                                                  placeholder="steer away from this (default: the empty prompt)")
                        gr.Examples(EXAMPLES, inputs=prompt, label="Example prompts")
                        with gr.Row(elem_id="actions"):
                            generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                            inpaint_btn = gr.Button("Inpaint", variant="primary", elem_id="inpaint")
                            sdedit_btn = gr.Button("Sketch → image", variant="primary", elem_id="sdedit")
                            upsample_btn = gr.Button("Upsample", elem_id="upsample")
                            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                            stop_count = gr.Number(0, visible=False)  # filled in the page (COUNT_STOP_JS)
                        c["status"] = gr.Markdown("", elem_id="status")
                        open_image = gr.UploadButton("Open an image…", file_types=["image"], size="sm")

                    with gr.Column(scale=4):
                        c["preview"] = gr.Image(label="Live preview", format="png", interactive=False, height=220,
                                                elem_id="preview")
                        c["results"] = gr.Gallery(label="Variations (click one, then “Use this”)", format="png",
                                                  columns=4, height=200, allow_preview=False, elem_id="results",
                                                  object_fit="contain", fit_columns=False)
                        use_btn = gr.Button("Use this variation", size="sm", elem_id="use")
                        c["compare"] = gr.ImageSlider(label="Before / after", format="png", elem_id="compare",
                                                      type="filepath", max_height=320)
                        c["node_info"] = gr.Markdown(elem_id="node_info")

                with gr.Accordion("Settings", open=False):
                    with gr.Row():
                        s = {}
                        s["steps"] = gr.Dropdown(
                            ["auto", "ddim10", "ddim15", "ddim25", "ddim50", "15", "25", "50", "100", "fast27"],
                            value="auto", allow_custom_value=True, label="Steps", elem_id="steps",
                            info=f"auto = {DEFAULT_STEPS} ({DEFAULT_STEPS_INPAINT} for inpainting); N = N evenly "
                                 "spaced steps; ddimN = N steps that skip the noisiest one")
                        s["sampler"] = gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler")
                        s["guidance"] = gr.Dropdown(
                            ["auto", "1", "2", "3", "4", "5", "7.5", "10"], value="auto", allow_custom_value=True,
                            label="Guidance scale", elem_id="guidance",
                            info=f"auto = {DEFAULT_GUIDANCE:g} ({DEFAULT_GUIDANCE_INPAINT:g} for inpainting, as "
                                 "GLIDE's notebooks); 1 = no guidance")
                        s["num_images"] = gr.Slider(1, 8, value=1, step=1, label="Variations", elem_id="variations")
                    with gr.Row():
                        s["seed_mode"] = gr.Radio(["random", "fixed"], value="random", label="Seed")
                        s["seed"] = c["seed"] = gr.Number(0, precision=0, minimum=0, label="Seed value",
                                                          info="the seed of the last run shows here; set "
                                                               "“fixed” to reuse it")
                        s["mask_blur"] = gr.Slider(0, 32, value=DEFAULT_MASK_BLUR, step=1, label="Mask blur (px)")
                        s["inpaint_mode"] = gr.Radio(["finetuned", "replace"], value="finetuned",
                                                     label="Inpainting mode",
                                                     info="finetuned = the inpainting model; replace = any model")
                    with gr.Row():
                        s["upsample"] = gr.Radio(["auto", "on", "off"], value="auto", label="Upsampler (64 → 256)")
                        s["upsample_strength"] = gr.Slider(
                            0.1, 1.0, value=DEFAULT_UPSAMPLE_STRENGTH, step=0.05, label="Upsampler strength",
                            elem_id="upsample_strength",
                            info="lower keeps the 64 px picture; 1 = redraw from noise (the GLIDE notebooks)")
                        s["model"] = c["model"] = gr.Dropdown(
                            studio.models.choices(), value="default", label="Model", allow_custom_value=False,
                            info=f"default = {studio.models.models_dir}; fine-tuned models join this list")
                settings = [s[name] for name in SETTINGS]

                gr.Markdown("### History")
                with gr.Row():
                    c["undo"] = gr.Button("↶ Undo", size="sm", interactive=False, elem_id="undo")
                    c["redo"] = gr.Button("↷ Redo", size="sm", interactive=False, elem_id="redo")
                c["history"] = gr.Gallery(label="Edit history (click a step to go back to it; the next edit "
                                                "branches from there)", columns=10, height=170, format="png",
                                          allow_preview=False, elem_id="history", object_fit="contain",
                                          fit_columns=False)
                with gr.Accordion("Edit graph", open=False):
                    c["history_tree"] = gr.Markdown(elem_id="history_tree")

                with gr.Accordion("Project", open=False) as project_panel:
                    with gr.Row():
                        c["project_name"] = gr.Textbox(label="Name", scale=2)
                        rename_btn = gr.Button("Rename", size="sm", scale=0)
                        c["projects"] = gr.Dropdown([], label="Projects (saved on the server after every edit)",
                                                    scale=3, elem_id="projects")
                    with gr.Row():
                        open_btn = gr.Button("Open", size="sm")
                        new_btn = gr.Button("New project", size="sm")
                        delete_btn = gr.Button("Delete…", size="sm", variant="stop")
                        confirm_btn = gr.Button("Really delete the selected project", size="sm", variant="stop",
                                                visible=False)
                    with gr.Row():
                        png_btn = gr.Button("Export PNG (with recipe)", size="sm")
                        zip_btn = gr.Button("Export project (.zip)", size="sm")
                        import_zip = gr.UploadButton("Import project (.zip)", file_types=[".zip"], size="sm")
                        replay_btn = gr.Button("Replay project", size="sm")
                    download = gr.File(label="Download", interactive=False)
                    replay_md = gr.Markdown()
                    replay_json = gr.JSON(visible=False)

            # ==================================================================== fine-tuning
            with gr.Tab("Fine-tune", id="finetune") as ft_tab:
                gr.Markdown("Fine-tune the **inpainting model** on a folder of your images with captions "
                            "(`image.png` + `image.txt`, or a `captions.jsonl`). Training runs in the background "
                            "(`python -m pipelines.training finetune-inpaint`); Stop saves a checkpoint that "
                            "Resume continues. The exported model appears in the Model list.")
                with gr.Row():
                    ft_data = gr.Textbox(label="Image folder on the server", placeholder="/path/to/images",
                                         scale=3)
                    ft_name = gr.Textbox(label="Run name", placeholder="my-inpaint (letters, digits, . _ -)", scale=2)
                    ft_init = gr.Dropdown(studio.finetuner.init_choices(), label="Start from",
                                          value=(studio.finetuner.init_choices() or [None])[0], scale=3,
                                          allow_custom_value=True)
                with gr.Row():
                    ft_steps = gr.Number(500, precision=0, minimum=1, label="Steps")
                    ft_batch = gr.Number(8, precision=0, minimum=1, label="Batch size")
                    ft_lr = gr.Number(1e-4, label="Learning rate")
                    ft_every = gr.Number(100, precision=0, minimum=1, label="Samples every N steps")
                with gr.Row():
                    ft_start = gr.Button("Start", variant="primary")
                    ft_stop = gr.Button("Stop (saves)", variant="stop")
                    ft_resume = gr.Button("Resume")
                    ft_run = gr.Dropdown(studio.finetuner.runs(), label="Run", allow_custom_value=False)
                ft_state = gr.Markdown()
                with gr.Row():
                    ft_plot = gr.LinePlot(x="step", y="loss", title="Training loss", height=260)
                    ft_samples = gr.Gallery(label="Sample grids (latest last)", columns=2, height=260,
                                            format="png")
                ft_tail = gr.Textbox(label="Trainer output", lines=6, max_lines=12, interactive=False)
                ft_timer = gr.Timer(2.0, active=False)

        # ---------------------------------------------------------------- hidden API components
        with gr.Column(visible=False):
            api = _api_components()

        # ================================================================ wiring
        # ---------------------------------------------------------------- named API endpoints
        # (wired first, so they own the names /generate, /inpaint, ...; the UI's events are undocumented)
        out = [api["gallery"], api["info"]]
        a = api
        api["btn"].click(studio.api_generate, [a["prompt"], a["negative_prompt"], a["steps"], a["sampler"],
                                               a["guidance_scale"], a["seed"], a["num_images"], a["upsample"],
                                               a["model"], a["project_id"]], out, api_name="generate", **MODEL_QUEUE)
        api["btn"].click(studio.api_inpaint, [a["prompt"], a["image"], a["mask"], a["negative_prompt"], a["mode"],
                                              a["strength_inpaint"], a["mask_blur"], a["steps_inpaint"], a["sampler"],
                                              a["guidance_inpaint"], a["seed"], a["num_images"], a["model"],
                                              a["project_id"]], out, api_name="inpaint", **MODEL_QUEUE)
        api["btn"].click(studio.api_sdedit, [a["prompt"], a["image"], a["strength_sdedit"], a["mask_optional"],
                                             a["negative_prompt"], a["mask_blur"], a["steps"], a["sampler"],
                                             a["guidance_scale"], a["seed"], a["num_images"], a["model"],
                                             a["project_id"]], out, api_name="sdedit", **MODEL_QUEUE)
        api["btn"].click(studio.api_upsample, [a["prompt"], a["image"], a["upsample_steps"], a["seed"],
                                               a["num_images"], a["model"], a["project_id"], a["strength_upsample"]],
                         out,
                         api_name="upsample", **MODEL_QUEUE)
        api["btn"].click(studio.api_new_project, a["name"], a["json"], api_name="new_project")
        api["btn"].click(studio.api_project, a["project_id"], a["json"], api_name="project")
        api["btn"].click(studio.api_projects, None, a["json"], api_name="projects")
        api["btn"].click(studio.api_replay, [a["project_id"], a["model"]], a["json"], api_name="replay",
                         **MODEL_QUEUE)

        # ---------------------------------------------------------------- the UI's events
        demo.load(studio.on_load, c["project_id"], outs(LOAD_OUTPUTS), **UI_ONLY)

        # the progress bar (and the queue position while waiting) shows over the status line, so
        # the live preview stays visible
        run = dict(show_progress="full", show_progress_on=[c["status"]], js=WITH_STOP_COUNT_JS, **MODEL_QUEUE,
                   **UI_ONLY)
        pid = c["project_id"]
        ran = outs(RUN_OUTPUTS)
        generate = shows_errors(studio.generate, RUN_OUTPUTS)
        generate_btn.click(generate, [pid, prompt, negative, *settings, stop_count], ran, **run)
        inpaint_btn.click(shows_errors(studio.inpaint, RUN_OUTPUTS),
                          [pid, c["mask_canvas"], prompt, negative, invert, *settings, stop_count], ran, **run)
        sdedit_btn.click(shows_errors(studio.sdedit, RUN_OUTPUTS),
                         [pid, c["sketch_canvas"], prompt, negative, strength, only_sketched, *settings, stop_count],
                         ran, **run)
        upsample_btn.click(shows_errors(studio.upsample, RUN_OUTPUTS), [pid, prompt, negative, *settings, stop_count],
                           ran, **run)
        prompt.submit(generate, [pid, prompt, negative, *settings, stop_count], ran, **run)
        stop_btn.click(studio.stop, stop_count, c["status"], js=COUNT_STOP_JS, queue=False, **UI_ONLY)

        ws = outs(WORKSPACE_STATUS)
        c["undo"].click(with_status(studio.undo, "Undone: the previous step is current."), pid, ws, **UI_ONLY)
        c["redo"].click(with_status(studio.redo, "Redone."), pid, ws, **UI_ONLY)
        c["history"].select(with_status(studio.jump, "Step selected: the next edit branches from it."), pid, ws,
                            **UI_ONLY)
        clear_mask.click(studio.reset_mask, pid, c["mask_canvas"], **UI_ONLY)
        clear_sketch.click(studio.reset_sketch, pid, c["sketch_canvas"], **UI_ONLY)
        c["results"].select(studio.select_variation, pid, [selected, c["compare"]], **UI_ONLY)
        use_btn.click(with_status(studio.use_variation, "Variation in use: it is the current step."),
                      [pid, selected], ws, **UI_ONLY)
        open_image.upload(with_status(studio.import_image, "Image opened: a new starting point in the history."),
                          [pid, open_image], ws, **UI_ONLY)

        load = outs(LOAD_OUTPUTS)
        project_panel.expand(studio.project_list, pid, c["projects"], **UI_ONLY)
        open_btn.click(shows_errors(studio.open_project, LOAD_OUTPUTS), c["projects"], load, **UI_ONLY)
        new_btn.click(studio.new_project, None, load, **UI_ONLY)
        rename_btn.click(studio.rename_project, [pid, c["project_name"]], [c["projects"], c["project_name"]],
                         **UI_ONLY)
        delete_btn.click(lambda: gr.update(visible=True), None, confirm_btn, queue=False, **UI_ONLY)
        confirm_btn.click(shows_errors(studio.delete_project, LOAD_OUTPUTS), [c["projects"], pid], load,
                          **UI_ONLY).then(
            lambda: gr.update(visible=False), None, confirm_btn, queue=False, **UI_ONLY)
        png_btn.click(studio.export_png, pid, download, **UI_ONLY)
        zip_btn.click(studio.export_zip, pid, download, **UI_ONLY)
        import_zip.upload(shows_errors(studio.import_zip, LOAD_OUTPUTS), import_zip, load, **UI_ONLY)
        replay_btn.click(studio.replay, [pid, s["model"]], [replay_md, replay_json], **MODEL_QUEUE, **UI_ONLY)

        ft_tab.select(lambda: gr.Timer(active=True), None, ft_timer, queue=False, **UI_ONLY)
        studio_tab.select(lambda: gr.Timer(active=False), None, ft_timer, queue=False, **UI_ONLY)
        ft_timer.tick(studio.ft_poll, ft_run, [ft_plot, ft_samples, ft_state, ft_tail, s["model"]],
                      show_progress="hidden", **UI_ONLY)
        ft_start.click(shows_errors(studio.ft_start, ("run", "status")),  # ft_state is the tab's status line
                       [ft_data, ft_name, ft_init, ft_steps, ft_batch, ft_lr, ft_every], [ft_run, ft_state], **UI_ONLY)
        ft_stop.click(studio.ft_stop, None, ft_state, **UI_ONLY)
        ft_resume.click(shows_errors(studio.ft_resume, ("status",)), [ft_run, ft_steps], ft_state, **UI_ONLY)

    return demo


def _api_components() -> dict:
    """Invisible inputs/outputs of the named endpoints (their defaults are the endpoints' defaults)."""
    return {
        "btn": gr.Button(),
        "prompt": gr.Textbox(label="prompt"),
        "negative_prompt": gr.Textbox("", label="negative_prompt"),
        "image": gr.File(label="image", type="filepath"),
        "mask": gr.File(label="mask", type="filepath"),
        "mask_optional": gr.File(label="mask", type="filepath"),
        "steps": gr.Textbox(DEFAULT_STEPS, label="steps"),
        "steps_inpaint": gr.Textbox(str(DEFAULT_STEPS_INPAINT), label="steps"),
        "upsample_steps": gr.Textbox(DEFAULT_UPSAMPLE_STEPS, label="steps"),
        "sampler": gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="sampler"),
        "guidance_scale": gr.Number(DEFAULT_GUIDANCE, label="guidance_scale"),
        "guidance_inpaint": gr.Number(DEFAULT_GUIDANCE_INPAINT, label="guidance_scale"),
        "seed": gr.Number(-1, label="seed"),  # no precision: a NaN would fail in Gradio, unnamed
        "num_images": gr.Number(1, precision=0, label="num_images"),
        "upsample": gr.Checkbox(True, label="upsample"),
        "mode": gr.Dropdown(["finetuned", "replace"], value="finetuned", label="mode"),
        "strength_inpaint": gr.Number(1.0, label="strength"),
        "strength_sdedit": gr.Number(DEFAULT_SDEDIT_STRENGTH, label="strength"),
        "strength_upsample": gr.Number(DEFAULT_UPSAMPLE_STRENGTH, label="strength"),
        "mask_blur": gr.Number(DEFAULT_MASK_BLUR, label="mask_blur"),
        "model": gr.Textbox("default", label="model"),
        "project_id": gr.Textbox("", label="project_id"),
        "name": gr.Textbox("", label="name"),
        "gallery": gr.Gallery(format="png", label="images"),
        "info": gr.JSON(label="info"),
        "json": gr.JSON(label="result"),
    }


def launch_studio(*, models_dir="assets/models", projects_dir="projects", device=None, server_name="127.0.0.1",
                  port=7860, auth=None, max_upload_mb=20.0, queue_size=16, preload=True, quiet=False,
                  finetune_data=None):
    """Build and launch the studio; returns (demo, local url). Models load in a background thread
    after the page is served (or lazily on first use when preload is False). Served beyond this
    machine, the Fine-tune tab reads training folders only inside PROJECTS_DIR/datasets and
    `finetune_data`; on 127.0.0.1, any folder."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    studio = Studio(models_dir=models_dir, projects_dir=projects_dir, device=device,
                    finetune_data_roots=training_data_roots(server_name, projects_dir, finetune_data),
                    max_upload_mb=max_upload_mb)
    demo = build_ui(studio)
    demo.studio = studio
    demo.queue(max_size=queue_size, default_concurrency_limit=4)
    _, url, _ = demo.launch(
        server_name=server_name, server_port=port, auth=auth, prevent_thread_lock=True, quiet=quiet,
        max_file_size=int(max_upload_mb * 1024 * 1024), allowed_paths=[str(studio.projects.root)],
        blocked_paths=[str(studio.projects.root / ".studio_secret"), str(studio.finetuner.root),
                       str(studio.projects.root / "datasets")],  # training images are the user's, not the UI's
        show_error=True, run_history=False, share=False, enable_monitoring=False, css=CSS,
        footer_links=["api", "settings"], mcp_server=False)
    # torch and the models load after the page is served: in the background, or on first use
    threading.Thread(target=studio.models.preload if preload else _pl, name="studio-preload", daemon=True).start()
    return demo, url
