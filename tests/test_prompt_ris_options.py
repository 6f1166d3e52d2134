"""Prompt-RIS's loading and plumbing that mutation testing of `modeling_prompt_ris.py` found unheld:
`from_backbones` keeps its checkpoints' names, attention implementation and dtype; with the presence head the
stage's own modules still train; SAM's point table follows SAM's weights; `instance_ids` reach the ICL terms."""

import pytest
import torch
from transformers import AutoModel

from refseg import PromptRisModel
from refseg.presets import get_config


def tiny(**overrides):
    torch.manual_seed(0)
    return AutoModel.from_config(get_config("prompt-ris-tiny", **overrides))


def test_from_backbones_honours_names_attention_and_dtype(tiny_backbones):
    model = PromptRisModel.from_backbones(clip=str(tiny_backbones["clip"]), sam=str(tiny_backbones["sam"]),
                                          attn_implementation="eager", dtype=torch.float64)
    assert model.config._attn_implementation == "eager"
    assert model.clip.config._attn_implementation == model.sam.config._attn_implementation == "eager"
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model.config.clip_config._name_or_path == str(tiny_backbones["clip"])
    assert model.config.sam_config._name_or_path == str(tiny_backbones["sam"])


@pytest.mark.parametrize("stage", ["coarse", "end_to_end"])
def test_the_presence_head_joins_the_stage_without_replacing_it(stage):
    plain, with_head = tiny(), tiny(no_target_head=True)
    for model in (plain, with_head):
        model.set_training_stage(stage)
    trained = lambda m: {n for n, p in m.named_parameters() if p.requires_grad and not n.startswith("no_target_head")}
    assert trained(with_head) == trained(plain) and trained(plain)


def test_the_point_table_follows_sams_weights():
    model = tiny()
    before = model.point_embeddings().clone()
    with torch.no_grad():
        model.sam.prompt_encoder.point_embed[1].weight.add_(1.0)  # SAM's weights change (e.g. loading)
    after = model.point_embeddings()
    torch.testing.assert_close(after, before + 1.0)


def test_instance_ids_reach_the_contrastive_terms(single_thread):
    model = tiny().train()
    size, sam = model.config.image_size, model.config.sam_image_size
    generator = torch.Generator().manual_seed(3)
    inputs = {"pixel_values": torch.randn(1, 3, size, size, generator=generator).expand(2, -1, -1, -1),
              "input_ids": torch.randint(1, 400, (2, 5), generator=generator),
              "sam_pixel_values": torch.randn(1, 3, sam, sam, generator=generator).expand(2, -1, -1, -1)}
    labels = torch.zeros(2, sam, sam)
    labels[:, : sam // 2] = 1  # one mask for both rows: the same instance by their targets
    group = torch.zeros(2, dtype=torch.long)
    same = model(**inputs, labels=labels, group_ids=group).loss_dict["coarse_icl"]
    torch.manual_seed(0)
    apart = model(**inputs, labels=labels, group_ids=group, instance_ids=torch.tensor([0, 1])).loss_dict["coarse_icl"]
    assert not torch.isclose(same, apart)  # named as two instances, the same masks cost differently
