"""Convert an OpenCLIP checkpoint into a stock transformers `CLIPModel` folder (weights, tokenizer, image processor).

RISCLIP-B in the paper starts from OpenCLIP's ViT-B-16-plus-240 trained on LAION-400M (896-wide ViT-B/16
at 240 px, 640-wide text transformer, joint space 640), which has no transformers checkpoint. This script
turns OpenCLIP's `CLIP` state dict (`visual.conv1.weight`, `visual.transformer.resblocks.N.attn.in_proj_weight`,
`token_embedding.weight`, `text_projection`, ...) into a `CLIPModel`, saved with `save_pretrained` next to a
CLIP tokenizer and a `CLIPImageProcessor`, so that `RisclipModel.from_backbones(clip=<folder>)` and
`RisclipProcessor.from_backbones(clip=<folder>)` load it like any CLIP checkpoint (preset `risclip-b-paper`).

    python scripts/convert_open_clip.py \
        --checkpoint vit_b_16_plus_240-laion400m_e32-699c4b84.pt \
        --tokenizer openai/clip-vit-base-patch16 \
        --output clip-vit-b-16-plus-240-laion400m-e32

The architecture is read from the weights' shapes (widths, depths, patch, image size, joint width,
vocabulary, context length); what the weights do not hold has flags: heads (`--vision_heads`,
`--text_heads`, default width / 64, OpenCLIP's head width: 14 and 10 for ViT-B-16-plus-240) and the MLP
activation (`--quick_gelu` for OpenAI-trained weights; OpenCLIP's own trainings, ViT-B-16-plus-240
included, use plain GELU). The checkpoint is opened with `torch.load(weights_only=True)` (or safetensors).
Nothing is downloaded except the tokenizer when `--tokenizer` is a Hub id; pass a local folder to stay offline.
"""

import _scripts_path  # noqa: F401  (first: keeps scripts/evaluate.py from shadowing `evaluate`)

import argparse
import logging
import re
from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

logger = logging.getLogger(__name__)

# OpenCLIP normalises ViT-B-16-plus-240's inputs with OpenAI's statistics (its default).
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
HEAD_WIDTH = 64  # OpenCLIP's default head width: heads = width // 64

# Buffers and extras of an OpenCLIP checkpoint that a CLIPModel has no place for (and needs none).
_IGNORED = re.compile(r"^(attn_mask|visual\.attn_mask)$")

# OpenCLIP resblock suffix -> CLIPEncoderLayer suffix (the fused in-projection is split separately).
_BLOCK = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_DIRECT = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}


