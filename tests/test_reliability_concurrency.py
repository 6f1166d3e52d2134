"""One pipeline shared by many threads, and the Space under concurrent sessions, limits and file probes.

- The pipeline of every method, called from 8 threads at once (three rounds) on images of different
  sizes with different expressions, gives exactly the masks and scores of sequential calls, and no
  call leaves anything on the processor.
- The running Space (Gradio queue: `CONCURRENCY_LIMIT` at once, `QUEUE_SIZE` waiting) answers 16
  concurrent `gradio_client` sessions, two requests each, with the masks the pipeline gives for that
  session's own image and expression, and each session's history holds only its own requests.
- Limits: more than `MAX_EXPRESSIONS` lines, an image above `MAX_IMAGE_PIXELS`, a decompression bomb,
  a file that is no image, an upload above `MAX_UPLOAD_SIZE`; and no file outside Gradio's upload
  cache is served, whatever the route or path trick.
"""

import os
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from test_space import SPACE_DIR, _mask_of, app, model_dir, server  # noqa: F401  (fixtures)

from refseg.pipelines import load_pipeline
from refseg.training import METHODS

THREADS, ROUNDS, SESSIONS = 8, 3, 16


def jobs_of(scenes):
    """Eight (image, expression) pairs, each image resized to a size of its own."""
    return [(image.resize((40 + 9 * i, 64 - 3 * i)), referents[i % 2][0]) for i, (image, referents) in enumerate(scenes)]


def as_plain(results):
    return [(r["text"], np.asarray(r["mask"]).copy(), r["score"]) for r in results]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_pipeline_shared_by_8_threads_gives_the_sequential_results(method, trained_on_two_referents,
                                                                     two_referent_scenes):
    segmenter = load_pipeline(str(trained_on_two_referents(method)[2]), device=-1)
    jobs = jobs_of(two_referent_scenes)
    processor_state = dict(vars(segmenter.processor))
    sequential = [as_plain(segmenter(image, text=[text])) for image, text in jobs]
    barrier = threading.Barrier(THREADS)

    def call(job):
        barrier.wait(timeout=60)  # all threads enter the pipeline together
        return as_plain(segmenter(job[0], text=[job[1]]))

    with ThreadPoolExecutor(THREADS) as pool:
        for _ in range(ROUNDS):
            concurrent = list(pool.map(call, jobs, timeout=120))
            for (image, _), seq, got in zip(jobs, sequential, concurrent):
                (text, mask, score), (got_text, got_mask, got_score) = seq[0], got[0]
                assert got_text == text and got_mask.shape == (image.height, image.width)
                assert np.array_equal(got_mask, mask) and got_score == score, text
    assert vars(segmenter.processor).keys() == processor_state.keys(), "a call left state on the processor"
    assert all(vars(segmenter.processor)[k] is v for k, v in processor_state.items())


# ------------------------------------------------------------------ the Space


def test_the_space_sets_its_queue_limits_on_purpose(app, model_dir, tmp_path):  # noqa: F811
    demo = app.build_demo(str(model_dir), examples_dir=tmp_path)
    assert demo._queue.max_size == app.QUEUE_SIZE
    segmenting = [fn for fn in demo.fns.values() if fn.name == "segment"]
    assert len(segmenting) == 2  # the button and the text box's Enter
    assert {(fn.concurrency_limit, fn.concurrency_id) for fn in segmenting} == {(app.CONCURRENCY_LIMIT, "segment")}
    assert app.CONCURRENCY_LIMIT > 1


