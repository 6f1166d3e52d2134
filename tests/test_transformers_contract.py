"""The transformers contract, for every method (and the CLIPSeg baseline where it applies).

What a transformers user writes first must work: `model(**processor(images=..., text=...))`, the output
arguments (`output_hidden_states`, `output_attentions`, `return_dict`, also from the config), missing weights
initialised as the modules' own `_init_weights` would (the backbones' by the backbones), feature getters that
keep transformers' meaning, `torch.export` with the default configuration, gradient checkpointing that really
recomputes the trainable layers, and the pipeline's `image-segmentation` keys.
ONNX export is in `test_transformers_contract_onnx.py`; FSDP training in `test_transformers_contract_fsdp.py`.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModel
from transformers.utils import ModelOutput

from refseg.training import METHODS, get_method
from refseg.training.modeling import build_model_and_processor

from conftest import tiny_preset

REFSEG_METHODS = sorted(m for m in METHODS if not METHODS[m].baseline)
ALL_METHODS = sorted(METHODS)
TEXTS = ["the red circle", "the big blue square on the left"]


def _image(seed, size=(52, 40)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def built(tiny_backbones):
    """`built(method, **config_overrides) -> (model, processor)`: the tiny preset on the tiny backbones, eval mode."""
    import json

    cache = {}

    def build(method, **overrides):
        key = (method, tuple(sorted(overrides.items())))
        if key not in cache:
            spec = get_method(method)
            args = SimpleNamespace(preset=tiny_preset(method), model_name_or_path=None,
                                   config_overrides=json.dumps(overrides) if overrides else None,
                                   **{name: str(tiny_backbones[name]) for name in spec.backbones})
            torch.manual_seed(0)
            model, processor = build_model_and_processor(spec, args)
            cache[key] = (model.eval(), processor)
        return cache[key]

    return build


def _inputs(processor, images=None):
    images = images if images is not None else [_image(0), _image(1, (33, 61))]
    return processor(images=images, text=TEXTS, return_tensors="pt")


# ------------------------------------------------------------------ 1. model(**processor(...))
@pytest.mark.parametrize("method", ALL_METHODS)
def test_the_processor_output_goes_straight_into_the_model(method, built):
    model, processor = built(method)
    inputs = _inputs(processor)
    assert "original_sizes" in inputs
    with torch.no_grad():
        outputs = model(**inputs)  # no popping
        without = model(**{k: v for k, v in inputs.items() if k != "original_sizes"})
    assert torch.equal(outputs.logits, without.logits)
    masks = processor.post_process_referring_segmentation(outputs, inputs["original_sizes"])
    assert [tuple(m.shape) for m in masks] == [(40, 52), (61, 33)]
    with pytest.raises(ValueError, match="sizes_typo"):
        model(**inputs, sizes_typo=inputs["original_sizes"])


# ------------------------------------------------------------------ 2. output arguments
def _tower_layers(config, tower):
    """The number of layers of a tower: RISAM's image tower and Prompt-RIS's second one are SAM's."""
    if tower == "sam_vision" or (config.model_type == "risam" and tower == "vision"):
        return config.sam_config.vision_config.num_hidden_layers
    clip = config if config.model_type == "clipseg" else config.clip_config
    return getattr(clip, f"{tower}_config").num_hidden_layers


def _expected_towers(method, model):
    if method == "clipseg":  # the stock CLIPSeg returns its image tower's outputs only
        return ["vision"]
    towers = ["vision", "text"]
    if method == "prompt_ris" and model.config.training_stage != "coarse":
        towers.append("sam_vision")
    return towers


@pytest.mark.parametrize("method", ALL_METHODS)
def test_hidden_states_come_back_per_tower_and_leave_the_outputs_unchanged(method, built):
    model, processor = built(method)
    inputs = _inputs(processor, images=_image(0))  # one image, two expressions: encoded once without recording
    with torch.no_grad():
        plain = model(**inputs)
        outputs = model(**inputs, output_hidden_states=True)
    # equal up to rounding: recording encodes the image once per row (a batch of 2 instead of 1)
    assert torch.allclose(plain.logits, outputs.logits, atol=1e-5)
    assert plain.vision_hidden_states is None and plain.text_hidden_states is None
    for tower in _expected_towers(method, model):
        states = outputs[f"{tower}_hidden_states"]
        assert isinstance(states, tuple) and len(states) == _tower_layers(model.config, tower) + 1, tower
        assert all(state.shape[0] == len(TEXTS) for state in states)  # a row per pair, also where images are shared
        assert not torch.equal(states[0], states[-1])


