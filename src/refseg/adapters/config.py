"""Adapter configurations: dataclasses with help text, validated in `__post_init__`, saved as JSON.

Shaped like PEFT's tuner configs (`peft.LoraConfig`, `peft.IA3Config`): every field carries
`metadata={"help": ...}`, inconsistent settings raise a `ValueError` naming the field, and a config
round-trips through `adapter_config.json` (`save_pretrained` / `from_pretrained`). The JSON holds an
`adapter_type` key so `AdapterConfig.from_dict` rebuilds the right subclass.
"""

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar, Optional, Union

from transformers.activations import ACT2FN

ADAPTER_CONFIG_NAME = "adapter_config.json"

# Every pre-LN encoder layer of both CLIP towers (`CLIPModel` module names).
CLIP_ENCODER_LAYERS = r"(.*\.)?(vision_model|text_model)\.encoder\.layers\.\d+"

_CONFIG_TYPES: dict = {}


def register_adapter_config(cls):
    """Class decorator: make `cls` loadable by `AdapterConfig.from_dict` through its `adapter_type`."""
    _CONFIG_TYPES[cls.adapter_type] = cls
    return cls


def module_matches(name: str, target_modules: Union[str, list, tuple]) -> bool:
    """Whether module `name` is a target, with PEFT's rule.

    A string is a regular expression that must match the whole name; a list holds exact names or
    name suffixes (`"q_proj"` matches `"vision_model.encoder.layers.0.self_attn.q_proj"`).
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


@dataclass
class AdapterConfig:
    """Fields every refseg adapter config shares. Subclasses set the class attribute `adapter_type`.

    Used as is (`adapter_type="base"`) for adapter folders that hold only `modules_to_save` heads.
    """

    adapter_type: ClassVar[str] = "base"

    target_modules: Optional[Union[str, list]] = field(
        default=None,
        metadata={
            "help": "Modules to wrap: a regular expression matched against the whole module name, or a list "
            "of exact names / name suffixes (PEFT's rule)."
        },
    )
    modules_to_save: Optional[list] = field(
        default=None,
        metadata={
            "help": "Names of further (non-wrapped) submodules, such as task heads, whose parameters and buffers "
            "are saved and loaded with the adapter weights."
        },
    )
    base_model_name_or_path: Optional[Union[str, dict]] = field(
        default=None,
        metadata={
            "help": "Hub id or local path of the pretrained backbone the adapter was trained on, or a dict "
            "`{backbone keyword: id or path}` for models with several backbones (`{'clip': ..., 'sam': ...}`)."
        },
    )
    method_config: Optional[dict] = field(
        default=None,
        metadata={
            "help": "The refseg method's own config fields (without its backbone sub-configs), so that the whole "
            "model can be rebuilt from the backbone checkpoint plus the adapter folder."
        },
    )

    def __post_init__(self):
        if self.target_modules is not None:
            if isinstance(self.target_modules, tuple):
                self.target_modules = list(self.target_modules)
            if isinstance(self.target_modules, str):
                try:
                    re.compile(self.target_modules)
                except re.error as err:
                    raise ValueError(f"`target_modules` is not a valid regular expression: {err}") from err
            elif not isinstance(self.target_modules, list) or not self.target_modules:
                raise ValueError(
                    f"`target_modules` must be a regex string or a non-empty list of names, got {self.target_modules!r}"
                )
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict, with the `adapter_type` first."""
        return {"adapter_type": self.adapter_type, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterConfig":
        """Rebuild the config subclass named by `data["adapter_type"]`; unknown keys raise a `ValueError`."""
        data = dict(data)
        adapter_type = data.pop("adapter_type", cls.adapter_type)
        config_cls = _CONFIG_TYPES.get(adapter_type)
        if config_cls is None:
            raise ValueError(f"`adapter_type` must be one of {sorted(_CONFIG_TYPES)}, got {adapter_type!r}")
        known = {f.name for f in fields(config_cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)} for {config_cls.__name__}")
        return config_cls(**data)

    def save_pretrained(self, save_directory) -> str:
        """Write `adapter_config.json` into `save_directory` (created if needed); returns its path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, ADAPTER_CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    @classmethod
    def from_pretrained(cls, load_directory) -> "AdapterConfig":
        """Read `adapter_config.json` from a folder."""
        path = os.path.join(load_directory, ADAPTER_CONFIG_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"`load_directory` {load_directory!s} holds no {ADAPTER_CONFIG_NAME}")
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


register_adapter_config(AdapterConfig)


@register_adapter_config
@dataclass
class BottleneckAdapterConfig(AdapterConfig):
    """Houlsby/AdaptFormer bottleneck adapters after the attention and MLP residuals of encoder layers.

    Each wrapped pre-LN layer computes (RISCLIP eqs. 3-4)

        h = x + MHSA(LN1(x));  h = h + AD_attn(h)
        y = h + MLP(LN2(h));   y = y + AD_mlp(y)

    with `AD(z) = s * up(act(down(z)))`: `down` Kaiming-normal, `up` zero-initialised, so a freshly
    injected adapter changes nothing; `s` is an optional learnable channel-wise scale.
    """

    adapter_type: ClassVar[str] = "bottleneck"

    target_modules: Optional[Union[str, list]] = field(
        default=CLIP_ENCODER_LAYERS,
        metadata={
            "help": "Encoder layers to wrap (pre-LN blocks with `layer_norm1`, `self_attn`, `layer_norm2`, `mlp`, "
            "like `CLIPEncoderLayer`). Default: every layer of both CLIP towers."
        },
    )
    bottleneck_dim: int = field(default=64, metadata={"help": "Width of the down-projection (the bottleneck)."})
    activation: str = field(default="relu", metadata={"help": "Non-linearity between down and up (a key of ACT2FN)."})
    positions: list = field(
        default_factory=lambda: ["attn", "mlp"],
        metadata={"help": "Where adapters go: after the attention residual ('attn') and/or the MLP residual ('mlp')."},
    )
    channel_scale: bool = field(
        default=False, metadata={"help": "Multiply the adapter output by a learnable per-channel scale."}
    )
    scale_init: float = field(default=1.0, metadata={"help": "Initial value of the channel-wise scale."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the bottleneck activations."})

    def __post_init__(self):
        super().__post_init__()
        if self.target_modules is None:
            raise ValueError("`target_modules` must name the layers to wrap, got None")
        if not isinstance(self.bottleneck_dim, int) or self.bottleneck_dim < 1:
            raise ValueError(f"`bottleneck_dim` must be a positive int, got {self.bottleneck_dim!r}")
        if self.activation not in ACT2FN:
            raise ValueError(f"`activation` must be a key of transformers' ACT2FN, got {self.activation!r}")
        self.positions = list(self.positions)
        if not self.positions or any(p not in ("attn", "mlp") for p in self.positions):
            raise ValueError(f"`positions` must be a non-empty subset of ['attn', 'mlp'], got {self.positions!r}")
        if len(set(self.positions)) != len(self.positions):
            raise ValueError(f"`positions` has duplicates: {self.positions!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout!r}")


PROMPT_SOURCES = ("static", "external")


@register_adapter_config
@dataclass
class PromptTokenConfig(AdapterConfig):
    """Prompt tokens inserted into the input of encoder layers and removed from their output
    (VPT-deep; Prompt-RIS Cross-Modal Prompting, eqs. 5-6).

    Each wrapped layer `E` computes, for its input `x` (B, L, D) and prompts `P` (B, n, D),

        [_; y] = E([P; x])        (prompts at `insert_at` = 0, the paper's choice)

    with the attention mask extended so that every token may also attend to the prompts (see
    `refseg.adapters.prompts`), and returns the L token positions only. The prompts are either the
    layer's own learnable tokens (`prompt_source="static"`, an `(n, D)` parameter per layer,
    N(0, init_std^2)) or tensors the owning model supplies for each forward
    (`prompt_source="external"`: Prompt-RIS computes them by cross-attention from the other
    tower). A layer without prompts for a forward (external source, nothing supplied; or inside
    `disable_prompts`) is exactly the stock layer.
    """

    adapter_type: ClassVar[str] = "prompt_tokens"

    target_modules: Optional[Union[str, list]] = field(
        default=CLIP_ENCODER_LAYERS,
        metadata={
            "help": "Encoder layers to wrap (pre-LN blocks with `layer_norm1`, `self_attn`, `layer_norm2`, `mlp`, "
            "like `CLIPEncoderLayer`). Default: every layer of both CLIP towers."
        },
    )
    num_tokens: int = field(
        default=16, metadata={"help": "n, the number of prompt tokens per layer (Prompt-RIS: 16 per direction)."}
    )
    prompt_source: str = field(
        default="static",
        metadata={
            "help": "Where the prompts come from: 'static' (learnable tokens owned by each layer, VPT-deep) or "
            "'external' (supplied by the owning model for each forward, e.g. Prompt-RIS's cross-modal prompts)."
        },
    )
    init_std: float = field(
        default=0.02,
        metadata={"help": "Standard deviation of the normal initialisation of static prompts (unused for 'external')."},
    )
    insert_at: int = field(
        default=0,
        metadata={
            "help": "Sequence index where the prompts are inserted: 0 puts them before [CLS]/[SOS] (Prompt-RIS "
            "eqs. 5-6), 1 right after [CLS] (VPT). Must not exceed the layer's sequence length."
        },
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the prompt tokens before they are inserted."})

    def __post_init__(self):
        super().__post_init__()
        if self.target_modules is None:
            raise ValueError("`target_modules` must name the layers to wrap, got None")
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise ValueError(f"`num_tokens` must be a positive int, got {self.num_tokens!r}")
        if self.prompt_source not in PROMPT_SOURCES:
            raise ValueError(f"`prompt_source` must be one of {list(PROMPT_SOURCES)}, got {self.prompt_source!r}")
        if (
            isinstance(self.init_std, bool)
            or not isinstance(self.init_std, (int, float))
            or not math.isfinite(self.init_std)
            or self.init_std < 0
        ):
            raise ValueError(f"`init_std` must be a finite number >= 0, got {self.init_std!r}")
        self.init_std = float(self.init_std)
        if isinstance(self.insert_at, bool) or not isinstance(self.insert_at, int) or self.insert_at < 0:
            raise ValueError(f"`insert_at` must be an int >= 0, got {self.insert_at!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout!r}")


__all__ = [
    "ADAPTER_CONFIG_NAME",
    "AdapterConfig",
    "BottleneckAdapterConfig",
    "CLIP_ENCODER_LAYERS",
    "PROMPT_SOURCES",
    "PromptTokenConfig",
    "module_matches",
    "register_adapter_config",
]
