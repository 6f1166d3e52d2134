"""Tiny local CLIP and SAM backbones for tests and the quickstart (nothing is downloaded).

`save_tiny_backbones(out_dir)` writes two folders that load offline exactly like Hub checkpoints:

- `<out>/clip`: a tiny `CLIPModel` (safetensors) whose image tower starts from 2-D sine-cosine
  position embeddings (`sincos_position_embeddings`), a tiny `CLIPTokenizer` whose byte-level BPE is
  trained locally on `texts` (default: `refseg.data.refshapes.expression_corpus()`), written in
  CLIP's own format (`vocab.json` + `merges.txt`, word ends marked `</w>`, specials
  `<|startoftext|>` / `<|endoftext|>`, pad = `<|endoftext|>` as in openai/clip) plus
  `tokenizer.json`, and a `CLIPImageProcessor` config laid out like openai/clip's (resize the
  shortest edge then centre-crop to `clip_image_size`; methods' processors override resize/crop).
- `<out>/sam`: a tiny `SamModel` and a `SamProcessor` (`SamImageProcessor` resizing the longest
  side to `sam_image_size` and padding to a square, masks at a quarter of that, as SAM does).

Token ids are fixed whatever corpus trains the BPE: the vocabulary is padded to `clip_vocab_size`
with never-produced `<|unused_k|>` placeholders, so `<|startoftext|>` is `clip_vocab_size - 2`
and `<|endoftext|>` (EOS and pad) is `clip_vocab_size - 1`, the largest id as in openai/clip
(code that finds EOS with `input_ids.argmax(-1)` works). `tiny_clip_config()` therefore matches
every tokenizer this module writes with the same `clip_vocab_size`.

Without torchvision, transformers 5 falls back from `CLIPImageProcessor` / `SamImageProcessor`
to their PIL backends (`CLIPImageProcessorPil`, `SamImageProcessorPil`) with a warning; the saved
configs still name the plain classes, so they load with either backend.
"""

