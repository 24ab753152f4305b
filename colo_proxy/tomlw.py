"""A small TOML writer for what tune and learn write: scalars, arrays, arrays of tables.

The standard library reads TOML (tomllib) but does not write it; the files
these tools write are flat (top-level keys, then `[[name]]` tables), which is
all this handles.  What it writes, tomllib reads back to the same values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any


def value(v: Any) -> str:
    """One TOML value (strings in basic quotes, JSON escapes are TOML escapes)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"TOML has no {v}")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, Sequence):
        return "[" + ", ".join(value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def _is_table_list(v: Any) -> bool:
    return (isinstance(v, Sequence) and not isinstance(v, str) and bool(v)
            and all(isinstance(x, Mapping) for x in v))


def dumps(doc: Mapping[str, Any], comments: Mapping[str, str] | None = None) -> str:
    """Top-level keys first, then each non-empty list of tables as `[[name]]` blocks.

    `comments` maps a key to a comment line written above it (or, for an array of
    tables, a list of per-entry comments is taken from `#name` entries' `_comment`).
    """
    comments = comments or {}
    lines: list[str] = []
    for k, v in doc.items():
        if _is_table_list(v):
            continue
        if k in comments:
            lines.append(f"# {comments[k]}")
        lines.append(f"{key(k)} = {value(v)}")
    for k, v in doc.items():
        if not _is_table_list(v):
            continue
        for entry in v:
            lines.append("")
            note = entry.get("_comment")
            if note:
                lines += [f"# {line}" for line in str(note).splitlines()]
            lines.append(f"[[{key(k)}]]")
            lines += [f"{key(a)} = {value(b)}" for a, b in entry.items() if a != "_comment"]
    return "\n".join(lines) + "\n"
