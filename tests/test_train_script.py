"""scripts/train.py end to end: checkpoints, exact resume, two processes, bad data.

Each run trains the tiny RISCLIP for a handful of steps on the session's RefShapes set.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from refseg.data.refshapes import EXPRESSION_KINDS

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "scripts" / "train.py"


def _common_args(tiny_backbones, refshapes_root, output_dir, **overrides):
    args = {
        "method": "risclip", "clip": str(tiny_backbones["clip"]), "dataset": "refshapes",
        "data_root": str(refshapes_root), "output_dir": str(output_dir), "seed": 3,
        "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, "learning_rate": 1e-3,
        "stages": "locator:4,refiner:2", "stage_unit": "steps", "eval_splits": "val",
        "max_eval_samples": 12, "report_to": "none", "logging_steps": 1,
        "config_overrides": json.dumps({"image_size": 64}),
    }
    args.update(overrides)
    out = []
    for k, v in args.items():
        out += [f"--{k}", str(v)]
    return out


def _run(cmd, env_extra=None, timeout=300):
    """Run ``cmd``; on a timeout make every process of its tree print its stacks (train.py dumps them
    on SIGUSR1), kill the tree and fail with the end of what it printed, so a hang in CI is
    diagnosable. torch's launcher starts each worker in a session of its own: kill them by pid."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = psutil.Process(proc.pid).children(recursive=True)
        for p in tree:
            with contextlib.suppress(psutil.Error):  # a process may end meanwhile
                if any(str(TRAIN) in a for a in p.cmdline()):
                    p.send_signal(signal.SIGUSR1)
                    time.sleep(1.5)  # one worker at a time: their stacks do not interleave
        for p in [psutil.Process(proc.pid), *tree]:
            with contextlib.suppress(psutil.Error):
                p.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, cmd[:8]))} ...\n{stdout[-3000:]}\n"
                    f"{stderr[-12000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(folder):
    return load_file(str(Path(folder) / "method_weights.safetensors"))


def _final_method_weights(output_dir):
    from transformers import AutoModel

    import refseg  # noqa: F401

    model = AutoModel.from_pretrained(output_dir)
    return {k: v for k, v in model.trainable_state_dict().items()}


