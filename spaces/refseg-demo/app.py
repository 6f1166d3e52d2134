"""refseg demo: type referring expressions, get one coloured mask per expression.

Run locally (after `pip install -e ".[demo]"` in the refseg repository and the quickstart):

    REFSEG_MODEL=refseg-quickstart/model GRADIO_SERVER_PORT=7860 python spaces/refseg-demo/app.py

- `REFSEG_MODEL`: a model folder or Hub id (any refseg method; default `DEFAULT_MODEL`, the
  quickstart's output folder, relative to the working directory).
- `REFSEG_DTYPE`: the dtype the model runs in, one of `DTYPES` (`float32`, `bfloat16`, `float16`);
  unset or empty: the dtype transformers loads the checkpoint in. Any other value stops the app
  with a `ValueError` naming the variable.
- `GRADIO_SERVER_PORT`: the port (default 7860); `GRADIO_SERVER_NAME` the interface (Gradio's own
  variable; Spaces set it to 0.0.0.0).

The API endpoint `/segment` takes `(image, text)` and optionally `threshold`; `text` holds one
expression per line. It returns the `gr.AnnotatedImage` value (the image and one mask per
expression, labelled "<expression> (<score>)") and a Markdown summary.

No match: an expression the pipeline reports as having no referent (its result's `no_target`) is
labelled "<expression>: no match (<score>)" and gets an empty mask, so nothing is drawn over the image
for it, and the summary and history say "no match". What `no_target` and the score mean depends on the
model (`refseg.pipelines`): with a presence output (`config.no_target_head`, the SAM3 baseline) the
model's own judgement, the score being the probability that the expression has a referent; without, an
empty mask, the score being the mean foreground probability inside the mask (not a presence score).

Hardware: the model runs on the GPU when `torch.cuda.is_available()` (`inference_device`), else on
the CPU. On ZeroGPU hardware (Hugging Face's shared GPUs, which lend a GPU to each decorated call) the
`spaces` package is installed by the Space itself; the request handler `segment_request` is then
wrapped in `spaces.GPU`, and elsewhere left as it is (`gpu_decorator`). `spaces` is imported first, as
ZeroGPU asks, and is never required.

State: the loaded pipeline is cached read-only for all visitors (`load_segmenter`); each visitor's
history lives in a `gr.State`. Nothing else is module-level and mutable.

Limits, set on purpose: Gradio's queue runs at most `CONCURRENCY_LIMIT` requests at once on the one
shared pipeline (it keeps no per-call state, so concurrent calls are safe) and holds at most
`QUEUE_SIZE` waiting ones (more are refused with "queue full"); uploads above `MAX_UPLOAD_SIZE` are
refused by Gradio before the app sees them; an image is checked against `MAX_IMAGE_PIXELS` from its
header, before it is decoded (PIL's decompression-bomb limit applies too); at most `MAX_EXPRESSIONS`
expressions are segmented per request. Files: the app serves only what Gradio itself allows (its
upload/cache folder and the examples it copied there); no `allowed_paths` are added.
"""

try:  # ZeroGPU hardware only (preinstalled there); imported before torch, as ZeroGPU asks. A name import:
    from spaces import GPU as zero_gpu  # a folder named `spaces` on the path (this repository's) is not it
except ImportError:
    zero_gpu = None

import functools
import os
import tempfile
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from refseg.data import load_refs_pickle, make_refshapes
from refseg.pipelines import load_pipeline
from refseg.processing_utils import load_image

DEFAULT_MODEL = "refseg-quickstart/model"
MODEL_ENV = "REFSEG_MODEL"
DTYPE_ENV = "REFSEG_DTYPE"
DTYPES = ("float32", "bfloat16", "float16")  # names transformers' `dtype=` takes
PORT_ENV = "GRADIO_SERVER_PORT"
DEFAULT_PORT = 7860
MAX_IMAGE_PIXELS = 4096 * 4096  # larger uploads are refused with a message
MAX_UPLOAD_SIZE = "25mb"  # larger files are refused by Gradio's upload route
MAX_EXPRESSIONS = 8  # per request; extra lines are dropped with a warning
CONCURRENCY_LIMIT = 2  # requests the shared pipeline serves at once (the Space hardware has 2 vCPUs)
QUEUE_SIZE = 64  # requests that may wait; beyond that Gradio answers "queue full"
HISTORY_LENGTH = 10  # rows of the per-session history
NUM_EXAMPLE_IMAGES = 3


def parse_dtype(value):
    """A `REFSEG_DTYPE` value -> its name in `DTYPES` (case and surrounding blanks ignored); `None` or
    blank -> `None` (the checkpoint's dtype). Anything else raises `ValueError` naming the variable."""
    if value is None or not value.strip():
        return None
    name = value.strip().lower()
    if name not in DTYPES:
        raise ValueError(f"{DTYPE_ENV}={value!r} is not a dtype the demo runs in; use one of {', '.join(DTYPES)}")
    return name


