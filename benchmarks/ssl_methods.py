"""Every self-supervised method, same backbone and budget, on the procedural shapes; scored by
frozen-feature kNN and linear probe against the random-init backbone it started from and the
CLIP image tower.

    python benchmarks/ssl_methods.py                          # all methods, resnet-micro, 1,000 steps each
    python benchmarks/ssl_methods.py --methods simclr byol --steps 300 --skip-baselines   # a quick pilot

Backbone: `--backbone` (default resnet-micro, a CPU-sized ResNet) for every method
except the ViT-only MAE, which trains `--vit-backbone` (default vit-micro). Each
method is compared with its own starting point: the same backbone with the same
initial weights (seed 0), untrained.

Labels: `class` = the 56 size-colour-shape classes; `shape` = the 4 shapes. The
augmentations (colour jitter, grey-scale, random crops) make these methods
invariant to colour and size by design, so `shape` is the label they are built
to recover; both are reported. A method passes when its linear probe on shape
beats its random-init backbone by `--margin` (default 5 points; the standard
error of one accuracy on 2,000 test images is about 1 point) and it has not
collapsed (per-dimension std of normalised embeddings under a tenth of
1/sqrt(d), or effective rank under 2). The script exits non-zero otherwise.
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
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
    p.add_argument("--skip-baselines", action="store_true",
                   help="skip the CLIP tower (quick pilots); the random-init backbone is always scored")
    p.add_argument("--backbone", default="resnet-micro", help="backbone of every method that is not ViT-only")
    p.add_argument("--vit-backbone", default="vit-micro", help="backbone of the ViT-only methods (MAE)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=None, help="ViT patch size (default image_size // 8)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr-scale", type=float, default=1.0,
                   help="multiplies every method's learning rate (each method's default_optimizer, scaled by "
                   "batch / 128)")
    p.add_argument("--min-crop-scale", type=float, default=0.5,
                   help="lower bound of the crop scale (papers: 0.08/0.2); small shapes vanish from small crops")
    p.add_argument("--margin", type=float, default=0.05,
                   help="a method passes when its linear probe on shape beats random init by this much")
    p.add_argument("--train-size", type=int, default=10_000)
    p.add_argument("--eval-train", type=int, default=5_000, help="labelled images for the kNN bank / probe")
    p.add_argument("--eval-test", type=int, default=2_000)
    p.add_argument("--workers", type=int, default=1, help="data-loading processes (overlap augmentation)")
    p.add_argument("--out", default="runs/ssl-benchmark")
    p.add_argument("--clip-bundle", default=str(ROOT / "models" / "tandem-shapes" / "1"))
    args = p.parse_args()
    rows: list[tuple[str, dict[str, float], float]] = []

    def backbone_of(name: str) -> str:
        return args.vit_backbone if ssl_class(name).needs_vit else args.backbone

    def untrained(name: str):  # type: ignore[no-untyped-def]
        torch.manual_seed(0)  # every method starts from the same backbone weights
        config = SSLConfig(method=name, backbone=backbone_of(name), image_size=args.image_size,
                           patch_size=args.patch_size, train_size=args.train_size, hidden_dim=512, out_dim=128,
                           min_crop_scale=args.min_crop_scale)
        return ssl_class(name)(config, Dist())

    def encoder_of(method) -> str:  # type: ignore[no-untyped-def]
        pool = getattr(method.backbone.net, "global_pool", "")
        return method.config.backbone + (" (mean-pooled)" if pool == "avg" else "")

    # The baseline of a method is its own starting point: the same backbone, same weights, before training.
    baselines: dict[str, dict[str, float]] = {}
    for name in args.methods:
        encoder = encoder_of(method := untrained(name))
        if encoder not in baselines:
            baselines[encoder] = score(method.backbone, eval_transform(args.image_size), args)
            rows.append((f"random-init {encoder}", baselines[encoder], 0.0))
    if not args.skip_baselines and Path(args.clip_bundle, "image.onnx").is_file():
        enc = OnnxEncoder(Path(args.clip_bundle) / "image.onnx")
        rows.append(("CLIP image tower (shipped)", score(enc, clip_transform(Path(args.clip_bundle)), args), 0.0))
    print(f"baselines: {[(name, round(r['linear_shape'], 3)) for name, r, _ in rows]}", flush=True)

    encoders: dict[str, str] = {}
    for name in args.methods:
        method = untrained(name)
        encoders[name] = encoder_of(method)
        optimizer, lr, weight_decay = type(method).default_optimizer
        train = TrainConfig(out=f"{args.out}/{name}", steps=args.steps, batch_size=args.batch_size,
                            optimizer=optimizer, lr=lr * args.lr_scale * args.batch_size / 128,
                            weight_decay=weight_decay, warmup_steps=min(50, args.steps // 10),
                            eval_every=10**9, checkpoint_every=args.steps, resume=False, workers=args.workers)
        started = time.perf_counter()
        Trainer(method, train, Dist()).fit()
        minutes = (time.perf_counter() - started) / 60
        result = score(method.backbone, eval_transform(args.image_size), args)
        rows.append((name, result, minutes))
        print(f"{name}: {json.dumps({k: round(v, 4) for k, v in result.items()})} ({minutes:.1f} min)", flush=True)

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{args.image_size}px; {args.steps} steps x {args.batch_size} images; optimisers "
          f"{ {name: ssl_class(name).default_optimizer for name in args.methods} }; "
          f"kNN k=20 and linear probe on {args.eval_train} train / {args.eval_test} test images; "
          "d = difference from the random-init backbone the method trained")
    head = ("encoder", "backbone", "kNN class", "kNN shape", "linear class", "linear shape", "d kNN shape",
            "d linear shape", "std", "eff. rank", "train min")
    print(" | ".join(head))
    failed = []
    for name, r, minutes in rows:
        backbone = encoders.get(name, "-")
        base = baselines.get(backbone)
        warn = collapse_warning({"std": r["std"], "std_healthy": r["std_healthy"], "effective_rank": r["rank"]})
        d_knn = f"{r['knn_shape'] - base['knn_shape']:+.3f}" if base else "-"
        d_lin = f"{r['linear_shape'] - base['linear_shape']:+.3f}" if base else "-"
        if base and (warn or r["linear_shape"] - base["linear_shape"] < args.margin):
            failed.append(name)
        print(" | ".join([name, backbone, f"{r['knn_class']:.3f}", f"{r['knn_shape']:.3f}",
                          f"{r['linear_class']:.3f}", f"{r['linear_shape']:.3f}", d_knn, d_lin,
                          f"{r['std']:.4f}", f"{r['rank']:.1f}" + (" COLLAPSED" if warn else ""),
                          f"{minutes:.1f}" if minutes else "-"]))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "results.json").write_text(json.dumps(
        [{"encoder": n, **r, "minutes": m} for n, r, m in rows], indent=2) + "\n")
    print(f"every method beats its random-init backbone by >= {args.margin:.2f} on linear shape, none collapsed: "
          + ("yes" if not failed else f"NO ({', '.join(failed)})"))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