@pytest.mark.parametrize("method", ["cris", "risam"])
def test_hidden_states_of_a_stock_tower_equal_the_stock_modules_own(method, built):
    """CRIS and RISAM run their text tower unchanged: what they return is the stock `CLIPTextModel`'s
    own `hidden_states`, bit for bit."""
    model, processor = built(method)
    inputs = _inputs(processor)
    text_model = model.clip.text_model if method == "cris" else model.clip
    with torch.no_grad():
        outputs = model(**inputs, output_hidden_states=True)
        stock = text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           output_hidden_states=True).hidden_states
    assert len(outputs.text_hidden_states) == len(stock)
    for ours, theirs in zip(outputs.text_hidden_states, stock):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("method", REFSEG_METHODS)
def test_attentions_need_eager_attention_and_are_distributions(method, built, tmp_path):
    model, processor = built(method)
    inputs = _inputs(processor)
    with pytest.raises(ValueError, match="eager"):
        model(**inputs, output_attentions=True)  # the tiny presets run sdpa: no weights to return
    model.save_pretrained(tmp_path)
    model = type(model).from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        outputs = model(**inputs, output_attentions=True)
    for tower in _expected_towers(method, model):
        weights = outputs[f"{tower}_attentions"]
        layers = _tower_layers(model.config, tower)
        # RISCLIP's last image layer runs MaskCLIP's value path (no attention map is formed there)
        assert len(weights) == layers - (method == "risclip" and tower == "vision"), tower
        for w in weights:
            assert torch.allclose(w.sum(-1), torch.ones(()), atol=1e-5)
    head_classes = getattr(type(model), "_head_attention_classes", ())
    assert (outputs.decoder_attentions is not None) == bool(head_classes)
    if head_classes:  # the heads' weights: with the module's values, they give the module's own output
        calls = []
        handles = [m.register_forward_hook(lambda m, args, kwargs, out: calls.append((m, args, kwargs, out)),
                                           with_kwargs=True) for m in model.modules() if isinstance(m, head_classes)]
        try:
            with torch.no_grad():
                outputs = model(**inputs, output_attentions=True)
        finally:
            for handle in handles:
                handle.remove()
        (first, args, kwargs, out), weights = calls[0], outputs.decoder_attentions
        assert len(weights) == len(calls) and all(torch.allclose(w.sum(-1), torch.ones(()), atol=1e-5) for w in weights)
        value = args[2] if len(args) > 2 else kwargs.get("value", args[1])
        v = first.v_proj(value)
        v = v.reshape(v.shape[0], v.shape[1], first.num_heads, -1).transpose(1, 2)
        mixed = torch.matmul(weights[0], v).transpose(1, 2).reshape(out.shape[0], out.shape[1], -1)
        assert torch.allclose(first.out_proj(mixed), out, atol=1e-5)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_return_dict_false_gives_the_tuple_also_from_the_config(method, built):
    model, processor = built(method)
    inputs = _inputs(processor)
    with torch.no_grad():
        outputs = model(**inputs)
        results = [model(**inputs, return_dict=False)]
        # (stock CLIPSeg of transformers 5.25 fails by itself with `config.return_dict=False`: its
        # `get_image_features` then returns a tuple that its own forward reads as an output object)
        if method != "clipseg":
            model.config.return_dict = False
            try:
                results.append(model(**inputs))
            finally:
                model.config.return_dict = True
    expected = outputs.to_tuple()
    for got in results:
        assert isinstance(got, tuple) and len(got) == len(expected)
        assert torch.equal(got[0], outputs.logits)  # no labels: `logits` comes first
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True, return_dict=False)
    assert len(hidden) > len(expected) and isinstance(hidden[-1], tuple)


