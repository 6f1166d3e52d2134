"""refseg.adapters prompt tokens: exact stock features without prompts, unload, the extended masks
(every word sees the prompts, causality and padding kept, no NaN), per-forward prompts, gradients
(with gradient checkpointing), save/load, config validation."""

import copy
import json
import threading

import pytest
import torch
from transformers import CLIPModel
from transformers.masking_utils import create_causal_mask

from refseg.adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterConfig,
    BottleneckAdapterConfig,
    PromptedEncoderLayer,
    PromptTokenConfig,
    PromptTokens,
    adapter_layers,
    adapter_named_parameters,
    disable_prompts,
    extend_attention_mask,
    inject_adapter,
    load_adapter,
    mark_only_adapters_trainable,
    prompted_layers,
    save_adapter,
    supply_prompts,
    unload,
)
from refseg.backbones import tiny_clip_config

NUM_LAYERS = 3
HIDDEN = 32
N_PROMPTS = 4
IMPLEMENTATIONS = ["eager", "sdpa"]
TOWERS = ("vision_model", "text_model")


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


@pytest.fixture(scope="module")
def stock_clips():
    """`{implementation: CLIPModel}`: one tiny CLIP (same weights) per attention implementation."""
    torch.manual_seed(0)
    config = tiny_clip_config(
        vocab_size=600, hidden_size=HIDDEN, num_layers=NUM_LAYERS, num_heads=4, image_size=32, patch_size=8,
        max_text_len=16,
    )
    base = CLIPModel(config).eval()
    clips = {}
    for implementation in IMPLEMENTATIONS:
        clip = copy.deepcopy(base)
        clip.set_attn_implementation(implementation)
        assert clip.text_model.config._attn_implementation == implementation
        clips[implementation] = clip
    return clips


def make_inputs(padding="right"):
    """Two samples of 7 tokens ([SOS] ... [EOS]=599); sample 1 padded (right: last 2; left: first 2)."""
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(2, 3, 32, 32, generator=generator)
    input_ids = torch.randint(0, 598, (2, 7), generator=generator)
    input_ids[:, -1] = 599
    attention_mask = torch.ones_like(input_ids)
    if padding == "right":
        input_ids[1, 4] = 599
        attention_mask[1, 5:] = 0
    elif padding == "left":
        attention_mask[1, :2] = 0
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


def real_positions(inputs, sample):
    return inputs["attention_mask"][sample].nonzero().flatten().tolist()


def randomise_prompts(model, seed=0, std=1.0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in adapter_named_parameters(model):
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def prompted(stock, **config):
    model = copy.deepcopy(stock)
    inject_adapter(model, PromptTokenConfig(**{"num_tokens": N_PROMPTS, **config}))
    return model


def layer_outputs(model, inputs, **kwargs):
    """Every encoder layer's output of both towers (hooks on `encoder.layers[i]`) + the final outputs."""
    captured = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
        for tower in TOWERS
        for layer in getattr(model, tower).encoder.layers
    ]
    try:
        with torch.no_grad():
            out = model(**inputs, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    finals = [
        out.vision_model_output.last_hidden_state, out.vision_model_output.pooler_output,
        out.text_model_output.last_hidden_state, out.image_embeds, out.text_embeds,
    ]
    return captured, finals


def text_layer_outputs(model, inputs):
    """`[(B, L, D)]` outputs of every text layer, plus the final last hidden state."""
    captured = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
             for layer in model.text_model.encoder.layers]
    try:
        with torch.no_grad():
            out = model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    finally:
        for hook in hooks:
            hook.remove()
    return captured + [out.last_hidden_state]


def all_equal(first, second):
    return len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second))


