"""scripts/train.py under FSDP (scripts/configs/accelerate/fsdp.yaml) on two CPU processes over gloo: every
method trains, checkpoints whole tensors, and resumes exactly.

Accelerate takes FSDP only on accelerator devices; tests/fsdp_on_cpu.py makes it take it on CPU processes
too (PyTorch's FSDP2 runs there over gloo) and then runs train.py unchanged. Each run is a `accelerate
launch` of two processes; RISCLIP (two stages, trained 0-d Locator parameters) is in the default suite,
the other methods are slow.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train_script import REPO, TRAIN, _final_method_weights, _free_port, _run

FSDP_CONFIG = REPO / "scripts" / "configs" / "accelerate" / "fsdp.yaml"
ON_CPU = REPO / "tests" / "fsdp_on_cpu.py"

# per method: the flags of a four-update run whose checkpoint at update 2 is followed by updates the resumed run
# must reproduce; with two stages the checkpoint is the end of the first one
RUNS = {
    "risclip": ["--clip", "{clip}", "--config_overrides", json.dumps({"image_size": 64}),
                "--stages", "locator:2,refiner:2"],
    "cris": ["--preset", "cris-tiny", "--clip", "{clip}", "--stages", "default:4"],
    "risam": ["--preset", "risam-tiny", "--clip", "{clip}", "--sam", "{sam}", "--stages", "default:4"],
    "prompt_ris": ["--preset", "prompt-ris-tiny", "--clip", "{clip}", "--sam", "{sam}", "--sentences_per_image", "2",
                   "--stages", "coarse:2,end_to_end:2"],
}


def launch_fsdp(method, backbones, refshapes_root, output_dir, *extra):
    """`accelerate launch --config_file fsdp.yaml` of train.py on two CPU processes (loopback, a free port)."""
    flags = [str({"{clip}": backbones["clip"], "{sam}": backbones["sam"]}.get(f, f)) for f in RUNS[method]]
    args = ["--method", method, *flags, "--dataset", "refshapes", "--data_root", str(refshapes_root),
            "--output_dir", str(output_dir), "--seed", "3", "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-3", "--stage_unit", "steps", "--eval_splits", "val", "--max_eval_samples", "5",
            "--per_device_eval_batch_size", "2", "--report_to", "none", "--logging_steps", "1",
            "--checkpointing_steps", "2", *extra]
    return _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
                 "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
                 str(ON_CPU), str(TRAIN), *args],
                env_extra={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
                           "MASTER_ADDR": "127.0.0.1"}, timeout=600)


def check_fsdp_run_resumes_exactly(method, tiny_backbones, refshapes_root, tmp_path):
    out = tmp_path / "run"
    log = launch_fsdp(method, tiny_backbones, refshapes_root, out)
    assert "Distributed environment: DistributedType.FSDP" in log.stderr + log.stdout
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # the checkpoint holds whole tensors, as an unsharded run writes them
    weights = load_file(str(out / "checkpoint-2" / "method_weights.safetensors"))
    model = _fresh_model(out)
    expected = model.trainable_state_dict()
    assert weights.keys() == expected.keys()
    assert all(weights[k].shape == expected[k].shape for k in weights)
    optimizer = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert all(isinstance(i, int) for i in optimizer["state"])
    uninterrupted = _final_method_weights(out)
    assert any(not torch.equal(uninterrupted[k], weights[k]) for k in weights)  # updates 3 and 4 changed weights
    record = json.loads((out / "eval_results.json").read_text())
    assert record["results"]["val"]["num_samples"] == 5  # 3 + 2 sentences: the shorter shard padded, then dropped

    # the run "died" after update 2: resume from it under FSDP, same final weights bit for bit
    import shutil

    shutil.rmtree(out / "checkpoint-4")
    for f in out.glob("*.safetensors"):
        f.unlink()
    launch_fsdp(method, tiny_backbones, refshapes_root, out, "--resume_from_checkpoint", "latest")
    resumed = _final_method_weights(out)
    assert uninterrupted.keys() == resumed.keys()
    for k in uninterrupted:
        assert torch.equal(uninterrupted[k], resumed[k]), k


def _fresh_model(folder):
    """The model saved in `folder`, loaded unsharded (0-d parameters are 0-d again)."""
    from transformers import AutoModel

    import refseg  # noqa: F401

    return AutoModel.from_pretrained(folder)


@pytest.mark.slow
def test_risclip_trains_under_fsdp_on_two_processes_and_resumes_exactly(tiny_backbones, refshapes_root, tmp_path):
    check_fsdp_run_resumes_exactly("risclip", tiny_backbones, refshapes_root, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cris", "risam", "prompt_ris"])
def test_method_trains_under_fsdp_on_two_processes_and_resumes_exactly(method, tiny_backbones, refshapes_root,
                                                                       tmp_path):
    check_fsdp_run_resumes_exactly(method, tiny_backbones, refshapes_root, tmp_path)


def test_fsdp_config_is_an_fsdp2_accelerate_config():
    import yaml

    config = yaml.safe_load(FSDP_CONFIG.read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    assert Path(ON_CPU).is_file()