def gpu_decorator(function):
    """`spaces.GPU(function)` where the `spaces` package is importable (ZeroGPU lends a GPU for each call),
    else `function` unchanged."""
    return function if zero_gpu is None else zero_gpu(function)


def inference_device() -> str:
    """`"cuda"` when PyTorch sees a GPU (a GPU Space; on ZeroGPU, `spaces` makes it visible), else `"cpu"`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=2)
def load_segmenter(model_path: str, dtype=None):
    """The pipeline for `model_path` in `dtype` (a `DTYPES` name; `None`: the checkpoint's) on
    `inference_device()`, loaded once per process and only read afterwards.

    Folders exported with remote code load with refseg's own classes (no `trust_remote_code`).
    """
    loading = {} if dtype is None else {"dtype": dtype}
    return load_pipeline(model_path, device=inference_device(), **loading)


def parse_expressions(text) -> list[str]:
    """One expression per non-blank line; raises `gr.Error` when there is none."""
    lines = [line.strip() for line in (text or "").splitlines()]
    expressions = [line for line in lines if line]
    if not expressions:
        raise gr.Error("Type at least one referring expression (one per line), e.g. 'the red circle'.")
    if len(expressions) > MAX_EXPRESSIONS:
        gr.Warning(f"Only the first {MAX_EXPRESSIONS} expressions are segmented.")
        expressions = expressions[:MAX_EXPRESSIONS]
    return expressions


def _refuse_size(width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise gr.Error(
            f"The image is {width} x {height} pixels; the demo accepts at most "
            f"{MAX_IMAGE_PIXELS:,} pixels. Please downscale it."
        )


def check_image(image) -> Image.Image:
    """The uploaded image as RGB (EXIF orientation applied), or `gr.Error` when it is missing, not an
    image, or larger than `MAX_IMAGE_PIXELS`. A file path (what the app's `gr.Image` hands over) is
    checked from its header before it is decoded."""
    if image is None:
        raise gr.Error("Upload an image first.")
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as header:  # lazy: reads the size, decodes nothing
                _refuse_size(*header.size)
        except Image.DecompressionBombError as err:
            raise gr.Error(f"The image is too large to decode safely ({err}). Please downscale it.") from err
        except (OSError, SyntaxError) as err:
            raise gr.Error(f"The upload is not an image that can be read ({err}).") from err
        try:
            return load_image(image)
        except ValueError as err:
            raise gr.Error(f"The upload is not an image that can be read ({err}).") from err
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    _refuse_size(image.width, image.height)
    return image.convert("RGB")


NO_MATCH = "no match"  # what the app shows for an expression with no referent (a result's `no_target`)


def annotation_label(result) -> str:
    """"<expression> (<score>)", or "<expression>: no match (<score>)" when the result has no referent."""
    if result["no_target"]:
        return f"{result['text']}: {NO_MATCH} ({result['score']:.2f})"
    return f"{result['text']} ({result['score']:.2f})"


def segment_image(segmenter, image, text, threshold=None, history=None):
    """Run `segmenter` on one image and the expressions in `text`.

    Returns `(annotated, summary, history)`: the `gr.AnnotatedImage` value (image, [(mask in [0, 1]
    of shape (h, w), label)]), a Markdown table of the scores, and the session history with this
    request's rows prepended (a new list; the caller's list is not modified). A result with no referent
    (`no_target`) keeps its place with an empty mask (the image shows through) and a "no match" label.
    """
    image = check_image(image)
    expressions = parse_expressions(text)
    results = segmenter(image, text=expressions, threshold=threshold)
    annotations, rows = [], []
    for result in results:
        mask = np.asarray(result["mask"], dtype=np.float32) / 255.0  # (h, w) in {0, 1}; empty for no target
        annotations.append((mask, annotation_label(result)))
        rows.append((result["text"], result["score"], int(mask.sum()), bool(result["no_target"])))
    history = (rows + list(history or []))[:HISTORY_LENGTH]
    summary = "| expression | result | score | mask pixels |\n| --- | --- | --- | --- |\n" + "\n".join(
        f"| {t} | {f'**{NO_MATCH}**' if absent else 'match'} | {s:.3f} | {n} |" for t, s, n, absent in rows
    )
    return (image, annotations), summary, history


@gpu_decorator
def segment_request(model_path: str, dtype, image, text, threshold=None, history=None):
    """One request of the app: `segment_image` with the cached pipeline of `model_path` in `dtype`, and the
    session history as Markdown. The function ZeroGPU runs on a GPU: it takes only plain values (the
    pipeline is looked up, not passed), so a ZeroGPU worker gets no model through its arguments."""
    segmenter = load_segmenter(model_path, dtype)
    annotated, summary, history = segment_image(segmenter, image, text, threshold, history)
    return annotated, summary, history, format_history(history)


def format_history(history) -> str:
    """Markdown of the session's latest results (newest first)."""
    if not history:
        return "**This session:** nothing segmented yet."
    lines = [f"- {text} ({NO_MATCH}, score {score:.2f})" if absent else f"- {text} (score {score:.2f}, {pixels} px)"
             for text, score, pixels, absent in history]
    return "**This session:**\n\n" + "\n".join(lines)


def make_examples(folder, num_images: int = NUM_EXAMPLE_IMAGES, seed: int = 0) -> list[list[str]]:
    """Write a few RefShapes images into `folder`; returns `[[image path, expressions], ...]`."""
    make_refshapes(folder, num_images=max(5, num_images), seed=seed)
    refs = load_refs_pickle(Path(folder) / "refshapes" / "refs(unc).p")
    by_image: dict[int, list[str]] = {}
    for ref in refs:
        by_image.setdefault(ref["image_id"], []).append(ref["sentences"][0]["sent"])
    examples = []
    for image_id in sorted(by_image)[:num_images]:
        path = Path(folder) / "images" / f"refshapes_{image_id:06d}.png"
        examples.append([str(path), "\n".join(by_image[image_id][:2])])
    return examples


def with_clear_upload_errors(image: gr.Image) -> gr.Image:
    """`image` with upload errors that read as messages: Gradio opens the file (header only) before the
    app sees it, so a decompression bomb or a file that is no image fails there, with a bare server
    error unless caught here. (Wrapped on the instance: a `gr.Image` subclass would need a module file
    for Gradio's component metaclass, which an app loaded by path has not.)"""
    preprocess = image.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except Image.DecompressionBombError as err:
            raise gr.Error(f"The image is too large to decode safely ({err}). Please downscale it.") from err
        except (OSError, SyntaxError) as err:  # PIL.UnidentifiedImageError is an OSError
            raise gr.Error(f"The upload is not an image that can be read ({err}).") from err

    image.preprocess = checked
    return image


class DemoBlocks(gr.Blocks):
    """`gr.Blocks` whose `launch` refuses uploads above `MAX_UPLOAD_SIZE` unless given another
    `max_file_size`: the limit holds however the app is launched (`main`, tests, `gradio app.py`)."""

    def launch(self, *args, max_file_size=None, **kwargs):
        return super().launch(*args, max_file_size=max_file_size or MAX_UPLOAD_SIZE, **kwargs)


def build_demo(model_path: str = DEFAULT_MODEL, examples_dir=None, dtype=None) -> gr.Blocks:
    """The Blocks app for the model at `model_path` (folder or Hub id) in `dtype` (a `DTYPES` name;
    `None`: the checkpoint's); loads the model now."""
    model_path, dtype = str(model_path), parse_dtype(dtype)
    segmenter = load_segmenter(model_path, dtype)  # loaded now (and moved to the GPU where there is one)
    default_threshold = float(getattr(segmenter.model.config, "threshold", 0.5))
    examples_dir = examples_dir or tempfile.mkdtemp(prefix="refseg-demo-examples-")
    examples = make_examples(examples_dir)

    def segment(image, text, threshold=default_threshold, history=None):
        return segment_request(model_path, dtype, image, text, threshold, history)

    with DemoBlocks(title="refseg: referring image segmentation") as demo:
        gr.Markdown(
            "# Referring image segmentation\n"
            f"Model: `{model_path}` ({str(segmenter.model.dtype).removeprefix('torch.')}). Upload an image, "
            "write one referring expression per line "
            "(for example *the red circle*), and press **Segment**: each expression gets its own mask."
        )
        history = gr.State([])
        with gr.Row():
            with gr.Column():
                # a path, so `check_image` sees the size before anything is decoded
                image = with_clear_upload_errors(
                    gr.Image(type="filepath", label="Image", image_mode=None, elem_id="input-image"))
                text = gr.Textbox(label="Referring expressions (one per line)", lines=3, elem_id="expressions")
                threshold = gr.Slider(0.05, 0.95, value=default_threshold, step=0.05, label="Mask threshold")
                button = gr.Button("Segment", variant="primary", elem_id="segment-button")
            with gr.Column():
                annotated = gr.AnnotatedImage(label="Masks", height=420, elem_id="result")
                summary = gr.Markdown(label="Scores", elem_id="summary")
                history_view = gr.Markdown(format_history([]), label="This session", elem_id="history")
        gr.Examples(examples=examples, inputs=[image, text], cache_examples=False)
        event_inputs = [image, text, threshold, history]
        event_outputs = [annotated, summary, history, history_view]
        # one concurrency group for both triggers: at most CONCURRENCY_LIMIT model calls at once in all
        limits = {"concurrency_limit": CONCURRENCY_LIMIT, "concurrency_id": "segment"}
        button.click(segment, inputs=event_inputs, outputs=event_outputs, api_name="segment", **limits)
        text.submit(segment, inputs=event_inputs, outputs=event_outputs, api_name=False, **limits)
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=QUEUE_SIZE)
    return demo


def main() -> None:
    dtype = parse_dtype(os.environ.get(DTYPE_ENV))  # checked before the model loads
    options = {} if dtype is None else {"dtype": dtype}
    demo = build_demo(os.environ.get(MODEL_ENV, DEFAULT_MODEL), **options)
    demo.launch(server_port=int(os.environ.get(PORT_ENV, DEFAULT_PORT)))


if __name__ == "__main__":
    main()
