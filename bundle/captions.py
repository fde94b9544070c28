"""The caption index format shared by training (training/data/captions.py) and `tandem index ingest`:
a CSV with an `image,caption` header (more columns ignored) or JSONL lines {"image": ..., "caption": ...}."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def read_caption_rows(path: Path) -> list[tuple[str, str]]:
    """(image path as written, caption) rows of a .csv or .jsonl caption index, in file order."""
    path = Path(path)
    rows: list[tuple[str, str]] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: the header must name columns 'image' and 'caption'")
            return [(r["image"], r["caption"]) for r in reader]
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        item = json.loads(line)
                        rows.append((item["image"], item["caption"]))
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(f'{path}:{n}: expected {{"image": ..., "caption": ...}} ({e})') from None
        return rows
    raise ValueError(f"{path}: a caption index is a .csv (image,caption header) or a .jsonl file")
