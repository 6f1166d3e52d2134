"""RISAM configuration."""

import logging

from transformers import CLIPConfig, PreTrainedConfig, SamConfig
from transformers.configuration_utils import SubConfigSpec

from ...no_target import validate_no_target_config

logger = logging.getLogger(__name__)

# RISAM trains in one stage: Feature Enhancement, Mutual-Aware Attention and the decoder, both encoders frozen.
TRAINING_STAGES = ("default",)
# [SOS] and [EOS] plus at least one word.
MIN_WORD_LENGTH = 3
# The two readings of eq. 4 (`relevance_mask_reading`) and the two places of the word positional encoding
# (`word_position_encoding`); the first of each is the default (docs/risam.md: the measurement behind it).
RELEVANCE_MASK_READINGS = ("tau_account", "printed")
WORD_POSITION_ENCODINGS = ("text_features", "decoder")


def default_feature_layers(global_attn_indexes) -> list:
    """The blocks RISAM reads (0-based): the 2nd, 3rd and 4th global-attention blocks of the SAM ViT
    (15, 23, 31 for ViT-H; 5, 8, 11 for ViT-B). With fewer than four global blocks, the last three
    global blocks (or all of them, repeated from the first) stand in."""
    indexes = sorted(int(i) for i in global_attn_indexes)
    if len(indexes) >= 4:
        return indexes[1:4]
    if not indexes:
        raise ValueError("the SAM vision config has no `global_attn_indexes`")
    return ([indexes[0]] * 3 + indexes)[-3:]