import json
import logging
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, SamConfig, SamModel

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_WORD_END = "</w>"
# CLIP's pre-tokenisation pattern (the one transformers' CLIPTokenizer uses).
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_NUM_BASE_TOKENS = 512  # 256 byte symbols + the same with the word-end mark


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for bytes 0..255, in CLIP's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def train_clip_bpe(texts: Iterable[str], vocab_size: int = 1024) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a CLIP-style byte-level BPE on `texts`.

    Returns `(vocab, merges)` in CLIP's layout: byte symbols, byte symbols + `</w>`, one token per
    merge (in merge order), `<|unused_k|>` placeholders up to `vocab_size - 2`, then
    `<|startoftext|>` and `<|endoftext|>`. Merges past the size budget are dropped (a prefix of a
    BPE merge list is itself a valid merge list).
    """
    texts = [text for text in texts if isinstance(text, str) and text.strip()]
    if not texts:
        raise ValueError("`texts` must contain at least one non-empty string to train the tokenizer on")
    if vocab_size < _NUM_BASE_TOKENS + 2:
        raise ValueError(f"`clip_vocab_size` must be at least {_NUM_BASE_TOKENS + 2}, got {vocab_size}")
    tokenizer = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix=_WORD_END))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # stop when every word is one token; the budget is applied below
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix=_WORD_END,
    )
    tokenizer.train_from_iterator(texts, trainer)
    merges = [tuple(pair) for pair in json.loads(tokenizer.to_str())["model"]["merges"]]

    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for token in [*symbols, *(s + _WORD_END for s in symbols)]:
        vocab[token] = len(vocab)
    budget = vocab_size - 2
    kept = []
    for left, right in merges:
        if len(vocab) >= budget:
            logger.warning(
                "Tiny CLIP tokenizer: keeping %d of %d BPE merges (vocab_size=%d)", len(kept), len(merges), vocab_size
            )
            break
        vocab.setdefault(left + right, len(vocab))
        kept.append((left, right))
    unused = 0
    while len(vocab) < budget:
        vocab[f"<|unused_{unused}|>"] = len(vocab)
        unused += 1
    vocab[BOS_TOKEN] = vocab_size - 2
    vocab[EOS_TOKEN] = vocab_size - 1
    return vocab, kept


def tiny_clip_config(
    *,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    image_size: int = 96,
    patch_size: int = 8,
    max_text_len: int = 32,
    projection_dim: Optional[int] = None,
    intermediate_size: Optional[int] = None,
) -> CLIPConfig:
    """A tiny `CLIPConfig` (same sizes for the text and vision towers).

    Args:
        vocab_size (`int`): text vocabulary size; `<|startoftext|>` = `vocab_size - 2`,
            `<|endoftext|>` (EOS and pad) = `vocab_size - 1`, matching `train_clip_bpe`.
        hidden_size, num_layers, num_heads (`int`): width, depth and heads of both towers.
        image_size, patch_size (`int`): vision input size and patch (grid `image_size // patch_size`).
        max_text_len (`int`): text positions (`max_position_embeddings`).
        projection_dim (`int`, *optional*): joint embedding size, defaults to `hidden_size`.
        intermediate_size (`int`, *optional*): MLP width, defaults to `4 * hidden_size`.
    """
    if hidden_size % num_heads:
        raise ValueError(f"`hidden_size` ({hidden_size}) must be divisible by `num_heads` ({num_heads})")
    if image_size % patch_size:
        raise ValueError(f"`image_size` ({image_size}) must be divisible by `patch_size` ({patch_size})")
    intermediate_size = intermediate_size or 4 * hidden_size
    projection_dim = projection_dim or hidden_size
    towers = dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        projection_dim=projection_dim,
    )
    text_config = dict(
        towers,
        vocab_size=vocab_size,
        max_position_embeddings=max_text_len,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    vision_config = dict(towers, image_size=image_size, patch_size=patch_size)
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)


def _default_global_attn_indexes(num_layers: int) -> list[int]:
    """Four global-attention blocks at the end of each quarter, like SAM ViT-B (2, 5, 8, 11 of 12)."""
    if num_layers < 4:
        return list(range(num_layers))
    return sorted({(i + 1) * num_layers // 4 - 1 for i in range(4)})


def tiny_sam_config(
    *,
    hidden_size: int = 32,
    num_layers: int = 4,
    num_heads: int = 2,
    image_size: int = 256,
    patch_size: int = 16,
    window_size: int = 4,
    output_channels: int = 32,
    global_attn_indexes: Optional[Sequence[int]] = None,
    decoder_num_heads: int = 2,
    decoder_mlp_dim: int = 64,
) -> SamConfig:
    """A tiny `SamConfig` whose vision, prompt-encoder and mask-decoder sub-configs fit together.

    Args:
        hidden_size, num_layers, num_heads (`int`): ViT image encoder width, depth, heads.
        image_size, patch_size (`int`): input size (after resize-longest-side + pad) and patch;
            the image embedding grid is `image_size // patch_size` for the prompt encoder too.
        window_size (`int`): windowed-attention size of the non-global blocks.
        output_channels (`int`): neck channels = prompt-encoder and mask-decoder width.
        global_attn_indexes (sequence of `int`, *optional*): global-attention blocks; defaults to
            the last block of each quarter of the encoder (all blocks when fewer than four).
        decoder_num_heads, decoder_mlp_dim (`int`): mask-decoder transformer heads and MLP width.
    """
    if image_size % patch_size:
        raise ValueError(f"`image_size` ({image_size}) must be divisible by `patch_size` ({patch_size})")
    if hidden_size % num_heads:
        raise ValueError(f"`hidden_size` ({hidden_size}) must be divisible by `num_heads` ({num_heads})")
    if output_channels % 16:
        raise ValueError(f"`output_channels` must be a multiple of 16 (mask decoder upscaling), got {output_channels}")
    indexes = _default_global_attn_indexes(num_layers) if global_attn_indexes is None else list(global_attn_indexes)
    if not indexes or any(not 0 <= i < num_layers for i in indexes):
        raise ValueError(f"`global_attn_indexes` must be non-empty layer indexes in [0, {num_layers}), got {indexes}")
    vision_config = dict(
        hidden_size=hidden_size,
        output_channels=output_channels,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        image_size=image_size,
        patch_size=patch_size,
        window_size=window_size,
        global_attn_indexes=indexes,
        num_pos_feats=output_channels // 2,  # shared positional embedding has 2 * num_pos_feats channels
        mlp_dim=4 * hidden_size,
        # The stock SamVisionConfig initialises with std 1e-10, which makes a randomly initialised
        # encoder's features constant; frozen tiny SAMs must still carry image information.
        initializer_range=0.02,
    )
    prompt_encoder_config = dict(hidden_size=output_channels, image_size=image_size, patch_size=patch_size)
    mask_decoder_config = dict(
        hidden_size=output_channels,
        num_attention_heads=decoder_num_heads,
        mlp_dim=decoder_mlp_dim,
        iou_head_hidden_dim=output_channels,
    )
    return SamConfig(
        vision_config=vision_config,
        prompt_encoder_config=prompt_encoder_config,
        mask_decoder_config=mask_decoder_config,
    )


def sincos_position_embeddings(grid: int, dim: int) -> torch.Tensor:
    """2-D sine-cosine position embeddings for a ViT's `[CLS] + grid x grid` tokens, shape `(1 + grid**2, dim)`.

    Half the channels code the column, half the row, each as sines and cosines of the index at
    `dim // 4` frequencies `10000 ** (-k / (dim // 4))` (the fixed embeddings of MAE and of the
    original Transformer); the [CLS] row is zero. `dim` must be divisible by 4.

    Why the tiny CLIP needs them: a pretrained CLIP's learned position embeddings are smooth 2-D
    codes, and RISCLIP's frozen backbone relies on them for "left", "second from the top" and
    for telling shapes apart. CLIP's own initialisation draws them at std 0.02, about a tenth of a
    patch embedding's scale, and a short contrastive pretraining on crops never needs them, so
    token positions can hardly be read back from a randomly initialised tiny CLIP (a linear probe on
    its frozen tokens does little better than always predicting the centre).
    """
    if dim % 4:
        raise ValueError(f"`dim` ({dim}) must be divisible by 4 for 2-D sine-cosine position embeddings")
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    codes = []
    for coordinate in (cols.flatten(), rows.flatten()):
        angles = coordinate[:, None] * frequencies[None]
        codes += [angles.sin(), angles.cos()]
    table = torch.zeros(1 + grid * grid, dim, dtype=torch.float64)
    table[1:] = torch.cat(codes, dim=1)
    return table.float()


def _seeded_model(model_class, config, seed: int):
    """Build `model_class(config)` with weights fixed by `seed`, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.eval()