# --------------------------------------------------------------------------- exact stock features
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("padding", ["none", "right"])
def test_disabled_prompts_give_the_stock_features_bit_for_bit(stock_clips, implementation, padding):
    stock = stock_clips[implementation]
    model = randomise_prompts(prompted(stock))
    inputs = make_inputs(padding)
    assert len(list(prompted_layers(model))) == 2 * NUM_LAYERS
    stock_states, stock_finals = layer_outputs(stock, inputs)
    with disable_prompts(model):
        states, finals = layer_outputs(model, inputs)
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True)
    assert len(states) == 2 * NUM_LAYERS and all_equal(stock_states + stock_finals, states + finals)
    with torch.no_grad():
        stock_hidden = stock(**inputs, output_hidden_states=True)
    for tower in ("vision_model_output", "text_model_output"):
        assert len(hidden[tower].hidden_states) == NUM_LAYERS + 1
        assert all_equal(stock_hidden[tower].hidden_states, hidden[tower].hidden_states)
    # outside the block the prompts act again, in both towers
    _, active = layer_outputs(model, inputs)
    assert not torch.equal(active[0], stock_finals[0]) and not torch.equal(active[2], stock_finals[2])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("padding", ["none", "right"])
def test_external_prompts_not_supplied_give_the_stock_model(stock_clips, implementation, padding):
    stock = stock_clips[implementation]
    model = prompted(stock, prompt_source="external")
    assert list(adapter_named_parameters(model)) == []  # the external source owns no parameters
    inputs = make_inputs(padding)
    assert all_equal(sum(layer_outputs(stock, inputs), []), sum(layer_outputs(model, inputs), []))


def test_unload_restores_the_stock_modules_and_outputs(stock_clips):
    stock = stock_clips["sdpa"]
    model = copy.deepcopy(stock)
    originals = [layer for tower in TOWERS for layer in getattr(model, tower).encoder.layers]
    inject_adapter(model, PromptTokenConfig(num_tokens=N_PROMPTS))
    randomise_prompts(model)
    inputs = make_inputs("right")
    assert not torch.equal(layer_outputs(model, inputs)[1][2], layer_outputs(stock, inputs)[1][2])
    unload(model)
    restored = [layer for tower in TOWERS for layer in getattr(model, tower).encoder.layers]
    assert len(restored) == 2 * NUM_LAYERS and all(a is b for a, b in zip(originals, restored))
    assert list(adapter_layers(model)) == [] and not hasattr(model, "refseg_adapter_config")
    assert model.state_dict().keys() == stock.state_dict().keys()
    assert all_equal(sum(layer_outputs(stock, inputs), []), sum(layer_outputs(model, inputs), []))