# ------------------------------------------------------------------ 3. missing weights are initialised
def _clip_q_proj_std(clip_config, tower="text"):
    """CLIP's own initialisation of an attention projection (CLIPPreTrainedModel._init_weights)."""
    sub = getattr(clip_config, f"{tower}_config")
    return sub.hidden_size ** -0.5 * (2 * sub.num_hidden_layers) ** -0.5 * clip_config.initializer_factor


DROPPED = {  # method -> substrings of the state-dict keys deleted from the checkpoint
    "risclip": ["text_model.encoder.layers.1.base_layer.self_attn.q_proj.weight", "refiner.layers.0.norm.running_var",
                "locator.logit_scale", "text_model.encoder.layers.2.adapter_mlp.default.down.weight",
                "text_model.encoder.layers.2.adapter_mlp.default.up.weight"],
    "cris": ["text_model.encoder.layers.1.self_attn.q_proj.weight", "neck.aggregate.1.running_var",
             "decoder.layers.0.self_attn_layer_norm.weight"],
    "risam": ["clip.encoder.layers.1.self_attn.q_proj.weight", "mask_decoder.query_token.weight",
              "feature_enhancement.final_cba.1.running_var"],
    "prompt_ris": ["text_model.encoder.layers.1.base_layer.self_attn.q_proj.weight",
                   "cross_modal_prompting.language_to_vision.0.query_tokens"],
}


@pytest.mark.parametrize("method", REFSEG_METHODS)
def test_weights_missing_from_a_checkpoint_get_their_modules_own_initialisation(method, built, tmp_path):
    model, _ = built(method)
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    saved = load_file(path)
    dropped = sorted(k for k in saved if any(part in k for part in DROPPED[method]))
    assert len(dropped) >= len(DROPPED[method]), dropped
    for key in dropped:
        saved.pop(key)
    save_file(saved, path, metadata={"format": "pt"})
    torch.manual_seed(1)
    reloaded = AutoModel.from_pretrained(tmp_path).state_dict()
    for key, tensor in saved.items():  # loaded tensors untouched
        assert torch.equal(reloaded[key], tensor), key
    checked = 0
    for key in dropped:
        value = reloaded[key].double()
        assert torch.isfinite(value).all() and value.abs().max() < 1e3, key
        if key.endswith("q_proj.weight"):  # CLIP's own scaled normal, not refseg's N(0, 0.02)
            expected = _clip_q_proj_std(model.config.clip_config)
            assert abs(value.std().item() - expected) < 0.2 * expected, (key, value.std().item(), expected)
        elif key.endswith("running_var") or key.endswith("layer_norm.weight"):
            assert torch.equal(value, torch.ones_like(value)), key
        elif key.endswith("up.weight"):  # an adapter's up-projection starts at zero (the stock features)
            assert torch.equal(value, torch.zeros_like(value)), key
        elif key == "locator.logit_scale":
            assert value.item() == pytest.approx(math.log(model.config.locator_logit_scale_init)), key
        elif key.endswith("query_token.weight") or key.endswith("query_tokens"):  # standard normal
            assert 0.5 < value.std().item() < 1.6, (key, value.std().item())
        elif "adapter_" in key and key.endswith("down.weight"):  # Kaiming normal, fan-in
            fan_in = value.shape[1]
            assert abs(value.std().item() - math.sqrt(2 / fan_in)) < 0.35 * math.sqrt(2 / fan_in), key
        else:
            continue
        checked += 1
    assert checked == len(dropped)  # every kind of dropped tensor was held to its own initialisation


@pytest.mark.parametrize("method", REFSEG_METHODS)
def test_a_model_built_from_a_config_initialises_its_clip_as_clip_does(method, built):
    model, _ = built(method)
    config = model.config
    torch.manual_seed(2)
    state = type(model)(config).state_dict()
    keys = [k for k in state if k.endswith(("layers.0.self_attn.q_proj.weight", "layers.0.base_layer.self_attn.q_proj.weight"))
            and (k.startswith("clip.text_model") or k.startswith("clip.encoder"))]  # RISAM holds the text tower alone
    assert len(keys) == 1, keys
    expected = _clip_q_proj_std(config.clip_config, "text")
    std = state[keys[0]].std().item()
    assert abs(std - expected) < 0.2 * expected, (keys[0], std, expected)


