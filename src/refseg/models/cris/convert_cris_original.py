"""Map a checkpoint of the authors' CRIS code (DerrickWang005/CRIS.pytorch) onto `CrisModel`'s heads.

Their `CRIS` module holds `backbone` (OpenAI's CLIP, a ResNet image tower), `neck` (`FPN`), `decoder`
(`TransformerDecoder`) and `proj` (`Projector`); their training script saves `{"state_dict": ...}` from a
`DistributedDataParallel` model (keys prefixed `module.`). This module maps `neck`, `decoder` and `proj` onto
`CrisModel.neck`, `.decoder` and `.projector`:

- names: `f1_v_proj` -> `v4_proj`, `f2_cat` -> `fuse3`, `f4_proj5` -> `level4_proj`, `norm1` ->
  `self_attn_layer_norm`, `multihead_attn` -> `cross_attn`, `vis.1` -> `up1`, ... (`_RENAMES`);
- `f2_cat` concatenates `[F_v3, F_m4]`; refseg's `fuse3` takes the paper's order `[F_m4, F_v3]`: the input
  channels of its 1x1 weight are swapped;
- their text gate is `Linear (no bias) -> BatchNorm1d -> ReLU`; refseg's is `Linear -> ReLU` (the paper's
  eq. 1). The BatchNorm1d (eval mode: running statistics) is folded into the Linear's weight and bias, so
  the two give the same gate at inference (training statistics of a new batch are not reproduced);
- `nn.MultiheadAttention`'s packed `in_proj_weight` / `in_proj_bias` are split into `q_proj`, `k_proj`,
  `v_proj` (or its separate `q_proj_weight`, `k_proj_weight`, `v_proj_weight` when keys had another width).

The `backbone` keys are not mapped: their CLIP is OpenAI's (ResNet-50/101 image tower) and refseg's is
`transformers.CLIPModel` (ViT only). The heads' widths follow the backbone (`fpn_in` = 512/1024/1024 and a
1024-wide F_s for RN50), so their checkpoint loads fully only into a `CrisModel` whose neck input widths and
sentence width equal theirs; `load_cris_original_heads(..., strict=False)` loads every tensor whose shape
fits and lists the rest.
"""

import collections
import re
from typing import Optional, Union

import torch

# (their pattern, refseg's name); applied to the key with the `neck.` / `decoder.` / `proj.` prefix
_RENAMES = [
    (r"^neck\.f1_v_proj\.", "neck.v4_proj."),
    (r"^neck\.norm_layer\.", "neck.fuse4_norm."),
    (r"^neck\.f2_v_proj\.", "neck.v3_proj."),
    (r"^neck\.f2_cat\.", "neck.fuse3."),
    (r"^neck\.f3_v_proj\.", "neck.v2_proj."),
    (r"^neck\.f3_cat\.", "neck.fuse2."),
    (r"^neck\.f4_proj5\.", "neck.level4_proj."),
    (r"^neck\.f4_proj4\.", "neck.level3_proj."),
    (r"^neck\.f4_proj3\.", "neck.level2_proj."),
    (r"^neck\.aggr\.", "neck.aggregate."),
    (r"^neck\.coordconv\.0\.conv1\.", "neck.coord_conv.conv."),
    (r"^neck\.coordconv\.1\.", "neck.out_conv."),
    (r"^decoder\.norm\.", "decoder.layer_norm."),
    (r"^decoder\.layers\.(\d+)\.norm1\.", r"decoder.layers.\1.self_attn_layer_norm."),
    (r"^decoder\.layers\.(\d+)\.self_attn_norm\.", r"decoder.layers.\1.self_attn_out_norm."),
    (r"^decoder\.layers\.(\d+)\.norm2\.", r"decoder.layers.\1.cross_attn_layer_norm."),
    (r"^decoder\.layers\.(\d+)\.cross_attn_norm\.", r"decoder.layers.\1.cross_attn_out_norm."),
    (r"^decoder\.layers\.(\d+)\.norm3\.", r"decoder.layers.\1.final_layer_norm."),
    (r"^decoder\.layers\.(\d+)\.ffn\.0\.", r"decoder.layers.\1.fc1."),
    (r"^decoder\.layers\.(\d+)\.ffn\.3\.", r"decoder.layers.\1.ffn_norm."),
    (r"^decoder\.layers\.(\d+)\.ffn\.4\.", r"decoder.layers.\1.fc2."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"decoder.layers.\1.self_attn.out_proj."),
    (r"^decoder\.layers\.(\d+)\.multihead_attn\.out_proj\.", r"decoder.layers.\1.cross_attn.out_proj."),
    (r"^proj\.vis\.1\.", "projector.up1."),
    (r"^proj\.vis\.3\.", "projector.up2."),
    (r"^proj\.vis\.4\.", "projector.vision_proj."),
    (r"^proj\.txt\.", "projector.text_proj."),
]
_HEADS = ("neck.", "decoder.", "proj.")
_ATTENTION = re.compile(r"^decoder\.layers\.(\d+)\.(self_attn|multihead_attn)\.(in_proj_weight|in_proj_bias|"
                        r"q_proj_weight|k_proj_weight|v_proj_weight)$")


