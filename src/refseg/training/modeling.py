"""Building the model and processor a training run starts from."""

import json
import logging
from collections.abc import Mapping

logger = logging.getLogger(__name__)


def parse_config_overrides(text) -> dict:
    """The `--config_overrides` JSON object as a dict (`{}` for `None` or an empty string).

    A mapping is taken as is: a YAML config may write the overrides as a mapping, not a string.
    """
    if not text:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"`config_overrides` is not valid JSON ({e}): {text!r}") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"`config_overrides` must be a JSON object of config fields, got {text!r}")
    return overrides


def backbone_sources(spec, model_args) -> dict:
    """`{"clip": id_or_path, ...}` from the preset, overridden by explicit flags."""
    sources = {}
    overrides = {}
    if model_args.preset:
        from ..presets import PRESETS

        if model_args.preset not in PRESETS:
            raise ValueError(f"`preset` must be one of {sorted(PRESETS)}, got {model_args.preset!r}")
        preset = PRESETS[model_args.preset]
        if preset.method != spec.name:
            raise ValueError(f"preset {model_args.preset!r} is a {preset.method} preset, not {spec.name}")
        sources.update(preset.backbones)
        overrides.update(preset.config_overrides)
    for name in spec.backbones:
        value = getattr(model_args, name, None)
        if value:
            sources[name] = value
    missing = [name for name in spec.backbones if not sources.get(name)]
    if missing:
        raise ValueError(f"no backbone given for {missing}: pass --{missing[0]} or a --preset")
    overrides.update(parse_config_overrides(model_args.config_overrides))
    return sources, overrides


def build_model_and_processor(spec, model_args):
    """A fresh method model on pretrained backbones, or a trained refseg model to fine-tune."""
    model_cls, processor_cls = spec.load_classes()
    if model_args.model_name_or_path:
        model = model_cls.from_pretrained(model_args.model_name_or_path)
        processor = processor_cls.from_pretrained(model_args.model_name_or_path)
        return model, processor
    sources, overrides = backbone_sources(spec, model_args)
    model = model_cls.from_backbones(**sources, **overrides)
    # the processor follows the model config: its input size, and the fields it names (CRIS: word length, threshold)
    settings = {"image_size": model.config.image_size}
    settings.update({name: getattr(model.config, name) for name in getattr(processor_cls, "config_fields", ())})
    processor = processor_cls.from_backbones(**sources, **settings)
    return model, processor


def stage_parameters(model, stage_names) -> list:
    """Every parameter trained in at least one of `stage_names`, each once, in model order.

    The optimizer holds them all from the start; parameters a stage freezes get no gradient
    (`zero_grad(set_to_none=True)`), so the optimizer leaves them untouched in that stage.
    """
    trained = set()
    for name in stage_names:
        model.set_training_stage(name)
        trained.update(id(p) for p in model.parameters() if p.requires_grad)
    params = [p for p in model.parameters() if id(p) in trained]
    for p in params:  # DDP registers the parameters that require grad when it wraps the model
        p.requires_grad_(True)
    return params



# attribute of the model naming the trained 0-d parameters `prepare_scalars_for_fsdp` made 1-d
FSDP_SCALARS = "_refseg_fsdp_scalars"


def prepare_scalars_for_fsdp(model, trained) -> list:
    """Make `model` shardable by FSDP2 (`fully_shard`), which refuses 0-d parameters; returns their names.

    A 0-d parameter no stage trains (not in `trained`; the stock `CLIPModel`'s `logit_scale`) becomes a buffer
    of the same name and value. A trained one (RISCLIP's Locator scale and bias) becomes 1-d, shape (1,), in
    place: it multiplies or adds by broadcasting, so the forward computes the same values. Their names are
    kept on the model (`FSDP_SCALARS`), so checkpoints and the saved model hold them 0-d again
    (`scalar_shapes_restored`) and load into an unsharded model unchanged.
    """
    trained = {id(p) for p in trained}
    moved, reshaped = [], []
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim():
                continue
            full_name = f"{module_name}.{name}" if module_name else name
            if id(param) in trained:
                param.data = param.data.reshape(1)
                reshaped.append(full_name)
            else:
                delattr(module, name)
                module.register_buffer(name, param.detach())
            moved.append(full_name)
    setattr(model, FSDP_SCALARS, frozenset(reshaped))
    return moved


def scalar_shapes_restored(state: dict, model) -> dict:
    """`state` (name -> tensor) with the parameters `prepare_scalars_for_fsdp` made 1-d back at 0-d."""
    scalars = getattr(model, FSDP_SCALARS, frozenset())
    return {k: v.reshape(()) if k in scalars and v.numel() == 1 else v for k, v in state.items()}
