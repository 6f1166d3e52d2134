"""CRIS configuration."""

import logging

from transformers import CLIPConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ...no_target import validate_no_target_config

logger = logging.getLogger(__name__)

# CRIS trains in one stage: everything (both CLIP towers included) end to end.
TRAINING_STAGES = ("default",)
# The paper feeds 416 px to stride-16 features: a 26x26 map at 1/16 (ViT-B/16: 26 patch tokens per side).
PAPER_GRID = 26
# [SOS] and [EOS] plus at least one word.
MIN_WORD_LENGTH = 3
# How the processor fits an image to the square input: stretched, or the authors' letterbox (aspect kept, padded).
RESIZE_MODES = ("stretch", "letterbox")
# How the processor resizes a mask into `labels`: nearest (0/1) or bilinear (soft edges, the authors' targets).
MASK_RESAMPLES = ("nearest", "bilinear")


def default_feature_layers(num_layers: int) -> list:
    """The three ViT layers (1-based) CRIS reads by default: a third, two thirds and all of the depth
    (4, 8, 12 for ViT-B; 8, 16, 24 for ViT-L; 1, 3, 4 for a 4-layer tower)."""
    first, second = max(1, round(num_layers / 3)), max(1, round(2 * num_layers / 3))
    if num_layers >= 3:
        first, second = min(first, num_layers - 2), min(max(second, first + 1), num_layers - 1)
    return [first, second, num_layers]


