"""RISCLIP: frozen CLIP with Backbone and Fusion Adapters (Locator) and a convolutional Refiner.

Kim, Kang, Park, "RISCLIP: Referring Image Segmentation Framework using CLIP". The CLIP towers are
the stock `transformers.CLIPModel` (`model.clip`); everything RISCLIP adds goes in through
`refseg.adapters`: bottleneck adapters wrap every encoder layer of both towers, PreFusion adapters
sit between the last paired layers, PostFusion layers follow the final projections.
"""

import inspect
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel
from transformers.masking_utils import create_causal_mask

# transformers 5.24 renamed `create_causal_mask`'s `past_key_values` to `cache` (the old name warns and
# goes in 5.40); earlier 5.x releases know only the old name.
_NO_CACHE = {"cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values": None}

from ...adapters.config import CLIP_ENCODER_LAYERS, BottleneckAdapterConfig
from ...adapters.fusion import PostFusionLayer, PreFusionAdapter
from ...adapters.injection import adapter_parameters, inject_adapter
from ...adapters.layers import encoder_layer_forward
from ...adapters.model_mixin import AdaptedModelMixin
from ...losses import dice_loss, sigmoid_focal_loss
from ...modeling_outputs import ReferringSegmentationOutput
from ...no_target import NoTargetHead, add_no_target_loss
from ...modeling_utils import (
    RecordedTower, ReferringSegmentationPreTrainedModel, check_required_inputs, referring_forward, unique_rows,
)
from .configuration_risclip import TRAINING_STAGES, RisclipConfig
from .modeling_risclip_heads import RisclipLocator, RisclipRefiner

try:  # optional: the LoRA option
    from peft import LoraConfig, inject_adapter_in_model
except ImportError:  # pragma: no cover - exercised only without peft
    LoraConfig = inject_adapter_in_model = None

logger = logging.getLogger(__name__)



class RisclipPreTrainedModel(ReferringSegmentationPreTrainedModel):
    """Weight initialisation and the loading plumbing shared by RISCLIP models.

    `_init_weights` initialises only what RISCLIP adds (adapters, fusion, Locator, Refiner) and never
    touches CLIP's modules: `initialize_weights` (`refseg.adapters.initialize_weights_with_adapters`)
    routes the adapter modules found inside the CLIP tree to this class's `_init_weights` and the
    wrapped stock modules (`base_layer`) to CLIP's own, which skips anything loaded from a checkpoint.
    Adapters, fusion blocks and the Locator take their own initial values; the Refiner's convolutions
    and norms those of `ReferringSegmentationPreTrainedModel`, except its feature projections and final
    projection (`RisclipRefiner.reset_projections`: fan-in unit gain; normal with `initializer_range`).
    """

    config_class = RisclipConfig
    config: RisclipConfig
    base_model_prefix = "risclip"
    _no_split_modules = [
        "CLIPTextEmbeddings", "CLIPVisionEmbeddings", "CLIPEncoderLayer", "AdaptedEncoderLayer",
        "PreFusionAdapter", "PostFusionLayer",
    ]

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, RisclipLocator):
            module.reset_parameters()
        elif isinstance(module, RisclipRefiner):  # visited after its convs: their generic init is overridden
            module.reset_projections(self.config.initializer_range)
        else:  # adapters, fusion blocks and LoRA get their own initial values there
            super()._init_weights(module)


