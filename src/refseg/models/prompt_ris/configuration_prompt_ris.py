"""Prompt-RIS configuration."""

import logging

from transformers import CLIPConfig, PreTrainedConfig, SamConfig
from transformers.configuration_utils import SubConfigSpec

from ...no_target import validate_no_target_config

logger = logging.getLogger(__name__)

# Sec. 4.2: CLIP with Cross-Modal Prompting (and ICL) first, then the whole model end to end.
TRAINING_STAGES = ("coarse", "end_to_end")
# The paper feeds 480 px to CLIP ViT-B/16: a 30x30 token grid.
PAPER_GRID = 30
# [SOS] and [EOS] plus at least one word.
MIN_WORD_LENGTH = 3


class PromptRisConfig(PreTrainedConfig):
    r"""
    Configuration of a [`PromptRisModel`]: a frozen CLIP (`clip_config`, both towers) tuned by Cross-Modal
    Prompting, a frozen SAM (`sam_config`: image encoder, prompt encoder, mask decoder) and the modules Prompt-RIS
    adds (Shang et al., "Prompt-Driven Referring Image Segmentation with Instance Contrasting", CVPR 2024).

    Args:
        clip_config (`dict` or `CLIPConfig`, *optional*):
            The CLIP backbone; defaults to CLIP ViT-B/16's architecture (patch 16). `PromptRisModel.from_backbones`
            loads real weights. The first `min(L_image, L_text)` layers of the two towers are paired for Cross-Modal
            Prompting (all 12 of ViT-B/16); the deeper tower's remaining layers run without prompts.
        sam_config (`dict` or `SamConfig`, *optional*):
            The SAM backbone; defaults to `SamConfig()` (SAM ViT-B's architecture at 1024 px). SAM's input size is
            fixed by its position embeddings (see `sam_image_size`).
        image_size (`int`, *optional*):
            Side of CLIP's square input, a multiple of the patch size. Defaults to 30 x the patch size (the paper's
            480 px, 30x30 tokens for ViT-B/16).
        num_prompt_tokens (`int`, *optional*, defaults to 16):
            n, the learnable query tokens per layer and direction (T_V^i, T_L^i of eqs. 5-6), and so the prompts
            prepended to every CLIP layer's input (paper: 16).
        cmp_hidden_size (`int`, *optional*, defaults to 256):
            Width of the query/key/value space of each Cross-Modal Prompting cross-attention (the paper does not
            give it; queries come from the source width, the output is projected to the target tower's width).
        cmp_num_heads (`int`, *optional*, defaults to 8):
            Heads of those cross-attentions (must divide `cmp_hidden_size`).
        decoder_hidden_size (`int`, *optional*):
            D_C, the width of the tiny cross-attention decoder (eq. 1) and of the coarse map's inner product
            (eq. 2). Defaults to CLIP's `projection_dim` (512 for ViT-B/16, CLIP's joint space).
        decoder_num_layers (`int`, *optional*, defaults to 1):
            Decoder layers; each holds the two cross-attentions of eq. 1 (F_IC queries F_T, F_T queries F_IC).
        decoder_num_heads (`int`, *optional*, defaults to 8):
            Heads of the decoder's cross-attentions (must divide `decoder_hidden_size`).
        decoder_ffn_dim (`int`, *optional*, defaults to 2048):
            Hidden width of the feed-forward block after each cross-attention of the decoder; 0 leaves it out
            (eq. 1 names only the cross-attentions).
        text_prompt_num_layers (`int`, *optional*, defaults to 2):
            Transformer blocks (self-attention, cross-attention to SAM's image features, MLP) turning CLIP's word
            features into SAM text prompts (the paper's two).
        text_prompt_num_heads (`int`, *optional*):
            Heads of those blocks; defaults to SAM's mask-decoder heads (8).
        text_prompt_mlp_dim (`int`, *optional*):
            MLP width of those blocks; defaults to SAM's mask-decoder MLP width (2048).
        gumbel_temperature (`float`, *optional*, defaults to 1.0):
            tau of the straight-through Gumbel-softmax that picks the point prompt in training (eq. 3). Inference
            takes the argmax of the map (no noise).
        prompt_dropout (`float`, *optional*, defaults to 0.1):
            In training (stage `end_to_end`), the probability that one kind of SAM prompt (mask, point, text) is
            dropped for one row, each kind and row drawn independently (Sec. 4.2 drops prompts "randomly" without a
            rate). A dropped mask prompt becomes SAM's `no_mask_embed`, a dropped point SAM's `not_a_point_embed`,
            dropped text prompts are left out of SAM's decoder. A row that would lose all three keeps its text prompts.
        train_sam_decoder (`bool`, *optional*, defaults to `False`):
            Also train SAM's mask decoder (the parts the first mask depends on: not the IoU head nor the other mask
            tokens' hypernetworks) and the mask embedding of its prompt encoder in stage `end_to_end`. Off, as in
            the paper, which keeps SAM frozen; the `prompt-ris-tiny` preset turns it on, because the tests' tiny SAM
            is random, not pretrained: a frozen random mask decoder gives logits of about 1e-4 whatever it is
            prompted with.
        word_length (`int`, *optional*, defaults to 20):
            Tokens per expression, [SOS] and [EOS] included; the processor pads and truncates to it. The paper gives
            none: 20 holds practically every RefCOCO/RefCOCO+ expression (3.5 words on average) with room to spare;
            G-Ref's longer expressions may want more. At least 3.
        no_target_head (`bool`, *optional*, defaults to `False`):
            Generalized referring segmentation: add the presence head (`refseg.no_target.NoTargetHead`) that
            says when the expression names nothing in the image. It reads the coarse decoder's sentence t_g, its pixels F'_IC and the coarse map S'_C; it trains in both stages. Off in the paper presets, on in
            the `*-g` presets.
        no_target_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the head's BCE term (target: the label mask is empty) in the loss.
        no_target_threshold (`float`, *optional*, defaults to 0.5):
            Post-processing returns an empty mask where `sigmoid(no_target_logits)` exceeds it.
        threshold (`float`, *optional*, defaults to 0.5):
            Probability threshold of the final mask (the paper gives none; 0.5 is the sigmoid's midpoint).
        bce_weight, dice_weight, icl_weight (`float`, *optional*, default to 1.0):
            Weights of the BCE, dice and instance-contrastive terms, applied alike to the coarse and the final mask
            (eq. 9 adds them unweighted).
        icl_iou_threshold (`float`, *optional*, defaults to 0.5):
            Probability threshold binarising a prediction for its IoU weight w_i in eq. 8.
        share_image_encoding (`bool`, *optional*, defaults to `True`):
            Run SAM's image encoder once per distinct row of `sam_pixel_values` (one image paired with several
            expressions). CLIP's image tower sees the text (Cross-Modal Prompting), so it always runs per row.
        training_stage (`str`, *optional*, defaults to `"coarse"`):
            `"coarse"` (Cross-Modal Prompting and the decoder on the coarse map; SAM is not run) or `"end_to_end"`.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Kept for transformers' generic code; Prompt-RIS's own linear layers use PyTorch's default initialisation
            (see `PromptRisPreTrainedModel._init_weights`).

    Example:

    ```python
    >>> from refseg import PromptRisConfig, PromptRisModel
    >>> from refseg.presets import get_config
    >>> model = PromptRisModel(get_config("prompt-ris-b"))   # the paper's CLIP ViT-B/16 + SAM ViT-B, random weights
    ```"""

    model_type = "prompt_ris"
    sub_configs_defaults = {
        "clip_config": SubConfigSpec(CLIPConfig, init_kwargs={"vision_config": {"patch_size": 16}}),
        "sam_config": SubConfigSpec(SamConfig),
    }

    clip_config: dict | CLIPConfig | None = None
    sam_config: dict | SamConfig | None = None
    image_size: int | None = None
    num_prompt_tokens: int = 16
    cmp_hidden_size: int = 256
    cmp_num_heads: int = 8
    decoder_hidden_size: int | None = None
    decoder_num_layers: int = 1
    decoder_num_heads: int = 8
    decoder_ffn_dim: int = 2048
    text_prompt_num_layers: int = 2
    text_prompt_num_heads: int | None = None
    text_prompt_mlp_dim: int | None = None
    gumbel_temperature: float = 1.0
    prompt_dropout: float = 0.1
    train_sam_decoder: bool = False
    word_length: int = 20
    threshold: float = 0.5
    no_target_head: bool = False
    no_target_loss_weight: float = 1.0
    no_target_threshold: float = 0.5
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    icl_weight: float = 1.0
    icl_iou_threshold: float = 0.5
    share_image_encoding: bool = True
    training_stage: str = "coarse"
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)  # builds `clip_config` / `sam_config` from dicts / None
        if self.image_size is None:
            self.image_size = PAPER_GRID * self.patch_size
        if self.decoder_hidden_size is None:
            self.decoder_hidden_size = int(self.clip_config.projection_dim)
        decoder = self.sam_config.mask_decoder_config
        if self.text_prompt_num_heads is None:
            self.text_prompt_num_heads = int(decoder.num_attention_heads)
        if self.text_prompt_mlp_dim is None:
            self.text_prompt_mlp_dim = int(decoder.mlp_dim)
        self._validate()
        validate_no_target_config(self)

    # ----------------------------------------------------------------- derived sizes
    @property
    def patch_size(self) -> int:
        return int(self.clip_config.vision_config.patch_size)

    @property
    def grid_size(self) -> int:
        """Tokens per side of CLIP's grid (30 at 480 px): the coarse map's side."""
        return self.image_size // self.patch_size

    @property
    def sam_image_size(self) -> int:
        """Side of SAM's square (padded) input, fixed by its position embeddings (1024)."""
        return int(self.sam_config.vision_config.image_size)

    @property
    def sam_grid_size(self) -> int:
        """Side of SAM's image embedding (64 at 1024 px)."""
        return int(self.sam_config.prompt_encoder_config.image_embedding_size)

    @property
    def mask_size(self) -> int:
        """Side of SAM's mask input and low-resolution mask output, 4x its embedding (256 at 1024 px): the
        side of `logits`."""
        return 4 * self.sam_grid_size

    @property
    def sam_hidden_size(self) -> int:
        """D_S, the width of SAM's prompts and mask decoder (256)."""
        return int(self.sam_config.mask_decoder_config.hidden_size)

    @property
    def num_cmp_layers(self) -> int:
        """CLIP layer pairs that get cross-modal prompts: the first `min(L_image, L_text)` of each tower."""
        return min(self.clip_config.vision_config.num_hidden_layers, self.clip_config.text_config.num_hidden_layers)

    # ----------------------------------------------------------------- validation
    def _validate(self) -> None:
        def positive_int(name, minimum=1):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")

        for name in ("image_size", "num_prompt_tokens", "cmp_hidden_size", "cmp_num_heads", "decoder_hidden_size",
                     "decoder_num_layers", "decoder_num_heads", "text_prompt_num_layers", "text_prompt_num_heads",
                     "text_prompt_mlp_dim", "word_length"):
            positive_int(name)
        positive_int("decoder_ffn_dim", minimum=0)
        if self.image_size % self.patch_size:
            raise ValueError(f"`image_size` ({self.image_size}) must be a multiple of the patch size ({self.patch_size})")
        if self.grid_size < 2:
            raise ValueError(f"`image_size` ({self.image_size}) must give at least 2x2 tokens (patch {self.patch_size})")
        for width, heads in (("cmp_hidden_size", "cmp_num_heads"), ("decoder_hidden_size", "decoder_num_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"`{heads}` ({getattr(self, heads)}) must divide `{width}` ({getattr(self, width)})")
        if self.sam_hidden_size % self.text_prompt_num_heads:
            raise ValueError(
                f"`text_prompt_num_heads` ({self.text_prompt_num_heads}) must divide SAM's prompt width "
                f"({self.sam_hidden_size})"
            )
        sam = self.sam_config
        vision, prompt = sam.vision_config, sam.prompt_encoder_config
        if prompt.image_size != vision.image_size or prompt.image_embedding_size != vision.image_size // vision.patch_size:
            raise ValueError(
                "`sam_config`: the prompt encoder's image size / embedding grid "
                f"({prompt.image_size}, {prompt.image_embedding_size}) must match the vision encoder's "
                f"({vision.image_size}, {vision.image_size // vision.patch_size})"
            )
        if not (prompt.hidden_size == vision.output_channels == self.sam_hidden_size):
            raise ValueError(
                "`sam_config`: the vision neck, prompt encoder and mask decoder widths must agree, got "
                f"{vision.output_channels}, {prompt.hidden_size}, {self.sam_hidden_size}"
            )
        if self.word_length < MIN_WORD_LENGTH:
            raise ValueError(
                f"`word_length` must be at least {MIN_WORD_LENGTH} ([SOS], one word, [EOS]), got {self.word_length}"
            )
        max_positions = self.clip_config.text_config.max_position_embeddings
        if self.word_length > max_positions:
            raise ValueError(f"`word_length` ({self.word_length}) exceeds CLIP's {max_positions} text positions")
        if not isinstance(self.train_sam_decoder, bool):
            raise ValueError(f"`train_sam_decoder` must be a bool, got {self.train_sam_decoder!r}")
        if not self.gumbel_temperature > 0:
            raise ValueError(f"`gumbel_temperature` must be > 0, got {self.gumbel_temperature!r}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"`prompt_dropout` must be in [0, 1), got {self.prompt_dropout!r}")
        for name in ("threshold", "icl_iou_threshold"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"`{name}` must be in (0, 1), got {getattr(self, name)!r}")
        for name in ("bce_weight", "dice_weight", "icl_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)!r}")
        if self.bce_weight == 0 and self.dice_weight == 0:
            raise ValueError("`bce_weight` and `dice_weight` cannot both be 0")
        if self.training_stage not in TRAINING_STAGES:
            raise ValueError(f"`training_stage` must be one of {TRAINING_STAGES}, got {self.training_stage!r}")


__all__ = ["MIN_WORD_LENGTH", "PAPER_GRID", "TRAINING_STAGES", "PromptRisConfig"]
