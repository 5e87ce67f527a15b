"""What every benchmark shares: the machine it ran on, percentiles, and the JSON it prints."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def emit(result: dict[str, Any], output: Path | None) -> None:
    """Write ``result`` to ``output`` (if given) and as the last line of stdout."""
    if output:
        output.write_text(json.dumps(result, indent=2))
    sys.stdout.write(json.dumps(result) + "\n")