@pytest.mark.slow
def test_checkpoints_limit_and_exact_resume(tiny_backbones, refshapes_root, tmp_path):
    out = tmp_path / "run"
    base = [sys.executable, str(TRAIN), *_common_args(tiny_backbones, refshapes_root, out,
                                                      checkpointing_steps=2, checkpoints_total_limit=2)]
    _run(base)
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert kept == ["checkpoint-4", "checkpoint-6"]
    assert not list(out.glob(".tmp-checkpoint-*"))
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["stage"] == "locator"
    ckpt_files = {p.name for p in (out / "checkpoint-4").iterdir()}
    assert "method_weights.safetensors" in ckpt_files and "optimizer.pt" in ckpt_files
    # Only the method's own weights: no frozen CLIP tensor in a checkpoint.
    assert not any(k.startswith(("clip.", "vision_model.", "text_model.")) and "adapter" not in k
                   for k in _weights(out / "checkpoint-4"))
    uninterrupted = _final_method_weights(out)
    record = json.loads((out / "eval_results.json").read_text())
    assert {k: record[k] for k in ("dataset", "split_by", "scored_output", "global_step")} == {
        "dataset": "refshapes", "split_by": "unc", "scored_output": "logits", "global_step": 6}
    results = record["results"]
    assert set(results) == {"val"} and results["val"]["num_samples"] == 12

    # scripts/evaluate.py on the saved model reproduces the training run's final evaluation.
    import evaluate as _shadow_check  # noqa: F401  (must be the `evaluate` package, not scripts/evaluate.py)
    assert hasattr(_shadow_check, "load")
    import importlib.util

    spec = importlib.util.spec_from_file_location("refseg_evaluate_script", REPO / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    again = script.main(["--model", str(out), "--dataset", "refshapes", "--data_root", str(refshapes_root),
                         "--split", "val", "--max_samples", "12", "--output", str(tmp_path / "eval.json"),
                         "--by_kind"])
    assert again == results
    assert json.loads((tmp_path / "eval.json").read_text())["results"] == results
    # --by_kind: the same 12 sentences split by kind of expression; the kinds add up to the whole.
    by_kind = json.loads((tmp_path / "eval_by_kind.json").read_text())["val"]
    assert set(by_kind) <= set(EXPRESSION_KINDS) and len(by_kind) >= 2
    assert sum(m["num_samples"] for m in by_kind.values()) == 12
    weighted = sum(m["mIoU"] * m["num_samples"] for m in by_kind.values()) / 12
    assert weighted == pytest.approx(results["val"]["mIoU"], abs=1e-9)
    with pytest.raises(ValueError, match="--by_kind"):
        script.parse_args(["--model", str(out), "--dataset", "refcoco", "--by_kind"])

    # Pretend the run died after step 4: drop what came later and resume from `latest`.
    import shutil

    shutil.rmtree(out / "checkpoint-6")
    for f in out.glob("*.safetensors"):
        f.unlink()
    _run(base + ["--resume_from_checkpoint", "latest"])
    resumed = _final_method_weights(out)
    assert uninterrupted.keys() == resumed.keys()
    for k in uninterrupted:
        assert torch.equal(uninterrupted[k], resumed[k]), k


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_backbones, refshapes_root, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = dict(stages="locator:3", max_eval_samples=15, eval_splits="val,testA", learning_rate=0.1,
                  adam_epsilon=1.0)  # updates linear in the gradient: see the accumulation test
    _run([sys.executable, str(TRAIN), *_common_args(tiny_backbones, refshapes_root, one, **common)])
    # Loopback only, on a free port: gloo otherwise binds to the address the host name resolves to,
    # which on a sandboxed machine need not be reachable (the workers then wait for each other forever).
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
          str(TRAIN), *_common_args(tiny_backbones, refshapes_root, two, per_device_train_batch_size=2, **common)],
         env_extra={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
                    "MASTER_ADDR": "127.0.0.1"})
    r1 = json.loads((one / "eval_results.json").read_text())["results"]
    r2 = json.loads((two / "eval_results.json").read_text())["results"]
    from refseg.data import explode_sentences, load_refer

    for split in ("val", "testA"):  # 15 val sentences: the two shards differ in size
        expected = min(15, len(explode_sentences(load_refer(refshapes_root, "refshapes", "unc", split))))
        assert r1[split]["num_samples"] == r2[split]["num_samples"] == expected
    w1, w2 = _final_method_weights(one), _final_method_weights(two)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4), k
    for split in r1:
        for metric, value in r1[split].items():
            assert r2[split][metric] == pytest.approx(value, abs=1e-6), (split, metric)


def test_missing_image_stops_training_naming_the_file(tiny_backbones, refshapes_root, tmp_path):
    import shutil

    import train

    from refseg.data import load_refs_pickle

    root = tmp_path / "data"
    shutil.copytree(refshapes_root, root)
    train_ids = {r["image_id"] for r in load_refs_pickle(root / "refshapes" / "refs(unc).p") if r["split"] == "train"}
    coco = json.loads((root / "refshapes" / "instances.json").read_text())
    victim = root / "images" / next(im["file_name"] for im in coco["images"] if im["id"] in train_ids)
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        train.main(_common_args(tiny_backbones, root, tmp_path / "run", eval_splits=""))


def test_gradient_accumulation_matches_the_larger_batch(tiny_backbones, refshapes_root, tmp_path):
    import train
    from transformers import set_seed

    from refseg import RisclipModel

    # adam_epsilon=1 makes each update nearly linear in the gradient; with the default 1e-8 Adam
    # turns float-level noise in tiny gradients (summation order) into sign-sized steps.
    common = dict(stages="locator:3", eval_splits="", learning_rate=0.1, adam_epsilon=1.0)
    train.main(_common_args(tiny_backbones, refshapes_root, tmp_path / "big", per_device_train_batch_size=4, **common))
    train.main(_common_args(tiny_backbones, refshapes_root, tmp_path / "acc", per_device_train_batch_size=2,
                            gradient_accumulation_steps=2, **common))
    big, acc = _final_method_weights(tmp_path / "big"), _final_method_weights(tmp_path / "acc")
    for k in big:
        assert torch.allclose(big[k], acc[k], atol=1e-6, rtol=1e-5), k
    set_seed(3)  # the runs' seed, set before the model is built: their starting point
    start = RisclipModel.from_backbones(clip=tiny_backbones["clip"], image_size=64).trainable_state_dict()
    assert any(not torch.equal(start[k], big[k]) for k in big)  # three updates did move the weights


