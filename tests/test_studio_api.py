"""End-to-end tests of the studio through `gradio_client`, against an app launched in-process on a
free port with the tiny random models (conftest `tiny_models`) as its default models.

What is pinned down: every named endpoint (/generate, /inpaint, /sdedit, /upsample) returns PNGs
and an info JSON, with 0 pixels changed outside the mask; bad uploads (corrupt, 1x1, 8000x8000, a
PDF, over the size limit) get a message and the app keeps serving; four clients at once each get
their own results; a project made over the API survives an app restart and replays bit-exactly;
the UI's internal events are not part of the documented API; files outside the app's folders are
not served.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

import studio.session  # noqa: E402
from pipelines.defaults import DEFAULT_SDEDIT_STRENGTH  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

FAST = dict(steps=3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_app(models_dir, projects_dir, temp_dir, **kw):
    """The studio as `python app.py` starts it, in this process, on a free port: (demo, url)."""
    os.environ["GRADIO_TEMP_DIR"] = str(temp_dir)
    from studio.ui import launch_studio

    return launch_studio(models_dir=models_dir, projects_dir=projects_dir, port=free_port(), quiet=True,
                         preload=False, **kw)


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("studio_app")
    demo, url = launch_app(tiny_models, root / "projects", root / "gradio_tmp", max_upload_mb=2)
    yield demo, url, root
    demo.close()


@pytest.fixture(scope="module")
def client(app):
    _, url, root = app
    return Client(url, verbose=False, download_files=str(root / "downloads"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("uploads")
    rng = np.random.RandomState(0)
    out = {"image": d / "image.png", "mask": d / "mask.png", "small": d / "small.png"}
    Image.fromarray(rng.randint(0, 256, (30, 40, 3), dtype=np.uint8)).save(out["image"])
    mask = np.zeros((30, 40), np.uint8)
    mask[8:20, 10:25] = 255
    Image.fromarray(mask).save(out["mask"])
    Image.fromarray(rng.randint(0, 256, (16, 16, 3), dtype=np.uint8)).save(out["small"])
    return out


def images_of(gallery) -> list[Image.Image]:
    out = []
    for item in gallery:
        path = item["image"] if isinstance(item, dict) else item[0]
        path = path["path"] if isinstance(path, dict) else path
        assert str(path).endswith(".png"), path  # PNG through the chain, never WebP
        out.append(Image.open(path))
    return out


def test_generate_endpoint(client):
    gallery, info = client.predict(prompt="a red circle", num_images=2, seed=7, upsample=False, **FAST,
                                   api_name="/generate")
    images = images_of(gallery)
    assert len(images) == 2 and images[0].size == (16, 16) and images[0].format == "PNG"
    assert info["seed"] == 7 and info["params"]["prompt"] == "a red circle" and info["timings"]["total_s"] > 0
    again, info2 = client.predict(prompt="a red circle", num_images=2, seed=7, upsample=False, **FAST,
                                  api_name="/generate")
    assert np.array_equal(np.asarray(images[1]), np.asarray(images_of(again)[1]))
    _, random_seed = client.predict(prompt="a red circle", upsample=False, **FAST, api_name="/generate")
    assert isinstance(random_seed["seed"], int)
    _, unknown = client.predict(prompt="a crimson circle.", upsample=False, **FAST, api_name="/generate")
    assert any("does not know the word 'crimson'" in w for w in unknown["warnings"])


def test_inpaint_endpoint_keeps_pixels_outside_the_mask(client, files):
    gallery, info = client.predict(prompt="a blue star", image=handle_file(files["image"]),
                                   mask=handle_file(files["mask"]), seed=1, **FAST, api_name="/inpaint")
    out = np.asarray(images_of(gallery)[0].convert("RGB"))
    src = np.asarray(Image.open(files["image"]).convert("RGB"))
    outside = np.asarray(Image.open(files["mask"])) < 128
    assert out.shape == src.shape and info["changed_outside_mask"] == [0]
    assert np.array_equal(out[outside], src[outside]) and not np.array_equal(out, src)
    _, replaced = client.predict(prompt="a blue star", image=handle_file(files["image"]),
                                 mask=handle_file(files["mask"]), mode="replace", seed=1, **FAST,
                                 api_name="/inpaint")
    assert replaced["changed_outside_mask"] == [0] and replaced["params"]["mode"] == "replace"


def test_sdedit_and_upsample_endpoints(client, files):
    gallery, info = client.predict(prompt="a green triangle", image=handle_file(files["image"]), strength=0.5,
                                   mask=handle_file(files["mask"]), seed=2, **FAST, api_name="/sdedit")
    assert images_of(gallery)[0].size == (40, 30) and info["changed_outside_mask"] == [0]
    gallery, info = client.predict(prompt="a green triangle", image=handle_file(files["image"]), seed=2,
                                   api_name="/sdedit", **FAST)
    assert info["changed_outside_mask"] is None and info["params"]["strength"] == DEFAULT_SDEDIT_STRENGTH
    gallery, info = client.predict(prompt="a red circle", image=handle_file(files["small"]), steps="3", seed=3,
                                   api_name="/upsample")
    assert images_of(gallery)[0].size == (64, 64) and info["params"]["pipeline"] == "upsample"
    assert info["params"]["strength"] == 0.4  # starts part-way from the enlarged image by default
    _, info = client.predict(prompt="a red circle", image=handle_file(files["small"]), steps="3", seed=3, strength=1.0,
                             api_name="/upsample")
    assert info["params"]["strength"] == 1.0


def test_bad_uploads_get_a_message_not_a_crash(client, files, tmp_path):
    (tmp_path / "corrupt.png").write_bytes(Path(files["image"]).read_bytes()[:60])
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.png")
    Image.new("RGB", (8000, 8000), "white").save(tmp_path / "huge.png")
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF\n")
    (tmp_path / "big.png").write_bytes(os.urandom(3 * 1024 * 1024))  # over the app's 2 MB limit
    cases = {"corrupt.png": "not a readable image", "tiny.png": "1x1", "huge.png": "8000x8000",
             "doc.pdf": "PDF", "big.png": "(?i)size|large|limit"}
    for name, message in cases.items():
        with pytest.raises(Exception, match=message):
            client.predict(prompt="x", image=handle_file(tmp_path / name), mask=handle_file(files["mask"]),
                           **FAST, api_name="/inpaint")
    with pytest.raises(Exception, match="mask is missing"):
        client.predict(prompt="x", image=handle_file(files["image"]), **FAST, api_name="/inpaint")
    with pytest.raises(Exception, match="empty"):  # the pipeline's own message comes through
        blank = tmp_path / "blank_mask.png"
        Image.new("L", (40, 30), 0).save(blank)
        client.predict(prompt="x", image=handle_file(files["image"]), mask=handle_file(blank), **FAST,
                       api_name="/inpaint")
    with pytest.raises(Exception, match="unknown model"):
        client.predict(prompt="x", model="../../etc", upsample=False, **FAST, api_name="/generate")
    with pytest.raises(Exception, match="seed must be a whole number"):
        client.predict(prompt="x", upsample=False, seed=2.5, **FAST, api_name="/generate")
    for seed in (float("nan"), float("inf")):  # raw HTTP can send these; Gradio's message named no field
        with pytest.raises(gr.Error, match="seed must be a whole number"):
            studio.session.Studio._api_seed(seed)
    # still serving
    gallery, _ = client.predict(prompt="a red circle", upsample=False, seed=1, **FAST, api_name="/generate")
    assert len(images_of(gallery)) == 1


def test_four_clients_at_once_each_get_their_own_results(app, files):
    _, url, root = app
    results, errors = {}, []
    prompts = ["a red circle", "a blue star", "a green square", "a white star"]

    def work(i):
        try:
            c = Client(url, verbose=False, download_files=str(root / f"dl{i}"))
            gallery, info = c.predict(prompt=prompts[i], seed=100 + i, upsample=False, **FAST, api_name="/generate")
            results[i] = (info, np.asarray(images_of(gallery)[0]))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and sorted(results) == [0, 1, 2, 3]
    for i in range(4):
        assert results[i][0]["seed"] == 100 + i and results[i][0]["params"]["prompt"] == prompts[i]
    pixels = [results[i][1] for i in range(4)]
    assert all(not np.array_equal(pixels[0], p) for p in pixels[1:])


def test_api_lists_the_named_endpoints_only(client):
    info = client.view_api(return_format="dict", print_info=False)
    named = set(info["named_endpoints"])
    assert {"/generate", "/inpaint", "/sdedit", "/upsample", "/new_project", "/project", "/replay"} <= named
    params = [p["parameter_name"] for p in info["named_endpoints"]["/inpaint"]["parameters"]]
    assert params[:3] == ["prompt", "image", "mask"] and "project_id" in params
    assert not any("lambda" in n or n.startswith("/on_") for n in named)


def test_no_file_outside_its_folders_is_served(app):
    _, url, root = app
    assert url.startswith("http://127.0.0.1:")
    secret = root / "projects" / ".studio_secret"  # inside the projects folder, but blocked
    assert secret.is_file()
    dataset = root / "projects" / "datasets" / "mine" / "a.png"  # training images: the user's, never served
    dataset.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16)).save(dataset)
    for path in ("/etc/passwd", str(Path(__file__).resolve()), "app.py", str(secret), str(dataset)):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}gradio_api/file={path}", timeout=10)
        assert e.value.code in (403, 404)


def test_project_survives_an_app_restart(tiny_models, tmp_path, files):
    projects = tmp_path / "projects"
    demo, url = launch_app(tiny_models, projects, tmp_path / "gtmp")
    try:
        c = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
        pid = c.predict(name="restart test", api_name="/new_project")["project_id"]
        _, g = c.predict(prompt="a red circle", seed=4, upsample=False, project_id=pid, **FAST, api_name="/generate")
        _, i = c.predict(prompt="a blue star", mask=handle_file(files["small"]), seed=5, project_id=pid, **FAST,
                         api_name="/inpaint")  # no image: the project's current one
        before = c.predict(project_id=pid, api_name="/project")
        secret = (projects / ".studio_secret").read_text()
    finally:
        demo.close()
    assert [n["op"] for n in before["nodes"]] == ["generate", "inpaint"] and before["current"] == i["node_id"]

    demo, url = launch_app(tiny_models, projects, tmp_path / "gtmp2")  # a restarted app, same folder
    try:
        c = Client(url, verbose=False, download_files=str(tmp_path / "dl2"))
        after = c.predict(project_id=pid, api_name="/project")
        assert after == before
        assert any(p["id"] == pid for p in c.predict(api_name="/projects"))
        report = c.predict(project_id=pid, api_name="/replay")
        assert report["all_reproduced"] and [n["reproduced"] for n in report["nodes"]] == [True, True]
        assert (projects / ".studio_secret").read_text() == secret  # the browser's stored id still decrypts
        with pytest.raises(Exception, match="does not exist"):
            c.predict(project_id="0123456789ab", api_name="/project")
    finally:
        demo.close()


def test_python_app_py_starts_fast_with_a_login(tiny_models, tmp_path):
    """`python app.py` as a user runs it: the page is served within seconds (measured and printed;
    the issue's budget is 15 s), it listens on 127.0.0.1, and --auth protects the API."""
    import subprocess
    import sys
    import time

    port = free_port()
    env = dict(os.environ, GRADIO_TEMP_DIR=str(tmp_path / "gtmp"), GRADIO_ANALYTICS_ENABLED="False")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--models-dir", str(tiny_models), "--projects-dir",
                             str(tmp_path / "projects"), "--port", str(port), "--auth", "ann:s3cret"],
                            cwd=Path(__file__).resolve().parent.parent, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        served = None
        while served is None and time.perf_counter() - t0 < 60 and proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    served = time.perf_counter() - t0 if r.status == 200 else None
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        assert served is not None, proc.stdout.read() if proc.poll() is not None else "not served in 60 s"
        print(f"\npython app.py: page served after {served:.1f} s")
        assert served < 30  # 15 s is the target on an idle machine; this bound leaves room for a busy one
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}gradio_api/info", timeout=10)
        assert e.value.code == 401
        c = Client(url, auth=("ann", "s3cret"), verbose=False, download_files=str(tmp_path / "dl"))
        assert c.predict(name="with a login", api_name="/new_project")["name"] == "with a login"
    finally:
        proc.terminate()
        proc.wait(30)


def test_endpoints_on_the_shipped_default_models(shipped_models, tmp_path, files):
    """The same calls on the real default models (skipped until they are in assets/models)."""
    demo, url = launch_app(shipped_models, tmp_path / "projects", tmp_path / "gtmp")
    try:
        c = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
        gallery, info = c.predict(prompt="a red circle on a gray background", seed=1, upsample=False, **FAST,
                                  api_name="/generate")
        assert images_of(gallery)[0].size == (64, 64) and info["params"]["models"]["base"].startswith("base@")
        gallery, info = c.predict(prompt="a blue star", image=handle_file(files["image"]),
                                  mask=handle_file(files["mask"]), seed=1, **FAST, api_name="/inpaint")
        assert info["changed_outside_mask"] == [0]
        gallery, info = c.predict(prompt="a green triangle", image=handle_file(files["image"]), seed=1, **FAST,
                                  api_name="/sdedit")
        assert images_of(gallery)[0].size == (40, 30)
        gallery, info = c.predict(prompt="a red circle", image=handle_file(files["small"]), steps="3", seed=1,
                                  api_name="/upsample")
        assert images_of(gallery)[0].size == (256, 256)
    finally:
        demo.close()
