"""The README (Space card) of `spaces/refseg-demo`, rendered with `huggingface_hub.SpaceCardData`.

`spaces/refseg-demo/README.md` is the output of `render_space_readme()`; a test checks the file is
up to date, so edit this module (not the README) and rewrite it with

    python -c "from refseg.hub.space import write_space_readme; write_space_readme('spaces/refseg-demo/README.md')"

`sdk_version` pins the Gradio version installed where the README is rendered.
"""

import os
from typing import Optional, Sequence, Union

from huggingface_hub import SpaceCard, SpaceCardData

SPACE_TITLE = "refseg: referring image segmentation"
SPACE_MODELS = ("refseg/risclip-tiny",)  # Hub ids the Space loads (set REFSEG_MODEL to one of them)
SPACE_LICENSE = "apache-2.0"

_BODY = """
# refseg demo

Upload an image, type one referring expression per line ("the red circle", "the square on the
left"), and get one coloured mask per expression, labelled with its score. An expression the model
finds no referent for is labelled "no match", with nothing drawn over the image.

- Score: for a model with a presence head (`no_target_head=True` in its config, or the SAM3
  baseline), the probability that the expression has a referent; "no match" is the head's answer.
  Otherwise the mean foreground probability inside the mask, which is not a presence score; "no
  match" then only means that no pixel passed the threshold.

- Model: the `REFSEG_MODEL` environment variable (a Hub id or a folder; set it in the Space
  settings), default `refseg-quickstart/model`, the folder refseg's quickstart writes.
- Dtype: `REFSEG_DTYPE`, one of `float32`, `bfloat16`, `float16` (unset: the checkpoint's dtype);
  any other value stops the app at start-up with an error naming the variable.
- API: the named endpoint `/segment` takes `(image, text)` and optionally `threshold`:

```python
from gradio_client import Client, handle_file

client = Client("<owner>/<space>")
annotated, scores, history = client.predict(
    handle_file("image.png"), "the red circle\\nthe square on the left", api_name="/segment"
)
```

Images above 16.7 megapixels (checked from the file header, before decoding), decompression
bombs, files that are not images, uploads above 25 MB and empty expressions are refused with a
message; at most 8 expressions are segmented per request. Gradio's queue runs 2 requests at once
and holds up to 64 waiting. Examples are RefShapes images generated at start-up.
"""


def _gradio_version() -> str:
    import gradio

    return gradio.__version__


def space_card_data(
    models: Sequence[str] = SPACE_MODELS, sdk_version: Optional[str] = None
) -> SpaceCardData:
    """Front matter of the Space: Gradio SDK pinned to `sdk_version` (default: installed Gradio)."""
    return SpaceCardData(
        title=SPACE_TITLE,
        emoji="🎯",
        colorFrom="indigo",
        colorTo="pink",
        sdk="gradio",
        sdk_version=sdk_version or _gradio_version(),
        app_file="app.py",
        pinned=False,
        license=SPACE_LICENSE,
        models=list(models),
        tags=["refseg", "referring-image-segmentation", "image-segmentation"],
        short_description="Segment the object a sentence refers to",
    )


def render_space_readme(models: Sequence[str] = SPACE_MODELS, sdk_version: Optional[str] = None) -> str:
    """README.md text of the Space (YAML front matter + body)."""
    data = space_card_data(models, sdk_version)
    return str(SpaceCard(f"---\n{data.to_yaml()}\n---\n{_BODY}"))


def write_space_readme(path: Union[str, os.PathLike], **kwargs) -> None:
    """Write `render_space_readme(**kwargs)` to `path`."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(render_space_readme(**kwargs))


__all__ = ["render_space_readme", "space_card_data", "write_space_readme"]
