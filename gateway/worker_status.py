"""The workers' states as the supervisor last wrote them (``serve --workers N``), for every
worker's ``/_health``: the parent (``gateway.workers``) keeps them in a small JSON file named
by ``CCG_WORKERS_STATUS_FILE``, which it sets for its workers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATUS_ENV = "CCG_WORKERS_STATUS_FILE"


def supervisor_status() -> dict[str, Any] | None:
    """The supervisor's last word on the workers (``--workers`` only; None otherwise)."""
    path = os.environ.get(STATUS_ENV)
    if not path:
        return None
    try:
        found = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None