# --------------------------------------------------------------------------- prompts in, prompts out
@pytest.mark.parametrize("insert_at", [0, 1])
def test_prompts_are_in_every_layer_input_and_not_in_its_output(stock_clips, insert_at):
    model = randomise_prompts(prompted(stock_clips["eager"], insert_at=insert_at))
    inputs = make_inputs("right")
    records = []
    hooks = []
    for tower in TOWERS:
        for layer in getattr(model, tower).encoder.layers:
            assert isinstance(layer, PromptedEncoderLayer)

            def inner(_m, args, _out, layer=layer):
                records.append(("inner", layer, args[0]))

            def residual(_m, args, _out, layer=layer):
                records.append(("residual", layer, args[0]))

            def mlp(_m, _args, out, layer=layer):
                records.append(("mlp", layer, out))

            def outer(_m, args, out, layer=layer):
                records.append(("outer", layer, args[0], out))

            hooks.append(layer.base_layer.layer_norm1.register_forward_hook(inner))
            hooks.append(layer.base_layer.layer_norm2.register_forward_hook(residual))
            hooks.append(layer.base_layer.mlp.register_forward_hook(mlp))
            hooks.append(layer.register_forward_hook(outer))
    base_shapes = []
    hooks.append(model.text_model.encoder.layers[0].base_layer.register_forward_hook(
        lambda _m, args, out: base_shapes.append((args[0].shape, out.shape))))
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    inner, outer = [[r for r in records if r[0] == kind] for kind in ("inner", "outer")]
    residuals, mlps = [[r[2] for r in records if r[0] == kind] for kind in ("residual", "mlp")]
    assert len(inner) == len(outer) == len(residuals) == len(mlps) == 2 * NUM_LAYERS
    for (_, layer, seen), (_, same_layer, layer_input, layer_output), h, m in zip(inner, outer, residuals, mlps):
        assert layer is same_layer
        batch, length, width = layer_input.shape
        assert seen.shape == (batch, N_PROMPTS + length, width)  # the stock steps run on n + L tokens
        assert layer_output.shape == (batch, length, width)  # and give back L:
        full = h + m  # the stock layer's output over n + L tokens, without the prompt positions
        assert torch.equal(layer_output, torch.cat([full[:, :insert_at], full[:, insert_at + N_PROMPTS:]], dim=1))
        weight = layer.prompt_tokens["default"].weight
        assert torch.equal(seen[:, insert_at:insert_at + N_PROMPTS], weight.expand(batch, -1, -1))
        kept = torch.cat([seen[:, :insert_at], seen[:, insert_at + N_PROMPTS:]], dim=1)
        assert torch.equal(kept, layer_input)
    # hooks on base_layer and output_hidden_states see the stock (L-token) shapes
    length = inputs["input_ids"].shape[1]
    assert base_shapes == [(torch.Size([2, length, HIDDEN]), torch.Size([2, length, HIDDEN]))]
    assert [h.shape[1] for h in out.text_model_output.hidden_states] == [length] * (NUM_LAYERS + 1)
    assert [h.shape[1] for h in out.vision_model_output.hidden_states] == [17] * (NUM_LAYERS + 1)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("padding", ["none", "right"])
@pytest.mark.parametrize("insert_at", [0, 1])
def test_every_word_sees_the_prompts_and_causal_order_is_kept(stock_clips, implementation, padding, insert_at):
    model = randomise_prompts(prompted(stock_clips[implementation], insert_at=insert_at))
    inputs = make_inputs(padding)
    before = text_layer_outputs(model, inputs)

    # a changed prompt token of the first layer changes every real word's output of that layer
    with torch.no_grad():  # (a random change: a constant added to all channels would vanish in layer_norm1)
        model.text_model.encoder.layers[0].prompt_tokens["default"].weight[N_PROMPTS - 1] += torch.randn(
            HIDDEN, generator=torch.Generator().manual_seed(9))
    after = text_layer_outputs(model, inputs)
    for sample in range(2):
        for position in real_positions(inputs, sample):
            assert not torch.allclose(before[0][sample, position], after[0][sample, position], atol=1e-4), (
                sample, position)

    # a changed later word changes nothing before it, at any layer: causality is kept
    changed = {**inputs, "input_ids": inputs["input_ids"].clone()}
    changed["input_ids"][:, 3] = (changed["input_ids"][:, 3] + 7) % 598
    again = text_layer_outputs(model, changed)
    for first, second in zip(after, again):
        assert torch.equal(first[:, :3], second[:, :3])
        assert not torch.allclose(first[:, 3], second[:, 3], atol=1e-4)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_padding_stays_masked_and_no_row_is_empty(stock_clips, implementation):
    # left padding: the padded tokens come *before* the real ones, so only the padding mask hides them
    model = randomise_prompts(prompted(stock_clips[implementation]))
    inputs = make_inputs("left")
    real = real_positions(inputs, 1)
    assert real == [2, 3, 4, 5, 6]
    before = text_layer_outputs(model, inputs)
    changed = {**inputs, "input_ids": inputs["input_ids"].clone()}
    changed["input_ids"][1, :2] = torch.tensor([11, 13])
    after = text_layer_outputs(model, changed)
    for first, second in zip(before, after):
        assert not torch.isnan(first).any() and not torch.isnan(second).any()
        assert torch.equal(first[1, real], second[1, real])
        assert torch.equal(first[0], second[0])
    # the padded positions themselves did change (the ids are in the forward path)
    assert not torch.allclose(before[0][1, :2], after[0][1, :2], atol=1e-4)
    # The stock mask has empty rows here (rows 0-1 of sample 1: padded, and causal). On CPU they give no
    # NaN either way (sdpa returns zeros, eager averages all keys), so check the masks themselves: every
    # row of every mask the prompted attentions receive may attend to something.
    masks = []
    hooks = [layer.base_layer.self_attn.register_forward_pre_hook(
        lambda _m, _a, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True)
        for layer in model.text_model.encoder.layers]
    try:
        with torch.no_grad():
            model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    finally:
        for hook in hooks:
            hook.remove()
    assert len(masks) == NUM_LAYERS
    for mask in masks:
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min
        assert mask.shape == (2, 1, N_PROMPTS + 7, N_PROMPTS + 7) and allowed.any(dim=-1).all()


