"""Prompt-RIS: a frozen CLIP tuned by Cross-Modal Prompting prompts a frozen SAM with a mask, a point and text.

Shang et al., "Prompt-Driven Referring Image Segmentation with Instance Contrasting" (CVPR 2024). The backbones
are the stock `transformers.CLIPModel` (`model.clip`, both towers) and `transformers.SamModel` (`model.sam`:
image encoder, prompt encoder, mask decoder, shared positional embedding), both frozen. What Prompt-RIS adds to
CLIP goes in through `refseg.adapters` prompt tokens; what it feeds SAM goes through SAM's own prompt encoder
and mask decoder.
"""

import inspect
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, SamModel
from transformers import initialization as init
from transformers.masking_utils import create_causal_mask

from ...adapters.config import PromptTokenConfig
from ...adapters.injection import inject_adapter
from ...adapters.model_mixin import AdaptedModelMixin
from ...adapters.prompts import PromptedEncoderLayer  # noqa: F401  (registers the wrapper `inject_adapter` puts
# into CLIP's layers; imported here so that exported remote code carries it)
from ...losses import bce_loss, dice_loss, instance_contrastive_loss
from ...modeling_outputs import ReferringSegmentationOutput
from ...no_target import NoTargetHead, add_no_target_loss
from ...modeling_utils import (
    LOADING_KWARGS,
    RecordedTower,
    ReferringSegmentationPreTrainedModel,
    check_required_inputs,
    check_text_inputs,
    is_exporting,
    referring_forward,
    unique_rows,
)
from .configuration_prompt_ris import TRAINING_STAGES, PromptRisConfig
from .modeling_prompt_ris_heads import (
    PromptRisAttention,
    PromptRisCoarseDecoder,
    PromptRisCrossModalPrompting,
    PromptRisPromptGenerator,
    PromptRisTextPrompter,
)

# transformers 5.24 renamed `create_causal_mask`'s `past_key_values` to `cache`; earlier 5.x know only the old name.
_NO_CACHE = {"cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values": None}

logger = logging.getLogger(__name__)

# What trains in each stage (CLIP never trains; SAM only with `config.train_sam_decoder`, see SAM_DECODER_MODULES).
_STAGE_MODULES = {
    "coarse": ("cross_modal_prompting", "decoder"),
    "end_to_end": ("cross_modal_prompting", "decoder", "text_prompter"),
}
# The SAM parts `config.train_sam_decoder` trains in stage `end_to_end` (and keeps in the trainable weights): what
# the first mask depends on. The IoU head and the other mask tokens' hypernetworks get no gradient from it and stay
# frozen (a parameter that requires grad but gets none would also stop DistributedDataParallel).
SAM_DECODER_MODULES = (
    "sam.prompt_encoder.mask_embed", "sam.mask_decoder.iou_token", "sam.mask_decoder.mask_tokens",
    "sam.mask_decoder.transformer", "sam.mask_decoder.upscale_conv1", "sam.mask_decoder.upscale_layer_norm",
    "sam.mask_decoder.upscale_conv2", "sam.mask_decoder.output_hypernetworks_mlps.0",
)