def test_16_concurrent_sessions_each_get_their_own_masks_and_history(server, app, model_dir,  # noqa: F811
                                                                     two_referent_scenes, tmp_path):
    segmenter = app.load_segmenter(str(model_dir), None)  # the very pipeline the server uses (same cache key)
    active, peak, lock = [0], [0], threading.Lock()
    forward = segmenter.forward

    def counting_forward(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.05)  # long enough for the queue's second slot to fill
            return forward(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    sessions = []
    for k in range(SESSIONS):
        image, referents = two_referent_scenes[k % len(two_referent_scenes)]
        path = tmp_path / f"scene-{k}.png"
        image.resize((48 + k, 64)).save(path)
        texts = [f"{referents[0][0]} s{k:02d}", f"{referents[1][0]} s{k:02d}"]
        expected = [as_plain(segmenter(Image.open(path), text=[t]))[0][1] > 0 for t in texts]
        sessions.append((path, texts, expected))

    def session(k):
        path, texts, expected = sessions[k]
        client = Client(server, verbose=False)
        histories = []
        for text, mask in zip(texts, expected):
            annotated, summary, history = client.predict(handle_file(str(path)), text, api_name="/segment")
            (annotation,) = annotated["annotations"]
            assert annotation["label"].startswith(text) and text in summary
            assert np.array_equal(_mask_of(Image.open(annotation["image"])), mask), text
            histories.append(history)
        return histories

    segmenter.forward = counting_forward
    try:
        with ThreadPoolExecutor(SESSIONS) as pool:
            futures = [pool.submit(session, k) for k in range(SESSIONS)]
            done, pending = wait(futures, timeout=240)
            assert not pending, f"{len(pending)} of {SESSIONS} sessions did not finish in 240 s"
            histories = [f.result() for f in futures]
    finally:
        del segmenter.forward
    assert peak[0] == app.CONCURRENCY_LIMIT, f"{peak[0]} requests ran at once"
    for k, (first, second) in enumerate(histories):
        own = sessions[k][1]
        assert own[0] in first and own[1] not in first
        assert own[0] in second and own[1] in second
        others = [f"s{j:02d}" for j in range(SESSIONS) if j != k]
        assert not any(tag in first or tag in second for tag in others), f"session {k} saw another's history"


def test_per_request_limits_give_clear_messages(server, app, refshapes_root, tmp_path):  # noqa: F811
    client = Client(server, verbose=False)
    scene = next((refshapes_root / "images").glob("*.png"))
    annotated, *_ = client.predict(handle_file(str(scene)), "\n".join(f"the shape {i}" for i in range(12)),
                                   api_name="/segment")
    assert len(annotated["annotations"]) == app.MAX_EXPRESSIONS
    big = tmp_path / "big.png"
    Image.new("1", (4200, 4100)).save(big)  # 17.2 M pixels, a few KB on disk
    with pytest.raises(AppError, match="accepts at most"):
        client.predict(handle_file(str(big)), "the red circle", api_name="/segment")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (14000, 13000)).save(bomb)  # 182 M pixels: over PIL's decompression-bomb limit
    with pytest.raises(AppError, match="too large to decode"):
        client.predict(handle_file(str(bomb)), "the red circle", api_name="/segment")
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 10)
    with pytest.raises(AppError, match="not an image"):
        client.predict(handle_file(str(fake)), "the red circle", api_name="/segment")


def _upload(server, path):
    with open(path, "rb") as f:
        return httpx.post(f"{server}gradio_api/upload", files={"files": (Path(path).name, f)}, timeout=60)


def test_an_upload_above_the_size_limit_is_refused(server, app, tmp_path):  # noqa: F811
    limit = int(app.MAX_UPLOAD_SIZE.removesuffix("mb")) * 1024 * 1024
    large = tmp_path / "large.png"
    large.write_bytes(b"\0" * (limit + 1024))
    response = _upload(server, large)
    assert response.status_code == 413 and "size" in response.text.lower()


def test_the_space_serves_no_file_outside_its_upload_cache(server, model_dir, tmp_path):  # noqa: F811
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-DO-NOT-SERVE")
    small = tmp_path / "ok.txt"
    small.write_text("uploaded")
    response = _upload(server, small)
    assert response.status_code == 200, response.text
    uploaded = Path(response.json()[0])
    ok = httpx.get(f"{server}gradio_api/file={uploaded}", timeout=30)
    assert ok.status_code == 200 and ok.text == "uploaded", "the route works for files it may serve"

    up = os.path.relpath(secret, uploaded.parent)  # ../../.. from the upload folder to the secret
    quoted = urllib.parse.quote(str(secret), safe="")
    probes = [
        f"gradio_api/file={secret}", f"file={secret}", f"gradio_api/file={quoted}",
        f"gradio_api/file={uploaded.parent}/{up}", f"gradio_api/file={uploaded.parent}/{urllib.parse.quote(up)}",
        f"gradio_api/file={uploaded.parent}/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e{secret}",
        f"gradio_api/file=file://{secret}", f"gradio_api/file={SPACE_DIR / 'app.py'}",
        f"gradio_api/file={model_dir / 'config.json'}", "gradio_api/file=/etc/passwd",
        "gradio_api/file=../../../../../../etc/passwd", "gradio_api/file=pyproject.toml",
        f"gradio_api/file={str(secret).replace('/', '//')}", f"gradio_api/file={secret.as_posix().upper()}",
    ]
    for probe in probes:
        response = httpx.get(server + probe, timeout=30)
        assert "SECRET-DO-NOT-SERVE" not in response.text and "root:x:0" not in response.text, probe
        if probe.startswith("gradio_api/file="):  # Gradio's file route refuses; other paths get the page or 404
            assert response.status_code in (403, 404), (probe, response.status_code)
