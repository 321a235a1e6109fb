"""A real browser (Debian's headless chromium, driven by Playwright) against the studio launched
in-process with the tiny random models.

The scenario of the issue: open the page, open an image, draw a mask stroke with the mouse, type a
prompt, click Inpaint, wait for the result; then check that the history grew, the status reports 0
pixels changed outside the mask, and — on the server's copy of the project — that the pixels
outside the painted stroke are bit-identical to the input and the stroke's mask sits where the
mouse drew it. A page reload brings the project back (the browser keeps only its id). Screenshots
are saved (their paths are printed; STUDIO_SCREENSHOT_DIR overrides the folder).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_studio_api import launch_app

CHROMIUM = "/usr/bin/chromium"
pytestmark = [pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason=f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y "
                                        "chromium) to run the browser test"),
              pytest.mark.usefixtures("one_thread_per_module")]


def selected_thumbnail_is(number: int) -> str:
    """JS: the history gallery highlights exactly its `number`-th thumbnail (1-based)."""
    return ("() => { const items = [...document.querySelectorAll('#history .thumbnail-item')];"
            f"  return items.length >= {number} && items.filter(i => i.classList.contains('selected')).length === 1"
            f"      && items[{number - 1}].classList.contains('selected'); }}")


def test_draw_a_mask_and_inpaint_in_a_real_browser(tiny_models, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    from pipelines import Scene
    from pipelines.shapes import random_scene, render

    shots = Path(os.environ.get("STUDIO_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    source = tmp_path / "start.png"
    render(random_scene(3), size=128).save(source)
    original = np.asarray(Image.open(source).convert("RGB"))
    projects = tmp_path / "projects"
    demo, url = launch_app(tiny_models, projects, tmp_path / "gtmp")
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url)
            page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('project')",
                                   timeout=30000)
            # open an image: it becomes the first history entry and the canvas background
            page.get_by_test_id("Open an image…-upload-button").set_input_files(str(source))
            page.wait_for_function("() => document.querySelectorAll('#history img').length === 1", timeout=30000)
            page.wait_for_timeout(1000)  # the canvas loads its background

            # draw one stroke with the mask brush, over the upper left part of the image
            page.locator("#mask_canvas").get_by_label("Brush").first.click()
            box = page.locator("#mask_canvas canvas").first.bounding_box()
            zoom = float(re.search(r"(\d+)%", page.locator("#mask_canvas").inner_text()).group(1)) / 100
            side = 128 * zoom  # the image is shown centred in the canvas at this zoom
            left, top = box["x"] + (box["width"] - side) / 2, box["y"] + (box["height"] - side) / 2
            start, end = (0.25, 0.3), (0.45, 0.3)  # fractions of the image
            page.mouse.move(left + side * start[0], top + side * start[1])
            page.mouse.down()
            for k in range(1, 11):
                f = k / 10
                page.mouse.move(left + side * (start[0] + (end[0] - start[0]) * f), top + side * start[1], steps=2)
            page.mouse.up()
            page.wait_for_timeout(300)

            page.locator("#prompt textarea").fill("a blue star")
            page.click("#inpaint")
            page.wait_for_function("() => document.querySelectorAll('#history img').length === 2", timeout=90000)
            page.wait_for_function("() => document.querySelector('#status').innerText.includes('inpaint done')",
                                   timeout=30000)
            status = page.locator("#status").inner_text()
            assert "pixels changed outside the mask: 0" in status, status
            # the history highlights the current step, after an edit and after an undo
            page.wait_for_function(selected_thumbnail_is(2), timeout=30000)
            page.click("#undo")
            page.wait_for_function(selected_thumbnail_is(1), timeout=30000)
            page.click("#redo")
            page.wait_for_function(selected_thumbnail_is(2), timeout=30000)
            page.wait_for_timeout(1500)  # let the canvas, slider and gallery images load
            shot = shots / "studio_inpaint.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"\nscreenshot: {shot}")

            # a user error (Sketch → image with nothing sketched) stays on the status line, and the
            # history keeps its images
            page.click("#sdedit")
            page.wait_for_function("() => document.querySelector('#status').innerText.includes('⚠')",
                                   timeout=30000)
            assert "sketch" in page.locator("#status").inner_text()
            page.wait_for_timeout(500)
            assert page.locator("#history img").count() == 2

            # a long run (8 variations, 400 steps, upsampled) shows live previews; Stop ends it
            page.get_by_role("button", name="Settings ▼").click()
            steps = page.locator("#steps input")  # a dropdown that takes typed values
            for _ in range(10):
                steps.fill("400")
                steps.press("Enter")
                page.wait_for_timeout(200)
                if steps.input_value() == "400":
                    break
            sync_api.expect(steps).to_have_value("400")
            for slider, value in (("#variations", "8"),):
                for _ in range(10):  # the accordion's content may still be settling: retry until it sticks
                    page.locator(f"{slider} input[type=number]").fill(value)
                    page.keyboard.press("Tab")
                    page.wait_for_timeout(200)
                    if page.locator(f"{slider} input[type=range]").input_value() == value:
                        break
                sync_api.expect(page.locator(f"{slider} input[type=range]")).to_have_value(value)
            page.click("#generate")
            page.wait_for_function("() => { const i = document.querySelector('#preview img');"
                                   "        return i && i.complete && i.naturalWidth > 0; }", timeout=60000)
            # the progress bar, with the step count: the typed 400 base steps + 10 of the upsampler
            page.wait_for_function("() => /step \\d+\\/410/.test(document.querySelector('#status').innerText)",
                                   timeout=30000)
            # Stop at once, while Generate still runs: the waiting Upsample must be skipped, not stopped
            # mid-run. 400 steps keep the tiny models busy 4 times as long as 100, which once timed out
            # here in a CI rehearsal, likely because the Generate had ended before the Stop
            page.click("#upsample")  # waits in the queue behind the running Generate
            page.wait_for_timeout(300)
            page.click("#stop")
            page.wait_for_function("() => document.querySelector('#status').innerText.includes('Stopped')",
                                   timeout=30000)
            # the waiting Upsample was submitted before the Stop: it does nothing when its turn comes
            page.wait_for_function("() => document.querySelector('#status').innerText.includes('before it started')",
                                   timeout=30000)
            page.screenshot(path=str(shots / "studio_stopped.png"), full_page=True)
            print(f"screenshot: {shots / 'studio_stopped.png'}")
            assert page.evaluate("() => document.querySelectorAll('#history img').length") == 2

            # a reload restores the project from the id kept in the browser
            page.reload()
            page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('restored')",
                                   timeout=30000)
            page.wait_for_function("() => document.querySelectorAll('#history img').length === 2", timeout=30000)
            page.screenshot(path=str(shots / "studio_after_reload.png"), full_page=True)
            print(f"screenshot: {shots / 'studio_after_reload.png'}")
            browser.close()
    finally:
        demo.close()

    # the server's copy: one project, import → inpaint, pixels outside the stroke unchanged
    [folder] = [d for d in projects.iterdir() if re.fullmatch(r"[0-9a-f]{12}", d.name)]
    scene = Scene.load(folder / "scene")
    first, second = scene.nodes.values()
    assert (first.op, second.op) == ("import", "inpaint") and second.parent == first.id
    assert np.array_equal(np.asarray(scene.image(first.id)), original)
    result = np.asarray(scene.image(second.id))
    stroke = np.asarray(scene.mask(second.id)) > 127
    changed = (result != original).any(axis=-1)
    assert stroke.any() and changed.any() and not (changed & ~stroke).any()
    assert second.changed_outside_mask == 0
    ys, xs = np.nonzero(stroke)  # the mask is where the mouse drew (image fractions, ± a brush width)
    assert abs(xs.mean() / 128 - (start[0] + end[0]) / 2) < 0.1 and abs(ys.mean() / 128 - start[1]) < 0.1
    assert xs.min() / 128 < start[0] + 0.05 and xs.max() / 128 > end[0] - 0.05
