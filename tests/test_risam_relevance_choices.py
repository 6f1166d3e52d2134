"""RISAM's two config choices, each on a hand-built case: the reading of eq. 4 (`relevance_mask_reading`:
"printed" masks where sigma(-s) >= tau, "tau_account" where sigma(s) < tau; scores chosen by hand, masks
expected by hand) and the place of the word positional encoding (`word_position_encoding`: on F_l before the
Mutual-Aware Attention blocks, or in the decoder's eqs. 8-9; hand values of the sine table). Under both
readings: a row that eq. 4 would mask entirely gives finite outputs and gradients, and text padding is never
attended. References: `tests/risam_reference.py`.
"""

import math

import pytest
import torch

from risam_reference import (  # noqa: F401  (`backbones`, `stock_encoders`: module fixtures)
    backbones, stock_encoders,
    HEADS, PLACES, READINGS, SIZE, TAU, close, layer_norm, model_inputs,
    prepared_model, reference_irrelevant, softmax,
)
from refseg import RisamModel

pytestmark = pytest.mark.usefixtures("single_thread")

# ------------------------------------------------------------------ eq. 4: the two readings, by hand
# Scaled similarities s (one sample, 4 pixels x 5 words; word 4 is padding), chosen around both thresholds
# at tau = 0.35: log(0.65 / 0.35) = 0.619 and log(0.35 / 0.65) = -0.619.
HAND_SCORES = [[1.0, 0.5, -0.5, -1.0, 9.0],     # pixel 0
               [0.0, -0.5, -1.0, 0.5, -9.0],    # pixel 1
               [-1.0, -3.0, -1.0, -3.0, 9.0],   # pixel 2
               [2.0, 0.6, 0.7, -0.6, 0.0]]      # pixel 3: either side of +-0.619
HAND_WORDS = [[True, True, True, True, False]]
T, F_ = True, False
HAND_CASES = {
    # printed: masked where sigma(-s) >= 0.35, i.e. s <= 0.619: only s = 1.0, 2.0, 0.7 (and 9.0) stay
    "printed": dict(
        irrelevant=[[F_, T, T, T, F_],
                    [T, T, T, T, T],
                    [T, T, T, T, F_],
                    [F_, T, F_, T, T]],     # 0.6: sigma(-0.6) = 0.354, masked; 0.7: 0.332, kept
        vision=[[F_, T, T, T, T],           # padding (word 4) masked whatever its score
                [F_, F_, F_, F_, T],        # every real word irrelevant: the padding mask alone
                [F_, F_, F_, F_, T],        # likewise
                [F_, T, F_, T, T]],
        language=[[F_, T, T, F_],           # word 0 over pixels 0-3
                  [F_, F_, F_, F_],         # word 1: irrelevant to every pixel -> not masked at all
                  [T, T, T, F_],
                  [F_, F_, F_, F_],         # word 3: likewise
                  [F_, T, F_, T]]),         # the padding word's row (never read: it is masked as a key)
    # tau_account: masked where sigma(s) < 0.35, i.e. s < -0.619: only s = -1.0, -3.0 (and -9.0)
    "tau_account": dict(
        irrelevant=[[F_, F_, F_, T, F_],
                    [F_, F_, T, F_, T],
                    [T, T, T, T, F_],
                    [F_, F_, F_, F_, F_]],  # -0.6: sigma(-0.6) = 0.354 >= 0.35, kept
        vision=[[F_, F_, F_, T, T],
                [F_, F_, T, F_, T],
                [F_, F_, F_, F_, T],        # every real word irrelevant: the padding mask alone
                [F_, F_, F_, F_, T]],
        language=[[F_, F_, T, F_],
                  [F_, F_, T, F_],
                  [F_, T, T, F_],
                  [T, F_, T, F_],
                  [F_, T, F_, F_]]),
}


