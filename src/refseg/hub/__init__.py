"""Hub side of refseg: export for `trust_remote_code`, model cards.

- `export(model, processor, out_dir, remote_code=True, card_data=None, eval_results=None)`: a folder
  a Hub model repo can hold as is (see `refseg.hub.export`).
- `build_model_card(card_data, eval_results=..., ...)`: the README (see `refseg.hub.cards`: the
  evaluation record it reads, and how the card's license is resolved).
- `load_eval_results(path_or_mapping)`: the validated evaluation record (`eval_results.json`).
- `write_flat_modules(modules, out_dir)`: the remote-code flattening on its own
  (see `refseg.hub.remote_code`).

`scripts/push_to_hub.py` wraps `export` and uploads with `huggingface_hub`.
"""

from .cards import (
    available_cards,
    build_model_card,
    load_card_info,
    load_eval_results,
    resolve_eval_dataset,
    resolve_license,
    templates_dir,
)
from .export import PIPELINE_TASK, export, write_remote_code
from .remote_code import module_closure, write_flat_modules

__all__ = [
    "PIPELINE_TASK",
    "available_cards",
    "build_model_card",
    "export",
    "load_card_info",
    "load_eval_results",
    "module_closure",
    "resolve_eval_dataset",
    "resolve_license",
    "templates_dir",
    "write_flat_modules",
    "write_remote_code",
]