def test_stage_learning_rates_set_each_stage_base_rate(tiny_backbones, refshapes_root, tmp_path):
    import train
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train.main(_common_args(tiny_backbones, refshapes_root, out, stages="locator:2,refiner:2", eval_splits="",
                            stage_learning_rates="refiner:5e-3", report_to="tensorboard"))
    logged = []
    for events in (out / "logs").rglob("events.out.tfevents.*"):  # scalars, and a separate hparams file
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "train/lr" in accumulator.Tags()["scalars"]:
            logged += [(e.step, e.value) for e in accumulator.Scalars("train/lr")]
    # the rate for the next update, logged after updates 1-4: the Locator's decay from 1e-3, then the
    # Refiner's restart at its own 5e-3 and its decay
    assert [s for s, _ in logged] == [1, 2, 3, 4]
    assert [v for _, v in logged] == pytest.approx([5e-4, 5e-3, 2.5e-3, 0.0])
    with pytest.raises(ValueError, match="stage_learning_rates"):
        train.main(_common_args(tiny_backbones, refshapes_root, tmp_path / "bad", stages="locator:1",
                                eval_splits="", stage_learning_rates="joint:5e-3"))


def _tracked_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {}
    for events in Path(log_dir).rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            tags[tag] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
    return tags


def test_locator_stage_is_evaluated_by_its_own_map(tiny_backbones, refshapes_root, tmp_path):
    """While the Locator trains (and when a run ends in that stage), evaluation scores the upsampled
    `coarse_logits`, not the untrained Refiner's `logits`; the log and the record say so."""
    import train
    from accelerate import Accelerator
    from transformers import AutoModel, AutoProcessor

    from refseg.training import evaluate_split
    from refseg.training.samples import EvalSamples

    out = tmp_path / "run"
    results = train.main(_common_args(tiny_backbones, refshapes_root, out, stages="locator:2", eval_steps=1,
                                      report_to="tensorboard"))
    record = json.loads((out / "eval_results.json").read_text())
    assert record["scored_output"] == "coarse_logits" and record["results"] == results
    tags = _tracked_scalars(out / "logs")
    assert [step for step, _ in tags["eval/coarse_logits/val/mIoU"]] == [1, 2]  # periodic, then final
    assert not any(tag.startswith("eval/logits/") for tag in tags)

    # the recorded figures are the saved model's Locator map, and differ from its Refiner's output
    from refseg.data import explode_sentences, load_refer

    model, processor = AutoModel.from_pretrained(out), AutoProcessor.from_pretrained(out)
    samples = EvalSamples(explode_sentences(load_refer(refshapes_root, "refshapes", "unc", "val")).select(range(12)))
    accelerator = Accelerator(cpu=True)
    by_map = evaluate_split(model, processor, samples, accelerator=accelerator, output="coarse_logits")
    by_refiner = evaluate_split(model, processor, samples, accelerator=accelerator)
    assert by_map == pytest.approx(results["val"], abs=1e-9)
    assert by_refiner["mIoU"] != pytest.approx(by_map["mIoU"], abs=1e-3)


def test_global_batch_size_derives_gradient_accumulation(tiny_backbones, refshapes_root, tmp_path):
    import train

    out = tmp_path / "run"
    train.main(_common_args(tiny_backbones, refshapes_root, out, stages="locator:2", eval_splits="",
                            global_batch_size=8, per_device_train_batch_size=4, checkpointing_steps=2))
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_batch_size"] == 8 and state["gradient_accumulation_steps"] == 2
    with pytest.raises(ValueError, match="global_batch_size"):
        train.main(_common_args(tiny_backbones, refshapes_root, tmp_path / "bad", stages="locator:1",
                                eval_splits="", global_batch_size=6, per_device_train_batch_size=4))