def _save_clip_tokenizer(folder: Path, texts: Sequence[str], vocab_size: int, max_text_len: int) -> CLIPTokenizer:
    vocab, merges = train_clip_bpe(texts, vocab_size)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=max_text_len)
    tokenizer.save_pretrained(folder)  # tokenizer.json + tokenizer_config.json
    # CLIP's own files, so that the folder also reads like openai/clip's.
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    return tokenizer


def save_tiny_backbones(
    out_dir,
    *,
    seed: int = 0,
    texts: Optional[Sequence[str]] = None,
    clip_vocab_size: int = 1024,
    clip_hidden_size: int = 64,
    clip_num_layers: int = 4,
    clip_num_heads: int = 4,
    clip_image_size: int = 96,
    clip_patch_size: int = 8,
    clip_max_text_len: int = 32,
    sam_hidden_size: int = 32,
    sam_num_layers: int = 4,
    sam_num_heads: int = 2,
    sam_image_size: int = 256,
    sam_patch_size: int = 16,
    sam_window_size: int = 4,
    sam_output_channels: int = 32,
) -> dict[str, Path]:
    """Write a tiny CLIP (`<out_dir>/clip`) and a tiny SAM (`<out_dir>/sam`) that load offline.

    Same `seed` (and `texts`) give identical weights and tokenizer files.

    Args:
        out_dir (`str` or `Path`): parent folder, created if needed.
        seed (`int`): seed of both models' random initialisation.
        texts (sequence of `str`, *optional*): corpus for the tokenizer's BPE; defaults to
            `refseg.data.refshapes.expression_corpus()` (the RefShapes vocabulary).
        clip_*: see `tiny_clip_config` (`clip_max_text_len` is also the tokenizer's `model_max_length`).
        sam_*: see `tiny_sam_config`.

    Returns:
        `dict`: `{"clip": Path, "sam": Path}`.
    """
    # Imported here: without torchvision, resolving these names logs a fallback warning.
    from transformers import CLIPImageProcessor, SamImageProcessor, SamProcessor

    out_dir = Path(out_dir)
    if texts is None:
        from .data.refshapes import expression_corpus  # lazy: keeps this module free of `datasets`

        texts = expression_corpus()
    clip_dir, sam_dir = out_dir / "clip", out_dir / "sam"
    clip_dir.mkdir(parents=True, exist_ok=True)
    sam_dir.mkdir(parents=True, exist_ok=True)

    _save_clip_tokenizer(clip_dir, texts, clip_vocab_size, clip_max_text_len)
    clip_config = tiny_clip_config(
        vocab_size=clip_vocab_size,
        hidden_size=clip_hidden_size,
        num_layers=clip_num_layers,
        num_heads=clip_num_heads,
        image_size=clip_image_size,
        patch_size=clip_patch_size,
        max_text_len=clip_max_text_len,
    )
    clip = _seeded_model(CLIPModel, clip_config, seed)
    with torch.no_grad():
        clip.vision_model.embeddings.position_embedding.weight.copy_(
            sincos_position_embeddings(clip_image_size // clip_patch_size, clip_hidden_size)
        )
    clip.save_pretrained(clip_dir, safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": clip_image_size}, crop_size={"height": clip_image_size, "width": clip_image_size}
    ).save_pretrained(clip_dir)

    sam_config = tiny_sam_config(
        hidden_size=sam_hidden_size,
        num_layers=sam_num_layers,
        num_heads=sam_num_heads,
        image_size=sam_image_size,
        patch_size=sam_patch_size,
        window_size=sam_window_size,
        output_channels=sam_output_channels,
    )
    _seeded_model(SamModel, sam_config, seed).save_pretrained(sam_dir, safe_serialization=True)
    mask_size = sam_image_size // 4
    image_processor = SamImageProcessor(
        size={"longest_edge": sam_image_size},
        pad_size={"height": sam_image_size, "width": sam_image_size},
        mask_size={"longest_edge": mask_size},
        mask_pad_size={"height": mask_size, "width": mask_size},
    )
    SamProcessor(image_processor=image_processor).save_pretrained(sam_dir)
    logger.info("Wrote tiny CLIP to %s and tiny SAM to %s", clip_dir, sam_dir)
    return {"clip": clip_dir, "sam": sam_dir}


__all__ = ["save_tiny_backbones", "sincos_position_embeddings", "tiny_clip_config", "tiny_sam_config", "train_clip_bpe"]
