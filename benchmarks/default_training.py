"""The default CLIP run, timed and scored: does it reach >= 95% zero-shot top-1
on the test split (seen classes, 56 candidate labels) within 15 minutes?

    python benchmarks/default_training.py --out runs/default

Prints wall time (data drawing, training, evaluation), the final test metrics
and whether the targets were met; `make default-model` runs this and then
exports the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import main as tandem  # noqa: E402

TARGET_TOP1, TARGET_MINUTES = 0.95, 15.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/default")
    p.add_argument("--steps", type=int, default=None, help="override the default step count")
    args, rest = p.parse_known_args()
    cmd = ["train", "clip", "--out", args.out, "--no-resume", *rest]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    started = time.perf_counter()
    code = tandem(cmd)
    minutes = (time.perf_counter() - started) / 60
    if code:
        return code
    metrics = json.loads((Path(args.out) / "metrics.json").read_text())
    top1 = metrics["zero_shot_top1_seen"]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} threads {torch.get_num_threads()}")
    print(f"wall time: {minutes:.1f} min (target <= {TARGET_MINUTES:.0f})")
    for k, v in metrics.items():
        print(f"  test {k:26} {v:.4f}")
    ok = top1 >= TARGET_TOP1 and minutes <= TARGET_MINUTES
    print(f"zero-shot top-1 (seen classes, 56 labels): {top1:.2%} (target >= {TARGET_TOP1:.0%}) -> "
          f"{'MET' if ok else 'NOT MET'}")
    (Path(args.out) / "benchmark.json").write_text(json.dumps({"minutes": minutes, **metrics}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
