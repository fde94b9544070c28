"""Small webdataset tar shards made here (no downloads): procedural shapes as jpg or png, captions as txt or
json, as img2dataset writes them, optionally with one corrupt jpg."""

from __future__ import annotations

import io
import json
from pathlib import Path

import webdataset as wds

from training.data import procedural


def write_shards(folder: Path, shards: int = 4, per_shard: int = 8, corrupt: str | None = "000001_0003",
                 labels: bool = False) -> str:
    """Shards folder/0000{0..shards-1}.tar; returns the brace pattern. Sample keys are SHARD_INDEX; even
    samples carry a txt caption, odd ones a json {"caption": ...}; sample `corrupt` has a truncated jpg."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(per_shard):
                spec = procedural.sample(0, "train", s * per_shard + i)
                key = f"{s:06d}_{i:04d}"
                buf = io.BytesIO()
                fmt = "png" if i % 3 == 2 else "jpg"
                procedural.render(spec, 32).save(buf, "PNG" if fmt == "png" else "JPEG")
                data = buf.getvalue()
                if key == corrupt:
                    fmt, data = "jpg", data[: len(data) // 3]  # cut short: the decoder must refuse it
                caption = spec.caption(procedural.CAPTION_TEMPLATES[0])
                sample = {"__key__": key, fmt: data}
                if i % 2:
                    sample["json"] = json.dumps({"caption": caption, "width": 32}).encode()
                else:
                    sample["txt"] = caption.encode()
                if labels:
                    sample["cls"] = str(procedural.SHAPES.index(spec.shape)).encode()
                sink.write(sample)
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")
