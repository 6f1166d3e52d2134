"""Tiny local CLIP / SAM backbones: offline loading, tokenizer format, forward shapes, determinism."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    CLIPModel,
    CLIPTokenizer,
    SamModel,
    SamProcessor,
)

from refseg.backbones import (
    save_tiny_backbones,
    sincos_position_embeddings,
    tiny_clip_config,
    tiny_sam_config,
    train_clip_bpe,
)

TEXTS = [
    "the red circle on the left",
    "the blue square above the green triangle",
    "second star from the right",
    "the largest yellow hexagon",
    "a small purple pentagon below the orange star",
]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    return save_tiny_backbones(tmp_path_factory.mktemp("tiny"), seed=0, texts=TEXTS)


def test_folders_hold_expected_files(backbones):
    clip_files = {p.name for p in backbones["clip"].iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
            "preprocessor_config.json"} <= clip_files
    sam_files = {p.name for p in backbones["sam"].iterdir()}
    assert {"config.json", "model.safetensors"} <= sam_files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in clip_files | sam_files)


def test_clip_format_vocab_and_merges(backbones):
    vocab = json.loads((backbones["clip"] / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 1024
    assert vocab["<|startoftext|>"] == 1022 and vocab["<|endoftext|>"] == 1023
    assert vocab["!"] == 0 and vocab["!</w>"] == 256  # byte symbols, then byte symbols + </w>
    lines = (backbones["clip"] / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version")
    for line in lines[1:]:
        left, right = line.split(" ")
        assert left in vocab and right in vocab and left + right in vocab
    assert "circle</w>" in vocab  # every corpus word ends up one token


def test_tokenizer_offline_encode_pad_round_trip(backbones):
    tokenizer = CLIPTokenizer.from_pretrained(backbones["clip"], local_files_only=True)
    assert type(AutoTokenizer.from_pretrained(backbones["clip"])) is CLIPTokenizer
    assert tokenizer.model_max_length == 32
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1022, 1023, 1023)

    encoded = tokenizer("The red  Circle, on the LEFT")
    ids = encoded["input_ids"]
    assert ids[0] == 1022 and ids[-1] == 1023
    assert tokenizer.convert_ids_to_tokens(ids[1:4]) == ["the</w>", "red</w>", "circle</w>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the red circle , on the left"
    # a word never seen in training still encodes (byte-level symbols), no unknown token
    zebra = tokenizer("zebra")["input_ids"][1:-1]
    assert zebra and 1023 not in zebra  # unk is <|endoftext|> (1023) in CLIP
    assert tokenizer.decode(zebra) == "zebra"

    batch = tokenizer(["the red circle", "a blue star on the left"], padding="max_length", return_tensors="pt")
    assert batch["input_ids"].shape == (2, 32)
    assert batch["input_ids"][0, 4:].eq(1023).all()  # bos the red circle eos pad...
    assert batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 27
    long = tokenizer(" ".join(["red"] * 50), truncation=True)["input_ids"]
    assert len(long) == 32 and long[-1] == 1023


def test_clip_forward_with_tokenizer_and_image_processor(backbones):
    model = CLIPModel.from_pretrained(backbones["clip"], local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(backbones["clip"])
    text_config = model.config.text_config
    assert (text_config.bos_token_id, text_config.eos_token_id, text_config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert text_config.vocab_size == len(tokenizer)

    image_processor = AutoImageProcessor.from_pretrained(backbones["clip"])
    pixel_values = image_processor(images=[Image.new("RGB", (120, 80), "red")] * 2, return_tensors="pt").pixel_values
    assert pixel_values.shape == (2, 3, 96, 96)
    text = tokenizer(["the red circle", "the largest yellow hexagon"], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixel_values, **text)
    assert out.logits_per_image.shape == (2, 2)
    assert out.vision_model_output.last_hidden_state.shape == (2, 1 + 12 * 12, 64)
    assert out.text_model_output.last_hidden_state.shape == (2, 32, 64)
    # pooled text output is taken at the first EOS (pad == EOS must not move it)
    with torch.no_grad():
        text_out = model.text_model(**text)
    eos_pos = text["input_ids"][0].tolist().index(1023)
    assert eos_pos == 4  # bos the red circle eos
    torch.testing.assert_close(text_out.pooler_output[0], text_out.last_hidden_state[0, eos_pos])


def _column_probe_error(model: CLIPModel, pixel_values: torch.Tensor) -> float:
    """Mean absolute error (in tokens) of a least-squares probe reading each patch token's column
    from the first encoder layer's input; fitted on half the images, scored on the other half."""
    with torch.no_grad():
        tokens = model.vision_model.pre_layrnorm(model.vision_model.embeddings(pixel_values))[:, 1:]
    batch, length, dim = tokens.shape
    grid = int(length**0.5)
    columns = torch.arange(grid, dtype=torch.float32).repeat(grid).repeat(batch)
    features = torch.cat([tokens.reshape(-1, dim), torch.ones(batch * length, 1)], dim=1)
    half = batch // 2 * length
    weights = torch.linalg.lstsq(features[:half], columns[:half, None]).solution
    return (features[half:] @ weights - columns[half:, None]).abs().mean().item()