@pytest.mark.parametrize("reading", READINGS)
def test_eq4_readings_on_a_hand_built_case(reading):
    from refseg.models.risam.modeling_risam_heads import RisamMutualAwareAttention, relevance_masks

    case = HAND_CASES[reading]
    s = torch.tensor([HAND_SCORES], dtype=torch.float64)
    words = torch.tensor(HAND_WORDS)
    assert reference_irrelevant(s, TAU, reading)[0].tolist() == case["irrelevant"]  # the reference, by hand
    vision, language = relevance_masks(s, words, TAU, reading)
    assert vision[0].tolist() == case["vision"]
    assert language[0].tolist() == case["language"]
    # the other reading gives other masks
    other = READINGS[1 - READINGS.index(reading)]
    assert relevance_masks(s, words, TAU, other)[0][0].tolist() != case["vision"]

    # a block whose scores are exactly s (W_v = W_l = identity, C = 5, F_v = s sqrt(C), F_l = identity):
    # its outputs are eq. 5 with the hand-built masks
    c = 5
    block = RisamMutualAwareAttention(c, c, c, TAU, reading).double()
    with torch.no_grad():
        block.vision_proj.weight.copy_(torch.eye(c))
        block.text_proj.weight.copy_(torch.eye(c))
        block.vision_norm.weight.uniform_(0.5, 1.5)
        block.text_norm.bias.uniform_(-1, 1)
        f_v, f_l = s * math.sqrt(c), torch.eye(c, dtype=torch.float64)[None]
        lav, val = block(f_v, f_l, words)
    a = softmax(s.masked_fill(torch.tensor([case["vision"]]), -math.inf))
    a_t = softmax(s.transpose(1, 2).masked_fill(torch.tensor([case["language"]]), -math.inf))
    close(lav, layer_norm(a @ f_l + f_v, block.vision_norm))
    close(val, layer_norm(a_t @ f_v + f_l, block.text_norm))


# ------------------------------------------------------------------ where the word positions go, by hand
SIN1, COS1, SIN2, COS2 = 0.8414709848078965, 0.5403023058681398, 0.9092974268256817, -0.4161468365471424


def check_hand_sine(table):
    """Rows 0-2 of a sine table against hand values: position 0 is (0, 1, 0, 1, ...); positions 1 and 2 start
    (sin 1, cos 1) and (sin 2, cos 2); channels 2-3 of position 1 are sin/cos of 1 / 10000^(2 / d)."""
    d = table.shape[-1]
    assert table[0, 0::2].abs().max() < 1e-12 and (table[0, 1::2] - 1).abs().max() < 1e-12
    assert abs(table[1, 0] - SIN1) < 1e-12 and abs(table[1, 1] - COS1) < 1e-12
    assert abs(table[2, 0] - SIN2) < 1e-12 and abs(table[2, 1] - COS2) < 1e-12
    angle = 1.0 / 10000 ** (2 / d)
    assert abs(table[1, 2] - math.sin(angle)) < 1e-12 and abs(table[1, 3] - math.cos(angle)) < 1e-12


