"""CRIS: a fine-tuned CLIP, a cross-modal neck, a vision-language decoder and a dynamic-kernel projector.

Wang et al., "CRIS: CLIP-Driven Referring Image Segmentation" (CVPR 2022). The CLIP towers are the stock
`transformers.CLIPModel` (`model.clip`), fine-tuned with the heads (at 0.1x the learning rate, through
`refseg.training.METHODS["cris"].param_groups`). `transformers`' CLIP is ViT-only, so three ViT layers
stand in for the paper's ResNet stages C3, C4, C5 (see `CrisConfig.vision_feature_layers`).
"""

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel

from ...adapters.model_mixin import AdaptedModelMixin
from ...losses import bce_loss
from ...modeling_outputs import ReferringSegmentationOutput
from ...no_target import NoTargetHead, add_no_target_loss
from ...modeling_utils import (
    RecordedTower, ReferringSegmentationPreTrainedModel, check_required_inputs, check_text_inputs, referring_forward,
    unique_rows,
)
from .configuration_cris import TRAINING_STAGES, CrisConfig
from .modeling_cris_heads import CrisAttention, CrisDecoder, CrisNeck, CrisProjector

logger = logging.getLogger(__name__)

# CLIP parameters CRIS never uses: frozen so that they are not counted (or held by the optimizer) as trained.
_UNUSED_CLIP_PARAMETERS = ("logit_scale",)


class CrisPreTrainedModel(ReferringSegmentationPreTrainedModel):
    """Weight initialisation and loading plumbing shared by CRIS models.

    `_init_weights` initialises CRIS's own modules; the CLIP sub-model's modules go to CLIP's own
    `_init_weights` (transformers hands each sub-`PreTrainedModel` its modules), and tensors loaded from a
    checkpoint are never re-initialised.
    """

    config_class = CrisConfig
    config: CrisConfig
    base_model_prefix = "cris"
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPVisionEmbeddings", "CLIPEncoderLayer", "CrisDecoderLayer"]


