"""Stage plans and the stage-aware learning-rate schedule.

A run is a sequence of stages (RISCLIP: `locator` then `refiner`). Each stage gets a number of
optimizer updates; the learning rate restarts at its base value when a stage begins and decays
within the stage (polynomial, step, or constant), so a short final stage (RISCLIP's one-epoch
Refiner stage) is not trained at the tail of the previous stage's decay.
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class StagePlan:
    """`names[i]` runs for `steps[i]` optimizer updates; `starts[i]` is its first global step."""

    names: tuple
    steps: tuple

    @property
    def starts(self) -> tuple:
        out, acc = [], 0
        for n in self.steps:
            out.append(acc)
            acc += n
        return tuple(out)

    @property
    def total_steps(self) -> int:
        return sum(self.steps)

    def stage_at(self, step: int) -> int:
        """Index of the stage that global update `step` (0-based) belongs to."""
        for i, (start, n) in enumerate(zip(self.starts, self.steps)):
            if step < start + n:
                return i
        return len(self.steps) - 1


def _parse_stage_values(text: str, flag: str, kind: str, convert) -> dict:
    """`"a:x,b:y"` -> `{"a": convert("x"), ...}`; `convert` returns None for a bad value."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition(":")
        converted = convert(value.strip()) if sep else None
        if converted is None:
            raise ValueError(f"`{flag}` entries must look like 'name:{kind}', got {part!r}")
        out[name.strip()] = converted
    return out


def _positive_int(value: str):
    return int(value) if value.isdigit() and int(value) > 0 else None


def _positive_float(value: str):
    try:
        rate = float(value)
    except ValueError:
        return None
    return rate if rate > 0 and math.isfinite(rate) else None


def parse_stages(text: str) -> dict:
    """Parse `"locator:59,refiner:1"` into `{"locator": 59, "refiner": 1}`."""
    out = _parse_stage_values(text, "stages", "positive_int", _positive_int)
    if not out:
        raise ValueError("`stages` is empty")
    return out


def parse_stage_learning_rates(text: str) -> dict:
    """Parse `"refiner:3e-3"` into `{"refiner": 0.003}` (stages not named use the base rate)."""
    return _parse_stage_values(text, "stage_learning_rates", "positive_float", _positive_float)


def build_stage_plan(
    stage_lengths: dict,
    *,
    known_stages: Sequence[str],
    unit: str,
    updates_per_epoch: int,
    max_steps: Optional[int] = None,
) -> StagePlan:
    """Turn `{stage: length}` (in `unit` = "epochs" or "steps") into a `StagePlan`.

    Stages run in the method's order (`known_stages`), whatever order the mapping has.
    `max_steps`, when given, sets the whole run's length: every stage keeps its share of the
    planned steps, scaled so the total equals `max_steps` (each stage at least one step; the
    rounding remainder goes to the first stage).
    """
    unknown = set(stage_lengths) - set(known_stages)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; this method has {list(known_stages)}")
    if unit not in ("epochs", "steps"):
        raise ValueError(f"`stage_unit` must be 'epochs' or 'steps', got {unit!r}")
    names = tuple(s for s in known_stages if s in stage_lengths)
    steps = [stage_lengths[s] * (updates_per_epoch if unit == "epochs" else 1) for s in names]
    if max_steps is not None:
        if max_steps < len(names):
            raise ValueError(f"`max_steps` ({max_steps}) must allow one step per stage ({len(names)})")
        total = sum(steps)
        scaled = [max(1, math.floor(n * max_steps / total)) for n in steps]
        scaled[0] += max_steps - sum(scaled)  # rounding remainder goes to the first stage
        steps = scaled
    return StagePlan(names=names, steps=tuple(steps))


def staged_lr_lambda(plan: StagePlan, *, kind: str = "polynomial", power: float = 1.0,
                     milestones: Sequence[float] = (), gamma: float = 0.1, end_factor: float = 0.0,
                     stage_scales: Optional[dict] = None, scope: str = "stage"):
    """Multiplier of the base learning rate for global update `step`.

    kind="polynomial": (1 - t)^power * (1 - end_factor) + end_factor.
    kind="step": gamma ** (number of `milestones`, fractions of the span, already passed).
    kind="constant": 1.
    t is the progress in the span `scope` names: `"stage"` (the default) restarts the schedule at
    each stage (RISCLIP's Refiner starts at its own rate); `"run"` runs one schedule over every
    stage of the plan (Prompt-RIS: one polynomial decay over its 20 + 30 epochs).
    `stage_scales` (`{stage: factor}`) multiplies the stages it names (e.g. a Refiner trained at
    3x the base rate); the others keep factor 1.
    """
    if kind not in ("polynomial", "step", "constant"):
        raise ValueError(f"`lr_scheduler` must be polynomial, step or constant, got {kind!r}")
    if scope not in ("stage", "run"):
        raise ValueError(f"`lr_schedule_scope` must be 'stage' or 'run', got {scope!r}")
    stage_scales = dict(stage_scales or {})
    unknown = set(stage_scales) - set(plan.names)
    if unknown:
        raise ValueError(f"`stage_learning_rates` names stage(s) {sorted(unknown)} not in this run {list(plan.names)}")
    scales = [float(stage_scales.get(name, 1.0)) for name in plan.names]

    def fn(step: int) -> float:
        i = plan.stage_at(step)
        if scope == "run":
            t = step / max(sum(plan.steps), 1)
        else:
            t = (step - plan.starts[i]) / max(plan.steps[i], 1)
        t = min(max(t, 0.0), 1.0)
        if kind == "polynomial":
            return scales[i] * ((1.0 - t) ** power * (1.0 - end_factor) + end_factor)
        if kind == "step":
            return scales[i] * gamma ** sum(t >= m for m in milestones)
        return scales[i]

    return fn
