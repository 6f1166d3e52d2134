"""A restricted unpickler for the refer `refs(<split_by>).p` files.

The original refer pickles (RefCOCO, RefCOCO+, RefCOCOg) are Python-2 pickles of a list of
plain dicts. Plain `pickle.load` would execute whatever callable a crafted file names, so
`refseg` never uses it on these files. `RestrictedUnpickler` admits only plain containers and
scalars: dict, list, tuple, set, frozenset, str, bytes, int, float, bool and None.

How that is enforced: every callable a pickle can invoke (REDUCE, NEWOBJ, INST, OBJ, BUILD)
must first be fetched with a GLOBAL/STACK_GLOBAL opcode, which goes through `find_class`.
`find_class` hands out only three harmless constructors that protocols 0-2 need to express
plain data (`set`, `frozenset`, and a bytes decoder standing in for `_codecs.encode`) and
raises `pickle.UnpicklingError` for every other global, before anything is called. Persistent
ids are refused too. Protocols 0-5 are read; Python-2 `str` objects are decoded as UTF-8 and,
when that fails, as latin-1 (which always succeeds), so py2-written refer files load.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from typing import Any

logger = logging.getLogger(__name__)


def _bytes_from_latin1(text: str, encoding: str = "latin1", *args: Any) -> bytes:
    """Stand-in for `_codecs.encode(text, "latin1")`, which protocols 0-2 use to store `bytes`."""
    if args or not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(
            f"refused _codecs.encode call with arguments of types "
            f"{type(text).__name__}, {encoding!r}: only latin-1 encoding of a str is admitted"
        )
    return text.encode("latin-1")


# (module, name) -> the harmless callable handed out instead of the real global.
_ALLOWED_GLOBALS = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _bytes_from_latin1,
}


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that refuses every global except plain-container constructors.

    Args:
        file: binary file object to read from.
        source: name used in error messages (usually the file path).
        **kwargs: passed to `pickle.Unpickler` (`encoding`, `errors`, `fix_imports`).
    """

    def __init__(self, file: io.BufferedIOBase, *, source: str = "<pickle>", **kwargs: Any):
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(
                f"{self.source}: refused global '{module}.{name}': refs pickles may contain only "
                "plain containers and scalars (dict, list, tuple, set, str, bytes, int, float, "
                "bool, None); the file was not executed"
            )
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"{self.source}: refused persistent id {pid!r}")


def restricted_loads(data: bytes, *, source: str = "<bytes>") -> Any:
    """Unpickle `data` with `RestrictedUnpickler` (UTF-8, then latin-1 for py2 strings).

    Raises:
        pickle.UnpicklingError: the data names a global other than set/frozenset/bytes, or is
            not a valid pickle. The message starts with `source`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"data: expected bytes, got {type(data).__name__}")
    try:
        return _load(data, source, "utf-8")
    except UnicodeDecodeError:
        logger.info("%s: py2 strings are not UTF-8, decoding them as latin-1", source)
        return _load(data, source, "latin1")


def _load(data: bytes, source: str, encoding: str) -> Any:
    if len(data) >= 2 and data[0] == pickle.PROTO[0] and data[1] > pickle.HIGHEST_PROTOCOL:
        raise pickle.UnpicklingError(
            f"{source}: written with pickle protocol {data[1]}, newer than this Python reads (protocols 0-"
            f"{pickle.HIGHEST_PROTOCOL}); re-save it with protocol {pickle.HIGHEST_PROTOCOL} or lower"
        )
    try:
        return RestrictedUnpickler(io.BytesIO(data), source=source, encoding=encoding).load()
    except UnicodeDecodeError:
        raise  # the caller retries with latin-1
    except pickle.UnpicklingError as err:
        if str(err).startswith(source):  # ours: already names the file
            raise
        # the C unpickler's own ("pickle data was truncated", ...) names no file
        raise pickle.UnpicklingError(f"{source}: not a valid pickle (cut short or damaged? {err})") from err
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, MemoryError) as err:
        raise pickle.UnpicklingError(f"{source}: not a valid pickle ({type(err).__name__}: {err})") from err


def load_refs_pickle(path: str | os.PathLike) -> Any:
    """Read a refer `refs(<split_by>).p` file with the restricted unpickler.

    Returns the unpickled plain data (for refer files: a list of ref dicts).

    Raises:
        FileNotFoundError: `path` does not exist (the message names it).
        pickle.UnpicklingError: the file holds anything but plain containers and scalars, or is
            not a pickle; nothing in it is executed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"refs pickle not found: {path}")
    with open(path, "rb") as handle:
        data = handle.read()
    return restricted_loads(data, source=path)


__all__ = ["RestrictedUnpickler", "load_refs_pickle", "restricted_loads"]