def test_padding_stays_masked_in_a_bidirectional_layer():
    """A layer given a 4-D padding mask (no causal order): real tokens never read padded ones."""
    torch.manual_seed(0)
    config = tiny_clip_config(vocab_size=600, hidden_size=HIDDEN, num_layers=1, num_heads=4, image_size=32,
                              patch_size=8, max_text_len=16)
    for implementation in IMPLEMENTATIONS:
        clip = CLIPModel(config).eval()
        clip.set_attn_implementation(implementation)
        inject_adapter(clip, PromptTokenConfig(num_tokens=N_PROMPTS, target_modules=["vision_model.encoder.layers.0"]))
        layer = randomise_prompts(clip).vision_model.encoder.layers[0]
        keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
        mask = keep[:, None, None, :].expand(2, 1, 6, 6)
        if implementation == "eager":
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        x = torch.randn(2, 6, HIDDEN)
        y = x.clone()
        y[0, 4:] = torch.randn(2, HIDDEN)
        with torch.no_grad():
            out_x, out_y = layer(x, mask), layer(y, mask)
        assert torch.equal(out_x[0, :4], out_y[0, :4]) and torch.equal(out_x[1], out_y[1])
        assert not torch.allclose(out_x[0, 4:], out_y[0, 4:], atol=1e-4)


def test_extended_mask_pattern():
    """n = 2 prompts, L = 4 words of a causal tower, word 3 padded (right padding, transformers' pattern)."""
    stock = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)[None, None]
    expected = torch.tensor(
        [
            # P0 P1 w0 w1 w2 w3
            [1, 1, 1, 1, 1, 0],  # prompt rows: all prompts, every non-padding word
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 0, 0, 0],  # word rows: all prompts + their stock pattern
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 0],
        ],
        dtype=torch.bool,
    )[None, None]
    assert torch.equal(extend_attention_mask(stock, 2, seq_len=4), expected)
    # the additive float form (eager) gives the same pattern with 0 / finfo.min
    minimum = torch.finfo(torch.float16).min
    additive = torch.zeros(1, 1, 4, 4, dtype=torch.float16).masked_fill(~stock, minimum)
    extended = extend_attention_mask(additive, 2, seq_len=4)
    assert extended.dtype == torch.float16
    assert torch.equal(extended, torch.zeros(1, 1, 6, 6, dtype=torch.float16).masked_fill(~expected, minimum))
    # no mask: nothing to mask unless the tower is causal (sdpa text tower without padding)
    assert extend_attention_mask(None, 2, seq_len=4) is None
    causal = extend_attention_mask(None, 2, seq_len=4, is_causal=True)
    no_padding = expected.clone()
    no_padding[..., 5] = True
    no_padding[..., 2:, 2:] = torch.ones(4, 4, dtype=torch.bool).tril()
    assert torch.equal(causal, no_padding)
    # prompts after the first token: the same rule, rows and columns in sequence order
    order = torch.tensor([2, 0, 1, 3, 4, 5])
    assert torch.equal(extend_attention_mask(stock, 2, seq_len=4, insert_at=1), expected[..., order, :][..., order])
    # the batch/head dimensions are kept (a per-sample mask stays per sample)
    batched = torch.cat([stock, torch.ones_like(stock)])
    assert extend_attention_mask(batched, 3, seq_len=4).shape == (2, 1, 7, 7)
    with pytest.raises(ValueError, match="4-D"):
        extend_attention_mask(torch.ones(2, 4, dtype=torch.bool), 2, seq_len=4)
    with pytest.raises(ValueError, match="cover"):
        extend_attention_mask(stock, 2, seq_len=5)


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_eager_and_sdpa_agree_with_prompts(stock_clips, padding):
    eager = randomise_prompts(prompted(stock_clips["eager"]))
    sdpa = copy.deepcopy(eager)
    sdpa.set_attn_implementation("sdpa")
    inputs = make_inputs(padding)
    results = [sum(layer_outputs(model, inputs), []) for model in (eager, sdpa)]
    assert len(results[0]) == 2 * NUM_LAYERS + 5
    for a, b in zip(*results):
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=2e-5), (a - b).abs().max()
    # and the prompts matter in both: otherwise agreement would prove nothing
    assert not torch.allclose(results[0][-1], layer_outputs(stock_clips["eager"], inputs)[1][-1], atol=1e-3)