class CrisModel(AdaptedModelMixin, CrisPreTrainedModel):
    """CRIS for referring image segmentation.

    Modules:
        clip: the stock `CLIPModel`, fine-tuned. Its image tower gives the three visual levels, its text tower
            the word features F_t (final-LN hidden states, CLIP's text width) and the sentence feature F_s
            (the [EOS] token through `text_projection`).
        neck: `CrisNeck` (eqs. 1-4), F_v at the token grid (1/16) with `neck_hidden_sizes[1]` channels.
        decoder: `CrisDecoder` (eqs. 5-7), self-attention over pixels, cross-attention to the words.
        projector: `CrisProjector` (eq. 8), z_v at 4x the grid and a per-sample dynamic kernel from F_s.

    Visual levels (ViT standing in for the ResNet): the patch tokens after the 1-based image layers
    `vision_feature_layers` (default 4, 8, 12 for ViT-B/16), reshaped to the (h, w) token grid; the first is
    upsampled x2 (bilinear, 1/8), the second kept (1/16), the third passed through CLIP's `post_layernorm`
    and `visual_projection` and average-pooled x2 (1/32), the pyramid the neck was designed for.

    One image, many expressions: the image tower does not see the text, so identical rows of
    `pixel_values` (the processor repeats an image once per expression) are encoded once and their features
    shared (`config.share_image_encoding`). `get_visual_levels` / `get_word_features` run one tower alone
    (benchmarks compare the full forward with them).

    Trainable weights: CRIS fine-tunes CLIP, so `trainable_state_dict()` (what training checkpoints keep)
    holds every weight: `clip`, `neck`, `decoder`, `projector`.

    Example:

    ```python
    >>> from refseg import CrisModel, CrisProcessor
    >>> model = CrisModel.from_backbones(clip="openai/clip-vit-base-patch16")   # 416 px, 26x26 tokens
    >>> processor = CrisProcessor.from_backbones(clip="openai/clip-vit-base-patch16")
    >>> inputs = processor(images=image, text=["the giraffe looking up", "the tree"], return_tensors="pt")
    >>> original_sizes = inputs["original_sizes"]  # model(**inputs) accepts it too
    >>> masks = processor.post_process_referring_segmentation(model(**inputs), original_sizes)  # threshold 0.35
    ```
    """

    # backbone towers whose per-layer outputs `output_hidden_states` / `output_attentions` return
    _recorded_towers = (
        RecordedTower("vision", "clip.vision_model.encoder.layers", "self_attn"),
        RecordedTower("text", "clip.text_model.encoder.layers", "self_attn"),
    )
    # the heads' attention modules whose weights `output_attentions` returns (`decoder_attentions`)
    _head_attention_classes = (CrisAttention,)

    modules_to_save = ("clip", "neck", "decoder", "projector")
    training_stages = TRAINING_STAGES
    backbone_attributes = {"clip": "clip"}

    def __init__(self, config: CrisConfig, clip_model: Optional[CLIPModel] = None):
        super().__init__(config)
        clip_config = config.clip_config
        # 1. the stock CLIP (loaded by `from_backbones`, random otherwise)
        self.clip = self._stock_clip(clip_model)
        vision_width = clip_config.vision_config.hidden_size
        text_width = clip_config.text_config.hidden_size
        projection_dim = clip_config.projection_dim
        # 2. neck, decoder, projector
        self.neck = CrisNeck([vision_width, vision_width, projection_dim], config.neck_hidden_sizes, projection_dim)
        self.decoder = CrisDecoder(config.hidden_size, config.decoder_num_layers, config.decoder_num_heads,
                                   config.decoder_ffn_dim, text_width, config.decoder_dropout)
        self.projector = CrisProjector(config.hidden_size, config.projector_hidden_size, projection_dim,
                                       config.projector_kernel_size)
        for module in (*self.neck.modules(), *self.projector.modules()):
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = config.batch_norm_momentum
        # 3. generalized RIS: the presence head on F_s, the decoded pixels F_c and the projector's logits
        self.no_target_head = None
        if config.no_target_head:
            self.no_target_head = NoTargetHead(projection_dim, config.hidden_size)
            self.modules_to_save = type(self).modules_to_save + ("no_target_head",)
        self.post_init()
        self.set_training_stage(config.training_stage)

    @classmethod
    def from_backbones(cls, clip: str, **overrides) -> "CrisModel":
        """Build CRIS on a pretrained CLIP checkpoint (Hub id or local folder).

        Args:
            clip (`str` or `os.PathLike`): passed to `CLIPModel.from_pretrained`.
            **overrides: `CrisConfig` fields (e.g. `image_size`, `word_length`) and loading arguments for
                `from_pretrained` (`dtype`, `revision`, `cache_dir`, `token`, `local_files_only`,
                `attn_implementation`, `device_map`). `image_size` defaults to 26 x the patch size (416 for
                ViT-B/16).
        """
        return cls._from_clip(clip, **overrides)

    # ----------------------------------------------------------------- the one stage
    def set_training_stage(self, stage: str) -> None:
        """Everything trains (CLIP's unused `logit_scale` excepted); records the stage in the config."""
        if stage not in TRAINING_STAGES:
            raise ValueError(f"`stage` must be one of {TRAINING_STAGES}, got {stage!r}")
        self.config.training_stage = stage
        self.requires_grad_(True)
        for name in _UNUSED_CLIP_PARAMETERS:
            getattr(self.clip, name).requires_grad_(False)

    def _at_base_rate(self, name: str) -> bool:
        # the authors' groups: CLIP's position embeddings train with the heads (config flag)
        return self.config.backbone_position_embeddings_at_base_rate and "position_embedding" in name

    def backbone_parameters(self) -> list:
        """The trainable CLIP parameters (the 0.1x learning-rate group); without the two position embeddings
        when `config.backbone_position_embeddings_at_base_rate`."""
        return [p for n, p in self.clip.named_parameters() if p.requires_grad and not self._at_base_rate(n)]

    def head_parameters(self) -> list:
        """The trainable parameters of the neck, decoder and projector (the base learning-rate group), then
        CLIP's position embeddings when `config.backbone_position_embeddings_at_base_rate`."""
        modules = [self.neck, self.decoder, self.projector] + ([self.no_target_head] if self.no_target_head else [])
        heads = [p for m in modules for p in m.parameters() if p.requires_grad]
        return heads + [p for n, p in self.clip.named_parameters() if p.requires_grad and self._at_base_rate(n)]

    # ----------------------------------------------------------------- the towers alone
    def get_visual_levels(self, pixel_values: torch.Tensor) -> tuple:
        """The image tower alone: `pixel_values` (U, 3, H, W) -> the neck's three visual levels
        ((U, C_v, 2h, 2w), (U, C_v, h, w), (U, D, h/2, w/2)), h, w the token grid."""
        vision = self.clip.vision_model
        batch, _, height, width = pixel_values.shape
        grid = (height // self.config.patch_size, width // self.config.patch_size)
        outputs = vision(pixel_values=pixel_values, interpolate_pos_encoding=True, output_hidden_states=True)
        hidden = outputs.hidden_states  # (embeddings, layer 1, ..., layer L), each (U, 1 + h*w, C_v)

        def to_map(tokens):
            return tokens[:, 1:].transpose(1, 2).reshape(batch, -1, *grid)

        first, second, last = self.config.vision_feature_layers
        c3 = F.interpolate(to_map(hidden[first]), scale_factor=2.0, mode="bilinear", align_corners=False)  # 1/8
        c4 = to_map(hidden[second])  # 1/16
        projected = self.clip.visual_projection(vision.post_layernorm(hidden[last]))
        c5 = F.avg_pool2d(to_map(projected), 2, 2, ceil_mode=True)  # 1/32
        return c3, c4, c5

    def get_word_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
        """The text tower alone: -> word features F_t (B, T, C_t) and the sentence feature F_s (B, D), the
        [EOS] (last real) token through `text_projection`."""
        words = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        eos_index = (attention_mask.to(torch.long) * positions).argmax(dim=-1)
        eos = words[torch.arange(words.shape[0], device=words.device), eos_index]
        return words, self.clip.text_projection(eos)

    # ----------------------------------------------------------------- forward
    def _check_inputs(self, pixel_values, input_ids, attention_mask, kwargs):
        check_required_inputs(pixel_values, input_ids, kwargs)
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"`pixel_values` must be (B, 3, H, W), got shape {tuple(pixel_values.shape)}")
        patch = self.config.patch_size
        height, width = pixel_values.shape[-2:]
        if height % patch or width % patch or height < 2 * patch or width < 2 * patch:
            raise ValueError(
                f"`pixel_values` height and width must be multiples of the patch size {patch} (at least 2 tokens), "
                f"got {height}x{width}"
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
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): normalised images, H and W multiples of
                the patch size (the processor gives `image_size` x `image_size`); rows may repeat an image.
            input_ids (`torch.LongTensor` of shape `(B, T)`): CLIP token ids, one expression per row.
            attention_mask (`torch.LongTensor` of shape `(B, T)`, *optional*): 1 for tokens, 0 for padding
                (masked in the decoder's cross-attention).
            labels (`torch.FloatTensor` of shape `(B, H, W)`, *optional*): binary target masks at the input size
                (or already at the `logits` size); the loss is the text-to-pixel contrastive loss (eqs. 9-10),
                sigmoid BCE over the pixels of `logits` against the target downsampled with nearest-exact.

        Returns:
            `ReferringSegmentationOutput` with `logits` (B, 4h, 4w): the text-to-pixel scores z_t * z_v at 4x
            the token grid (1/4 of the input for patch 16: 104x104 at 416 px), *not* upsampled; the
            processor's `post_process_referring_segmentation` upsamples them to the original size and
            thresholds the sigmoid at `config.threshold` (0.35). `coarse_logits` is `None` (CRIS has no
            token-level map). `image_embeds` (B, h*w, C) is F_c, `text_embeds` (B, D) is F_s.
        """
        self._check_inputs(pixel_values, input_ids, attention_mask, kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # 1. image tower, once per distinct image
        if self.config.share_image_encoding and pixel_values.shape[0] > 1:
            representatives, inverse = unique_rows(pixel_values)
            levels = self.get_visual_levels(pixel_values[representatives])
            if len(representatives) < pixel_values.shape[0]:
                levels = tuple(level[inverse] for level in levels)
        else:
            levels = self.get_visual_levels(pixel_values)
        # 2. text tower: words F_t and sentence F_s
        words, sentence = self.get_word_features(input_ids, attention_mask)
        # 3. neck (eqs. 1-4): F_v (B, C, h, w)
        visual = self.neck(levels, sentence)
        # 4. vision-language decoder (eqs. 5-7): F_c (B, C, h, w)
        decoded = self.decoder(visual, words, attention_mask.bool())
        # 5. projector (eq. 8): logits (B, 4h, 4w)
        logits = self.projector(decoded, sentence)
        # 6. generalized RIS: does the expression name anything here? (`refseg.no_target`)
        no_target_logits = None
        if self.no_target_head is not None:
            no_target_logits = self.no_target_head(sentence, decoded, logits)
        # 7. text-to-pixel contrastive loss (eqs. 9-10) (+ the presence term)
        loss, loss_dict = None, None
        if labels is not None:
            loss, loss_dict = self._loss(labels, logits, pixel_values.shape[-2:])
            loss, loss_dict = add_no_target_loss(self.config, no_target_logits, labels, loss, loss_dict)
        return ReferringSegmentationOutput(
            loss=loss, logits=logits, coarse_logits=None, image_embeds=decoded.flatten(2).transpose(1, 2),
            text_embeds=sentence, loss_dict=loss_dict, no_target_logits=no_target_logits,
        )

    def _loss(self, labels, logits, input_size):
        if labels.dim() != 3 or labels.shape[0] != logits.shape[0] or labels.shape[-2:] not in (input_size, logits.shape[-2:]):
            raise ValueError(
                f"`labels` must be (B, H, W) = {(logits.shape[0], *input_size)} (the input size) or "
                f"{tuple(logits.shape)} (the logits size), got {tuple(labels.shape)}"
            )
        target = labels.to(logits.dtype)
        if target.shape[-2:] != logits.shape[-2:]:
            target = F.interpolate(target.unsqueeze(1), size=logits.shape[-2:], mode="nearest-exact").squeeze(1)
        loss = bce_loss(logits, target)
        return loss, {"bce": loss.detach()}


__all__ = ["CrisModel", "CrisPreTrainedModel", "unique_rows"]