@pytest.mark.parametrize("place", PLACES)
def test_word_position_encoding_place_on_a_hand_built_case(backbones, stock_encoders, place):
    model = prepared_model(backbones, word_position_encoding=place)
    _, clip = stock_encoders
    inputs = model_inputs()
    seen = {}
    hooks = [model.mutual_attention[0].register_forward_pre_hook(lambda _m, args: seen.__setitem__("ma", args)),
             model.mask_decoder.layers[0].register_forward_pre_hook(lambda _m, args: seen.__setitem__("dec", args))]
    with torch.no_grad():
        model(**inputs)
        f_l = clip(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    for hook in hooks:
        hook.remove()
    added = seen["ma"][1] - f_l  # what was added to F_l before the first Mutual-Aware Attention block
    token_pos = seen["dec"][2][0]  # the decoder's encodings of [F_m, words]
    assert token_pos.shape == (8, model.config.hidden_size)
    assert token_pos[0].abs().max() == 0  # the query token's encoding is zero
    if place == "decoder":
        assert added.abs().max() == 0
        check_hand_sine(token_pos[1:])
    else:
        assert token_pos.abs().max() == 0
        close(added[0], added[1], atol=1e-12)  # the same for every sample
        check_hand_sine(added[0])
        assert added.shape[-1] == model.config.clip_config.text_config.hidden_size  # width C'


# ------------------------------------------------------------------ fully masked rows and padding, both readings
# tau at which eq. 4 masks every pair whatever the score (|s| < 13): sigma(-s) >= 1e-6, or sigma(s) < 1 - 1e-6
MASK_ALL = {"printed": 1e-6, "tau_account": 1 - 1e-6}


@pytest.mark.parametrize("reading", READINGS)
def test_fully_masked_rows_give_finite_outputs_and_gradients(backbones, reading):
    from refseg.models.risam.modeling_risam_heads import RisamMutualAwareAttention

    torch.manual_seed(0)
    tau = MASK_ALL[reading]
    block = RisamMutualAwareAttention(16, 12, 16, tau, reading)
    visual = torch.randn(2, 10, 16, requires_grad=True)
    words = torch.randn(2, 5, 12, requires_grad=True)
    word_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    s = block.vision_proj(visual) @ block.text_proj(words).transpose(1, 2) * block.scale
    assert reference_irrelevant(s.detach().double(), tau, reading).all()  # every pair irrelevant
    lav, val = block(visual, words, word_mask)
    assert torch.isfinite(lav).all() and torch.isfinite(val).all()
    (from_pixels,) = torch.autograd.grad(lav.square().sum(), words, retain_graph=True)
    assert from_pixels[0, 3:].abs().max() == 0  # padding words: no pixel attends to them, even then
    assert from_pixels[0, :3].abs().sum() > 0
    (lav.square().sum() + val.square().sum()).backward()
    assert all(g is not None and torch.isfinite(g).all()
               for g in (visual.grad, words.grad, *(p.grad for p in block.parameters())))
    assert visual.grad.abs().sum() > 0 and words.grad[0, :3].abs().sum() > 0

    # the whole model: finite logits, loss and gradients
    torch.manual_seed(0)
    model = RisamModel.from_backbones(sam=backbones["sam"], clip=backbones["clip"], relevance_threshold=tau,
                                      relevance_mask_reading=reading, **HEADS).train()
    inputs = {k: v.float() if v.is_floating_point() else v for k, v in model_inputs().items()}
    labels = torch.zeros(2, SIZE, SIZE)
    labels[:, 10:70, 20:90] = 1
    out = model(**inputs, labels=labels)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("reading", READINGS)
@pytest.mark.parametrize("place", PLACES)
def test_text_padding_is_never_attended(backbones, reading, place):
    model = prepared_model(backbones, std=0.2, attention_std=0.7, relevance_mask_reading=reading,
                           word_position_encoding=place)
    inputs = model_inputs()
    with torch.no_grad():
        out = model(**inputs).logits
        changed = dict(inputs, input_ids=inputs["input_ids"].clone())
        changed["input_ids"][1, 5:] = 17  # padded positions of row 1: never seen
        assert torch.equal(model(**changed).logits, out)
        changed["input_ids"][1, 2] = 17  # a real word: seen
        assert (model(**changed).logits[1] - out[1]).abs().max() > 1e-4


def test_the_two_choices_validate_round_trip_and_reach_the_modules(backbones):
    from refseg import RisamConfig
    from refseg.presets import get_config

    tiny = get_config("risam-tiny")
    for kwargs, field in [({"relevance_mask_reading": "inverted"}, "relevance_mask_reading"),
                          ({"word_position_encoding": "pixels"}, "word_position_encoding")]:
        with pytest.raises(ValueError, match=field):
            RisamConfig(sam_config=tiny.sam_config, clip_config=tiny.clip_config, **{**HEADS, **kwargs})
    for reading in READINGS:
        for place in PLACES:
            config = RisamConfig(sam_config=tiny.sam_config, clip_config=tiny.clip_config, **HEADS,
                                 relevance_mask_reading=reading, word_position_encoding=place)
            again = RisamConfig.from_dict(config.to_dict())
            assert (again.relevance_mask_reading, again.word_position_encoding) == (reading, place)
            model = RisamModel(config)
            assert [block.reading for block in model.mutual_attention] == [reading, reading]
            assert model.mask_decoder.word_positions == (place == "decoder")
