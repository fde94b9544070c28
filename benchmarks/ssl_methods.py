"""Every self-supervised method, same backbone and budget, on the procedural shapes; scored by
frozen-feature kNN and linear probe against a random-init backbone and the CLIP image tower.

    python benchmarks/ssl_methods.py                          # all methods, vit-micro, 300 steps each
    python benchmarks/ssl_methods.py --methods simclr byol --steps 500 --backbone resnet18-small

Labels: `class` = the 56 size-colour-shape classes; `shape` = the 4 shapes. The
augmentations (colour jitter, grey-scale, random crops) make these methods
invariant to colour and size by design, so `shape` is the label they are built
to recover; both are reported. Collapse: per-dimension std of normalised
embeddings (healthy ~ 1/sqrt(d)) and effective rank.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.backbones import build_backbone  # noqa: E402
from training.data.images import ShapesImages, stack  # noqa: E402
from training.distributed import Dist  # noqa: E402
from training.evaluation.collapse import collapse_stats, collapse_warning  # noqa: E402
from training.evaluation.features import extract  # noqa: E402
from training.evaluation.knn import knn_accuracy  # noqa: E402
from training.evaluation.linear import linear_probe_accuracy  # noqa: E402
from training.methods import SSL_METHODS, ssl_class  # noqa: E402
from training.methods.base import SSLConfig  # noqa: E402
from training.trainer import TrainConfig, Trainer  # noqa: E402
from training.transforms import eval_transform  # noqa: E402


class OnnxEncoder(nn.Module):
    """An ONNX image tower as a module, so the CLIP bundle is scored like the others."""

    def __init__(self, path: Path):
        super().__init__()
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"pixel_values": x.numpy()})[0])


def score(encoder: nn.Module, transform, args: argparse.Namespace) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """kNN and linear probe for both labels on one feature extraction, plus collapse statistics."""
    train, test = ShapesImages("train", args.eval_train, transform), ShapesImages("test", args.eval_test, transform)
    train_x, test_x = extract(encoder, stack(train)[0]), extract(encoder, stack(test)[0])
    out: dict[str, float] = {}
    for label, ytr, yte in (("class", train.labels, test.labels), ("shape", train.shapes, test.shapes)):
        out[f"knn_{label}"] = knn_accuracy(train_x, ytr, test_x, yte)
        out[f"linear_{label}"] = linear_probe_accuracy(train_x, ytr, test_x, yte)
    stats = collapse_stats(test_x)
    out["std"], out["rank"], out["std_healthy"] = stats["std"], stats["effective_rank"], stats["std_healthy"]
    return out


def clip_transform(bundle: Path):  # type: ignore[no-untyped-def]
    import open_clip

    m = json.loads((bundle / "manifest.json").read_text())["image"]
    return open_clip.image_transform(m["size"], is_train=False, mean=tuple(m["mean"]), std=tuple(m["std"]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(SSL_METHODS))
    p.add_argument("--skip-baselines", action="store_true", help="only the methods (for quick pilots)")
    p.add_argument("--backbone", default="vit-micro")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=None, help="ViT patch size (default image_size // 8)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-crop-scale", type=float, default=None,
                   help="override the papers' crop scale (0.08/0.2): small shapes vanish from small crops")
    p.add_argument("--train-size", type=int, default=10_000)
    p.add_argument("--eval-train", type=int, default=5_000, help="labelled images for the kNN bank / probe")
    p.add_argument("--eval-test", type=int, default=2_000)
    p.add_argument("--out", default="runs/ssl-benchmark")
    p.add_argument("--clip-bundle", default=str(ROOT / "models" / "tandem-shapes" / "1"))
    args = p.parse_args()
    torch.manual_seed(0)
    rows: list[tuple[str, dict[str, float], float]] = []

    random_init = build_backbone(args.backbone, args.image_size, args.patch_size)
    rows.append((f"random-init {args.backbone}", score(random_init, eval_transform(args.image_size), args), 0.0))
    if Path(args.clip_bundle, "image.onnx").is_file():
        enc = OnnxEncoder(Path(args.clip_bundle) / "image.onnx")
        rows.append(("CLIP image tower (shipped)", score(enc, clip_transform(Path(args.clip_bundle)), args), 0.0))
    print(f"baselines: {[(name, round(r['knn_shape'], 3)) for name, r, _ in rows]}", flush=True)

    for name in args.methods:
        torch.manual_seed(0)
        config = SSLConfig(method=name, backbone=args.backbone, image_size=args.image_size, patch_size=args.patch_size,
                           train_size=args.train_size, hidden_dim=512, out_dim=128,
                           min_crop_scale=args.min_crop_scale)
        method = ssl_class(name)(config, Dist())
        train = TrainConfig(out=f"{args.out}/{name}", steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            weight_decay=0.05 if name == "mae" else 1e-4, warmup_steps=min(50, args.steps // 10),
                            eval_every=10**9, checkpoint_every=args.steps, resume=False)
        started = time.perf_counter()
        Trainer(method, train, Dist()).fit()
        minutes = (time.perf_counter() - started) / 60
        result = score(method.backbone, eval_transform(args.image_size), args)
        rows.append((name, result, minutes))
        print(f"{name}: {json.dumps({k: round(v, 4) for k, v in result.items()})} ({minutes:.1f} min)", flush=True)

    base = rows[0][1]
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; backbone "
          f"{args.backbone} at {args.image_size}px; {args.steps} steps x {args.batch_size} images; "
          f"kNN k=20 and linear probe on {args.eval_train} train / {args.eval_test} test images")
    head = ("encoder", "kNN class", "kNN shape", "linear class", "linear shape", "d kNN shape", "std", "eff. rank",
            "train min")
    print(" | ".join(head))
    for name, r, minutes in rows:
        warn = collapse_warning({"std": r["std"], "std_healthy": r["std_healthy"], "effective_rank": r["rank"]})
        print(" | ".join([name, f"{r['knn_class']:.3f}", f"{r['knn_shape']:.3f}", f"{r['linear_class']:.3f}",
                          f"{r['linear_shape']:.3f}", f"{r['knn_shape'] - base['knn_shape']:+.3f}",
                          f"{r['std']:.4f}", f"{r['rank']:.1f}" + (" COLLAPSED" if warn else ""),
                          f"{minutes:.1f}" if minutes else "-"]))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "results.json").write_text(json.dumps(
        [{"encoder": n, **r, "minutes": m} for n, r, m in rows], indent=2) + "\n")
    beaten = all(r["knn_shape"] > base["knn_shape"] for n, r, _ in rows[1:] if n in args.methods)
    print(f"every method beats random init on kNN (shape): {'yes' if beaten else 'NO'}")
    return 0 if beaten and not np.isnan(base["knn_shape"]) else 1


if __name__ == "__main__":
    sys.exit(main())