# ------------------------------------------------------------------ 4. feature getters keep transformers' meaning
@pytest.mark.parametrize("method", REFSEG_METHODS)
def test_feature_getters_named_as_transformers_return_model_outputs(method, built):
    """In transformers 5, `get_image_features` / `get_text_features` return a `BaseModelOutput`. A method that
    offers other features names them otherwise (CRIS and RISAM: `get_visual_levels`, `get_word_features`)."""
    model, processor = built(method)
    inputs = _inputs(processor)
    for name, args in (("get_image_features", ("pixel_values",)), ("get_text_features", ("input_ids", "attention_mask"))):
        if name in type(model).__dict__ or any(name in klass.__dict__ for klass in type(model).__mro__
                                              if klass.__module__.startswith("refseg")):
            with torch.no_grad():
                assert isinstance(getattr(model, name)(*(inputs[a] for a in args)), ModelOutput), name
    if method in ("cris", "risam"):
        with torch.no_grad():
            assert isinstance(model.get_visual_levels(inputs["pixel_values"]), tuple)
            assert model.get_word_features(inputs["input_ids"], inputs["attention_mask"]) is not None


# ------------------------------------------------------------------ 5. torch.export with the defaults
@pytest.mark.parametrize("method", REFSEG_METHODS)
def test_torch_export_with_the_default_config_equals_eager(method, built):
    model, processor = built(method)
    image = _image(3)
    inputs = dict(_inputs(processor, images=image))  # one image, two expressions: the image-sharing path
    inputs.pop("original_sizes")
    with torch.no_grad():
        expected = model(**inputs).logits
    program = torch.export.export(model, (), kwargs=inputs, strict=False)
    with torch.no_grad():
        got = program.module()(**inputs)
    got = got["logits"] if isinstance(got, dict) else got.logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


# ------------------------------------------------------------------ 6. gradient checkpointing
def _checkpointable_layers(model):
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _checkpointing(model, what):
    """transformers 5.25 renamed gradient checkpointing to activation checkpointing (the old names warn)."""
    return getattr(model, f"activation_checkpointing_{what}", None) or getattr(model, f"gradient_checkpointing_{what}")


