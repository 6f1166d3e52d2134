"""CRIS heads, what the equation references (`test_cris_equations.py`) cannot see: the projector's export path
(the dynamic kernel as one product per sample instead of a grouped convolution, taken only while exporting) and
attention dropout inside the decoder. Found by mutation testing."""

import torch

import refseg.models.cris.modeling_cris_heads as heads


def test_the_projectors_export_path_computes_the_same_dynamic_kernel(monkeypatch):
    torch.manual_seed(0)
    projector = heads.CrisProjector(in_channels=12, hidden_size=8, text_dim=10).double().eval()
    for param in projector.parameters():
        param.data.normal_(0, 0.5)
    x, sentence = torch.randn(3, 12, 5, 7, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    with torch.no_grad():
        grouped = projector(x, sentence)
        monkeypatch.setattr(heads, "is_exporting", lambda: True)
        unfolded = projector(x, sentence)
    assert grouped.shape == (3, 20, 28)
    torch.testing.assert_close(unfolded, grouped, rtol=0, atol=1e-12)


def test_attention_dropout_acts_in_training_only_and_takes_the_decoders_rate():
    layer = heads.CrisDecoderLayer(hidden_size=8, num_heads=2, ffn_dim=16, text_dim=6, dropout=0.3)
    assert layer.self_attn.dropout == 0.3 and layer.cross_attn.dropout == 0.3
    attention = heads.CrisAttention(8, 2, dropout=0.5)
    query = torch.randn(2, 9, 8)
    attention.eval()
    assert torch.equal(attention(query, query, query), attention(query, query, query))
    attention.train()
    torch.manual_seed(1)
    first = attention(query, query, query)
    torch.manual_seed(2)
    assert not torch.allclose(first, attention(query, query, query))
