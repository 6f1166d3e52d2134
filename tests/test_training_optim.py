"""The optimizer choice, the global-batch arithmetic and the output each stage is judged by."""

import pytest
import torch
import torch.nn.functional as F

from refseg.modeling_outputs import ReferringSegmentationOutput
from refseg.training import METHODS, MethodSpec
from refseg.training.evaluation import select_output
from refseg.training.optim import build_optimizer, resolve_gradient_accumulation


@pytest.mark.parametrize(
    "global_batch, per_device, processes, accumulation, expected",
    [(None, 8, 4, 1, 1), (None, 8, 1, 3, 3), (32, 8, 4, 1, 1), (32, 8, 1, 1, 4), (32, 8, 2, 1, 2),
     (32, 4, 8, 1, 1), (32, 8, 1, 4, 4)],
)
def test_global_batch_gives_the_accumulation(global_batch, per_device, processes, accumulation, expected):
    assert resolve_gradient_accumulation(global_batch, per_device, processes, accumulation) == expected


@pytest.mark.parametrize(
    "global_batch, per_device, processes, accumulation, name",
    [(32, 8, 8, 1, "global_batch_size"),  # 64 per update already
     (30, 8, 1, 1, "global_batch_size"),  # not a multiple of 8
     (32, 8, 1, 2, "gradient_accumulation_steps"),  # 4 would be needed
     (0, 8, 1, 1, "global_batch_size"), (32, 0, 1, 1, "per_device_train_batch_size")],
)
def test_global_batch_that_does_not_divide_is_refused(global_batch, per_device, processes, accumulation, name):
    with pytest.raises(ValueError, match=name):
        resolve_gradient_accumulation(global_batch, per_device, processes, accumulation)


@pytest.mark.parametrize("implementation, flags", [("auto", {"fused": True}), ("fused", {"fused": True}),
                                                   ("foreach", {"foreach": True}),
                                                   ("for-loop", {"foreach": False, "fused": False})])
def test_optimizer_implementation(implementation, flags):
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = build_optimizer(params, optimizer="adamw", learning_rate=0.1, weight_decay=0.01,
                                implementation=implementation)
    assert isinstance(optimizer, torch.optim.AdamW)
    for key, value in flags.items():
        assert bool(optimizer.defaults[key]) is value, key
    assert optimizer.defaults["lr"] == 0.1 and optimizer.defaults["weight_decay"] == 0.01


def test_fused_optimizer_takes_the_for_loop_steps():
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(7)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(3)]
    results = {}
    for implementation in ("for-loop", "fused", "foreach"):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = build_optimizer(params, optimizer="adam", learning_rate=0.05, implementation=implementation)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            optimizer.step()
        results[implementation] = [p.detach() for p in params]
    for implementation in ("fused", "foreach"):
        for a, b in zip(results["for-loop"], results[implementation]):
            assert torch.allclose(a, b, atol=1e-6), implementation
    assert not torch.allclose(results["for-loop"][0], start[0])


def test_bad_optimizer_arguments_are_named():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="optimizer_implementation"):
        build_optimizer(params, learning_rate=0.1, implementation="apex")
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer(params, optimizer="sgd", learning_rate=0.1)


def test_select_output_scores_the_upsampled_coarse_map():
    coarse = torch.tensor([[[4.0, -4.0], [-4.0, 4.0]]])  # (1, 2, 2)
    outputs = ReferringSegmentationOutput(logits=torch.full((1, 8, 8), -9.0), coarse_logits=coarse)
    selected = select_output(outputs, "coarse_logits")
    expected = F.interpolate(coarse[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(selected.logits, expected)
    assert (selected.logits[0, :4, :4] > 0).all() and (selected.logits[0, :4, 4:] < 0).all()
    same = ReferringSegmentationOutput(logits=torch.ones(1, 8, 8), coarse_logits=coarse)
    assert torch.equal(select_output(same, "logits").logits, torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match="output"):
        select_output(ReferringSegmentationOutput(logits=torch.ones(1, 4, 4)), "coarse_logits")


def test_each_stage_names_the_output_it_is_judged_by():
    spec = METHODS["risclip"]
    assert spec.scored_output("locator") == "coarse_logits"
    assert spec.scored_output("refiner") == "logits"
    with pytest.raises(ValueError, match="stage"):
        spec.scored_output("joint")
    with pytest.raises(ValueError, match="stage_outputs"):
        MethodSpec(name="x", model_class="a.B", processor_class="a.C", stages=("one",),
                   stage_outputs={"two": "coarse_logits"})
    assert MethodSpec(name="x", model_class="a.B", processor_class="a.C").scored_output("default") == "logits"