class RisamConfig(PreTrainedConfig):
    r"""
    Configuration of a [`RisamModel`]: a frozen SAM image encoder (`sam_config`, only its vision part is
    built), a frozen CLIP text encoder (`clip_config`, only its text part is built) and RISAM's Feature
    Enhancement, Mutual-Aware Attention and Mutual-Aware Mask Decoder (Zhang et al., "RISAM: Referring Image
    Segmentation via Mutual-Aware Attention Features").

    Args:
        sam_config (`dict` or `SamConfig`, *optional*):
            The SAM backbone; defaults to `SamConfig()` (SAM ViT-B's architecture: 768 wide, 12 blocks, global
            attention at 2, 5, 8, 11, 1024 px). The `risam-h` preset is the paper's ViT-H.
        clip_config (`dict` or `CLIPConfig`, *optional*):
            The CLIP whose text tower encodes the expression (its image tower is never built); defaults to
            `CLIPConfig()` (the 12-layer, 512-wide text transformer of CLIP ViT-B).
        feature_layers (`list[int]`, *optional*):
            Three 0-based SAM ViT blocks whose outputs are the shallow, middle and deep features F_v1, F_v2,
            F_v3 (each (H, W, C_sam) at the embedding grid, 64x64 at 1024 px). Defaults to the 2nd, 3rd and 4th
            of `sam_config.vision_config.global_attn_indexes` (15, 23, 31 for ViT-H).
        hidden_size (`int`, *optional*, defaults to 256):
            Width C of the enhanced visual features, the Mutual-Aware Attention and the decoder.
        num_mutual_attention_blocks (`int`, *optional*, defaults to 2):
            Mutual-Aware Attention blocks in sequence (the paper's 2, Table 4).
        relevance_threshold (`float`, *optional*, defaults to 0.35):
            tau of eq. 4: a pixel-word pair whose relevance sigma(-s) is >= tau, i.e. whose scaled similarity s
            is <= log((1 - tau) / tau), is masked out of both attentions. `None` disables the relevance mask
            (Table 3's "w/o attn. mask"); text padding is masked always. Which pairs count as irrelevant
            depends on `relevance_mask_reading`.
        relevance_mask_reading (`str`, *optional*, defaults to `"tau_account"`):
            How eq. 4 is read. `"tau_account"`: as the paper's account of tau requires (Sec. 4.5.1, Fig. 8: a
            small tau lets irrelevant pairs through, a large one masks needed ones), the relevance is sigma(s)
            and a pair is masked where sigma(s) < tau (pairs with s < log(tau / (1 - tau)) = -0.62 at tau 0.35).
            `"printed"`: eq. 4 as printed, M = 1 / (1 + e^s) = sigma(-s) and a pair is masked where M >= tau
            (only pairs with s > log((1 - tau) / tau) = 0.62 stay): at initialisation nearly every pixel row is
            then fully masked and falls back to no relevance mask. docs/risam.md gives the RefShapes
            measurement behind the default.
        word_position_encoding (`str`, *optional*, defaults to `"text_features"`):
            Where the fixed 1-D sine encoding of the word positions goes. `"text_features"`: added once to the
            text features F_l before the first Mutual-Aware Attention block, width C' (the authors' overview
            figure, Fig. 3); the decoder then adds none. `"decoder"`: added to the queries and keys of eq. 8
            and to the keys of eq. 9 (as DETR and SAM add theirs), width `hidden_size`.
        decoder_num_layers (`int`, *optional*, defaults to 2):
            Mutual-Aware Mask Decoder blocks (eqs. 6-9). The paper stacks blocks without giving the number; 2
            matches SAM's two-way transformer, the decoder it replaces.
        decoder_num_heads (`int`, *optional*, defaults to 8):
            Heads of the decoder's attentions (must divide `hidden_size`); 8 as SAM's decoder.
        decoder_mlp_dim (`int`, *optional*, defaults to 0):
            Hidden width of a feed-forward block on the pixels at the end of each decoder block (after eq. 9);
            0 (the paper's eqs. 6-9, which have none) leaves it out.
        upsample_hidden_sizes (`list[int]`, *optional*):
            Channels after the two ConvTranspose + BN x2 upsamplings; defaults to `[hidden_size // 4,
            hidden_size // 8]` (64, 32, as SAM's mask decoder). The query MLP ends at the last width.
        word_length (`int`, *optional*, defaults to 17):
            Tokens per expression, [SOS] and [EOS] included: the paper's maximum word number, 17 for RefCOCO and
            25 for RefCOCO+ and G-Ref (set by the YAML configs). At least 3.
        no_target_head (`bool`, *optional*, defaults to `False`):
            Generalized referring segmentation: add the presence head (`refseg.no_target.NoTargetHead`) that
            says when the expression names nothing in the image. It reads the multi-modal query token after the mask decoder, the decoder's pixel features and the mask logits. Off in the paper presets, on in
            the `*-g` presets.
        no_target_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the head's BCE term (target: the label mask is empty) in the loss.
        no_target_threshold (`float`, *optional*, defaults to 0.5):
            Post-processing returns an empty mask where `sigmoid(no_target_logits)` exceeds it.
        threshold (`float`, *optional*, defaults to 0.35):
            Probability threshold of the final mask (the paper's).
        focal_weight, dice_weight (`float`, *optional*, default to 0.5):
            Weights of the focal and dice losses (eq. 12).
        focal_gamma (`float`, *optional*, defaults to 2.0):
            Focusing exponent of the focal loss (eq. 10, no alpha weighting).
        batch_norm_momentum (`float`, *optional*, defaults to 0.1):
            Momentum of the running statistics of every BatchNorm (Feature Enhancement, upsampling).
        share_image_encoding (`bool`, *optional*, defaults to `True`):
            Encode identical rows of `pixel_values` (one image paired with several expressions) once: SAM and
            the Feature Enhancement do not see the text. In training, the Feature Enhancement's BatchNorm
            statistics are then taken over the distinct images of the batch, not over every row.
        training_stage (`str`, *optional*, defaults to `"default"`):
            The only stage: the heads train, both encoders stay frozen.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Kept for transformers' generic code; RISAM's own linear layers use PyTorch's default (Kaiming-uniform)
            initialisation instead (see `RisamPreTrainedModel._init_weights`).

    Example:

    ```python
    >>> from refseg import RisamConfig, RisamModel
    >>> from refseg.presets import get_config
    >>> model = RisamModel(get_config("risam-h"))   # the paper's ViT-H, random weights
    ```"""

    model_type = "risam"
    sub_configs_defaults = {"sam_config": SubConfigSpec(SamConfig), "clip_config": SubConfigSpec(CLIPConfig)}

    sam_config: dict | SamConfig | None = None
    clip_config: dict | CLIPConfig | None = None
    feature_layers: list | tuple | None = None
    hidden_size: int = 256
    num_mutual_attention_blocks: int = 2
    relevance_threshold: float | None = 0.35
    relevance_mask_reading: str = "tau_account"
    word_position_encoding: str = "text_features"
    decoder_num_layers: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 0
    upsample_hidden_sizes: list | tuple | None = None
    word_length: int = 17
    threshold: float = 0.35
    no_target_head: bool = False
    no_target_loss_weight: float = 1.0
    no_target_threshold: float = 0.5
    focal_weight: float = 0.5
    dice_weight: float = 0.5
    focal_gamma: float = 2.0
    batch_norm_momentum: float = 0.1
    share_image_encoding: bool = True
    training_stage: str = "default"
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)  # builds `sam_config` / `clip_config` from dicts / None
        vision = self.sam_config.vision_config
        if self.feature_layers is None:
            self.feature_layers = default_feature_layers(vision.global_attn_indexes)
        self.feature_layers = [int(i) for i in self.feature_layers]
        if self.upsample_hidden_sizes is None:
            self.upsample_hidden_sizes = [max(1, self.hidden_size // 4), max(1, self.hidden_size // 8)]
        self.upsample_hidden_sizes = [int(c) for c in self.upsample_hidden_sizes]
        self._validate(vision)
        validate_no_target_config(self)

    @property
    def image_size(self) -> int:
        """Side of the square (padded) model input: SAM's own input size (its absolute position embeddings fix it)."""
        return int(self.sam_config.vision_config.image_size)

    @image_size.setter
    def image_size(self, value):
        if value != self.image_size:
            raise ValueError(
                f"`image_size` of RISAM is SAM's input size ({self.image_size}), fixed by its position embeddings; "
                f"got {value!r}"
            )

    @property
    def patch_size(self) -> int:
        return int(self.sam_config.vision_config.patch_size)

    @property
    def grid_size(self) -> int:
        """Side of SAM's embedding grid (64 at 1024 px); the logits are 4x it."""
        return self.image_size // self.patch_size

    def _validate(self, vision) -> None:
        def positive_int(name, minimum=1):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")

        for name in ("hidden_size", "num_mutual_attention_blocks", "decoder_num_layers", "decoder_num_heads",
                     "word_length"):
            positive_int(name)
        positive_int("decoder_mlp_dim", minimum=0)
        depth = vision.num_hidden_layers
        layers = self.feature_layers
        if len(layers) != 3 or any(not 0 <= i < depth for i in layers) or sorted(layers) != layers:
            raise ValueError(
                f"`feature_layers` must be three non-decreasing 0-based SAM block indices in [0, {depth}), got {layers!r}"
            )
        if self.hidden_size % self.decoder_num_heads:
            raise ValueError(f"`decoder_num_heads` ({self.decoder_num_heads}) must divide `hidden_size` ({self.hidden_size})")
        if self.hidden_size % 2:
            raise ValueError(f"`hidden_size` must be even (1-D sine encoding of the words), got {self.hidden_size}")
        if len(self.upsample_hidden_sizes) != 2 or any(c < 1 for c in self.upsample_hidden_sizes):
            raise ValueError(f"`upsample_hidden_sizes` must be two positive ints, got {self.upsample_hidden_sizes!r}")
        if self.word_length < MIN_WORD_LENGTH:
            raise ValueError(
                f"`word_length` must be at least {MIN_WORD_LENGTH} ([SOS], one word, [EOS]), got {self.word_length}"
            )
        max_positions = self.clip_config.text_config.max_position_embeddings
        if self.word_length > max_positions:
            raise ValueError(f"`word_length` ({self.word_length}) exceeds CLIP's {max_positions} text positions")
        if self.relevance_threshold is not None and not 0.0 < self.relevance_threshold < 1.0:
            raise ValueError(f"`relevance_threshold` must be in (0, 1) or None, got {self.relevance_threshold!r}")
        if self.relevance_mask_reading not in RELEVANCE_MASK_READINGS:
            raise ValueError(
                f"`relevance_mask_reading` must be one of {RELEVANCE_MASK_READINGS}, got {self.relevance_mask_reading!r}"
            )
        if self.word_position_encoding not in WORD_POSITION_ENCODINGS:
            raise ValueError(
                f"`word_position_encoding` must be one of {WORD_POSITION_ENCODINGS}, got {self.word_position_encoding!r}"
            )
        text_width = self.clip_config.text_config.hidden_size
        if self.word_position_encoding == "text_features" and text_width % 2:
            raise ValueError(f"`word_position_encoding='text_features'` needs an even CLIP text width, got {text_width}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"`threshold` must be in (0, 1), got {self.threshold!r}")
        for name in ("focal_weight", "dice_weight", "focal_gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)!r}")
        if self.focal_weight == 0 and self.dice_weight == 0:
            raise ValueError("`focal_weight` and `dice_weight` cannot both be 0")
        if not 0.0 < self.batch_norm_momentum <= 1.0:
            raise ValueError(f"`batch_norm_momentum` must be in (0, 1], got {self.batch_norm_momentum!r}")
        if self.training_stage not in TRAINING_STAGES:
            raise ValueError(f"`training_stage` must be one of {TRAINING_STAGES}, got {self.training_stage!r}")


__all__ = ["MIN_WORD_LENGTH", "RELEVANCE_MASK_READINGS", "TRAINING_STAGES", "WORD_POSITION_ENCODINGS", "RisamConfig", "default_feature_layers"]
