"""JSON Lines files (one JSON value a line, local or remote), read with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from flanjax import paths


def read_jsonl(path: str, error: type[Exception]) -> Iterator[tuple[str, Any]]:
    """(where, record) for each non-blank line of `path`, `where` being "PATH line N"; a line
    that is not JSON raises `error`, naming it."""
    with paths.open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where} is not JSON ({e.msg}); a JSONL file holds one JSON value per line.") from None
            yield where, record
