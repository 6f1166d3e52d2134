"""Named configurations: each method at paper scale and at tiny test scale.

`PRESETS[name]` is a `Preset`: the method (`model_type`), the pretrained backbones it is meant to
start from (`{"clip": "openai/clip-vit-base-patch16"}`, the keywords of `XxxModel.from_backbones`),
the method's config overrides, and a builder of the backbone sub-configs from their published
architecture numbers, so `get_config(name)` works offline (no download). Train from a preset with
`XxxModel.from_backbones(**preset.backbones, **preset.config_overrides)`; instantiate one without
weights (e.g. on the meta device, to count parameters) with `AutoModel.from_config(get_config(name))`.

Adding a method's presets: write its backbone-config builders (or reuse the CLIP ones here) and add
`Preset(...)` entries to `PRESETS` under names `<method>-<size>` (and the name to `GENERALIZED_BASES` for its
`-g` twin).

| preset | backbone | input | grid |
| --- | --- | --- | --- |
| `risclip-b` | CLIP ViT-B/16 (`openai/clip-vit-base-patch16`) | 640 | 40x40 |
| `risclip-b-paper` | OpenCLIP ViT-B-16-plus-240 (LAION-400M, the paper's), a folder from `scripts/convert_open_clip.py` | 640 | 40x40 |
| `risclip-l` | CLIP ViT-L/14 at 336 (`openai/clip-vit-large-patch14-336`) | 560 | 40x40 |
| `risclip-tiny` | `refseg.backbones.tiny_clip_config()` (a folder from `save_tiny_backbones`) | 64 | 8x8 |
| `cris-b` | CLIP ViT-B/16 (`openai/clip-vit-base-patch16`), fine-tuned | 416 | 26x26 |
| `cris-l` | CLIP ViT-L/14 at 336 (`openai/clip-vit-large-patch14-336`), fine-tuned | 448 | 32x32 |
| `cris-tiny` | `refseg.backbones.tiny_clip_config()` (a folder from `save_tiny_backbones`) | 64 | 8x8 |
| `risam-h` | SAM ViT-H (`facebook/sam-vit-huge`) + CLIP ViT-B/16's text tower, both frozen | 1024 | 64x64 |
| `risam-b` | SAM ViT-B (`facebook/sam-vit-base`) + CLIP ViT-B/16's text tower, both frozen | 1024 | 64x64 |
| `risam-tiny` | `refseg.backbones.tiny_sam_config()` + `tiny_clip_config()` | 256 | 16x16 |
| `prompt-ris-b` | CLIP ViT-B/16 (`openai/clip-vit-base-patch16`) + SAM ViT-B (`facebook/sam-vit-base`), both frozen | 480 + 1024 | 30x30 + 64x64 |
| `prompt-ris-tiny` | `refseg.backbones.tiny_clip_config()` + `tiny_sam_config()` | 64 + 256 | 8x8 + 16x16 |
| `clipseg-tiny` | the stock CLIPSeg decoder (baseline, `refseg.baselines`) on `tiny_clip_config()`, CLIP frozen | 64 | 8x8 |

Generalized referring segmentation (gRefCOCO: an expression may name no object or several): `<base>-g` is
preset `<base>` with `no_target_head=True` (the presence head of `refseg.no_target`), nothing else changed,
for every base in `GENERALIZED_BASES`: `risclip-b-g`, `risclip-l-g`, `risclip-tiny-g`, `cris-b-g`, `cris-l-g`,
`cris-tiny-g`, `risam-h-g`, `risam-b-g`, `risam-tiny-g`, `prompt-ris-b-g`, `prompt-ris-tiny-g`. The other
presets keep the head off, as the papers have none.
"""

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from transformers import CLIPConfig, PreTrainedConfig, SamConfig


def clip_vit_b16_config() -> CLIPConfig:
    """`openai/clip-vit-base-patch16`: ViT-B/16 at 224 (768 wide, 12 layers, 12 heads) and the
    12-layer, 512-wide text transformer; joint space 512."""
    return CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                         max_position_embeddings=77, vocab_size=49408, projection_dim=512),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16, projection_dim=512),
        projection_dim=512,
    )


def clip_vit_b16_plus_240_config() -> CLIPConfig:
    """OpenCLIP `ViT-B-16-plus-240` (LAION-400M; converted by `scripts/convert_open_clip.py`): ViT-B/16 at 240
    (896 wide, 12 layers, 14 heads) and a 12-layer, 640-wide text transformer (10 heads); joint space 640; GELU
    (not OpenAI's QuickGELU)."""
    return CLIPConfig(
        text_config=dict(hidden_size=640, intermediate_size=2560, num_hidden_layers=12, num_attention_heads=10,
                         max_position_embeddings=77, vocab_size=49408, projection_dim=640, hidden_act="gelu"),
        vision_config=dict(hidden_size=896, intermediate_size=3584, num_hidden_layers=12, num_attention_heads=14,
                           image_size=240, patch_size=16, projection_dim=640, hidden_act="gelu"),
        projection_dim=640,
    )


