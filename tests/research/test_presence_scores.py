"""scripts/research/presence_scores.py: the AUROC against hand counts, and the script end to end on a tiny
generalized RefShapes with a tiny model that has the presence head."""

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[2] / "scripts" / "research"))

from presence_scores import auroc, main  # noqa: E402


def test_auroc_counts_pairs_and_half_ties():
    assert auroc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auroc([0.1], [0.9]) == 0.0
    # pairs (p, n): (0.5, 0.5) tie, (0.5, 0.2) win, (0.9, 0.5) win, (0.9, 0.2) win -> (3 + 0.5) / 4
    assert auroc([0.5, 0.9], [0.5, 0.2]) == 0.875
    # 3 positives x 2 negatives: 0.4 beats 0.3 only; 0.6 beats both; 0.3 ties 0.3 -> (1 + 2 + 0.5) / 6
    assert auroc([0.4, 0.6, 0.3], [0.3, 0.5]) == pytest.approx(3.5 / 6)
    with pytest.raises(ValueError, match="each group"):
        auroc([], [0.1])


def test_script_reports_both_groups(tmp_path, tiny_backbones):
    import torch
    from transformers import AutoModel

    from refseg import RisclipProcessor
    from refseg.data import make_refshapes
    from refseg.presets import get_config

    make_refshapes(tmp_path / "data", num_images=12, seed=0, generalized=True)
    torch.manual_seed(0)
    model = AutoModel.from_config(get_config("risclip-tiny-g"))
    with torch.no_grad():
        model.no_target_head.fc2.bias.fill_(-20.0)  # says "present" to everything: flags nothing
    model.save_pretrained(tmp_path / "model")
    RisclipProcessor.from_backbones(clip=str(tiny_backbones["clip"]), image_size=64).save_pretrained(tmp_path / "model")
    figures = main(["--model", str(tmp_path / "model"), "--data_root", str(tmp_path / "data"), "--split", "train"])
    assert figures["head"] is True and figures["present"]["count"] > 0 and figures["absent"]["count"] > 0
    assert figures["flagged_no_target"] == {"absent": 0.0, "present": 0.0}
    assert figures["present"]["median"] > 0.99 and 0.0 <= figures["auroc"] <= 1.0