def _train_step(model, batch, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# Stages whose trainable layers are not checkpointed, and why: recomputing a BatchNorm layer in training mode
# updates its running statistics a second time (torch.utils.checkpoint replays the forward as it is).
NOT_CHECKPOINTED = {("risclip", "refiner"): "the Refiner's layers are conv-BN-ReLU blocks"}
# The layer kinds that hold a method's training activations, each checkpointed in some stage.
CHECKPOINTED = {
    "risclip": {"AdaptedEncoderLayer", "PreFusionAdapter", "PostFusionLayer"},
    "cris": {"CLIPEncoderLayer", "CrisDecoderLayer"},
    "risam": {"RisamMutualAwareAttention", "RisamDecoderLayer"},
    "prompt_ris": {"PromptedEncoderLayer", "PromptRisDecoderLayer", "PromptRisTextPromptLayer"},
}


@pytest.mark.parametrize("method", REFSEG_METHODS)
def test_gradient_checkpointing_recomputes_the_trainable_layers_with_equal_gradients(method, tiny_backbones, built):
    """In every training stage, the layers that hold activations for backward are checkpointed: with
    checkpointing on, each runs its forward a second time during backward (counted on a module inside it),
    and loss and gradients equal those without it; the layer kinds of `CHECKPOINTED` are among them."""
    import copy

    from conftest import scene_batch

    _, processor = built(method)
    base, _ = built(method)
    model = copy.deepcopy(base)
    spec = METHODS[method]
    scenes = [(_image(5, (48, 48)), [("the red circle", np.eye(48, dtype=bool)),
                                      ("the blue square", np.fliplr(np.eye(48, dtype=bool)))])]
    batch = scene_batch(processor, scenes, model=model)
    batch.pop("original_sizes")
    recomputed = set()
    for stage in spec.stages:
        model.set_training_stage(stage)
        model.train()
        layers = _checkpointable_layers(model)
        # a layer holds activations for backward when its output requires grad (trainable itself, or on the
        # way to trainable parameters: Prompt-RIS's frozen CLIP layers carry the prompts' gradients)
        in_graph = [False] * len(layers)
        probes = [next(m for m in layer.modules() if isinstance(m, torch.nn.Linear)) for layer in layers]
        calls = [0] * len(probes)

        def mark(i):
            def hook(module, args, out):
                out = out[0] if isinstance(out, tuple) else out
                in_graph[i] = in_graph[i] or bool(out.requires_grad)
            return hook

        handles = [probe.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
                   for i, probe in enumerate(probes)]
        handles += [layer.register_forward_hook(mark(i)) for i, layer in enumerate(layers)]
        try:
            _checkpointing(model, "disable")()
            loss, grads = _train_step(model, batch, seed=0)
            plain_calls, calls[:] = list(calls), [0] * len(probes)
            _checkpointing(model, "enable")()
            assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
            checkpointed_loss, checkpointed_grads = _train_step(model, batch, seed=0)
        finally:
            _checkpointing(model, "disable")()
            for handle in handles:
                handle.remove()
        ran = [i for i, n in enumerate(plain_calls) if n and in_graph[i]]
        if (method, stage) in NOT_CHECKPOINTED:
            assert not ran
            continue
        assert ran, f"{method}/{stage}: no checkpointable layer holds activations for backward"
        assert all(calls[i] == 2 * plain_calls[i] for i in ran), (stage, plain_calls, calls)
        recomputed |= {type(layers[i]).__name__ for i in ran}
        assert torch.allclose(loss, checkpointed_loss, atol=1e-6)
        assert grads.keys() == checkpointed_grads.keys()
        for name in grads:
            assert torch.allclose(grads[name], checkpointed_grads[name], atol=1e-5, rtol=1e-4), name
    assert CHECKPOINTED[method] <= recomputed, recomputed


# ------------------------------------------------------------------ 7. pipeline keys
@pytest.mark.parametrize("method", ["risclip", "clipseg"])
def test_pipeline_results_carry_label_score_and_mask(method, built):
    from refseg.pipelines import ReferringImageSegmentationPipeline

    model, processor = built(method)
    pipe = ReferringImageSegmentationPipeline(model=model, processor=processor)
    results = pipe(_image(4), text=TEXTS)
    assert [r["label"] for r in results] == TEXTS == [r["text"] for r in results]
    for result in results:
        assert {"score", "label", "mask"} <= set(result) and isinstance(result["mask"], Image.Image)


@pytest.mark.parametrize("method", REFSEG_METHODS)
def test_processors_take_typed_processing_kwargs(method, built):
    """Each processor declares its `ProcessingKwargs` (tokenizer arguments, flat or as `text_kwargs`, and
    `return_tensors`); unknown keyword arguments are an error, not silently dropped."""
    from transformers.processing_utils import ProcessingKwargs

    _, processor = built(method)
    kwargs_class = type(processor).kwargs_class
    assert kwargs_class.__name__ == f"{type(processor).__name__}Kwargs"
    assert issubclass(kwargs_class, dict) and ProcessingKwargs.__annotations__.keys() <= kwargs_class.__annotations__.keys()
    assert kwargs_class._defaults["text_kwargs"]["return_tensors"] == "pt"
    image = _image(6)
    as_numpy = processor(images=image, text=TEXTS, return_tensors="np")
    assert isinstance(as_numpy["input_ids"], np.ndarray)
    assert isinstance(processor(images=image, text=TEXTS)["input_ids"], torch.Tensor)  # "pt" by default
    with pytest.raises(ValueError, match="colour"):
        processor(images=image, text=TEXTS, colour="red")
    word_length = getattr(processor, "word_length", None)
    if word_length is None:  # the tokenizer's length arguments reach it, flat or per modality
        flat = processor(images=image, text=TEXTS, max_length=4)["input_ids"]
        nested = processor(images=image, text=TEXTS, text_kwargs={"max_length": 4})["input_ids"]
        assert flat.shape[1] == 4 and torch.equal(flat, nested)
    else:  # fixed by the processor's word_length
        assert processor(images=image, text=TEXTS)["input_ids"].shape[1] == word_length
        for kwargs in ({"max_length": 4}, {"text_kwargs": {"padding": "longest"}}):
            with pytest.raises(ValueError, match="word_length"):
                processor(images=image, text=TEXTS, **kwargs)