def _strip(state_dict: dict) -> dict:
    """Drop DDP's `module.` prefix and keep the heads."""
    out = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key.startswith(_HEADS):
            out[key] = value
    return out


def convert_cris_original_state_dict(state_dict: dict, batch_norm_eps: float = 1e-5) -> dict:
    """Their `neck.*`, `decoder.*`, `proj.*` tensors -> `CrisModel` state-dict entries (`neck.*`, `decoder.*`,
    `projector.*`). `backbone.*` keys are ignored (see the module docstring).

    Args:
        state_dict (`dict`): their model's state dict (a `module.` prefix is stripped).
        batch_norm_eps (`float`): eps of their text gate's BatchNorm1d (PyTorch's default, as theirs).
    """
    theirs = _strip(state_dict)
    ours, used = {}, set()

    # the text gate: Linear(no bias) -> BatchNorm1d, folded into one Linear
    gate = "neck.txt_proj."
    if gate + "0.weight" in theirs:
        weight = theirs[gate + "0.weight"]
        scale = theirs[gate + "1.weight"] / torch.sqrt(theirs[gate + "1.running_var"] + batch_norm_eps)
        bias = theirs[gate + "1.bias"] - theirs[gate + "1.running_mean"] * scale
        if gate + "0.bias" in theirs:  # a Linear with a bias goes through the BatchNorm too
            bias = bias + theirs[gate + "0.bias"] * scale
        ours["neck.text_proj.weight"] = weight * scale[:, None]
        ours["neck.text_proj.bias"] = bias
        used.update(k for k in theirs if k.startswith(gate))

    # attention: packed (or separate) input projections -> q_proj, k_proj, v_proj
    for key, value in theirs.items():
        match = _ATTENTION.match(key)
        if not match:
            continue
        layer, kind, part = match.groups()
        prefix = f"decoder.layers.{layer}.{'self_attn' if kind == 'self_attn' else 'cross_attn'}."
        if part in ("in_proj_weight", "in_proj_bias"):
            suffix = "weight" if part == "in_proj_weight" else "bias"
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                ours[f"{prefix}{name}.{suffix}"] = chunk.clone()
        else:
            ours[f"{prefix}{part[:-len('_weight')]}.weight"] = value
        used.add(key)

    for key, value in theirs.items():
        if key in used:
            continue
        for pattern, replacement in _RENAMES:
            new, count = re.subn(pattern, replacement, key)
            if count:
                ours[new] = value
                used.add(key)
                break
        else:
            raise KeyError(f"no mapping for the authors' key {key!r}")

    # fuse3: their f2_cat reads [F_v3 (out), F_m4]; ours reads [F_m4, F_v3 (out)]
    weight = ours.get("neck.fuse3.0.weight")
    if weight is not None:
        visual = weight.shape[0]  # F_v3 has the block's output width
        ours["neck.fuse3.0.weight"] = torch.cat([weight[:, visual:], weight[:, :visual]], dim=1)
    return ours


def load_cris_original_heads(model, checkpoint: Union[str, dict], strict: bool = True,
                             batch_norm_eps: float = 1e-5) -> Optional[list]:
    """Load the authors' neck, decoder and projector into `model` (a `CrisModel`).

    Args:
        model (`CrisModel`): the model to fill; its CLIP is left as it is.
        checkpoint (`str` or `dict`): a path to their `.pth` (`best_model.pth` / `last_model.pth`, opened with
            `torch.load(weights_only=True)`), or a state dict, or their saved dict holding one under
            `"state_dict"`.
        strict (`bool`): raise a `ValueError` listing the tensors whose shapes differ from the model's (their
            ResNet widths against a ViT CLIP); with `False` those are skipped and returned.

    Returns:
        The refseg names that were skipped (shape mismatch), `[]` when everything loaded.
    """
    if isinstance(checkpoint, str):
        # their file also holds the optimizer and the MultiStepLR state, whose milestones are a Counter (a dict);
        # admitted explicitly (PyTorch 2.13 already allows it) so the load does not rest on the version's defaults
        with torch.serialization.safe_globals([collections.Counter]):
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("state_dict", checkpoint)
    converted = convert_cris_original_state_dict(state_dict, batch_norm_eps=batch_norm_eps)
    own = model.state_dict()
    unknown = sorted(set(converted) - set(own))
    if unknown:
        raise ValueError(f"converted keys unknown to the model: {unknown[:5]}")
    missing = sorted(k for k in own if k.startswith(("neck.", "decoder.", "projector.")) and k not in converted)
    if missing:
        raise ValueError(f"the checkpoint lacks head tensors the model has: {missing[:5]}")
    skipped = sorted(k for k, v in converted.items() if tuple(v.shape) != tuple(own[k].shape))
    if skipped and strict:
        raise ValueError("shape mismatch (their ResNet-CLIP widths?): " + ", ".join(
            f"{k} {tuple(converted[k].shape)} vs {tuple(own[k].shape)}" for k in skipped[:8]))
    with torch.no_grad():
        for key, value in converted.items():
            if key not in skipped:
                own[key].copy_(value.to(own[key].dtype))
    return skipped


__all__ = ["convert_cris_original_state_dict", "load_cris_original_heads"]
