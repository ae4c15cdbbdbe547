"""What every benchmark does last: write its results as JSON (folders created), with the machine they were
measured on (CPU model and flags, libraries, threads: finegrain.env.machine_info), and say where."""

from __future__ import annotations

import json
from pathlib import Path

from finegrain.env import machine_info


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine_info(), **payload}, indent=2))
    print(f"written {path}")
    return path