def clip_vit_l14_336_config() -> CLIPConfig:
    """`openai/clip-vit-large-patch14-336`: ViT-L/14 at 336 (1024 wide, 24 layers, 16 heads) and the
    12-layer, 768-wide text transformer; joint space 768."""
    return CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77, vocab_size=49408, projection_dim=768),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14, projection_dim=768),
        projection_dim=768,
    )


def sam_vit_config(size: str) -> SamConfig:
    """The published SAM image encoders at 1024 px, patch 16, 14x14 windows (`facebook/sam-vit-base`,
    `-large`, `-huge`): width, depth, heads and global-attention blocks; SAM's 256-channel neck, prompt
    encoder and mask decoder (the latter two are never built by RISAM)."""
    architectures = {
        "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11]),
        "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                      global_attn_indexes=[5, 11, 17, 23]),
        "huge": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                     global_attn_indexes=[7, 15, 23, 31]),
    }
    if size not in architectures:
        raise ValueError(f"`size` must be one of {sorted(architectures)}, got {size!r}")
    vision = dict(architectures[size], image_size=1024, patch_size=16, window_size=14, output_channels=256,
                  mlp_dim=4 * architectures[size]["hidden_size"])
    return SamConfig(vision_config=vision)


def _tiny_sam_config() -> SamConfig:
    from .backbones import tiny_sam_config  # the defaults `save_tiny_backbones` writes

    return tiny_sam_config()


def _tiny_clip_config() -> CLIPConfig:
    from .backbones import tiny_clip_config  # the defaults `save_tiny_backbones` writes

    return tiny_clip_config()


@dataclass(frozen=True)
class Preset:
    """One named configuration.

    Attributes:
        method: the method's `model_type` (`"risclip"`).
        backbones: `{from_backbones keyword: Hub id}`; empty for tiny presets, whose backbones are
            local folders written by `refseg.backbones.save_tiny_backbones`.
        config_overrides: fields of the method config that differ from its defaults.
        description: one line for tables and model cards.
        backbone_configs: builds `{sub-config name: config}` from known architecture numbers (offline).
    """

    method: str
    backbones: Mapping[str, str]
    config_overrides: Mapping[str, Any]
    description: str
    backbone_configs: Callable[[], dict] = field(repr=False, default=dict)

    def __post_init__(self):  # read-only views, so a shared preset cannot be changed by accident
        object.__setattr__(self, "backbones", MappingProxyType(dict(self.backbones)))
        object.__setattr__(self, "config_overrides", MappingProxyType(dict(self.config_overrides)))


