"""Flatten refseg model code into one folder that transformers' remote-code loader can import.

`AutoModel.from_pretrained(folder, trust_remote_code=True)` imports the module named in `auto_map`
from the folder and follows only *flat relative* imports (`from .x import y`, found by a regex)
to other files of the same folder. refseg's model code lives in a package and imports its helpers
by their package paths (`from ...adapters.layers import X`), so the exporter:

1. finds the import closure of the given modules inside `refseg` by parsing their imports with
   `ast` (module-level, function-level and `try:` imports alike);
2. gives every module of the closure a flat name (`refseg.models.risclip.modeling_risclip` ->
   `modeling_risclip`, `refseg.adapters.layers` -> `adapters_layers`, `refseg.losses` -> `losses`);
3. writes each module's source with only its refseg import statements rewritten to
   `from .<flat name> import ...`;
4. checks the written files the way transformers will: every relative import resolves to a written
   file, and every other import (outside `try:` blocks) is the standard library or one of
   `REMOTE_CODE_PACKAGES`.

Only `from <refseg module> import <names>` is supported: `import refseg.x` and importing a refseg
*module object* (`from refseg.adapters import layers`) raise `ValueError`, because transformers'
loader cannot discover such files.
"""

import ast
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Iterable, Union

from transformers.dynamic_module_utils import get_imports, get_relative_imports

logger = logging.getLogger(__name__)

ROOT_PACKAGE = "refseg"
# Third-party packages exported code may import outside `try:` blocks (remote users have them
# because transformers needs them).
REMOTE_CODE_PACKAGES = frozenset(
    {"torch", "transformers", "numpy", "PIL", "safetensors", "huggingface_hub", "tokenizers", "packaging",
     "typing_extensions"}
)


def _is_refseg(module: str) -> bool:
    return module == ROOT_PACKAGE or module.startswith(ROOT_PACKAGE + ".")


def _module_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise ValueError(f"cannot export module {module!r}: no Python source file found")
    return Path(spec.origin)


def _is_package(module: str) -> bool:
    return _module_file(module).name == "__init__.py"


def _is_submodule(package: str, name: str) -> bool:
    """Whether `package.name` is a module (file or sub-package) rather than an attribute."""
    if not _is_package(package):
        return False
    folder = _module_file(package).parent
    return (folder / f"{name}.py").is_file() or (folder / name / "__init__.py").is_file()


def flat_module_name(module: str) -> str:
    """Flat file stem for a refseg module (`refseg.adapters.layers` -> `adapters_layers`).

    Model files keep their own names (`refseg.models.<method>.<file>` -> `<file>`), so `auto_map`
    entries read like transformers' (`modeling_risclip.RisclipModel`).
    """
    if not _is_refseg(module) or module == ROOT_PACKAGE:
        raise ValueError(f"`module` must be a submodule of {ROOT_PACKAGE!r}, got {module!r}")
    parts = module.split(".")[1:]
    if len(parts) == 3 and parts[0] == "models":
        return parts[2]
    return "_".join(parts)


def _refseg_imports(module: str, tree: ast.AST) -> list[tuple[ast.stmt, str]]:
    """`(node, absolute base module)` for every import statement of `tree` that targets refseg."""
    package = module if _is_package(module) else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_refseg(alias.name):
                    raise ValueError(
                        f"{module}: `import {alias.name}` cannot be exported as remote code; "
                        f"use `from <module> import <name>` with the submodule path"
                    )
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module
            if base and _is_refseg(base):
                found.append((node, base))
    return found


def _check_import(module: str, node: ast.ImportFrom, base: str) -> None:
    if base == ROOT_PACKAGE:
        raise ValueError(
            f"{module} line {node.lineno}: imports from the `{ROOT_PACKAGE}` package root; import from "
            f"the submodule path instead (e.g. `from ...adapters.layers import X`) so the code can be exported"
        )
    for alias in node.names:
        if alias.name != "*" and _is_submodule(base, alias.name):
            raise ValueError(
                f"{module} line {node.lineno}: imports the module `{base}.{alias.name}` as an object; import "
                f"names from it instead (`from {base}.{alias.name} import X`) so the code can be exported"
            )


