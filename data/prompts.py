"""Prompts for text-conditional calibration: a text file (one prompt a line), a JSONL file (a "prompt"
or "text" field per line), or a saved `datasets` folder with a "prompt" or "text" column."""
from __future__ import annotations

import json
from pathlib import Path


def load_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        column = next((c for c in ("prompt", "text") if c in ds.column_names), None)
        if column is None:
            raise ValueError(f"prompt dataset {path} has no 'prompt' or 'text' column (columns: {ds.column_names})")
        prompts = [str(p) for p in ds[column]]
    elif not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    elif path.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompts.append(str(row["prompt"] if "prompt" in row else row["text"]))
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{n}: expected a JSON object with a 'prompt' or 'text' field") from None
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts
