"""Unit tests of `refseg.training.resume`: what a checkpoint holds besides its folder layout.

After `load_state`, the Python, NumPy and torch generators must continue exactly where they were
when `write_rng_state` ran (including the cached second Gaussian of `random.gauss` and NumPy's
legacy `standard_normal`), and weights, optimizer and scheduler must continue the same trajectory.
"""

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from refseg.training.resume import (
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    WEIGHTS_FILE,
    load_state,
    write_main_state,
    write_rng_state,
)


class TinyMethod(torch.nn.Module):
    """A frozen "backbone" plus a trainable head with a buffer, with the two methods the
    checkpoint code uses (`AdaptedModelMixin` provides them on real models)."""

    def __init__(self, head_seed):
        super().__init__()
        torch.manual_seed(0)  # the "pretrained" backbone is the same in every run
        self.backbone = torch.nn.Linear(3, 4).requires_grad_(False)
        torch.manual_seed(head_seed)
        self.head = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))

    def forward(self, x):
        return self.head(self.backbone(x)).squeeze(-1)

    def trainable_state_dict(self):
        return {f"head.{k}": v for k, v in self.head.state_dict().items()}

    def load_trainable_state_dict(self, state):
        self.head.load_state_dict({k.removeprefix("head."): v for k, v in state.items()}, strict=True)


def build(seed):
    model = TinyMethod(head_seed=seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, steps):
    """Steps whose data comes from all three global generators, so RNG and weights interact."""
    losses = []
    for _ in range(steps):
        x = torch.randn(6, 3) + float(np.random.rand()) + random.random()
        loss = (model(x) - 1).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def draws():
    """A few draws from every generator, including the cached-Gaussian paths."""
    return {
        "torch": torch.rand(4).tolist() + torch.randint(0, 1000, (3,)).tolist(),
        "numpy": np.random.rand(3).tolist() + [float(np.random.standard_normal())] + np.random.randint(0, 99, 3).tolist(),
        "python": [random.random(), random.gauss(0, 1), random.randrange(1000)],
    }


def scramble():
    torch.manual_seed(12345)
    np.random.seed(12345)
    random.seed(12345)


@pytest.fixture(autouse=True)
def keep_global_rng():
    """These tests reseed the global generators: give the rest of the session its state back."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


def put_generators_in_a_cached_gaussian_state(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.rand(7)
    np.random.standard_normal()  # legacy NumPy keeps the second Gaussian of a pair
    random.gauss(0, 1)  # so does Python's random.gauss


def test_rng_draws_after_restore_equal_draws_after_save(tmp_path):
    model, optimizer, scheduler = build(0)
    write_main_state(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler)
    put_generators_in_a_cached_gaussian_state(3)
    assert np.random.get_state()[3] == 1, "the test must cover NumPy's cached Gaussian"
    write_rng_state(tmp_path, rank=0)
    expected = draws()
    scramble()
    assert draws() != expected
    load_state(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, rank=0)
    got = draws()
    for name in ("torch", "numpy", "python"):
        assert got[name] == expected[name], f"{name} generator not restored"


def test_each_process_restores_its_own_rng_state(tmp_path):
    model, optimizer, scheduler = build(0)
    write_main_state(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler)
    expected = {}
    for rank in (0, 1):
        put_generators_in_a_cached_gaussian_state(100 + rank)
        write_rng_state(tmp_path, rank=rank)
        expected[rank] = draws()
    assert expected[0] != expected[1]
    for rank in (1, 0):
        scramble()
        load_state(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, rank=rank)
        assert draws() == expected[rank]


def test_a_rank_without_a_saved_rng_state_keeps_its_own_generators(tmp_path):
    """Resuming on more processes than the run was saved with: the extra rank has no file."""
    model, optimizer, scheduler = build(0)
    write_main_state(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler)
    put_generators_in_a_cached_gaussian_state(1)
    write_rng_state(tmp_path, rank=0)
    scramble()
    before = random.getstate(), np.random.get_state(), torch.get_rng_state()
    load_state(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, rank=3)
    after = random.getstate(), np.random.get_state(), torch.get_rng_state()
    assert after[0] == before[0]
    np.testing.assert_array_equal(after[1][1], before[1][1])
    assert torch.equal(after[2], before[2])


def test_rng_files_are_plain_json_and_safetensors(tmp_path):
    write_rng_state(tmp_path, rank=2)
    state = json.loads((tmp_path / "rng_state_2.json").read_text())
    assert set(state) == {"python", "numpy"}
    assert set(load_file(str(tmp_path / "rng_state_2.safetensors"))) >= {"torch"}


def test_weights_optimizer_scheduler_and_rng_continue_the_same_trajectory(tmp_path):
    """Train 3 steps, checkpoint, train 3 more; a fresh model resumed from the checkpoint (and
    generators scrambled in between) must produce the same 3 later losses and final weights."""
    model, optimizer, scheduler = build(0)
    np.random.seed(0)
    random.seed(0)
    train_steps(model, optimizer, scheduler, 3)
    write_main_state(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler)
    write_rng_state(tmp_path, rank=0)
    expected_losses = train_steps(model, optimizer, scheduler, 3)
    expected_state = model.trainable_state_dict()
    expected_lr = scheduler.get_last_lr()

    assert set(load_file(str(tmp_path / WEIGHTS_FILE))) == set(expected_state), "only the trainable part is saved"
    assert (tmp_path / OPTIMIZER_FILE).is_file()
    assert json.loads((tmp_path / SCHEDULER_FILE).read_text())["last_epoch"] == 3

    resumed, r_optimizer, r_scheduler = build(1)  # different initial head weights
    scramble()
    load_state(tmp_path, model=resumed, optimizer=r_optimizer, scheduler=r_scheduler, rank=0)
    assert r_scheduler.last_epoch == 3
    assert train_steps(resumed, r_optimizer, r_scheduler, 3) == expected_losses
    assert r_scheduler.get_last_lr() == expected_lr
    for key, value in resumed.trainable_state_dict().items():
        assert torch.equal(value, expected_state[key]), key
