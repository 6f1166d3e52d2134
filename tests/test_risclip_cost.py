"""RISCLIP at a lower cost, same model: the Refiner's projected features and the fusion attention.

Refiner: `refiner_projection_dim` reduces each feature map by a 1x1 conv at CLIP's token grid before it
is upsampled; the layout, the commutation with bilinear upsampling the docs claim, the initial values
and the config checks. Fusion: `FusionAttention` (SDPA, projections fused at compute time) against
`softmax(Q K^T * scale + mask) V` written out with the module's own weights.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from refseg import RisclipConfig, RisclipModel
from refseg.adapters.fusion import FusionAttention, PostFusionLayer, PreFusionAdapter
from refseg.backbones import tiny_clip_config
from refseg.models.risclip.modeling_risclip_heads import RisclipRefiner

pytestmark = pytest.mark.usefixtures("single_thread")

HEADS = dict(adapter_bottleneck_dim=8, fusion_num_heads=4, num_post_fusion_layers=2, refiner_hidden_sizes=[8, 8, 8])


def small_config(**overrides):
    clip = tiny_clip_config(vocab_size=600, hidden_size=32, num_layers=3, num_heads=4, image_size=32, patch_size=8,
                            max_text_len=16)
    return RisclipConfig(clip_config=clip, image_size=64, refiner_feature_layers=[3, 2, 1], **{**HEADS, **overrides})


def randomised_refiner(feature_dim=12, hidden_sizes=(8, 6, 4), projection_dim=5, seed=0):
    """A Refiner with every weight, bias and BatchNorm statistic random (BN in eval mode)."""
    torch.manual_seed(seed)
    refiner = RisclipRefiner(feature_dim, list(hidden_sizes), projection_dim=projection_dim).double().eval()
    with torch.no_grad():
        for param in refiner.parameters():
            param.normal_(0.0, 0.5)
        for layer in refiner.layers:
            layer.norm.running_mean.normal_(0.0, 0.5)
            layer.norm.running_var.uniform_(0.5, 2.0)
    return refiner


# ---- Refiner: layout ----------------------------------------------------------------------------


def test_refiner_layout_is_the_papers_without_projection_and_reduced_with_it():
    paper = RisclipRefiner(48, [16, 8, 4], projection_dim=None)
    assert paper.feature_projections is None
    assert [layer.conv.in_channels for layer in paper.layers] == [1 + 48, 16 + 48, 8 + 48]

    projected = RisclipRefiner(48, [16, 8, 4], projection_dim=6)
    assert [layer.conv.in_channels for layer in projected.layers] == [1 + 6, 16 + 6, 8 + 6]
    layout = [(c.in_channels, c.out_channels, c.kernel_size) for c in projected.feature_projections]
    assert layout == [(48, 6, (1, 1))] * 3

    # the projections run at the token grid (3x5 here), the layers at 3x5, 6x10, 12x20
    sizes = {"projections": [], "layers": []}
    for conv in projected.feature_projections:
        conv.register_forward_hook(lambda _m, args, out: sizes["projections"].append((args[0].shape, out.shape)))
    for layer in projected.layers:
        layer.register_forward_hook(lambda _m, args, _o: sizes["layers"].append(tuple(args[0].shape)))
    features = [torch.randn(2, 48, 3, 5) for _ in range(3)]
    with torch.no_grad():
        scores = projected(torch.rand(2, 1, 3, 5), features)
    assert scores.shape == (2, 2, 24, 40)
    assert sizes["projections"] == [(torch.Size([2, 48, 3, 5]), torch.Size([2, 6, 3, 5]))] * 3
    assert sizes["layers"] == [(2, 7, 3, 5), (2, 22, 6, 10), (2, 14, 12, 20)]


def test_model_builds_either_refiner_from_the_config():
    config = small_config(refiner_projection_dim=None)
    paper = RisclipModel(config).refiner
    assert paper.feature_projections is None and paper.layers[0].conv.in_channels == 1 + 32
    projected = RisclipModel(small_config(refiner_projection_dim=4)).refiner
    assert len(projected.feature_projections) == 3 and projected.layers[0].conv.in_channels == 1 + 4
    assert RisclipConfig.from_dict(config.to_dict()).refiner_projection_dim is None


# ---- Refiner: the projection commutes with upsampling (the docstring's claim) -----------------------


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_projecting_before_upsampling_equals_projecting_after(grid):
    """float64: the two orders agree to 1e-10 (bilinear weights sum to 1, so even the bias commutes)."""
    refiner = randomised_refiner()
    generator = torch.Generator().manual_seed(1)
    probability = torch.rand(2, 1, *grid, generator=generator, dtype=torch.float64)
    features = [torch.randn(2, 12, *grid, generator=generator, dtype=torch.float64) for _ in refiner.layers]
    with torch.no_grad():
        scores = refiner(probability, features)
        # the same Refiner, computed the paper's way round: upsample the raw 12-channel maps, then project
        x = probability
        for layer, projection, feature in zip(refiner.layers, refiner.feature_projections, features):
            if feature.shape[-2:] != x.shape[-2:]:
                feature = F.interpolate(feature, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = layer(torch.cat([x, projection(feature)], dim=1))
        reference = refiner.proj(x)
    assert scores.shape == (2, 2, grid[0] * 8, grid[1] * 8)
    torch.testing.assert_close(scores, reference, atol=1e-10, rtol=0)
    assert reference.std() > 0.1  # not two near-constant maps agreeing


# ---- Refiner: initial values --------------------------------------------------------------------


def test_refiner_projections_start_variance_preserving_and_scores_near_zero():
    torch.manual_seed(0)
    refiner = RisclipModel(small_config(refiner_projection_dim=16, refiner_hidden_sizes=[8, 8, 64])).refiner
    for conv in refiner.feature_projections:  # 32 -> 16: fan-in, unit gain (std 32 ** -0.5)
        assert conv.weight.std().item() == pytest.approx(32 ** -0.5, rel=0.15)
        assert torch.equal(conv.bias, torch.zeros(16))
    # the final 1x1 conv: normal(initializer_range), not the fan-out init of the other convs (std 1 here)
    assert refiner.proj.weight.std().item() == pytest.approx(0.02, rel=0.25)
    assert torch.equal(refiner.proj.bias, torch.zeros(2))
    assert refiner.layers[0].conv.weight.std().item() == pytest.approx(math.sqrt(2 / (8 * 9)), rel=0.15)


def test_refiner_shape_does_not_change_the_initial_values_of_the_rest_of_the_model():
    """The Refiner is built without advancing the RNG: toggling the projection (or resizing the Refiner)
    leaves every adapter and fusion weight drawn by `post_init` as it was."""
    states = []
    variants = ({"refiner_projection_dim": None}, {"refiner_projection_dim": 4}, {"refiner_hidden_sizes": [16, 8, 4]})
    for overrides in variants:
        torch.manual_seed(0)
        model = RisclipModel(small_config(**overrides))
        states.append({k: v for k, v in model.state_dict().items() if not k.startswith("refiner.")})
    assert any(k.startswith("pre_fusion.") for k in states[0])
    for state in states[1:]:
        assert state.keys() == states[0].keys()
        assert all(torch.equal(state[k], states[0][k]) for k in state)


# ---- Refiner: config ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, True, 2.5])
def test_refiner_projection_dim_must_be_none_or_a_positive_int(value):
    with pytest.raises(ValueError, match="refiner_projection_dim"):
        small_config(refiner_projection_dim=value)


def test_refiner_projection_dim_accepts_none_and_positive_ints():
    assert small_config(refiner_projection_dim=None).refiner_projection_dim is None
    assert small_config(refiner_projection_dim=1).refiner_projection_dim == 1


# ---- Fusion attention: SDPA, key/value projections folded for few queries on many keys ----------------


def reference_attention(attn, queries, keys, key_padding_mask=None):
    """softmax(Q K^T * scale + mask) V per head, with the module's own weights; scale = exp(t_h) / sqrt(d_h)."""
    batch, num_queries, dim = queries.shape
    heads, head_dim = attn.num_heads, attn.head_dim

    def split(x, proj):  # (B, N, D) -> (B, H, N, d_h)
        return (x @ proj.weight.T + proj.bias).view(batch, x.shape[1], heads, head_dim).transpose(1, 2)

    q, k, v = split(queries, attn.q_proj), split(keys, attn.k_proj), split(keys, attn.v_proj)
    scale = torch.ones(heads, dtype=q.dtype) if attn.temperature is None else attn.temperature.exp()
    logits = q @ k.transpose(-1, -2) * (scale / math.sqrt(head_dim))[None, :, None, None]
    if key_padding_mask is not None:
        logits = logits + torch.where(key_padding_mask.bool(), 0.0, float("-inf"))[:, None, None, :].to(q.dtype)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, num_queries, dim)
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def attention_inputs(num_queries, num_keys, dim=32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(2, num_queries, dim, generator=generator, dtype=torch.float64)
    keys = torch.randn(2, num_keys, dim, generator=generator, dtype=torch.float64)
    mask = torch.ones(2, num_keys, dtype=torch.long)
    mask[0, -2:] = 0  # two padding keys in the first row, holding garbage that shows if attended
    keys[0, -2:] = 50.0
    return queries, keys, mask


def random_attention(learnable_temperature, dim=32, heads=4, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    attn = FusionAttention(dim, heads, learnable_temperature=learnable_temperature, dropout=dropout).double()
    with torch.no_grad():
        for param in attn.parameters():
            param.normal_(0.0, 0.3)
    return attn


# (queries, keys): 3 text tokens reading 40 image tokens folds the projections; 40 reading 5 does not
PATHS = {"folded": (3, 40), "standard": (40, 5)}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("learnable_temperature", [False, True], ids=["plain", "temperature"])
@pytest.mark.parametrize("path", list(PATHS))
def test_fusion_attention_is_the_written_out_attention(path, learnable_temperature, mode):
    """float64, dropout 0: outputs and every gradient (parameters and inputs) agree to 1e-10."""
    num_queries, num_keys = PATHS[path]
    attn = random_attention(learnable_temperature).train(mode == "train")
    assert attn.folds_keys(num_queries, num_keys) == (path == "folded")
    queries, keys, mask = attention_inputs(num_queries, num_keys)
    queries.requires_grad_(True), keys.requires_grad_(True)
    weights = torch.randn(2, num_queries, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    out = attn(queries, keys, mask)
    expected = reference_attention(attn, queries, keys, mask)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    assert expected.abs().max() < 30  # the padding garbage (50) was not attended to

    grads = torch.autograd.grad((out * weights).sum(), [queries, keys, *attn.parameters()])
    expected_grads = torch.autograd.grad((expected * weights).sum(), [queries, keys, *attn.parameters()])
    names = ["queries", "keys"] + [name for name, _ in attn.named_parameters()]
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-10, rtol=1e-10, msg=name)
        if name != "k_proj.bias":  # softmax ignores a shift shared by every key: its gradient is 0
            assert grad.abs().max() > 1e-6, name
    # without a mask, the padding keys are attended to: the check above is not vacuous
    assert not torch.allclose(attn(queries, keys), out)


@pytest.mark.parametrize("path", list(PATHS))
def test_fusion_attention_dropout_acts_only_while_training(path):
    num_queries, num_keys = PATHS[path]
    attn = random_attention(False, dropout=0.5)
    queries, keys, mask = attention_inputs(num_queries, num_keys)
    expected = reference_attention(attn, queries, keys, mask)
    torch.testing.assert_close(attn.eval()(queries, keys, mask), expected, atol=1e-10, rtol=1e-10)
    torch.manual_seed(0)
    assert not torch.allclose(attn.train()(queries, keys, mask), expected)


def _with_reference_attention(module):
    """A copy of `module` whose every `FusionAttention` runs `reference_attention` instead."""
    import copy

    reference = copy.deepcopy(module)
    for attn in reference.modules():
        if isinstance(attn, FusionAttention):
            attn.forward = lambda q, k, m=None, attn=attn: reference_attention(attn, q, k, m)
    return reference


@pytest.mark.parametrize("learnable_temperature", [False, True], ids=["plain", "temperature"])
def test_fusion_blocks_compute_what_they_did_with_the_reference_attention(learnable_temperature):
    """PostFusion and PreFusion at 40 image and 3 text tokens (+ 2 padding): the text cross-attention takes
    the folded path, the others the standard one; outputs equal the written-out attention's to 1e-10."""
    torch.manual_seed(0)
    options = dict(learnable_temperature=learnable_temperature, channel_scale=True)
    blocks = [PostFusionLayer(32, 4, **options), PreFusionAdapter(48, 24, 32, 4, **options)]
    generator = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    for block, (dim_v, dim_t) in zip(blocks, [(32, 32), (48, 24)]):
        block.double().eval()
        with torch.no_grad():
            for param in block.parameters():
                param.normal_(0.0, 0.3, generator=generator)
        assert block.text_cross_attn.folds_keys(5, 40) and not block.vision_cross_attn.folds_keys(40, 5)
        vision = torch.randn(2, 40, dim_v, generator=generator, dtype=torch.float64)
        text = torch.randn(2, 5, dim_t, generator=generator, dtype=torch.float64)
        out_v, out_t = block(vision, text, mask)
        ref_v, ref_t = _with_reference_attention(block)(vision, text, mask)
        torch.testing.assert_close(out_v, ref_v, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(out_t, ref_t, atol=1e-10, rtol=1e-10)
        assert (out_v - vision).abs().max() > 0.1 and (out_t - text).abs().max() > 0.1  # the branches act


def test_fusion_state_dict_keys_are_unchanged():
    """Checkpoints and adapter files written before the folded attention load as they are."""
    attn = FusionAttention(16, 4, learnable_temperature=True)
    assert list(attn.state_dict()) == [
        "temperature", "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
        "out_proj.weight", "out_proj.bias",
    ]