def load_open_clip_state_dict(path) -> dict:
    """The tensors of an OpenCLIP checkpoint file (`.safetensors`, or a `.pt`/`.bin` opened with
    `torch.load(weights_only=True)`); a training checkpoint's `state_dict` is unwrapped and a
    `module.` prefix (DistributedDataParallel) removed."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"`checkpoint` {path} holds no OpenCLIP state dict (a dict of tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _depth(state: dict, prefix: str) -> int:
    blocks = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not blocks or blocks != set(range(len(blocks))):
        raise ValueError(f"the state dict has no contiguous `{prefix}N` blocks (is it OpenCLIP's CLIP layout?)")
    return len(blocks)


def clip_config_from_state_dict(state: dict, *, vision_heads=None, text_heads=None, quick_gelu: bool = False,
                                bos_token_id=None, eos_token_id=None, pad_token_id=None) -> CLIPConfig:
    """The `CLIPConfig` of OpenCLIP weights, from their shapes (see the module docstring for what is not in them)."""
    missing = [k for k in ("visual.conv1.weight", "visual.positional_embedding", "visual.proj",
                           "token_embedding.weight", "positional_embedding", "text_projection") if k not in state]
    if missing:
        raise ValueError(f"not an OpenCLIP ViT CLIP state dict: missing {missing}")
    width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = int(round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    if grid * grid + 1 != state["visual.positional_embedding"].shape[0]:
        raise ValueError("`visual.positional_embedding` is not a square grid plus [CLS]")
    embed_dim = state["visual.proj"].shape[1]
    vocab_size, text_width = state["token_embedding.weight"].shape
    act = "quick_gelu" if quick_gelu else "gelu"
    vision = dict(
        hidden_size=width, intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_depth(state, "visual.transformer.resblocks."),
        num_attention_heads=vision_heads or width // HEAD_WIDTH, image_size=grid * patch, patch_size=patch,
        projection_dim=embed_dim, hidden_act=act, layer_norm_eps=1e-5,
    )
    text = dict(
        hidden_size=text_width, intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_depth(state, "transformer.resblocks."),
        num_attention_heads=text_heads or text_width // HEAD_WIDTH, vocab_size=vocab_size,
        max_position_embeddings=state["positional_embedding"].shape[0], projection_dim=embed_dim,
        hidden_act=act, layer_norm_eps=1e-5,
        # OpenCLIP pools the [EOS] (end of text) token, the highest id of CLIP's vocabulary
        bos_token_id=vocab_size - 2 if bos_token_id is None else bos_token_id,
        eos_token_id=vocab_size - 1 if eos_token_id is None else eos_token_id,
        pad_token_id=vocab_size - 1 if pad_token_id is None else pad_token_id,
    )
    for name, cfg in (("vision", vision), ("text", text)):
        if cfg["hidden_size"] % cfg["num_attention_heads"]:
            raise ValueError(f"{name} heads ({cfg['num_attention_heads']}) must divide its width ({cfg['hidden_size']})")
    if tuple(state["text_projection"].shape) != (text_width, embed_dim):
        raise ValueError(f"`text_projection` must be (text width, joint width) = {(text_width, embed_dim)}, "
                         f"got {tuple(state['text_projection'].shape)}")
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=embed_dim)


def convert_state_dict(state: dict) -> dict:
    """OpenCLIP `CLIP` keys -> `CLIPModel` keys. The fused attention in-projection (3C, C) is split into
    q, k, v; the joint-space projections, stored (width, embed) and applied as `x @ proj`, become
    `nn.Linear` weights (embed, width). Raises a `ValueError` on keys it does not know (e.g. layer scale,
    attention pooling, a text `cls_emb`), rather than dropping them."""
    out, unknown = {}, []
    for key, value in state.items():
        value = value.detach()
        if key in _DIRECT:
            out[_DIRECT[key]] = value
            continue
        if key == "visual.proj":
            out["visual_projection.weight"] = value.T.contiguous()
            continue
        if key == "text_projection":  # (width, embed), used as `x @ proj`, like `visual.proj`
            out["text_projection.weight"] = value.T.contiguous()
            continue
        match = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", key)
        if match:
            tower = "vision_model" if match.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{match.group(2)}."
            suffix = match.group(3)
            if suffix in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if suffix.endswith("weight") else "bias"
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = chunk.contiguous()
                continue
            if suffix in _BLOCK:
                out[prefix + _BLOCK[suffix]] = value
                continue
        if _IGNORED.match(key):
            continue
        unknown.append(key)
    if unknown:
        raise ValueError(f"keys this converter does not know (not a plain OpenCLIP ViT CLIP?): {sorted(unknown)[:10]}")
    return out


def convert(state: dict, output, tokenizer, *, vision_heads=None, text_heads=None, quick_gelu: bool = False,
            dtype=torch.float32) -> CLIPModel:
    """Build, fill (strictly: every `CLIPModel` weight must come from `state`) and save the model to `output`
    with the tokenizer loaded from `tokenizer` (Hub id or folder) and a `CLIPImageProcessor` at the
    checkpoint's image size; returns the model."""
    tok = AutoTokenizer.from_pretrained(tokenizer)
    config = clip_config_from_state_dict(
        state, vision_heads=vision_heads, text_heads=text_heads, quick_gelu=quick_gelu,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    if len(tok) > config.text_config.vocab_size:
        raise ValueError(f"`tokenizer` has {len(tok)} tokens, the checkpoint's vocabulary {config.text_config.vocab_size}")
    model = CLIPModel(config).eval()
    weights = convert_state_dict(state)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"conversion incomplete: missing {missing[:10]}, unexpected {unexpected[:10]}")
    model = model.to(dtype)
    output = Path(output)
    model.save_pretrained(output)
    tok.model_max_length = config.text_config.max_position_embeddings
    tok.save_pretrained(output)
    size = config.vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD).save_pretrained(output)
    logger.info("saved %s (vision %d x %d, text %d x %d, joint %d) to %s", type(model).__name__,
                config.vision_config.hidden_size, config.vision_config.num_hidden_layers,
                config.text_config.hidden_size, config.text_config.num_hidden_layers, config.projection_dim, output)
    return model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="OpenCLIP weights: .pt / .bin (torch) or .safetensors")
    parser.add_argument("--output", required=True, help="folder to write the CLIPModel, tokenizer and image processor to")
    parser.add_argument("--tokenizer", required=True,
                        help="CLIP tokenizer: Hub id (e.g. openai/clip-vit-base-patch16) or a local folder")
    parser.add_argument("--vision_heads", type=int, default=None, help="image attention heads (default: width / 64)")
    parser.add_argument("--text_heads", type=int, default=None, help="text attention heads (default: width / 64)")
    parser.add_argument("--quick_gelu", action="store_true",
                        help="QuickGELU MLPs (OpenAI-trained weights); default: GELU, as OpenCLIP's LAION trainings")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    convert(load_open_clip_state_dict(args.checkpoint), args.output, args.tokenizer, vision_heads=args.vision_heads,
            text_heads=args.text_heads, quick_gelu=args.quick_gelu, dtype=getattr(torch, args.dtype))


if __name__ == "__main__":
    main()