class PromptRisPreTrainedModel(ReferringSegmentationPreTrainedModel):
    """Weight initialisation and loading plumbing shared by Prompt-RIS models (CLIP's and SAM's modules go to
    their own `_init_weights`; loaded tensors are never re-initialised)."""

    config_class = PromptRisConfig
    config: PromptRisConfig
    base_model_prefix = "prompt_ris"
    _no_split_modules = ["CLIPEncoderLayer", "PromptedEncoderLayer", "SamVisionLayer", "SamTwoWayAttentionBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        """The base initialisation, except: linear layers get PyTorch's default (Kaiming-uniform, a = sqrt(5), as
        SAM's heads and RISAM's), and the Cross-Modal Prompting query tokens are standard normal (so that their
        attention over the other tower is not uniform from the start)."""
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)
            return
        super()._init_weights(module)
        if isinstance(module, PromptRisPromptGenerator):
            init.normal_(module.query_tokens, std=1.0)


class PromptRisModel(AdaptedModelMixin, PromptRisPreTrainedModel):
    """Prompt-RIS for referring image segmentation.

    Modules:
        clip: the stock `CLIPModel`, frozen; every encoder layer of both towers is a `PromptedEncoderLayer`
            (`refseg.adapters`, `prompt_source="external"`) that prepends the prompts it is given to its input
            and drops them from its output.
        sam: the stock `SamModel`, frozen (image encoder, prompt encoder, mask decoder).
        cross_modal_prompting: `PromptRisCrossModalPrompting` (eqs. 5-6), n query tokens and a cross-attention
            per paired layer and direction.
        decoder: `PromptRisCoarseDecoder` (eqs. 1-2), the coarse map S'_C on CLIP's grid.
        text_prompter: `PromptRisTextPrompter`, the two blocks that make SAM text prompts of CLIP's words.

    Forward (Sec. 3.1):
        1. Both CLIP towers run in lockstep; before layer i (i = 1 .. K), V2L prompts for the text layer are
           computed from the image tower's input to layer i and L2V prompts for the image layer from the text
           tower's input (layer 1's from the embeddings), prepended to that layer's input and dropped after it.
           The text tower keeps its causal mask and padding; every word also sees the n prompts.
        2. The decoder gives S'_C (`coarse_logits`, (B, g, g), g = `image_size / patch`, 30 at 480 px).
        3. S'_C is upsampled (bilinear) to SAM's mask size M (256 at 1024 px). Mask prompt: these logits through
           SAM's prompt encoder (`mask_embed`; SAM takes mask logits, as its own low-resolution output, as mask
           input). Point prompt (eq. 3): a straight-through Gumbel-softmax (`F.gumbel_softmax(hard=True)`,
           temperature `gumbel_temperature`) over the M*M flattened logits in training, the argmax at inference,
           weighting SAM's precomputed positional embeddings of every pixel centre plus its positive-point label
           embedding, i.e. exactly the embedding SAM's prompt encoder gives a positive point at that position.
           Text prompts: `text_prompter` on CLIP's word features and SAM's image embedding.
        4. SAM's stock mask decoder takes `[iou token, mask tokens, point prompt, text prompts]` as sparse and
           `mask prompt + image embedding` as dense prompts (the decoder adds the image embedding itself), with
           `multimask_output=False`, i.e. the first mask token's mask only: `logits` (B, M, M), in SAM's padded
           frame. SAM's padding point (added by `SamPromptEncoder` when there are no boxes) is not used: the text
           prompts follow the point. Word padding is left out: SAM's decoder has no key mask for sparse tokens, so
           each row passes only its real text tokens (rows of equal length share one decoder call).

    Geometry: the processor letterboxes the image for CLIP exactly as for SAM (longest side resized, padded
    bottom/right), so CLIP's token grid, SAM's embedding and the mask frame cover the same square and S'_C
    upsamples straight into SAM's mask frame (Sec. 3.1), and `coarse_logits` and `logits` share one frame.

    Training stages (`set_training_stage`, Sec. 4.2):
        `"coarse"`: Cross-Modal Prompting and the decoder train on the coarse map (BCE + dice + ICL); SAM is not
            run at all, `logits` is then S'_C upsampled to M x M (so `sam_pixel_values` may be omitted).
        `"end_to_end"`: Cross-Modal Prompting, the decoder and the text prompter train on the coarse and the
            final mask; each prompt kind is dropped per row with probability `prompt_dropout` (config).
    CLIP never trains, nor does SAM unless `config.train_sam_decoder` (off, as in the paper; on in the tiny preset,
    whose SAM is random) adds its mask decoder and mask embedding to `end_to_end`; gradients flow through the
    frozen layers (CLIP's towers to the prompts, SAM's mask decoder and prompt encoder to the coarse map). SAM's
    image encoder runs without autograd history.

    One image, many expressions: CLIP's image tower depends on the text through Cross-Modal Prompting, so it runs
    per row; SAM's image encoder runs once per distinct row of `sam_pixel_values` (`share_image_encoding`).

    Trainable weights: `trainable_state_dict()` holds `cross_modal_prompting`, `decoder` and `text_prompter`
    (the prompted CLIP layers hold no parameters), plus `SAM_DECODER_MODULES` with `config.train_sam_decoder`.

    Example:

    ```python
    >>> from refseg import PromptRisModel, PromptRisProcessor
    >>> model = PromptRisModel.from_backbones(clip="openai/clip-vit-base-patch16", sam="facebook/sam-vit-base")
    >>> processor = PromptRisProcessor.from_backbones(clip="openai/clip-vit-base-patch16", sam="facebook/sam-vit-base")
    >>> inputs = processor(images=image, text=["the giraffe looking up", "the tree"], return_tensors="pt")
    >>> original_sizes = inputs["original_sizes"]  # model(**inputs) accepts it too
    >>> masks = processor.post_process_referring_segmentation(model(**inputs), original_sizes)  # threshold 0.5
    ```
    """

    # backbone towers whose per-layer outputs `output_hidden_states` / `output_attentions` return
    _recorded_towers = (
        RecordedTower("vision", "clip.vision_model.encoder.layers", "self_attn"),
        RecordedTower("text", "clip.text_model.encoder.layers", "self_attn"),
        RecordedTower("sam_vision", "sam.vision_encoder.layers", "attn"),
    )
    # the heads' attention modules whose weights `output_attentions` returns (`decoder_attentions`)
    _head_attention_classes = (PromptRisAttention,)

    modules_to_save = ("cross_modal_prompting", "decoder", "text_prompter")
    training_stages = TRAINING_STAGES
    backbone_attributes = {"clip": "clip", "sam": "sam"}

    def __init__(self, config: PromptRisConfig, clip_model: Optional[CLIPModel] = None,
                 sam_model: Optional[SamModel] = None):
        super().__init__(config)
        # 1. the stock backbones (loaded by `from_backbones`, random otherwise), prompt tokens into CLIP's layers
        self.clip = self._stock_clip(clip_model)
        inject_adapter(self.clip, PromptTokenConfig(num_tokens=config.num_prompt_tokens, prompt_source="external"))
        if sam_model is None:
            if config.sam_config._attn_implementation is None:
                config.sam_config._attn_implementation = config._attn_implementation
            sam_model = SamModel._from_config(config.sam_config)
        self.sam = sam_model
        vision_cfg, text_cfg = config.clip_config.vision_config, config.clip_config.text_config
        # 2. what Prompt-RIS adds
        self.cross_modal_prompting = PromptRisCrossModalPrompting(
            vision_cfg.hidden_size, text_cfg.hidden_size, config.num_cmp_layers, config.num_prompt_tokens,
            config.cmp_hidden_size, config.cmp_num_heads, vision_cfg.layer_norm_eps,
        )
        self.decoder = PromptRisCoarseDecoder(
            vision_cfg.hidden_size, text_cfg.hidden_size, config.decoder_hidden_size, config.decoder_num_layers,
            config.decoder_num_heads, config.decoder_ffn_dim,
        )
        self.text_prompter = PromptRisTextPrompter(
            text_cfg.hidden_size, config.sam_hidden_size, config.text_prompt_num_layers,
            config.text_prompt_num_heads, config.text_prompt_mlp_dim,
        )
        # generalized RIS: the presence head on t_g, F'_IC and the coarse map S'_C (trains in both stages)
        self.no_target_head = None
        if config.no_target_head:
            width = self.decoder.vision_proj.out_features
            self.no_target_head = NoTargetHead(width, width)
        # instance attributes: what `trainable_state_dict` holds follows the config
        if config.no_target_head:
            self.modules_to_save = self.modules_to_save + ("no_target_head",)
        if config.train_sam_decoder:
            self.modules_to_save = self.modules_to_save + SAM_DECODER_MODULES
        self._point_table = None  # (key, table): SAM's point embeddings of every mask pixel, see `point_embeddings`
        self.post_init()
        self.set_training_stage(config.training_stage)

    @classmethod
    def from_backbones(cls, clip: str, sam: str, **overrides) -> "PromptRisModel":
        """Build Prompt-RIS on pretrained CLIP and SAM checkpoints (Hub ids or local folders).

        Args:
            clip (`str` or `os.PathLike`): a `CLIPModel` checkpoint (`openai/clip-vit-base-patch16`).
            sam (`str` or `os.PathLike`): a `SamModel` checkpoint (`facebook/sam-vit-base`).
            **overrides: `PromptRisConfig` fields (e.g. `image_size`, `num_prompt_tokens`) and loading arguments for
                `from_pretrained` (`dtype`, `revision`, `cache_dir`, `token`, `local_files_only`,
                `attn_implementation`, `device_map`). `image_size` defaults to 30 x CLIP's patch size (480 for
                ViT-B/16).
        """
        loading = {k: overrides.pop(k) for k in LOADING_KWARGS if k in overrides}
        clip_model = CLIPModel.from_pretrained(clip, **loading)
        sam_model = SamModel.from_pretrained(sam, **loading)
        clip_model.config._name_or_path, sam_model.config._name_or_path = str(clip), str(sam)
        attn_implementation = clip_model.config._attn_implementation  # read first: building a config resets it
        config = cls.config_class(clip_config=clip_model.config, sam_config=sam_model.config, **overrides)
        config._attn_implementation = attn_implementation  # sets it on the CLIP and SAM sub-configs too
        return cls(config, clip_model=clip_model, sam_model=sam_model).to(clip_model.dtype)  # added modules too

    # ----------------------------------------------------------------- stages
    def set_training_stage(self, stage: str) -> None:
        """Select what trains (see the class docstring) and what `forward` runs and computes the loss of.
        Sets `requires_grad` on every parameter and records the stage in `config.training_stage`."""
        if stage not in TRAINING_STAGES:
            raise ValueError(f"`stage` must be one of {TRAINING_STAGES}, got {stage!r}")
        self.config.training_stage = stage
        self.requires_grad_(False)
        trained = _STAGE_MODULES[stage]
        if self.no_target_head is not None:
            trained += ("no_target_head",)
        if stage == "end_to_end" and self.config.train_sam_decoder:
            trained += SAM_DECODER_MODULES
        for name in trained:
            self.get_submodule(name).requires_grad_(True)

    # ----------------------------------------------------------------- the encoders
    def encode_clip(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> tuple:
        """Both CLIP towers in lockstep with Cross-Modal Prompting at every paired layer.

        Returns (image tokens (B, 1 + N, D_I) after CLIP's `post_layernorm`, word features F_T (B, L, D_T) after
        its `final_layer_norm`). Inside `refseg.adapters.disable_prompts(model.clip)` the layers ignore the prompts
        and this is the stock CLIP's computation.
        """
        vision, text = self.clip.vision_model, self.clip.text_model
        v_layers, t_layers = vision.encoder.layers, text.encoder.layers
        h_v = vision.pre_layrnorm(vision.embeddings(pixel_values, interpolate_pos_encoding=True))
        h_t = text.embeddings(input_ids=input_ids)
        causal_mask = create_causal_mask(config=text.config, inputs_embeds=h_t, attention_mask=attention_mask,
                                         **_NO_CACHE)
        word_mask = attention_mask.bool()
        for i in range(max(len(v_layers), len(t_layers))):
            v2l = l2v = None
            if i < self.cross_modal_prompting.num_layers:  # both from the inputs to layer i (eqs. 5-6)
                v2l, l2v = self.cross_modal_prompting(i, h_v, h_t, word_mask)
            if i < len(t_layers):
                h_t = t_layers[i](h_t, causal_mask, v2l, is_causal=True)  # prompts positional (see adapters.prompts)
            if i < len(v_layers):
                h_v = v_layers[i](h_v, None, l2v)
        return vision.post_layernorm(h_v), text.final_layer_norm(h_t)

    def get_sam_image_embeddings(self, sam_pixel_values: torch.Tensor) -> torch.Tensor:
        """SAM's image encoder (stock `SamModel.get_image_embeddings`, no autograd history), once per distinct row
        when `config.share_image_encoding`: (B, D_S, h, w). The input is cast to SAM's dtype (SAM's patch embedding
        does not cast it, unlike CLIP's)."""
        sam_pixel_values = sam_pixel_values.to(self.sam.dtype)
        if self.config.share_image_encoding and sam_pixel_values.shape[0] > 1:
            representatives, inverse = unique_rows(sam_pixel_values)
            embeddings = self.sam.get_image_embeddings(sam_pixel_values[representatives])
            return embeddings[inverse] if len(representatives) < sam_pixel_values.shape[0] else embeddings
        return self.sam.get_image_embeddings(sam_pixel_values)

    # ----------------------------------------------------------------- prompts for SAM
    def point_embeddings(self) -> torch.Tensor:
        """E of eq. 3: SAM's prompt-encoder embedding of a positive point at the centre of each pixel of the
        M x M mask frame, (M * M, D_S) row-major, computed with SAM's own `shared_embedding` (coordinates
        normalised as `SamPromptEncoder._embed_points` does) plus `point_embed[1]` (label 1). SAM is frozen, so
        the table is computed once and kept until those weights change (a cache, never saved)."""
        encoder = self.sam.prompt_encoder
        gaussian, positive = encoder.shared_embedding.positional_embedding, encoder.point_embed[1].weight

        def table():
            size = self.config.mask_size
            with torch.no_grad():
                centres = (torch.arange(size, device=gaussian.device, dtype=gaussian.dtype) + 0.5) / size
                y, x = torch.meshgrid(centres, centres, indexing="ij")
                points = encoder.shared_embedding(torch.stack([x, y], dim=-1)) + positive  # (M, M, D_S)
            return points.reshape(size * size, -1)

        if is_exporting():  # traced tensors have no storage to key a cache on: the graph computes the table
            return table()
        key = (gaussian.data_ptr(), gaussian._version, positive.data_ptr(), positive._version, gaussian.dtype)
        if self._point_table is None or self._point_table[0] != key:
            self._point_table = (key, table())
        return self._point_table[1]

    def point_prompt(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """Eq. 3: the point prompt e_p (B, D_S) from the upsampled coarse logits S_C (B, M, M). Training: a
        straight-through Gumbel-softmax one-hot M (forward: one position; backward: the softmax's gradient to
        S_C) weights E; inference (`model.eval()`): E at the argmax of S_C, no noise."""
        table = self.point_embeddings()
        flat = mask_logits.flatten(1)
        if self.training:  # sampled in float32 at least (half precision would round the soft sample's gradient)
            flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
            weights = F.gumbel_softmax(flat, tau=self.config.gumbel_temperature, hard=True, dim=-1)
            return weights.to(table.dtype) @ table
        return table[flat.argmax(dim=1)]

    def _drop_prompts(self, dense, point, text, text_mask):
        """Prompt dropout (Sec. 4.2) in training: per row, each kind independently with `config.prompt_dropout`;
        a row never loses all three (it keeps its text prompts). A dropped mask prompt becomes SAM's
        `no_mask_embed`, a dropped point SAM's `not_a_point_embed`; dropped text prompts become zero tokens that
        the returned `text_mask` (B, L) bool marks absent, so SAM's decoder never sees them."""
        rate = self.config.prompt_dropout
        if not self.training or rate == 0:
            return dense, point, text, text_mask
        encoder = self.sam.prompt_encoder
        drop = torch.rand(dense.shape[0], 3, device=dense.device) < rate  # (mask, point, text)
        drop[:, 2] &= ~drop[:, :2].all(dim=1)
        no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).to(dense.dtype)
        dense = torch.where(drop[:, 0, None, None, None], no_mask, dense)
        point = torch.where(drop[:, 1, None], encoder.not_a_point_embed.weight.to(point.dtype), point)
        text = torch.where(drop[:, 2, None, None], torch.zeros_like(text), text)
        return dense, point, text, text_mask & ~drop[:, 2, None]

    def _sam_decode(self, image_embeddings, image_pe, dense, point, text, text_mask) -> torch.Tensor:
        """SAM's stock mask decoder on the sparse prompts `[e_p, P_text]` of each row, its real text tokens only.

        SAM's mask decoder has no key mask for its sparse tokens: every token it is given takes part in its
        self-attention and in the image-to-token attention, zero tokens included. So each row passes its point and
        its real text tokens (`text_mask`, in order) and nothing else, and rows with the same number of real tokens
        share one decoder call: the result does not depend on how far the expressions were padded.
        `image_embeddings` and `dense` (B, D_S, h, w), `image_pe` (1, D_S, h, w), `point` (B, D_S),
        `text` (B, L, D_S), `text_mask` (B, L) bool -> the first mask's logits (B, M, M).
        """
        counts = text_mask.sum(dim=1)
        order = torch.sort((~text_mask).to(torch.uint8), dim=1, stable=True).indices  # real tokens first, in order
        text = text.gather(1, order.unsqueeze(-1).expand_as(text))
        sparse = torch.cat([point.unsqueeze(1), text], dim=1)  # (B, 1 + L, D_S)
        outputs, rows = [], []
        for count in torch.unique(counts).tolist():
            index = (counts == count).nonzero(as_tuple=True)[0]
            masks, _ = self.sam.mask_decoder(
                image_embeddings=image_embeddings[index],
                image_positional_embeddings=image_pe.expand(len(index), -1, -1, -1),
                sparse_prompt_embeddings=sparse[index, : 1 + count].unsqueeze(1),  # (b, 1, 1 + count, D_S)
                dense_prompt_embeddings=dense[index],
                multimask_output=False,  # the first mask token's mask alone
            )
            outputs.append(masks[:, 0, 0])  # (b, M, M): the first of SAM's four masks
            rows.append(index)
        if len(outputs) == 1:
            return outputs[0].contiguous()
        rows = torch.cat(rows)
        inverse = torch.empty_like(rows)
        inverse[rows] = torch.arange(len(rows), device=rows.device)
        return torch.cat(outputs)[inverse]

    def decode_with_sam(self, mask_logits, words, word_mask, sam_pixel_values) -> torch.Tensor:
        """Mask, point and text prompts into SAM's mask decoder (eq. 4): `mask_logits` (B, M, M) the upsampled
        coarse logits, `words` (B, L, D_T) CLIP's word features, `word_mask` (B, L) bool (True: a real token) -> the
        first mask's logits (B, M, M)."""
        image_embeddings = self.get_sam_image_embeddings(sam_pixel_values)  # F_IS (B, D_S, h, w)
        with torch.no_grad():
            image_pe = self.sam.get_image_wide_positional_embeddings()  # (1, D_S, h, w)
        _, dense = self.sam.prompt_encoder(input_points=None, input_labels=None, input_boxes=None,
                                           input_masks=mask_logits.unsqueeze(1))  # P_mask (B, D_S, h, w)
        point = self.point_prompt(mask_logits)  # e_p (B, D_S)
        text = self.text_prompter(words, word_mask, image_embeddings, image_pe)  # P_text (B, L, D_S)
        dense, point, text, text_mask = self._drop_prompts(dense, point.to(text.dtype), text, word_mask)
        return self._sam_decode(image_embeddings, image_pe, dense, point, text, text_mask)  # (B, M, M)

    # ----------------------------------------------------------------- forward
    def _check_inputs(self, pixel_values, input_ids, attention_mask, sam_pixel_values, group_ids, instance_ids,
                      kwargs):
        check_required_inputs(pixel_values, input_ids, kwargs)
        patch = self.config.patch_size
        if (pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or pixel_values.shape[2] != pixel_values.shape[3]
                or pixel_values.shape[2] % patch or pixel_values.shape[2] < 2 * patch):
            raise ValueError(
                f"`pixel_values` must be (B, 3, S, S) with S a multiple of CLIP's patch size {patch} (the processor "
                f"gives S = {self.config.image_size}), got {tuple(pixel_values.shape)}"
            )
        batch = pixel_values.shape[0]
        check_text_inputs(input_ids, attention_mask, batch, self.config.clip_config.text_config.max_position_embeddings)
        size = self.config.sam_image_size
        if sam_pixel_values is None:
            if self.config.training_stage != "coarse":
                raise ValueError("`sam_pixel_values` (SAM's padded input, from the processor) is required outside the "
                                 "`coarse` stage")
        elif sam_pixel_values.dim() != 4 or tuple(sam_pixel_values.shape) != (batch, 3, size, size):
            raise ValueError(
                f"`sam_pixel_values` must be (B, 3, {size}, {size}) = ({batch}, 3, {size}, {size}) (SAM's padded "
                f"input), got {tuple(sam_pixel_values.shape)}"
            )
        for name, ids in (("group_ids", group_ids), ("instance_ids", instance_ids)):
            if ids is not None and (not torch.is_tensor(ids) or tuple(ids.shape) != (batch,)):
                shape = tuple(ids.shape) if torch.is_tensor(ids) else type(ids).__name__
                raise ValueError(f"`{name}` must be a tensor of shape ({batch},), one id per row, got {shape}")
        if instance_ids is not None and group_ids is None:
            raise ValueError("`instance_ids` needs `group_ids`: instances are contrasted within an image group")

    @referring_forward
    def forward(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.LongTensor] = None,
        labels: Optional[torch.FloatTensor] = None,
        sam_pixel_values: Optional[torch.FloatTensor] = None,
        group_ids: Optional[torch.LongTensor] = None,
        instance_ids: Optional[torch.LongTensor] = None,
        **kwargs,
    ) -> ReferringSegmentationOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, S, S)`): CLIP-normalised images, letterboxed like
                SAM's (longest side resized to S = `config.image_size`, zero-padded bottom/right).
            input_ids (`torch.LongTensor` of shape `(B, T)`): CLIP token ids, one expression per row.
            attention_mask (`torch.LongTensor` of shape `(B, T)`, *optional*): 1 for tokens, 0 for padding.
            labels (`torch.FloatTensor` of shape `(B, S_sam, S_sam)`, *optional*): binary target masks in SAM's
                padded frame (or at the `logits` size). Loss (eq. 9): `bce_weight` x BCE + `dice_weight` x dice on
                `coarse_logits` against the area-downsampled (soft) target, plus, in stage `end_to_end`, the same on
                `logits` upsampled (bilinear) to the labels' size; with `group_ids`, `icl_weight` x ICL (eqs. 7-8) on
                each of them.
            sam_pixel_values (`torch.FloatTensor` of shape `(B, 3, S_sam, S_sam)`, *optional*): SAM-processed images
                (S_sam = `config.sam_image_size`); rows may repeat an image. Required except in stage `coarse`.
            group_ids (`torch.LongTensor` of shape `(B,)`, *optional*): the image (group) of each row, from the
                `grouped_by_image` sampler; Instance Contrastive Learning contrasts the rows of each group. Without
                it the ICL terms are left out.
            instance_ids (`torch.LongTensor` of shape `(B,)`, *optional*): the referent of each row (Y of eq. 8);
                without it, rows of a group whose target masks are identical count as one instance.

        Returns:
            `ReferringSegmentationOutput` with `logits` (B, M, M): SAM's first mask at its low resolution (256 x 256
            at 1024 px) in the padded frame (stage `coarse`: S'_C upsampled to it); the processor's
            `post_process_referring_segmentation` crops the padding and thresholds at `config.threshold`.
            `coarse_logits` (B, g, g): S'_C. `image_embeds` (B, g*g, D_C): F'_IC; `text_embeds` (B, D_C): t_g.
            `loss` and `loss_dict` (`coarse_bce`, `coarse_dice`, [`coarse_icl`], and in `end_to_end` `bce`,
            `dice`, [`icl`]) with `labels`.
        """
        self._check_inputs(pixel_values, input_ids, attention_mask, sam_pixel_values, group_ids, instance_ids, kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        word_mask = attention_mask.bool()
        # 1. CLIP with Cross-Modal Prompting (eqs. 5-6): F_IC (B, N, D_I), F_T (B, T, D_T)
        image_tokens, words = self.encode_clip(pixel_values, input_ids, attention_mask)
        # 2. decoder and coarse map (eqs. 1-2); t_g at the [EOS], the last real token
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        eos_index = (attention_mask.to(torch.long) * positions).argmax(dim=-1)
        coarse, pixels, sentence = self.decoder(image_tokens[:, 1:], words, word_mask, eos_index)
        grid = pixel_values.shape[-1] // self.config.patch_size
        coarse_logits = coarse.reshape(-1, grid, grid)
        size = self.config.mask_size
        mask_logits = F.interpolate(coarse_logits.unsqueeze(1), size=(size, size), mode="bilinear",
                                    align_corners=False).squeeze(1)  # S_C (B, M, M)
        # 3. SAM prompted by the mask, the point and the text (eqs. 3-4); not run in the coarse stage
        if self.config.training_stage == "coarse":
            logits = mask_logits
        else:
            logits = self.decode_with_sam(mask_logits, words.to(mask_logits.dtype), word_mask, sam_pixel_values)
        # 4. generalized RIS: does the expression name anything here? (`refseg.no_target`)
        no_target_logits = None
        if self.no_target_head is not None:
            pixel_map = pixels.transpose(1, 2).reshape(pixels.shape[0], -1, grid, grid)  # (B, D_C, g, g)
            no_target_logits = self.no_target_head(sentence, pixel_map, coarse_logits)
        loss, loss_dict = None, None
        if labels is not None:
            loss, loss_dict = self._loss(labels, coarse_logits, logits, group_ids, instance_ids)
            loss, loss_dict = add_no_target_loss(self.config, no_target_logits, labels, loss, loss_dict)
        return ReferringSegmentationOutput(loss=loss, logits=logits, coarse_logits=coarse_logits, image_embeds=pixels,
                                           text_embeds=sentence, loss_dict=loss_dict, no_target_logits=no_target_logits)

    def _terms(self, prefix, prediction, target, group_ids, instance_ids) -> dict:
        terms = {f"{prefix}bce": bce_loss(prediction, target), f"{prefix}dice": dice_loss(prediction, target)}
        if group_ids is not None:
            terms[f"{prefix}icl"] = instance_contrastive_loss(
                prediction, target, group_ids, instance_ids=instance_ids, iou_threshold=self.config.icl_iou_threshold
            )
        return terms

    def _loss(self, labels, coarse_logits, logits, group_ids, instance_ids):
        input_size = (self.config.sam_image_size,) * 2
        if (labels.dim() != 3 or labels.shape[0] != logits.shape[0]
                or tuple(labels.shape[-2:]) not in (input_size, tuple(logits.shape[-2:]))):
            raise ValueError(
                f"`labels` must be (B, H, W) = {(logits.shape[0], *input_size)} (SAM's input size) or "
                f"{tuple(logits.shape)} (the logits size), got {tuple(labels.shape)}"
            )
        target = labels.to(logits.dtype)
        coarse_target = F.interpolate(target.unsqueeze(1), size=coarse_logits.shape[-2:], mode="area").squeeze(1)
        terms = self._terms("coarse_", coarse_logits, coarse_target, group_ids, instance_ids)  # L_clipseg (+ ICL)
        if self.config.training_stage != "coarse":
            final = logits
            if final.shape[-2:] != target.shape[-2:]:
                final = F.interpolate(final.unsqueeze(1), size=target.shape[-2:], mode="bilinear",
                                      align_corners=False).squeeze(1)
            terms.update(self._terms("", final, target, group_ids, instance_ids))  # L_samseg (+ ICL)
        weights = {"bce": self.config.bce_weight, "dice": self.config.dice_weight, "icl": self.config.icl_weight}
        loss = sum(weights[name.rsplit("_", 1)[-1]] * value for name, value in terms.items())
        return loss, {name: value.detach() for name, value in terms.items()}


__all__ = ["SAM_DECODER_MODULES", "PromptRisModel", "PromptRisPreTrainedModel"]