# --------------------------------------------------------------------------- per-forward prompts
def _external_prompts(model, batch=2, seed=5, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    prompts = {}
    for name, layer in prompted_layers(model):
        tensor = torch.randn(batch, N_PROMPTS, layer.hidden_size, generator=generator)
        prompts[name] = tensor.requires_grad_(requires_grad)
    return prompts


def test_lockstep_driving_matches_the_stock_forward_with_supplied_prompts(stock_clips):
    """The Prompt-RIS pattern of the module docstring: the model calls each layer itself with its
    prompts (`layer(h, mask, prompts)`), with transformers' own causal mask for the text tower."""
    for implementation in IMPLEMENTATIONS:
        model = prompted(stock_clips[implementation], prompt_source="external")
        inputs = make_inputs("right")
        prompts = _external_prompts(model)
        with torch.no_grad(), supply_prompts(model, prompts):
            reference = model(**inputs)
        vision, text = model.vision_model, model.text_model
        with torch.no_grad():
            h_v = vision.pre_layrnorm(vision.embeddings(inputs["pixel_values"]))
            h_t = text.embeddings(input_ids=inputs["input_ids"])
            mask = create_causal_mask(config=text.config, inputs_embeds=h_t, attention_mask=inputs["attention_mask"],
                                      cache=None)
            for k in range(NUM_LAYERS):
                h_t = text.encoder.layers[k](h_t, mask, prompts[f"text_model.encoder.layers.{k}"], is_causal=True)
                h_v = vision.encoder.layers[k](h_v, None, prompts[f"vision_model.encoder.layers.{k}"])
        assert torch.equal(reference.vision_model_output.last_hidden_state, h_v)
        assert torch.equal(reference.text_model_output.last_hidden_state, text.final_layer_norm(h_t))
        stock = stock_clips[implementation](**inputs)
        assert not torch.allclose(stock.text_model_output.last_hidden_state,
                                  reference.text_model_output.last_hidden_state, atol=1e-3)


def test_supplied_prompts_are_private_to_the_thread_and_the_block(stock_clips):
    model = prompted(stock_clips["sdpa"], prompt_source="external")
    inputs = make_inputs("right")
    _, stock = layer_outputs(stock_clips["sdpa"], inputs)
    from_thread = []
    with supply_prompts(model, _external_prompts(model)):
        _, inside = layer_outputs(model, inputs)
        worker = threading.Thread(target=lambda: from_thread.append(layer_outputs(model, inputs)[1]))
        worker.start()
        worker.join()
    _, after = layer_outputs(model, inputs)
    assert not torch.equal(inside[2], stock[2]) and not torch.equal(inside[0], stock[0])
    assert all_equal(from_thread[0], stock)  # another thread never sees this block's prompts
    assert all_equal(after, stock)  # nothing outlives the block


def test_supplied_prompts_are_checked(stock_clips):
    model = prompted(stock_clips["sdpa"], prompt_source="external")
    layer = model.text_model.encoder.layers[0]
    x = torch.randn(2, 5, HIDDEN)
    with pytest.raises(ValueError, match="num_tokens"):
        layer(x, None, torch.randn(2, N_PROMPTS + 1, HIDDEN))
    with pytest.raises(ValueError, match="width"):
        layer(x, None, torch.randn(2, N_PROMPTS, HIDDEN + 1))
    with pytest.raises(ValueError, match="batch size"):
        layer(x, None, torch.randn(3, N_PROMPTS, HIDDEN))
    # (n, D) and (1, n, D) are broadcast over the batch
    shared = torch.randn(N_PROMPTS, HIDDEN)
    with torch.no_grad():
        broadcast = layer(x, None, shared, is_causal=True)
        assert torch.equal(broadcast, layer(x, None, shared.expand(2, -1, -1), is_causal=True))
    with pytest.raises(ValueError, match="not a submodule"):
        with supply_prompts(model, {"text_model.encoder.layers.9": shared}):
            pass
    with pytest.raises(ValueError, match="prompted layers"):
        with supply_prompts(model, {"text_model.encoder": shared}):
            pass
    static = prompted(stock_clips["sdpa"])
    with pytest.raises(ValueError, match="static"):
        static.text_model.encoder.layers[0](x, None, shared)
    with pytest.raises(ValueError, match="4-D"):
        layer(x, torch.ones(2, 5), shared)


# --------------------------------------------------------------------------- training
def test_gradients_reach_the_static_prompts(stock_clips):
    model = randomise_prompts(prompted(stock_clips["sdpa"]), std=0.1)
    mark_only_adapters_trainable(model)
    expected = {f"{tower}.encoder.layers.{i}.prompt_tokens.default.weight"
                for tower in TOWERS for i in range(NUM_LAYERS)}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected == {name for name, _ in adapter_named_parameters(model)}
    out = model(**make_inputs("right"))
    (out.text_embeds.square().sum() + out.image_embeds.square().sum()).backward()
    for name, param in model.named_parameters():
        if name in expected:
            assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def _supplied_prompt_grads(model, inputs, use_reentrant=None):
    model = copy.deepcopy(model)
    model.requires_grad_(False)
    if use_reentrant is not None:
        model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
        model.train()  # transformers checkpoints only in training mode (the tiny CLIP has no dropout)
    runs = []
    hook = model.text_model.encoder.layers[0].base_layer.layer_norm1.register_forward_hook(
        lambda _m, args, _o: runs.append(args[0].shape[1]))
    prompts = _external_prompts(model, requires_grad=True)
    with supply_prompts(model, prompts):
        out = model(**inputs)
    loss = out.text_embeds.square().sum() + out.image_embeds.square().sum()
    loss.backward()  # outside the block: a checkpointed layer is replayed here
    hook.remove()
    return {name: tensor.grad for name, tensor in prompts.items()}, runs


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradients_reach_the_supplied_prompts_also_under_gradient_checkpointing(stock_clips, use_reentrant):
    model = prompted(stock_clips["sdpa"], prompt_source="external")
    inputs = make_inputs("right")
    plain, plain_runs = _supplied_prompt_grads(model, inputs)
    assert len(plain) == 2 * NUM_LAYERS
    for name, grad in plain.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    checkpointed, runs = _supplied_prompt_grads(model, inputs, use_reentrant=use_reentrant)
    assert plain_runs == [N_PROMPTS + 7] and runs == [N_PROMPTS + 7] * 2  # the layer was replayed, with its prompts
    for name in plain:
        assert checkpointed[name] is not None and torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_static_prompt_initialisation():
    torch.manual_seed(0)
    tokens = PromptTokens(256, 512, init_std=0.05)
    weight = tokens.weight.detach().double()
    assert weight.shape == (256, 512)
    assert abs(weight.std().item() / 0.05 - 1) < 0.01 and weight.mean().abs().item() < 0.001
    assert PromptTokens(4, 8, source="external").weight is None


# --------------------------------------------------------------------------- files and configs
def test_save_and_load_round_trip_of_the_static_prompts(stock_clips, tmp_path):
    stock = stock_clips["sdpa"]
    trained = randomise_prompts(prompted(stock, insert_at=1, init_std=0.1), seed=3, std=0.2)
    save_adapter(trained, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME])
    data = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    assert data["adapter_type"] == "prompt_tokens" and data["num_tokens"] == N_PROMPTS and data["insert_at"] == 1

    fresh = copy.deepcopy(stock)
    config = load_adapter(fresh, tmp_path)  # injects, then loads
    assert isinstance(config, PromptTokenConfig) and config == trained.refseg_adapter_config["default"]
    saved = dict(adapter_named_parameters(trained))
    loaded = dict(adapter_named_parameters(fresh))
    assert saved.keys() == loaded.keys() and len(saved) == 2 * NUM_LAYERS
    assert all(torch.equal(saved[name], loaded[name]) for name in saved)
    inputs = make_inputs("right")
    assert all_equal(sum(layer_outputs(trained, inputs), []), sum(layer_outputs(fresh, inputs), []))

    mismatched = prompted(stock, num_tokens=N_PROMPTS + 1)
    with pytest.raises(ValueError, match="shape"):
        load_adapter(mismatched, tmp_path)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_tokens": 0}, "num_tokens"),
        ({"num_tokens": 2.0}, "num_tokens"),
        ({"num_tokens": True}, "num_tokens"),
        ({"prompt_source": "cross"}, "prompt_source"),
        ({"init_std": -0.1}, "init_std"),
        ({"init_std": float("nan")}, "init_std"),
        ({"insert_at": -1}, "insert_at"),
        ({"dropout": 1.0}, "dropout"),
        ({"target_modules": None}, "target_modules"),
        ({"target_modules": "layers.(\\d+"}, "target_modules"),
    ],
)
def test_config_rejects_bad_settings(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PromptTokenConfig(**kwargs)


def test_config_json_round_trip(tmp_path):
    config = PromptTokenConfig(num_tokens=8, prompt_source="external", insert_at=1, dropout=0.1,
                               modules_to_save=["v2l"], method_config={"a": 1})
    config.save_pretrained(tmp_path)
    assert AdapterConfig.from_pretrained(tmp_path) == config
    assert PromptTokenConfig().num_tokens == 16 and PromptTokenConfig().insert_at == 0


def test_injection_rules(stock_clips):
    model = prompted(stock_clips["sdpa"])
    with pytest.raises(ValueError, match="already holds"):
        inject_adapter(model, PromptTokenConfig(num_tokens=2), adapter_name="other")
    inject_adapter(model, PromptTokenConfig(num_tokens=2))  # the same name: replaced
    assert model.text_model.encoder.layers[0].prompt_tokens["default"].num_tokens == 2
    with pytest.raises(ValueError, match="matched no module"):
        inject_adapter(copy.deepcopy(stock_clips["sdpa"]), PromptTokenConfig(target_modules=["no_such_layer"]))
    bottleneck = copy.deepcopy(stock_clips["sdpa"])
    inject_adapter(bottleneck, BottleneckAdapterConfig(bottleneck_dim=4))
    with pytest.raises(ValueError, match="not a pre-LN encoder layer"):
        inject_adapter(bottleneck, PromptTokenConfig())