def module_closure(modules: Iterable[str]) -> list[str]:
    """The refseg modules `modules` need, themselves included, in discovery order."""
    queue = [m for m in modules]
    for module in queue:
        if not _is_refseg(module) or module == ROOT_PACKAGE:
            raise ValueError(f"`modules` must be submodules of {ROOT_PACKAGE!r}, got {module!r}")
    seen: list[str] = []
    while queue:
        module = queue.pop(0)
        if module in seen:
            continue
        seen.append(module)
        tree = ast.parse(_module_file(module).read_text(encoding="utf-8"))
        for node, base in _refseg_imports(module, tree):
            _check_import(module, node, base)
            if base not in seen:
                queue.append(base)
    flat = [flat_module_name(m) for m in seen]
    clashes = {name for name in flat if flat.count(name) > 1}
    if clashes:
        raise ValueError(f"modules {seen} map to clashing flat file names {sorted(clashes)}")
    return seen


def rewrite_source(module: str, flat_names: dict[str, str]) -> str:
    """Source of `module` with every refseg import rewritten to a flat relative import."""
    source = _module_file(module).read_text(encoding="utf-8")
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    edits = []
    for node, base in _refseg_imports(module, tree):
        first, last = lines[node.lineno - 1], lines[node.end_lineno - 1]
        if first[: node.col_offset].strip() or last[node.end_col_offset :].strip().split("#")[0].strip(" ;\n"):
            raise ValueError(f"{module} line {node.lineno}: put the refseg import on its own line(s) to export it")
        names = ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in node.names)
        comment = last[node.end_col_offset :].strip()
        statement = f"{first[: node.col_offset]}from .{flat_names[base]} import {names}"
        edits.append((node.lineno - 1, node.end_lineno, statement + (f"  {comment}" if comment else "") + "\n"))
    for start, stop, text in sorted(edits, reverse=True):
        lines[start:stop] = [text]
    return "".join(lines)


def write_flat_modules(modules: Iterable[str], out_dir: Union[str, os.PathLike]) -> dict[str, Path]:
    """Write the flattened closure of `modules` into `out_dir`; returns `{module: written file}`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    closure = module_closure(modules)
    flat_names = {m: flat_module_name(m) for m in closure}
    written = {}
    for module in closure:
        path = out_dir / f"{flat_names[module]}.py"
        header = f"# Exported from `{module}` by refseg.hub.export; refseg imports rewritten to flat ones.\n"
        path.write_text(header + rewrite_source(module, flat_names), encoding="utf-8")
        written[module] = path
    check_remote_code(written.values())
    logger.info("wrote %d remote-code modules to %s", len(written), out_dir)
    return written


def check_remote_code(files: Iterable[Path]) -> None:
    """Raise `ValueError` if transformers' loader would fail on `files` (missing relative files,
    refseg imports left, or third-party imports outside `try:` beyond `REMOTE_CODE_PACKAGES`)."""
    allowed = REMOTE_CODE_PACKAGES | set(sys.stdlib_module_names)
    for path in files:
        for name in get_relative_imports(path):
            if not (path.parent / f"{name}.py").is_file():
                raise ValueError(f"{path.name}: relative import `.{name}` has no file {name}.py in the export")
        extra = sorted(set(get_imports(path)) - allowed)
        if extra:
            raise ValueError(
                f"{path.name}: remote code may import only the standard library and {sorted(REMOTE_CODE_PACKAGES)} "
                f"outside `try:` blocks; found {extra}"
            )


__all__ = [
    "REMOTE_CODE_PACKAGES",
    "check_remote_code",
    "flat_module_name",
    "module_closure",
    "rewrite_source",
    "write_flat_modules",
]
