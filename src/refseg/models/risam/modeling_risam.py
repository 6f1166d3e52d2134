"""RISAM: a frozen SAM image encoder and a frozen CLIP text encoder, Feature Enhancement, Mutual-Aware
Attention and the Mutual-Aware Mask Decoder.

Zhang et al., "RISAM: Referring Image Segmentation via Mutual-Aware Attention Features". Only about 1 % of
the parameters train (about 6M at ViT-H): the encoders are the stock `transformers` modules, frozen, and run
without autograd history.
"""

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPTextModel, SamConfig, SamVisionModel
from transformers import initialization as init

from ...adapters.model_mixin import AdaptedModelMixin
from ...losses import dice_loss, sigmoid_focal_loss
from ...modeling_outputs import ReferringSegmentationOutput
from ...no_target import NoTargetHead, add_no_target_loss
from ...modeling_utils import (
    LOADING_KWARGS,
    RecordedTower,
    ReferringSegmentationPreTrainedModel,
    check_required_inputs,
    check_text_inputs,
    referring_forward,
    sine_positions_1d,
    unique_rows,
)
from .configuration_risam import TRAINING_STAGES, RisamConfig
from .modeling_risam_heads import RisamAttention, RisamFeatureEnhancement, RisamMaskDecoder, RisamMutualAwareAttention

logger = logging.getLogger(__name__)