PRESETS: dict = {
    "risclip-b": Preset(
        method="risclip",
        backbones={"clip": "openai/clip-vit-base-patch16"},
        config_overrides={"image_size": 640},
        description="RISCLIP-B: frozen CLIP ViT-B/16 at 640 px (40x40 tokens), adapters in all 12+12 layers, "
        "6 PreFusion, 6 PostFusion",
        backbone_configs=lambda: {"clip_config": clip_vit_b16_config()},
    ),
    "risclip-b-paper": Preset(
        method="risclip",
        backbones={},  # no transformers checkpoint: convert OpenCLIP's weights, then pass the folder as `clip`
        config_overrides={"image_size": 640},
        description="RISCLIP-B on the paper's backbone: frozen OpenCLIP ViT-B-16-plus-240 (LAION-400M, 896 wide) at "
        "640 px (40x40 tokens), adapters in all 12+12 layers, 6 PreFusion, 6 PostFusion",
        backbone_configs=lambda: {"clip_config": clip_vit_b16_plus_240_config()},
    ),
    "risclip-l": Preset(
        method="risclip",
        backbones={"clip": "openai/clip-vit-large-patch14-336"},
        config_overrides={"image_size": 560},
        description="RISCLIP-L: frozen CLIP ViT-L/14 (OpenAI, 336 px pretraining) at 560 px (40x40 tokens), "
        "adapters in all 24+12 layers, 6 PreFusion, 6 PostFusion",
        backbone_configs=lambda: {"clip_config": clip_vit_l14_336_config()},
    ),
    "risclip-tiny": Preset(
        method="risclip",
        backbones={},
        config_overrides={
            "image_size": 64,
            "adapter_bottleneck_dim": 16,
            "fusion_num_heads": 4,
            "num_post_fusion_layers": 2,
            "refiner_hidden_sizes": [16, 16, 8, 8],
            "refiner_projection_dim": 16,  # a quarter of the tiny CLIP's width, as 64 is a twelfth of ViT-B's
        },
        description="RISCLIP on the tiny CLIP of refseg.backbones (64 wide, 4 layers, patch 8) at 64 px: "
        "tests and the quickstart",
        backbone_configs=lambda: {"clip_config": _tiny_clip_config()},
    ),
    "cris-b": Preset(
        method="cris",
        backbones={"clip": "openai/clip-vit-base-patch16"},
        config_overrides={"image_size": 416},
        description="CRIS on CLIP ViT-B/16 at 416 px (26x26 tokens; image layers 4, 8, 12 as the 1/8, 1/16, 1/32 "
        "levels), neck 256/512/1024, 3-layer decoder, both towers fine-tuned",
        backbone_configs=lambda: {"clip_config": clip_vit_b16_config()},
    ),
    "cris-l": Preset(
        method="cris",
        backbones={"clip": "openai/clip-vit-large-patch14-336"},
        # 448 = 32 x 14 tokens (the paper's 416 is no multiple of 14): the 1/32 level pools exactly to
        # 16x16 and the logits are 128x128. 420 (30x30), the multiple nearest 416, works as an override.
        config_overrides={"image_size": 448},
        description="CRIS on CLIP ViT-L/14 (OpenAI, 336 px pretraining) at 448 px (32x32 tokens; image layers "
        "8, 16, 24), neck 256/512/1024, 3-layer decoder, both towers fine-tuned",
        backbone_configs=lambda: {"clip_config": clip_vit_l14_336_config()},
    ),
    "cris-tiny": Preset(
        method="cris",
        backbones={},
        config_overrides={
            "image_size": 64,
            "neck_hidden_sizes": [32, 64, 64],
            "decoder_num_layers": 2,
            "decoder_num_heads": 4,
            "decoder_ffn_dim": 128,
            "projector_hidden_size": 32,
            # short runs (tests: 30 steps): no decoder dropout, BatchNorm statistics that follow the
            # quickly changing features (at 0.1 / 0.1, eval-mode masks lag the trained ones)
            "decoder_dropout": 0.0,
            "batch_norm_momentum": 0.5,
        },
        description="CRIS on the tiny CLIP of refseg.backbones (64 wide, 4 layers, patch 8) at 64 px: "
        "tests and the quickstart",
        backbone_configs=lambda: {"clip_config": _tiny_clip_config()},
    ),
    "risam-h": Preset(
        method="risam",
        backbones={"sam": "facebook/sam-vit-huge", "clip": "openai/clip-vit-base-patch16"},
        config_overrides={},
        description="RISAM on SAM ViT-H at 1024 px (blocks 15, 23, 31, 64x64) and CLIP ViT-B/16's text tower, both "
        "frozen; Feature Enhancement at 256, 2 Mutual-Aware Attention blocks, 2 decoder blocks",
        backbone_configs=lambda: {"sam_config": sam_vit_config("huge"), "clip_config": clip_vit_b16_config()},
    ),
    "risam-b": Preset(
        method="risam",
        backbones={"sam": "facebook/sam-vit-base", "clip": "openai/clip-vit-base-patch16"},
        config_overrides={},
        description="RISAM on SAM ViT-B at 1024 px (blocks 5, 8, 11, 64x64) and CLIP ViT-B/16's text tower, both "
        "frozen; Feature Enhancement at 256, 2 Mutual-Aware Attention blocks, 2 decoder blocks",
        backbone_configs=lambda: {"sam_config": sam_vit_config("base"), "clip_config": clip_vit_b16_config()},
    ),
    "risam-tiny": Preset(
        method="risam",
        backbones={},
        config_overrides={"hidden_size": 64, "decoder_num_heads": 4, "upsample_hidden_sizes": [32, 16]},
        description="RISAM on the tiny SAM (32 wide, 4 blocks, 256 px, 16x16) and tiny CLIP text tower of "
        "refseg.backbones: tests and the quickstart",
        backbone_configs=lambda: {"sam_config": _tiny_sam_config(), "clip_config": _tiny_clip_config()},
    ),
    "prompt-ris-b": Preset(
        method="prompt_ris",
        backbones={"clip": "openai/clip-vit-base-patch16", "sam": "facebook/sam-vit-base"},
        config_overrides={"image_size": 480},
        description="Prompt-RIS on CLIP ViT-B/16 at 480 px (30x30 tokens, Cross-Modal Prompting with 16 tokens per "
        "direction in all 12 layer pairs) and SAM ViT-B at 1024 px, both frozen; mask, point and text prompts",
        backbone_configs=lambda: {"clip_config": clip_vit_b16_config(), "sam_config": sam_vit_config("base")},
    ),
    "prompt-ris-tiny": Preset(
        method="prompt_ris",
        backbones={},
        config_overrides={
            "image_size": 64,
            # The tiny CLIP of the tests is random: its attention is near uniform, so each prompt takes a word's
            # share of every word's attention, and with several image-derived V2L prompts (2 already) the two
            # expressions of one image get nearly the same [EOS] feature. One token per direction keeps them apart.
            "num_prompt_tokens": 1,
            "cmp_hidden_size": 32,
            "cmp_num_heads": 4,
            "decoder_hidden_size": 64,
            "decoder_num_heads": 4,
            "decoder_ffn_dim": 128,
            # The tiny SAM is random, not pretrained: its frozen mask decoder cannot be prompted into a mask.
            "train_sam_decoder": True,
        },
        description="Prompt-RIS on the tiny CLIP (64 wide, 4 layers, patch 8) at 64 px and the tiny SAM (32 wide, "
        "256 px) of refseg.backbones, one prompt token per direction, SAM's mask decoder trained: tests and the "
        "quickstart",
        backbone_configs=lambda: {"clip_config": _tiny_clip_config(), "sam_config": _tiny_sam_config()},
    ),
}