def test_clip_position_embeddings_are_2d_sincos(backbones):
    model = CLIPModel.from_pretrained(backbones["clip"], local_files_only=True)
    table = model.vision_model.embeddings.position_embedding.weight
    assert torch.equal(table, sincos_position_embeddings(12, 64))
    assert torch.equal(table[0], torch.zeros(64))  # [CLS]
    # rows (1 + r * 12 + c): the first half codes the column, the second half the row
    assert torch.equal(table[1 + 3, :32], table[1 + 5 * 12 + 3, :32])
    assert torch.equal(table[1 + 5 * 12, 32:], table[1 + 5 * 12 + 7, 32:])
    assert len({tuple(row.tolist()) for row in table[1:]}) == 144
    with pytest.raises(ValueError, match="dim"):
        sincos_position_embeddings(4, 30)


def test_clip_tokens_know_their_position(backbones):
    """With sine-cosine position embeddings a linear probe reads a token's column from the frozen
    tower; with CLIP's own random initialisation (std 0.02) it cannot do much better than guessing."""
    pixel_values = 0.5 * torch.randn(16, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    model = CLIPModel.from_pretrained(backbones["clip"], local_files_only=True).eval()
    stock = CLIPModel(model.config).eval()  # CLIP's own initialisation
    guess = torch.arange(12.0).sub(5.5).abs().mean().item()  # always predicting the centre: 3.0
    assert _column_probe_error(model, pixel_values) < 0.5
    assert _column_probe_error(stock, pixel_values) > 0.8 * guess


def test_sam_forward_with_processor(backbones):
    model = SamModel.from_pretrained(backbones["sam"], local_files_only=True)
    processor = SamProcessor.from_pretrained(backbones["sam"])
    assert isinstance(AutoProcessor.from_pretrained(backbones["sam"]), SamProcessor)
    inputs = processor(images=Image.new("RGB", (200, 100), "blue"), input_points=[[[50, 50]]], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 256, 256)
    assert inputs["reshaped_input_sizes"].tolist() == [[128, 256]]
    with torch.no_grad():
        out = model(**inputs)
        embeddings = model.get_image_embeddings(torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)))
    assert out.pred_masks.shape == (1, 1, 3, 64, 64)
    assert out.iou_scores.shape == (1, 1, 3)
    assert embeddings.shape == (2, 32, 16, 16)
    # random tiny features must differ between images (stock SAM init would make them constant)
    assert (embeddings[0] - embeddings[1]).std() > 0.1


def test_same_seed_same_files_other_seed_other_weights(backbones, tmp_path):
    again = save_tiny_backbones(tmp_path / "again", seed=0, texts=TEXTS)
    other = save_tiny_backbones(tmp_path / "other", seed=1, texts=TEXTS)
    for name in ("clip", "sam"):
        first = load_file(backbones[name] / "model.safetensors")
        second = load_file(again[name] / "model.safetensors")
        third = load_file(other[name] / "model.safetensors")
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)
        assert any(not torch.equal(first[k], third[k]) for k in first)
    for file in ("vocab.json", "merges.txt", "tokenizer.json"):
        assert (backbones["clip"] / file).read_bytes() == (again["clip"] / file).read_bytes()


def test_global_rng_untouched(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    save_tiny_backbones(tmp_path, seed=5, texts=TEXTS[:2], clip_num_layers=1, sam_num_layers=1)
    assert torch.equal(torch.rand(3), expected)


def test_vocab_budget_truncates_merges():
    vocab, merges = train_clip_bpe(TEXTS, vocab_size=520)
    assert len(vocab) == 520 and len(merges) == 520 - 514
    assert vocab["<|endoftext|>"] == 519
    with pytest.raises(ValueError, match="clip_vocab_size"):
        train_clip_bpe(TEXTS, vocab_size=100)
    with pytest.raises(ValueError, match="texts"):
        train_clip_bpe(["  ", ""])


def test_configs_without_saving():
    clip = tiny_clip_config()
    assert clip.vision_config.image_size == 96 and clip.vision_config.patch_size == 8
    assert clip.text_config.max_position_embeddings == 32 and clip.text_config.eos_token_id == 1023
    assert tiny_sam_config().vision_config.global_attn_indexes == [0, 1, 2, 3]
    assert tiny_sam_config(num_layers=8).vision_config.global_attn_indexes == [1, 3, 5, 7]
    assert tiny_sam_config(num_layers=12).vision_config.global_attn_indexes == [2, 5, 8, 11]
    sam = tiny_sam_config(image_size=128)
    assert sam.prompt_encoder_config.image_embedding_size == 8
    with pytest.raises(ValueError, match="global_attn_indexes"):
        tiny_sam_config(num_layers=4, global_attn_indexes=[4])
    with pytest.raises(ValueError, match="patch_size"):
        tiny_clip_config(image_size=100, patch_size=8)