class RisamPreTrainedModel(ReferringSegmentationPreTrainedModel):
    """Weight initialisation and loading plumbing shared by RISAM models (the encoders' modules go to their
    own `_init_weights`; loaded tensors are never re-initialised)."""

    config_class = RisamConfig
    config: RisamConfig
    base_model_prefix = "risam"
    _no_split_modules = ["SamVisionLayer", "CLIPEncoderLayer", "RisamDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        """The base initialisation, except: linear layers get PyTorch's default (Kaiming-uniform, a = sqrt(5),
        as SAM's own heads), and the multi-modal query token is standard normal. With the base's N(0, 0.02)
        the three-layer query MLP times the upsampled features starts the logits near 1e-3, so a fresh model's
        masks hardly differ between expressions."""
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)
            return
        super()._init_weights(module)
        if isinstance(module, RisamMaskDecoder):
            init.normal_(module.query_token.weight, std=1.0)  # the random multi-modal query token


def _encoder_context(module: nn.Module):
    """`torch.no_grad()` when every parameter of `module` is frozen: a frozen encoder keeps no activations
    for backward (nothing upstream of it needs gradients)."""
    frozen = not any(p.requires_grad for p in module.parameters())
    return torch.no_grad() if frozen else torch.enable_grad()


class RisamModel(AdaptedModelMixin, RisamPreTrainedModel):
    """RISAM for referring image segmentation.

    Modules:
        sam: the stock `SamVisionModel` (SAM's image encoder alone), frozen. The outputs of the blocks
            `config.feature_layers` (the 2nd-4th global-attention blocks) are F_v1, F_v2, F_v3.
        clip: the stock `CLIPTextModel` (CLIP's text tower alone), frozen; its final-LN hidden states are F_l.
        feature_enhancement: `RisamFeatureEnhancement` (eqs. 1-2), F_v (B, C, h, w).
        mutual_attention: `num_mutual_attention_blocks` `RisamMutualAwareAttention` blocks (eqs. 3-5).
        mask_decoder: `RisamMaskDecoder` (eqs. 6-9), logits at 4x the grid.

    Only the towers RISAM uses are built, loaded and saved: `from_backbones` loads `SamVisionModel` from the
    SAM checkpoint (its `vision_encoder.*` weights; the prompt encoder and mask decoder are never
    materialised) and `CLIPTextModel` from the CLIP checkpoint (its `text_model.*` weights; no image tower).
    The configs keep the whole `SamConfig` / `CLIPConfig` so that the model records what it was built from.
    SAM's vision encoder includes its neck, which RISAM does not read; it is kept so `self.sam` stays the
    stock module (its cost is about 0.1 % of the ViT at ViT-H).

    One image, many expressions: SAM and the Feature Enhancement do not see the text, so identical rows of
    `pixel_values` (the processor repeats an image once per expression) are encoded once
    (`config.share_image_encoding`).

    Trainable weights: `trainable_state_dict()` (what training checkpoints keep) holds
    `feature_enhancement`, `mutual_attention` and `mask_decoder` only.

    Example:

    ```python
    >>> from refseg import RisamModel, RisamProcessor
    >>> model = RisamModel.from_backbones(sam="facebook/sam-vit-huge", clip="openai/clip-vit-base-patch16")
    >>> processor = RisamProcessor.from_backbones(sam="facebook/sam-vit-huge", clip="openai/clip-vit-base-patch16")
    >>> inputs = processor(images=image, text=["the giraffe looking up", "the tree"], return_tensors="pt")
    >>> original_sizes = inputs["original_sizes"]  # model(**inputs) accepts it too
    >>> masks = processor.post_process_referring_segmentation(model(**inputs), original_sizes)  # threshold 0.35
    ```
    """

    # backbone towers whose per-layer outputs `output_hidden_states` / `output_attentions` return
    _recorded_towers = (
        RecordedTower("vision", "sam.vision_encoder.layers", "attn"),
        RecordedTower("text", "clip.encoder.layers", "self_attn"),
    )
    # the heads' attention modules whose weights `output_attentions` returns (`decoder_attentions`)
    _head_attention_classes = (RisamAttention,)

    modules_to_save = ("feature_enhancement", "mutual_attention", "mask_decoder")
    training_stages = TRAINING_STAGES
    backbone_attributes = {"sam": "sam", "clip": "clip"}

    def __init__(self, config: RisamConfig, sam_model: Optional[SamVisionModel] = None,
                 clip_model: Optional[CLIPTextModel] = None):
        super().__init__(config)
        # 1. the stock encoders (loaded by `from_backbones`, random otherwise)
        for sub in (config.sam_config.vision_config, config.clip_config.text_config):
            if sub._attn_implementation is None:  # building a config resets sub-configs' choice
                sub._attn_implementation = config._attn_implementation
        self.sam = sam_model if sam_model is not None else SamVisionModel._from_config(config.sam_config.vision_config)
        self.clip = clip_model if clip_model is not None else CLIPTextModel._from_config(config.clip_config.text_config)
        sam_width = config.sam_config.vision_config.hidden_size
        text_width = config.clip_config.text_config.hidden_size
        hidden = config.hidden_size
        # 2. the heads
        self.feature_enhancement = RisamFeatureEnhancement(sam_width, hidden)
        self.mutual_attention = nn.ModuleList(
            RisamMutualAwareAttention(hidden, text_width if i == 0 else hidden, hidden, config.relevance_threshold,
                                      config.relevance_mask_reading)
            for i in range(config.num_mutual_attention_blocks)
        )
        self.mask_decoder = RisamMaskDecoder(hidden, config.decoder_num_layers, config.decoder_num_heads,
                                             config.decoder_mlp_dim, config.upsample_hidden_sizes,
                                             word_positions=config.word_position_encoding == "decoder")
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = config.batch_norm_momentum
        # generalized RIS: the presence head on the query token, the decoder's pixels and the mask logits
        self.no_target_head = None
        if config.no_target_head:
            self.no_target_head = NoTargetHead(hidden, hidden)
            self.modules_to_save = type(self).modules_to_save + ("no_target_head",)
        self.post_init()
        self.set_training_stage(config.training_stage)

    @classmethod
    def from_backbones(cls, sam: str, clip: str, **overrides) -> "RisamModel":
        """Build RISAM on pretrained SAM and CLIP checkpoints (Hub ids or local folders).

        Only SAM's image encoder (`SamVisionModel.from_pretrained(sam)`) and CLIP's text tower
        (`CLIPTextModel.from_pretrained(clip)`) are loaded; the other weights of both checkpoints are skipped.

        Args:
            sam (`str` or `os.PathLike`): a `SamModel` checkpoint (`facebook/sam-vit-huge`).
            clip (`str` or `os.PathLike`): a `CLIPModel` checkpoint (`openai/clip-vit-base-patch16`).
            **overrides: `RisamConfig` fields (e.g. `word_length`, `relevance_threshold`) and loading arguments
                for `from_pretrained` (`dtype`, `revision`, `cache_dir`, `token`, `local_files_only`,
                `attn_implementation`, `device_map`).
        """
        from transformers.utils import logging as hf_logging

        loading = {k: overrides.pop(k) for k in LOADING_KWARGS if k in overrides}
        config_loading = {k: v for k, v in loading.items() if k in ("cache_dir", "revision", "token", "local_files_only")}
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the skipped towers would be listed as "unexpected" weights
        try:
            sam_model = SamVisionModel.from_pretrained(sam, **loading)
            clip_model = CLIPTextModel.from_pretrained(clip, **loading)
        finally:
            hf_logging.set_verbosity(verbosity)
        sam_config = SamConfig.from_pretrained(sam, **config_loading)
        clip_config = CLIPConfig.from_pretrained(clip, **config_loading)
        sam_config.vision_config, clip_config.text_config = sam_model.config, clip_model.config
        # record the checkpoints (exported cards and `from_adapter_weights` read them back)
        sam_config._name_or_path, clip_config._name_or_path = str(sam), str(clip)
        attn_implementation = sam_model.config._attn_implementation  # read first: building a config resets it
        config = cls.config_class(sam_config=sam_config, clip_config=clip_config, **overrides)
        config._attn_implementation = attn_implementation  # sets it on the SAM and CLIP sub-configs too
        return cls(config, sam_model=sam_model, clip_model=clip_model).to(clip_model.dtype)  # added modules too

    # ----------------------------------------------------------------- the one stage
    def set_training_stage(self, stage: str) -> None:
        """The heads train; SAM's image encoder and CLIP's text tower stay frozen. Records the stage."""
        if stage not in TRAINING_STAGES:
            raise ValueError(f"`stage` must be one of {TRAINING_STAGES}, got {stage!r}")
        self.config.training_stage = stage
        self.requires_grad_(False)
        for name in self.modules_to_save:
            getattr(self, name).requires_grad_(True)

    # ----------------------------------------------------------------- the encoders alone
    def get_visual_levels(self, pixel_values: torch.Tensor) -> tuple:
        """SAM's image encoder alone: `pixel_values` (U, 3, S, S) -> (F_v1, F_v2, F_v3), the outputs of the
        blocks `config.feature_layers`, each (U, h, w, C_sam)."""
        with _encoder_context(self.sam):
            hidden = self.sam(pixel_values=pixel_values.to(self.sam.dtype), output_hidden_states=True).hidden_states
        return tuple(hidden[i + 1] for i in self.config.feature_layers)  # hidden[0]: the patch embeddings

    def get_word_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """CLIP's text tower alone: -> F_l (B, T, C_t), the final-LN hidden states."""
        with _encoder_context(self.clip):
            return self.clip(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """SAM features through the Feature Enhancement (what does not depend on the text), once per distinct
        row when `config.share_image_encoding`: (B, C, h, w)."""
        if self.config.share_image_encoding and pixel_values.shape[0] > 1:
            representatives, inverse = unique_rows(pixel_values)
            visual = self.feature_enhancement(*self.get_visual_levels(pixel_values[representatives]))
            return visual[inverse] if len(representatives) < pixel_values.shape[0] else visual
        return self.feature_enhancement(*self.get_visual_levels(pixel_values))

    # ----------------------------------------------------------------- forward
    def _check_inputs(self, pixel_values, input_ids, attention_mask, kwargs):
        check_required_inputs(pixel_values, input_ids, kwargs)
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"`pixel_values` must be (B, 3, {size}, {size}) (SAM's padded input), got {tuple(pixel_values.shape)}"
            )
        check_text_inputs(input_ids, attention_mask, pixel_values.shape[0],
                          self.config.clip_config.text_config.max_position_embeddings)

    @referring_forward
    def forward(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.LongTensor] = None,
        labels: Optional[torch.FloatTensor] = None,
        **kwargs,
    ) -> ReferringSegmentationOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, S, S)`): SAM-processed images (longest side
                resized to S = `config.image_size`, normalised, zero-padded bottom/right); rows may repeat an image.
            input_ids (`torch.LongTensor` of shape `(B, T)`): CLIP token ids, one expression per row.
            attention_mask (`torch.LongTensor` of shape `(B, T)`, *optional*): 1 for tokens, 0 for padding
                (masked in every attention over the words).
            labels (`torch.FloatTensor` of shape `(B, S, S)`, *optional*): binary target masks in the padded
                input frame (or already at the `logits` size); the loss is `focal_weight` x focal (gamma 2) +
                `dice_weight` x dice (eqs. 10-12) on `logits` upsampled (bilinear) to the labels' size.

        Returns:
            `ReferringSegmentationOutput` with `logits` (B, 4h, 4w): mask logits at 4x SAM's grid (256x256 at
            1024 px), in the padded frame; the processor's `post_process_referring_segmentation` crops the
            padding, resizes to the original size and thresholds the sigmoid at `config.threshold` (0.35).
            `coarse_logits` is `None` (RISAM has no token-level map). `image_embeds` (B, h*w, C) is F_lav after
            the last Mutual-Aware Attention block, `text_embeds` (B, T, C) is F_val.
        """
        self._check_inputs(pixel_values, input_ids, attention_mask, kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        word_mask = attention_mask.bool()
        # 1. SAM features and the Feature Enhancement (eqs. 1-2), once per distinct image: F_v (B, C, h, w)
        visual = self.encode_image(pixel_values)
        grid = tuple(visual.shape[-2:])
        visual = visual.flatten(2).transpose(1, 2)  # (B, h*w, C)
        # 2. CLIP text: F_l (B, T, C_t)
        words = self.get_word_features(input_ids, attention_mask).to(visual.dtype)
        if self.config.word_position_encoding == "text_features":  # Fig. 3: Pos. Enc. on F_l before the blocks
            words = words + sine_positions_1d(words.shape[1], words.shape[2], device=words.device, dtype=words.dtype)
        # 3. Mutual-Aware Attention (eqs. 3-5): F_lav (B, h*w, C), F_val (B, T, C)
        for block in self.mutual_attention:
            visual, words = block(visual, words, word_mask)
        # 4. Mutual-Aware Mask Decoder (eqs. 6-9): logits (B, 4h, 4w)
        no_target_logits = None
        if self.no_target_head is None:
            logits = self.mask_decoder(visual, words, word_mask, grid)
        else:  # generalized RIS: the presence head on the query token and the decoder's pixels (`refseg.no_target`)
            logits, query, pixel_map = self.mask_decoder(visual, words, word_mask, grid, return_state=True)
            no_target_logits = self.no_target_head(query, pixel_map, logits)
        loss, loss_dict = None, None
        if labels is not None:
            loss, loss_dict = self._loss(labels, logits, pixel_values.shape[-2:])
            loss, loss_dict = add_no_target_loss(self.config, no_target_logits, labels, loss, loss_dict)
        return ReferringSegmentationOutput(loss=loss, logits=logits, coarse_logits=None, image_embeds=visual,
                                           text_embeds=words, loss_dict=loss_dict, no_target_logits=no_target_logits)

    def _loss(self, labels, logits, input_size):
        if labels.dim() != 3 or labels.shape[0] != logits.shape[0] or labels.shape[-2:] not in (input_size, logits.shape[-2:]):
            raise ValueError(
                f"`labels` must be (B, H, W) = {(logits.shape[0], *input_size)} (the input size) or "
                f"{tuple(logits.shape)} (the logits size), got {tuple(labels.shape)}"
            )
        target = labels.to(logits.dtype)
        if target.shape[-2:] != logits.shape[-2:]:
            logits = F.interpolate(logits.unsqueeze(1), size=target.shape[-2:], mode="bilinear",
                                   align_corners=False).squeeze(1)
        focal = sigmoid_focal_loss(logits, target, alpha=None, gamma=self.config.focal_gamma)
        dice = dice_loss(logits, target)
        loss = self.config.focal_weight * focal + self.config.dice_weight * dice
        return loss, {"focal": focal.detach(), "dice": dice.detach()}


__all__ = ["RisamModel", "RisamPreTrainedModel"]
