"""Stage plans and the stage-aware learning-rate schedule (per-stage restarts and rates)."""

import pytest

from refseg.training.schedules import (
    build_stage_plan,
    parse_stage_learning_rates,
    parse_stages,
    staged_lr_lambda,
)

STAGES = ("locator", "refiner")


def test_parse_stages_and_rates():
    assert parse_stages("refiner:2, locator:10") == {"refiner": 2, "locator": 10}
    assert parse_stage_learning_rates("refiner:3e-3") == {"refiner": 0.003}
    assert parse_stage_learning_rates("") == {}
    for bad in ("refiner", "refiner:x", "refiner:0", "refiner:-1e-3", "refiner:nan"):
        with pytest.raises(ValueError, match="stage_learning_rates"):
            parse_stage_learning_rates(bad)
    with pytest.raises(ValueError, match="stages"):
        parse_stages("locator:0")


def test_plan_keeps_method_order_and_scales_to_max_steps():
    plan = build_stage_plan({"refiner": 1, "locator": 3}, known_stages=STAGES, unit="epochs", updates_per_epoch=10)
    assert plan.names == STAGES and plan.steps == (30, 10) and plan.starts == (0, 30)
    assert [plan.stage_at(s) for s in (0, 29, 30, 39)] == [0, 0, 1, 1]
    scaled = build_stage_plan({"locator": 3, "refiner": 1}, known_stages=STAGES, unit="steps",
                              updates_per_epoch=10, max_steps=9)
    assert scaled.steps == (7, 2) and scaled.total_steps == 9
    with pytest.raises(ValueError, match="unknown stage"):
        build_stage_plan({"joint": 1}, known_stages=STAGES, unit="steps", updates_per_epoch=1)


def test_polynomial_decay_restarts_per_stage_at_the_stage_rate():
    plan = build_stage_plan({"locator": 4, "refiner": 2}, known_stages=STAGES, unit="steps", updates_per_epoch=1)
    plain = staged_lr_lambda(plan)
    assert [plain(s) for s in range(6)] == [1.0, 0.75, 0.5, 0.25, 1.0, 0.5]
    scaled = staged_lr_lambda(plan, stage_scales={"refiner": 3.0})
    assert [scaled(s) for s in range(6)] == [1.0, 0.75, 0.5, 0.25, 3.0, 1.5]
    assert staged_lr_lambda(plan, kind="constant", stage_scales={"locator": 0.5})(0) == 0.5
    with pytest.raises(ValueError, match="stage_learning_rates"):
        staged_lr_lambda(plan, stage_scales={"joint": 2.0})
    with pytest.raises(ValueError, match="lr_scheduler"):
        staged_lr_lambda(plan, kind="cosine")


def test_run_scope_decays_once_over_every_stage():
    plan = build_stage_plan({"locator": 4, "refiner": 2}, known_stages=STAGES, unit="steps", updates_per_epoch=1)
    whole = staged_lr_lambda(plan, scope="run")
    assert [whole(s) for s in range(6)] == pytest.approx([1 - s / 6 for s in range(6)])  # no restart at step 4
    stepped = staged_lr_lambda(plan, kind="step", milestones=[0.5], scope="run")
    assert [stepped(s) for s in range(6)] == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.1, 0.1])
    assert staged_lr_lambda(plan, scope="run", stage_scales={"refiner": 2.0})(4) == pytest.approx(2 * 2 / 6)
    with pytest.raises(ValueError, match="lr_schedule_scope"):
        staged_lr_lambda(plan, scope="epoch")