def _tiny_clipseg_towers() -> dict:
    clip = _tiny_clip_config()
    return {"text_config": clip.text_config.to_dict(), "vision_config": clip.vision_config.to_dict(),
            "projection_dim": clip.projection_dim}


# The CLIPSeg baseline (`METHODS["clipseg"]`): the stock decoder, FiLM-conditioned on CLIP's sentence
# embedding, on the tiny CLIP's layers 2-4 of 4 (CLIPSeg-rd64 reads layers 4, 7, 10 of 12).
PRESETS["clipseg-tiny"] = Preset(
    method="clipseg",
    backbones={},
    config_overrides={"image_size": 64, "extract_layers": [1, 2, 3], "reduce_dim": 32,
                      "decoder_num_attention_heads": 4, "decoder_intermediate_size": 64},
    description="CLIPSeg baseline: the stock CLIPSeg decoder (reduce_dim 32, 3 layers) on the tiny CLIP of "
    "refseg.backbones at 64 px, CLIP frozen",
    backbone_configs=_tiny_clipseg_towers,
)


# The presets that get a generalized (`-g`) twin: each method at each size; not the paper-backbone variant
# (`risclip-b-paper`) nor the CLIPSeg baseline, whose stock decoder has no presence head.
GENERALIZED_BASES = ("risclip-b", "risclip-l", "risclip-tiny", "cris-b", "cris-l", "cris-tiny", "risam-h", "risam-b",
                     "risam-tiny", "prompt-ris-b", "prompt-ris-tiny")


def generalized_preset(base: Preset) -> Preset:
    """`base` with the presence head on (`no_target_head=True`): the same method, backbones and sizes."""
    return Preset(method=base.method, backbones=base.backbones,
                  config_overrides={**base.config_overrides, "no_target_head": True},
                  description=base.description + "; with the no-target (presence) head for generalized RIS "
                  "(gRefCOCO)", backbone_configs=base.backbone_configs)


PRESETS.update({f"{name}-g": generalized_preset(PRESETS[name]) for name in GENERALIZED_BASES})


def get_config(name: str, **overrides) -> PreTrainedConfig:
    """The method config of preset `name`, with `overrides` applied on top (built offline).

    The backbone sub-configs come from the preset's architecture numbers, so the config describes the
    paper-scale model without downloading anything; a model built from it has random weights.
    """
    if name not in PRESETS:
        raise ValueError(f"`name` must be one of {sorted(PRESETS)}, got {name!r}")
    preset = PRESETS[name]
    from transformers import AutoConfig

    from . import models  # noqa: F401  (registers the refseg model types with AutoConfig)

    kwargs = {**preset.backbone_configs(), **preset.config_overrides, **overrides}
    return AutoConfig.for_model(preset.method, **kwargs)


__all__ = ["GENERALIZED_BASES", "PRESETS", "Preset", "clip_vit_b16_config", "clip_vit_b16_plus_240_config",
           "clip_vit_l14_336_config", "generalized_preset", "get_config", "sam_vit_config"]