class CrisConfig(PreTrainedConfig):
    r"""
    Configuration of a [`CrisModel`]: a fine-tuned CLIP (`clip_config`) plus CRIS's cross-modal neck,
    vision-language decoder and projector (Wang et al., "CRIS: CLIP-Driven Referring Image Segmentation").

    Args:
        clip_config (`dict` or `CLIPConfig`, *optional*):
            The CLIP backbone. Defaults to CLIP ViT-B/16's architecture, i.e. `cris-b` with random weights;
            `CrisModel.from_backbones(clip=...)` loads real weights. (The paper's ResNet-50/101 CLIP is not a
            `transformers.CLIPModel`; the ViT stands in for it, see `vision_feature_layers`.)
        image_size (`int`, *optional*):
            Side of the square model input; a multiple of the patch size. Defaults to 26 x the patch size (the
            paper's 26x26 map at 1/16: 416 px for ViT-B/16).
        vision_feature_layers (`list[int]`, *optional*):
            Three 1-based CLIP image layers whose patch tokens (reshaped to the token grid) stand in for the
            ResNet's C3, C4, C5: the first is upsampled x2 (1/8), the second stays at the grid (1/16), the
            third goes through CLIP's post-LN and visual projection and is average-pooled x2 (1/32).
            Defaults to a third, two thirds and all of the depth (4, 8, 12 for ViT-B/16).
        neck_hidden_sizes (`list[int]`, *optional*, defaults to `[256, 512, 1024]`):
            Channels of the neck at 1/8, 1/16 and 1/32 (the public code's `fpn_out`). The 1/16 width is the
            width `C` of the neck output, the decoder and the paper's "512 channels at 1/16".
        decoder_num_layers (`int`, *optional*, defaults to 3):
            Vision-language decoder layers (the paper's n).
        decoder_num_heads (`int`, *optional*, defaults to 8):
            Attention heads of the decoder; must divide `neck_hidden_sizes[1]`.
        decoder_ffn_dim (`int`, *optional*, defaults to 2048):
            Hidden width of the decoder's feed-forward networks.
        decoder_dropout (`float`, *optional*, defaults to 0.1):
            Dropout on attention weights and on every residual branch of the decoder.
        projector_hidden_size (`int`, *optional*):
            Channels of the projector's 1/4-resolution features `z_v` (the dynamic kernel has
            `projector_hidden_size * k * k + 1` values). Defaults to half of `neck_hidden_sizes[1]` (256).
        projector_kernel_size (`int`, *optional*, defaults to 3):
            Side of the per-sample dynamic kernel (odd).
        word_length (`int`, *optional*, defaults to 17):
            Tokens per expression, [SOS] and [EOS] included (17 for RefCOCO/+, 22 for RefCOCOg); the processor
            pads and truncates to it. At least 3.
        no_target_head (`bool`, *optional*, defaults to `False`):
            Generalized referring segmentation: add the presence head (`refseg.no_target.NoTargetHead`) that
            says when the expression names nothing in the image. It reads the sentence feature F_s, the decoder's output F_c and the projector's logits. Off in the paper presets, on in
            the `*-g` presets.
        no_target_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the head's BCE term (target: the label mask is empty) in the loss.
        no_target_threshold (`float`, *optional*, defaults to 0.5):
            Post-processing returns an empty mask where `sigmoid(no_target_logits)` exceeds it.
        threshold (`float`, *optional*, defaults to 0.35):
            Probability threshold of the final mask (the paper's).
        resize_mode (`str`, *optional*, defaults to `"stretch"`):
            How `CrisProcessor` (built by the training script from this config) fits an image to the square
            input: `"stretch"`, or `"letterbox"` as the authors' code (aspect ratio kept, centred, padded with
            CLIP's mean colour; post-processing maps the probabilities back through the inverse placement).
            The `cris-b` paper configs use `"letterbox"`.
        mask_resample (`str`, *optional*, defaults to `"nearest"`):
            How the processor resizes ground-truth masks into `labels`: `"nearest"` (0/1) or `"bilinear"`
            (soft edges, the authors' loss targets: their mask is warped with linear interpolation; the loss
            then samples it at the logits size as before). The `cris-b` paper configs use `"bilinear"`.
        backbone_learning_rate_scale (`float`, *optional*, defaults to 0.1):
            Learning rate of the CLIP towers relative to the base rate (`refseg.training.METHODS["cris"]`
            builds the parameter groups from it).
        backbone_position_embeddings_at_base_rate (`bool`, *optional*, defaults to `False`):
            Train CLIP's two position embeddings at the base rate with the heads, not at
            `backbone_learning_rate_scale` (the authors' optimiser groups: every backbone parameter whose name
            holds `positional_embedding` goes to the head group). The `cris-b` paper configs set it.
        batch_norm_momentum (`float`, *optional*, defaults to 0.1):
            Momentum of the running statistics of every BatchNorm in the neck and projector (PyTorch's default,
            as the public code). Short runs (the tiny preset) need more: the statistics must follow features
            that change quickly, or eval-mode outputs lag the trained ones.
        share_image_encoding (`bool`, *optional*, defaults to `True`):
            Encode identical rows of `pixel_values` (one image paired with several expressions) once and share
            the features; the image tower does not depend on the text, so the outputs are the same.
        training_stage (`str`, *optional*, defaults to `"default"`):
            The only stage: every module trains (CLIP's unused `logit_scale` excepted).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the normal init of the new linear layers.

    Example:

    ```python
    >>> from refseg import CrisConfig, CrisModel
    >>> config = CrisConfig()          # CRIS on ViT-B/16 at 416 px, random weights
    >>> model = CrisModel(config)
    ```"""

    model_type = "cris"
    sub_configs_defaults = {"clip_config": SubConfigSpec(CLIPConfig, init_kwargs={"vision_config": {"patch_size": 16}})}

    clip_config: dict | CLIPConfig | None = None
    image_size: int | None = None
    vision_feature_layers: list | tuple | None = None
    neck_hidden_sizes: list | tuple = (256, 512, 1024)
    decoder_num_layers: int = 3
    decoder_num_heads: int = 8
    decoder_ffn_dim: int = 2048
    decoder_dropout: float = 0.1
    projector_hidden_size: int | None = None
    projector_kernel_size: int = 3
    word_length: int = 17
    threshold: float = 0.35
    no_target_head: bool = False
    no_target_loss_weight: float = 1.0
    no_target_threshold: float = 0.5
    resize_mode: str = "stretch"
    mask_resample: str = "nearest"
    backbone_learning_rate_scale: float = 0.1
    backbone_position_embeddings_at_base_rate: bool = False
    batch_norm_momentum: float = 0.1
    share_image_encoding: bool = True
    training_stage: str = "default"
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)  # builds `clip_config` from a dict / None
        vision = self.clip_config.vision_config
        if self.image_size is None:
            self.image_size = PAPER_GRID * self.patch_size
        if self.vision_feature_layers is None:
            self.vision_feature_layers = default_feature_layers(vision.num_hidden_layers)
        self.vision_feature_layers = [int(i) for i in self.vision_feature_layers]
        self.neck_hidden_sizes = [int(c) for c in self.neck_hidden_sizes]
        if self.projector_hidden_size is None and len(self.neck_hidden_sizes) == 3:
            self.projector_hidden_size = self.neck_hidden_sizes[1] // 2
        self._validate(vision)
        validate_no_target_config(self)

    @property
    def patch_size(self) -> int:
        return int(self.clip_config.vision_config.patch_size)

    @property
    def grid_size(self) -> int:
        """Tokens per side of the image grid (the 1/16 level): `image_size // patch_size`."""
        return self.image_size // self.patch_size

    @property
    def hidden_size(self) -> int:
        """Width `C` of the neck output and the decoder (`neck_hidden_sizes[1]`)."""
        return self.neck_hidden_sizes[1]

    def _validate(self, vision) -> None:
        def positive_int(name, value=None):
            value = getattr(self, name) if value is None else value
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")

        for name in ("image_size", "decoder_num_layers", "decoder_num_heads", "decoder_ffn_dim",
                     "projector_hidden_size", "projector_kernel_size", "word_length"):
            positive_int(name)
        if self.image_size % self.patch_size:
            raise ValueError(f"`image_size` ({self.image_size}) must be a multiple of the patch size ({self.patch_size})")
        if self.grid_size < 2:
            raise ValueError(f"`image_size` ({self.image_size}) must give at least 2x2 tokens (patch {self.patch_size})")
        layers = self.vision_feature_layers
        depth = vision.num_hidden_layers
        if len(layers) != 3 or any(not 1 <= i <= depth for i in layers) or sorted(set(layers)) != layers:
            raise ValueError(
                f"`vision_feature_layers` must be three increasing 1-based layer indices in [1, {depth}], got {layers!r}"
            )
        if len(self.neck_hidden_sizes) != 3 or any(c < 1 for c in self.neck_hidden_sizes):
            raise ValueError(f"`neck_hidden_sizes` must be three positive ints (1/8, 1/16, 1/32), got {self.neck_hidden_sizes!r}")
        if self.hidden_size % self.decoder_num_heads:
            raise ValueError(
                f"`decoder_num_heads` ({self.decoder_num_heads}) must divide `neck_hidden_sizes[1]` ({self.hidden_size})"
            )
        if self.hidden_size % 4:
            raise ValueError(f"`neck_hidden_sizes[1]` ({self.hidden_size}) must be a multiple of 4 (2-D sine encoding)")
        if self.clip_config.text_config.hidden_size % 2:
            raise ValueError("the CLIP text width must be even (1-D sine encoding of the words)")
        if self.projector_kernel_size % 2 == 0:
            raise ValueError(f"`projector_kernel_size` must be odd, got {self.projector_kernel_size}")
        if self.word_length < MIN_WORD_LENGTH:
            raise ValueError(
                f"`word_length` must be at least {MIN_WORD_LENGTH} ([SOS], one word, [EOS]), got {self.word_length}"
            )
        max_positions = self.clip_config.text_config.max_position_embeddings
        if self.word_length > max_positions:
            raise ValueError(f"`word_length` ({self.word_length}) exceeds CLIP's {max_positions} text positions")
        if not 0.0 <= self.decoder_dropout < 1.0:
            raise ValueError(f"`decoder_dropout` must be in [0, 1), got {self.decoder_dropout!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"`threshold` must be in (0, 1), got {self.threshold!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"`resize_mode` must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.mask_resample not in MASK_RESAMPLES:
            raise ValueError(f"`mask_resample` must be one of {MASK_RESAMPLES}, got {self.mask_resample!r}")
        if self.backbone_learning_rate_scale < 0:
            raise ValueError(f"`backbone_learning_rate_scale` must be >= 0, got {self.backbone_learning_rate_scale!r}")
        if not 0.0 < self.batch_norm_momentum <= 1.0:
            raise ValueError(f"`batch_norm_momentum` must be in (0, 1], got {self.batch_norm_momentum!r}")
        if self.training_stage not in TRAINING_STAGES:
            raise ValueError(f"`training_stage` must be one of {TRAINING_STAGES}, got {self.training_stage!r}")


__all__ = [
    "MASK_RESAMPLES", "MIN_WORD_LENGTH", "PAPER_GRID", "RESIZE_MODES", "TRAINING_STAGES", "CrisConfig",
    "default_feature_layers",
]
