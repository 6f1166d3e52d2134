"""RISCLIP configuration."""

import logging

from transformers import CLIPConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ...no_target import validate_no_target_config

logger = logging.getLogger(__name__)

TRAINING_STAGES = ("locator", "refiner")
# The paper feeds both RISCLIP-B (ViT-B/16 at 640) and RISCLIP-L (ViT-L/14 at 560) 40x40 tokens.
PAPER_GRID = 40


class RisclipConfig(PreTrainedConfig):
    r"""
    Configuration of a [`RisclipModel`]: a frozen CLIP (`clip_config`) plus RISCLIP's adapters, Locator
    and Refiner (Kim et al., "RISCLIP: Referring Image Segmentation Framework using CLIP").

    Args:
        clip_config (`dict` or `CLIPConfig`, *optional*):
            The CLIP backbone. Defaults to CLIP ViT-B/16's architecture (`CLIPConfig(vision_config={"patch_size":
            16})`), i.e. RISCLIP-B with random weights; `RisclipModel.from_backbones(clip=...)` loads real weights.
        image_size (`int`, *optional*):
            Side of the square model input. CLIP's position embeddings are interpolated to
            `image_size // patch_size` tokens per side. Defaults to 40 x the patch size, the paper's 40x40 grid
            (640 for ViT-B/16, 560 for ViT-L/14).
        adapter_bottleneck_dim (`int`, *optional*, defaults to 64):
            Width of the Backbone Adapters' bottleneck (not given by the paper).
        adapter_activation (`str`, *optional*, defaults to `"relu"`):
            Non-linearity of the Backbone Adapters (AdaptFormer's ReLU).
        adapter_layers (`int`, *optional*):
            Backbone Adapters go into the last `adapter_layers` layers of each tower; `None` (default) means
            every layer, as in the paper.
        adapter_channel_scale (`bool`, *optional*, defaults to `False`):
            Learnable channel-wise scales on every adapter output before the residual sum (Appendix A,
            "additional techniques").
        adapter_scale_init (`float`, *optional*, defaults to 1.0):
            Initial value of those scales.
        learnable_attention_temperature (`bool`, *optional*, defaults to `False`):
            A learnable per-head temperature in every fusion attention (Appendix A).
        adapter_dropout (`float`, *optional*, defaults to 0.0):
            Dropout inside the Backbone Adapters and on the fusion attention weights.
        num_pre_fusion_layers (`int`, *optional*, defaults to 6):
            PreFusion adapters, pairing the last image and text layers, deepest pair first. Clipped to the
            depth of the shallower tower (tiny test models).
        num_post_fusion_layers (`int`, *optional*, defaults to 6):
            PostFusion layers after the final projections.
        fusion_hidden_size (`int`, *optional*):
            Width of PreFusion's shared space; `None` (default) uses CLIP's `projection_dim`.
        fusion_num_heads (`int`, *optional*, defaults to 8):
            Heads of every fusion attention; must divide `fusion_hidden_size` and `projection_dim`.
        fusion_mlp_ratio (`float`, *optional*, defaults to 4.0):
            PostFusion MLP width / `projection_dim`.
        refiner_hidden_sizes (`list[int]`, *optional*, defaults to `[256, 128, 64, 32]`):
            Output channels of the Refiner's [3x3 conv, BN, ReLU, x2 bilinear] layers (not given by the paper;
            narrowing as the resolution doubles).
        refiner_feature_layers (`list[int]`, *optional*, defaults to `[4, 3, 2, 1]`):
            1-based CLIP image layers whose outputs (before any fusion) feed the Refiner layers, in order;
            0 is the embedding output (patch + position embeddings after CLIP's pre-LN, the paper's f_0).
            Indices deeper than the image tower are clipped to its depth.
        refiner_projection_dim (`int`, *optional*, defaults to 64):
            Channels each Refiner feature map is reduced to by a 1x1 conv at CLIP's token grid, before it is
            upsampled to the Refiner layer's resolution. A departure from the paper's figure, which upsamples
            the raw `hidden_size`-channel features: at RISCLIP-B it cuts the Refiner from 96 to 19 GFLOP per
            640 px image, and the RefShapes quickstart scores as well or better (docs/risclip.md, "Cost").
            `None` keeps the paper's literal design.
        share_image_encoding (`bool`, *optional*, defaults to `True`):
            At inference, run the text-free prefix of the image tower (the layers before the first PreFusion,
            with their Backbone Adapters) once per distinct row of `pixel_values` (one image paired with
            several expressions) and expand it afterwards. Training batches are unchanged.
        locator_logit_scale_init (`float`, *optional*, defaults to 10.0):
            Initial scale of the Locator's cosine similarity (learned in log space): cosines in [-1, 1] map to
            logits in [-10, 10] + bias.
        locator_logit_bias_init (`float`, *optional*, defaults to -2.0):
            Initial bias of the Locator's logits: sigmoid(-2) = 0.12, about the share of a 40x40 grid a
            referred object covers, so the map starts near the foreground prior rather than at 0.5.
        dice_loss_weight (`float`, *optional*, defaults to 1.0):
            lambda_dice (Appendix A: lambda_dice : lambda_focal = 1.0 : 1.75).
        focal_loss_weight (`float`, *optional*, defaults to 1.75):
            lambda_focal.
        focal_alpha (`float`, *optional*, defaults to 0.65):
            Focal loss alpha (weight of foreground).
        focal_gamma (`float`, *optional*, defaults to 2.0):
            Focal loss gamma.
        training_stage (`str`, *optional*, defaults to `"locator"`):
            `"locator"` (stage 1: adapters, fusion and the Locator's scale/bias train on the token-level target)
            or `"refiner"` (stage 2: the Refiner alone trains on the pixel target).
        no_target_head (`bool`, *optional*, defaults to `False`):
            Generalized referring segmentation: add the presence head (`refseg.no_target.NoTargetHead`) that
            says when the expression names nothing in the image. It reads the [EOS] token after PostFusion, the PostFusion patch tokens and the Locator's map; it trains in the `locator` stage. Off in the paper presets, on in
            the `*-g` presets.
        no_target_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the head's BCE term (target: the label mask is empty) in the loss.
        no_target_threshold (`float`, *optional*, defaults to 0.5):
            Post-processing returns an empty mask where `sigmoid(no_target_logits)` exceeds it.
        threshold (`float`, *optional*, defaults to 0.5):
            Probability threshold of the final mask; 0.5 on the fg - bg logit is the paper's argmax.
        use_lora (`bool`, *optional*, defaults to `False`):
            Also put LoRA (through `peft`) on `lora_target_modules` of both towers; trains with the Locator.
        lora_r (`int`, *optional*, defaults to 8):
            LoRA rank.
        lora_alpha (`int`, *optional*, defaults to 16):
            LoRA alpha.
        lora_dropout (`float`, *optional*, defaults to 0.0):
            LoRA dropout.
        lora_target_modules (`list[str]`, *optional*, defaults to `["q_proj", "v_proj"]`):
            Module-name suffixes LoRA targets inside the CLIP encoder layers.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the normal init of the Refiner's final projection.

    Example:

    ```python
    >>> from refseg import RisclipConfig, RisclipModel
    >>> config = RisclipConfig()          # RISCLIP-B architecture (ViT-B/16 at 640), random weights
    >>> model = RisclipModel(config)
    ```"""

    model_type = "risclip"
    sub_configs_defaults = {"clip_config": SubConfigSpec(CLIPConfig, init_kwargs={"vision_config": {"patch_size": 16}})}

    clip_config: dict | CLIPConfig | None = None
    image_size: int | None = None
    adapter_bottleneck_dim: int = 64
    adapter_activation: str = "relu"
    adapter_layers: int | None = None
    adapter_channel_scale: bool = False
    adapter_scale_init: float = 1.0
    learnable_attention_temperature: bool = False
    adapter_dropout: float = 0.0
    num_pre_fusion_layers: int = 6
    num_post_fusion_layers: int = 6
    fusion_hidden_size: int | None = None
    fusion_num_heads: int = 8
    fusion_mlp_ratio: float = 4.0
    refiner_hidden_sizes: list | tuple = (256, 128, 64, 32)
    refiner_feature_layers: list | tuple = (4, 3, 2, 1)
    refiner_projection_dim: int | None = 64
    share_image_encoding: bool = True
    locator_logit_scale_init: float = 10.0
    locator_logit_bias_init: float = -2.0
    dice_loss_weight: float = 1.0
    focal_loss_weight: float = 1.75
    focal_alpha: float = 0.65
    focal_gamma: float = 2.0
    training_stage: str = "locator"
    threshold: float = 0.5
    no_target_head: bool = False
    no_target_loss_weight: float = 1.0
    no_target_threshold: float = 0.5
    use_lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list | tuple = ("q_proj", "v_proj")
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)  # builds `clip_config` from a dict / None
        self.refiner_hidden_sizes = [int(c) for c in self.refiner_hidden_sizes]
        self.refiner_feature_layers = [int(i) for i in self.refiner_feature_layers]
        self.lora_target_modules = list(self.lora_target_modules)
        vision, text = self.clip_config.vision_config, self.clip_config.text_config
        if self.image_size is None:
            self.image_size = PAPER_GRID * self.patch_size

        fusable = min(vision.num_hidden_layers, text.num_hidden_layers)
        if self.num_pre_fusion_layers > fusable:
            logger.info("num_pre_fusion_layers %d clipped to the tower depth %d", self.num_pre_fusion_layers, fusable)
            self.num_pre_fusion_layers = fusable
        clipped = [min(i, vision.num_hidden_layers) for i in self.refiner_feature_layers]
        if clipped != self.refiner_feature_layers:
            logger.info("refiner_feature_layers %s clipped to %s", self.refiner_feature_layers, clipped)
            self.refiner_feature_layers = clipped
        self._validate(vision)
        validate_no_target_config(self)

    @property
    def patch_size(self) -> int:
        return int(self.clip_config.vision_config.patch_size)

    @property
    def grid_size(self) -> int:
        """Tokens per side of the image grid: `image_size // patch_size`."""
        return self.image_size // self.patch_size

    @property
    def fusion_dim(self) -> int:
        return self.fusion_hidden_size or self.clip_config.projection_dim

    def _validate(self, vision) -> None:
        def positive_int(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")

        for name in ("image_size", "adapter_bottleneck_dim", "fusion_num_heads", "lora_r"):
            positive_int(name)
        for name in ("num_pre_fusion_layers", "num_post_fusion_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be an int >= 0, got {getattr(self, name)!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"`image_size` ({self.image_size}) must be a multiple of the patch size ({self.patch_size})")
        if self.adapter_layers is not None and not 0 <= self.adapter_layers:
            raise ValueError(f"`adapter_layers` must be None or >= 0, got {self.adapter_layers!r}")
        for dim_name, dim in (("fusion_hidden_size", self.fusion_dim), ("projection_dim", self.clip_config.projection_dim)):
            if dim % self.fusion_num_heads:
                raise ValueError(f"`fusion_num_heads` ({self.fusion_num_heads}) must divide {dim_name} ({dim})")
        if not self.refiner_hidden_sizes or any(c < 1 for c in self.refiner_hidden_sizes):
            raise ValueError(f"`refiner_hidden_sizes` must be positive ints, got {self.refiner_hidden_sizes!r}")
        if len(self.refiner_hidden_sizes) != len(self.refiner_feature_layers):
            raise ValueError(
                f"`refiner_feature_layers` ({self.refiner_feature_layers}) needs one entry per Refiner layer "
                f"(`refiner_hidden_sizes` has {len(self.refiner_hidden_sizes)})"
            )
        if self.refiner_projection_dim is not None and (
                isinstance(self.refiner_projection_dim, bool) or not isinstance(self.refiner_projection_dim, int)
                or self.refiner_projection_dim < 1):
            raise ValueError(f"`refiner_projection_dim` must be None or an int >= 1, got {self.refiner_projection_dim!r}")
        if not isinstance(self.share_image_encoding, bool):
            raise ValueError(f"`share_image_encoding` must be a bool, got {self.share_image_encoding!r}")
        if any(i < 0 for i in self.refiner_feature_layers):
            raise ValueError(
                f"`refiner_feature_layers` are 1-based layer indices (0: the embeddings), got {self.refiner_feature_layers!r}"
            )
        if self.locator_logit_scale_init <= 0:
            raise ValueError(f"`locator_logit_scale_init` must be > 0, got {self.locator_logit_scale_init!r}")
        if not 0.0 <= self.focal_alpha <= 1.0:
            raise ValueError(f"`focal_alpha` must be in [0, 1], got {self.focal_alpha!r}")
        if self.focal_gamma < 0 or self.dice_loss_weight < 0 or self.focal_loss_weight < 0:
            raise ValueError("`focal_gamma`, `dice_loss_weight` and `focal_loss_weight` must be >= 0")
        if self.training_stage not in TRAINING_STAGES:
            raise ValueError(f"`training_stage` must be one of {TRAINING_STAGES}, got {self.training_stage!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"`threshold` must be in (0, 1), got {self.threshold!r}")
        if not 0.0 <= self.adapter_dropout < 1.0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("`adapter_dropout` and `lora_dropout` must be in [0, 1)")


__all__ = ["PAPER_GRID", "RisclipConfig", "TRAINING_STAGES"]