class RisclipModel(AdaptedModelMixin, RisclipPreTrainedModel):
    """RISCLIP for referring image segmentation.

    Modules:
        clip: the stock `CLIPModel` (frozen); its encoder layers are `AdaptedEncoderLayer`s holding
            Backbone Adapters (`refseg.adapters`), optionally with LoRA from `peft`.
        pre_fusion: `PreFusionAdapter`s; `pre_fusion[i]` runs before image layer `L_v - i` and text
            layer `L_t - i` (1-based), so `pre_fusion[0]` pairs the deepest layers.
        post_fusion: `PostFusionLayer`s after the final LN and projections of both towers.
        locator: learnable scale and bias of the patch/[EOS] cosine similarity.
        refiner: the convolutional Refiner.

    Training stages (`set_training_stage`, paper Sec. 3.4):
        `"locator"`: Backbone Adapters (and LoRA if enabled), PreFusion, PostFusion and the Locator's
            scale/bias train on the token-level target; the Refiner is frozen (and kept in eval mode).
        `"refiner"`: only the Refiner trains, on the pixel target; everything else is frozen (eval mode).
    CLIP's own parameters never train.

    Trainable weights (`AdaptedModelMixin`): `trainable_state_dict()` / `load_trainable_state_dict()`,
    `save_adapter_weights(dir)` / `load_adapter_weights(dir)` (`adapter_config.json` +
    `adapter_model.safetensors`) and `RisclipModel.from_adapter_weights(dir, clip=None)` hold the adapters plus the fusion, Locator and Refiner
    modules, and reload into a model built on the same CLIP checkpoint.

    Example:

    ```python
    >>> from refseg import RisclipModel, RisclipProcessor
    >>> model = RisclipModel.from_backbones(clip="openai/clip-vit-base-patch16")   # 640 px, 40x40 tokens
    >>> processor = RisclipProcessor.from_backbones(clip="openai/clip-vit-base-patch16")
    >>> inputs = processor(images=image, text=["the giraffe looking up"], return_tensors="pt")
    >>> original_sizes = inputs["original_sizes"]  # model(**inputs) accepts it too
    >>> masks = processor.post_process_referring_segmentation(model(**inputs), original_sizes)
    ```
    """

    # backbone towers whose per-layer outputs `output_hidden_states` / `output_attentions` return
    _recorded_towers = (
        RecordedTower("vision", "clip.vision_model.encoder.layers", "self_attn"),
        RecordedTower("text", "clip.text_model.encoder.layers", "self_attn"),
    )

    modules_to_save = ("pre_fusion", "post_fusion", "locator", "refiner")
    training_stages = TRAINING_STAGES
    backbone_attributes = {"clip": "clip"}

    def __init__(self, config: RisclipConfig, clip_model: Optional[CLIPModel] = None):
        super().__init__(config)
        clip_config = config.clip_config
        # 1. the stock CLIP (loaded by `from_backbones`, random otherwise)
        self.clip = self._stock_clip(clip_model)
        vision_cfg, text_cfg = clip_config.vision_config, clip_config.text_config
        # 2. Backbone Adapters in the chosen layers of both towers
        adapter_config = self._backbone_adapter_config(config)
        if adapter_config is not None:
            inject_adapter(self.clip, adapter_config)
        if config.use_lora:
            self._inject_lora(config)
        # 3. fusion, Locator, Refiner
        self.pre_fusion = nn.ModuleList(
            PreFusionAdapter(
                vision_cfg.hidden_size, text_cfg.hidden_size, config.fusion_dim, config.fusion_num_heads,
                learnable_temperature=config.learnable_attention_temperature,
                channel_scale=config.adapter_channel_scale, scale_init=config.adapter_scale_init,
                dropout=config.adapter_dropout, layer_norm_eps=vision_cfg.layer_norm_eps,
            )
            for _ in range(config.num_pre_fusion_layers)
        )
        self.post_fusion = nn.ModuleList(
            PostFusionLayer(
                clip_config.projection_dim, config.fusion_num_heads, mlp_ratio=config.fusion_mlp_ratio,
                learnable_temperature=config.learnable_attention_temperature,
                channel_scale=config.adapter_channel_scale, scale_init=config.adapter_scale_init,
                dropout=config.adapter_dropout,
            )
            for _ in range(config.num_post_fusion_layers)
        )
        self.locator = RisclipLocator(config.locator_logit_scale_init, config.locator_logit_bias_init)
        self.refiner = RisclipRefiner(vision_cfg.hidden_size, config.refiner_hidden_sizes,
                                      projection_dim=config.refiner_projection_dim)
        # 4. generalized RIS: the presence head on the fused [EOS], the fused patch tokens and the Locator's map
        self.no_target_head = None
        if config.no_target_head:
            width = clip_config.projection_dim
            self.no_target_head = NoTargetHead(width, width, eps=vision_cfg.layer_norm_eps)
            self.modules_to_save = type(self).modules_to_save + ("no_target_head",)
        self.post_init()
        self.set_training_stage(config.training_stage)

    # ----------------------------------------------------------------- construction helpers
    @staticmethod
    def _backbone_adapter_config(config: RisclipConfig) -> Optional[BottleneckAdapterConfig]:
        n = config.adapter_layers
        if n == 0:
            return None
        if n is None:
            targets = CLIP_ENCODER_LAYERS
        else:
            targets = []
            for tower, sub in (("vision_model", config.clip_config.vision_config),
                               ("text_model", config.clip_config.text_config)):
                depth = sub.num_hidden_layers
                targets += [f"{tower}.encoder.layers.{i}" for i in range(max(depth - n, 0), depth)]
        return BottleneckAdapterConfig(
            target_modules=targets, bottleneck_dim=config.adapter_bottleneck_dim,
            activation=config.adapter_activation, channel_scale=config.adapter_channel_scale,
            scale_init=config.adapter_scale_init, dropout=config.adapter_dropout,
        )

    def _inject_lora(self, config: RisclipConfig) -> None:
        if LoraConfig is None:
            raise ImportError("`use_lora=True` needs the `peft` package (pip install peft)")
        lora = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_target_modules),
        )
        inject_adapter_in_model(lora, self.clip)

    @classmethod
    def from_backbones(cls, clip: str, **overrides) -> "RisclipModel":
        """Build RISCLIP on a pretrained CLIP checkpoint (Hub id or local folder).

        Args:
            clip (`str` or `os.PathLike`): passed to `CLIPModel.from_pretrained`.
            **overrides: `RisclipConfig` fields (e.g. `image_size`, `adapter_bottleneck_dim`) and loading
                arguments for `from_pretrained` (`dtype`, `revision`, `cache_dir`, `token`,
                `local_files_only`, `attn_implementation`, `device_map`). `image_size` defaults to
                40 x the patch size (the paper's 40x40 grid: 640 for ViT-B/16, 560 for ViT-L/14).
                The modules RISCLIP adds take the loaded CLIP's dtype (e.g. `dtype=torch.bfloat16`).
        """
        return cls._from_clip(clip, **overrides)

    # ----------------------------------------------------------------- stages and trainable weights
    def _stage_modules(self, stage: str) -> list:
        if stage == "refiner":
            return [self.refiner]
        heads = [self.no_target_head] if self.no_target_head is not None else []
        return [self.pre_fusion, self.post_fusion, self.locator, *heads]

    def set_training_stage(self, stage: str) -> None:
        """Select what trains (see the class docstring) and which loss `forward` computes.

        Sets `requires_grad` on every parameter, records the stage in `config.training_stage`, and
        re-applies the train/eval split: modules frozen in this stage stay in eval mode.
        """
        if stage not in TRAINING_STAGES:
            raise ValueError(f"`stage` must be one of {TRAINING_STAGES}, got {stage!r}")
        self.config.training_stage = stage
        self.requires_grad_(False)
        for module in self._stage_modules(stage):
            module.requires_grad_(True)
        if stage == "locator":
            for param in adapter_parameters(self.clip):
                param.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and getattr(self.config, "training_stage", None) in TRAINING_STAGES:
            if self.config.training_stage == "locator":
                self.refiner.eval()
            else:
                for module in self._stage_modules("locator"):
                    module.eval()
                self.clip.eval()
        return self

    # ----------------------------------------------------------------- forward
    def _encode(self, pixel_values, input_ids, attention_mask):
        """Both towers in lockstep, PreFusion between the paired last layers.

        The image layers before the first PreFusion (with their Backbone Adapters) do not read the
        text: at inference with `config.share_image_encoding` they run once per distinct row of
        `pixel_values` (`unique_rows`) and are expanded to every row before the fused layers. Training
        keeps one row per pair (dropout would otherwise be shared between the pairs of an image).

        Returns the image hidden states after the last layer (its patch tokens from MaskCLIP's value
        path), the text hidden states, and the Refiner's visual features `{layer: (B, 1+N, C)}`.
        """
        vision, text = self.clip.vision_model, self.clip.text_model
        v_layers, t_layers = vision.encoder.layers, text.encoder.layers
        n_v, n_t, n_fused = len(v_layers), len(t_layers), len(self.pre_fusion)
        wanted = set(self.config.refiner_feature_layers)
        features = {}

        inverse = None  # row -> its distinct image, when the text-free prefix runs once per image
        if self.config.share_image_encoding and not self.training and pixel_values.shape[0] > 1:
            representatives, inverse = unique_rows(pixel_values)
            if len(representatives) < pixel_values.shape[0]:
                pixel_values = pixel_values[representatives]
            else:
                inverse = None
        h_v = vision.pre_layrnorm(vision.embeddings(pixel_values, interpolate_pos_encoding=True))
        if 0 in wanted:
            features[0] = h_v
        h_t = text.embeddings(input_ids=input_ids)
        causal_mask = create_causal_mask(
            config=text.config, inputs_embeds=h_t, attention_mask=attention_mask, **_NO_CACHE
        )

        def run_vision(i, h):
            h = encoder_layer_forward(v_layers[i], h, None, value_attention=i == n_v - 1)
            if i + 1 in wanted:
                features[i + 1] = h
            return h

        def run_text(j, h):
            return encoder_layer_forward(t_layers[j], h, causal_mask, is_causal=True)

        for i in range(n_v - n_fused):
            h_v = run_vision(i, h_v)
        if inverse is not None:  # (distinct images, 1+N, C) -> (B, 1+N, C), prefix features too
            h_v = h_v[inverse]
            features = {layer: feature[inverse] for layer, feature in features.items()}
        for j in range(n_t - n_fused):
            h_t = run_text(j, h_t)
        for p in range(n_fused):  # shallowest fused pair first, i.e. pre_fusion[n_fused - 1]
            h_v, h_t = self.pre_fusion[n_fused - 1 - p](h_v, h_t, attention_mask)
            h_v = run_vision(n_v - n_fused + p, h_v)
            h_t = run_text(n_t - n_fused + p, h_t)
        return h_v, h_t, features

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
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): normalised images; H and W multiples of
                the patch size (the processor gives `image_size` x `image_size`).
            input_ids (`torch.LongTensor` of shape `(B, T)`): CLIP token ids, one expression per image.
            attention_mask (`torch.LongTensor` of shape `(B, T)`, *optional*): 1 for tokens, 0 for padding.
            labels (`torch.FloatTensor` of shape `(B, H, W)`, *optional*): binary target masks at the input
                resolution; the loss of the active stage is returned (stage 1: focal + dice between
                `coarse_logits` and the area-downsampled, i.e. soft, token-level target; stage 2: between
                `logits` and `labels`).

        Returns:
            `ReferringSegmentationOutput` with `logits` (B, H, W) = fg - bg Refiner scores (so
            `sigmoid(logits) > 0.5` is the paper's argmax; while the Locator stage trains: the
            upsampled `coarse_logits`), `coarse_logits` (B, h, w) the Locator's map,
            `image_embeds` (B, h*w, D) fused patch tokens, `text_embeds` (B, D) fused [EOS] tokens.
        """
        check_required_inputs(pixel_values, input_ids, kwargs)
        if pixel_values.dim() != 4:
            raise ValueError(f"`pixel_values` must be (B, 3, H, W), got shape {tuple(pixel_values.shape)}")
        batch, _, height, width = pixel_values.shape
        patch = self.config.patch_size
        if height % patch or width % patch:
            raise ValueError(f"`pixel_values` height and width must be multiples of the patch size {patch}, got {height}x{width}")
        if input_ids.shape[0] != batch:
            raise ValueError(f"`input_ids` has {input_ids.shape[0]} rows for {batch} images")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        grid = (height // patch, width // patch)

        # 1. CLIP towers with Backbone Adapters and PreFusion
        h_v, h_t, features = self._encode(pixel_values, input_ids, attention_mask)
        # 2. final LN + projection of every token into CLIP's joint space
        image_tokens = self.clip.visual_projection(self.clip.vision_model.post_layernorm(h_v))[:, 1:]  # (B, h*w, D)
        text_tokens = self.clip.text_projection(self.clip.text_model.final_layer_norm(h_t))  # (B, T, D)
        # 3. PostFusion
        for layer in self.post_fusion:
            image_tokens, text_tokens = layer(image_tokens, text_tokens, attention_mask)
        # 4. Locator: [EOS] = last real token of each expression
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        eos_index = (attention_mask.to(torch.long) * positions).argmax(dim=-1)
        eos_tokens = text_tokens[torch.arange(batch, device=text_tokens.device), eos_index]  # (B, D)
        coarse_logits = self.locator(image_tokens, eos_tokens, grid)  # (B, h, w)
        # 5. Refiner on the (detached) map and the early visual features: stages never share gradients.
        #    While the Locator stage trains, the frozen Refiner's output feeds no loss: it is skipped
        #    and `logits` is the token map upsampled to the input size (eval mode always refines).
        if self.training and self.config.training_stage == "locator":
            logits = F.interpolate(coarse_logits.unsqueeze(1), size=(height, width), mode="bilinear",
                                   align_corners=False).squeeze(1)
        else:
            maps = [
                features[i][:, 1:].transpose(1, 2).reshape(batch, -1, *grid).detach()
                for i in self.config.refiner_feature_layers
            ]
            scores = self.refiner(coarse_logits.detach().sigmoid().unsqueeze(1), maps)  # (B, 2, 2^n h, 2^n w)
            if scores.shape[-2:] != (height, width):  # e.g. patch 14: back to the input size (bicubic)
                scores = F.interpolate(scores, size=(height, width), mode="bicubic", align_corners=False)
            logits = scores[:, 1] - scores[:, 0]
        # 6. generalized RIS: does the expression name anything here? (`refseg.no_target`)
        no_target_logits = None
        if self.no_target_head is not None:
            token_map = image_tokens.transpose(1, 2).reshape(batch, -1, *grid)  # (B, D, h, w)
            no_target_logits = self.no_target_head(eos_tokens, token_map, coarse_logits)
        # 7. loss of the active stage (+ the presence term)
        loss, loss_dict = None, None
        if labels is not None:
            loss, loss_dict = self._loss(labels, coarse_logits, logits)
            loss, loss_dict = add_no_target_loss(self.config, no_target_logits, labels, loss, loss_dict)
        return ReferringSegmentationOutput(
            loss=loss, logits=logits, coarse_logits=coarse_logits, image_embeds=image_tokens,
            text_embeds=eos_tokens, loss_dict=loss_dict, no_target_logits=no_target_logits,
        )

    def _loss(self, labels, coarse_logits, logits):
        if labels.shape != logits.shape:
            raise ValueError(f"`labels` must be (B, H, W) = {tuple(logits.shape)}, got {tuple(labels.shape)}")
        labels = labels.to(logits.dtype)
        if self.config.training_stage == "locator":
            target = F.interpolate(labels.unsqueeze(1), size=coarse_logits.shape[-2:], mode="area").squeeze(1)
            prediction = coarse_logits
        else:
            target, prediction = labels, logits
        cfg = self.config
        focal = sigmoid_focal_loss(prediction, target, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma)
        dice = dice_loss(prediction, target)
        loss = cfg.focal_loss_weight * focal + cfg.dice_loss_weight * dice
        return loss, {"focal": focal.detach(), "dice": dice.detach()}


__all__ = ["RisclipModel", "RisclipPreTrainedModel"]
