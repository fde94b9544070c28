"""Every self-supervised method, same backbone and budget, on the procedural shapes, over several seeds;
scored by frozen-feature kNN and linear probe against the random-init backbone each run started from.

    python benchmarks/ssl_methods.py                                   # every method, 3 seeds, test split
    python benchmarks/ssl_methods.py --methods simsiam --split val --lr-scale 0.5    # choosing a setting
    python benchmarks/ssl_methods.py --methods byol --split val --optimizer lars     # choosing an optimiser
    python benchmarks/ssl_methods.py --methods simclr --seeds 0 --steps 200          # a quick pilot
    python benchmarks/ssl_methods.py --report-from runs/a/results.json runs/b/results.json   # one table of several

Honest evaluation. Settings are chosen on the **val** split (`--split val`);
the reported numbers come from the **test** split (`--split test`, the
default), which no choice has looked at. The kNN bank and the linear probe's
training set are labelled images of the training split.

Seeds. Each seed trains from its own random initialisation (weights, data
order, augmentations) and is compared with *that* initialisation, untrained:
the gain of a seed is its linear-probe accuracy on shape minus its own
random-init accuracy. A method passes when the mean gain over the seeds
exceeds twice its standard error (std / sqrt(seeds); so at least 2 seeds)
and no seed collapsed (collapse.py's thresholds). The script prints mean ±
standard deviation over the seeds, and exits non-zero unless every method
passes.

Defaults of each method (optimiser, lr, weight decay, steps, batch) are its
config in training/config.py; the benchmark sets only what it must to run on
a CPU: `--backbone` (resnet-micro; MAE trains `--vit-backbone`, vit-micro),
`--min-crop-scale` 0.5 and the data sizes. Labels: `class` = the 56
size-colour-shape classes, `shape` = the 4 shapes, which the augmentations
(colour jitter, grey-scale, crops) leave as the thing to learn.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import SSLConfig, TrainConfig  # noqa: E402
from training.data.images import ShapesImages, stack  # noqa: E402
from training.distributed import Dist  # noqa: E402
from training.evaluation.collapse import collapse_stats, collapse_warning  # noqa: E402
from training.evaluation.features import extract  # noqa: E402
from training.evaluation.knn import knn_accuracy  # noqa: E402
from training.evaluation.linear import linear_probe_accuracy  # noqa: E402
from training.methods import SSL_METHODS, ssl_class, ssl_config  # noqa: E402
from training.trainer import Trainer  # noqa: E402
from training.transforms import eval_transform  # noqa: E402


class OnnxEncoder(nn.Module):
    """An ONNX image tower as a module, so the CLIP bundle is scored like the others."""

    def __init__(self, path: Path):
        super().__init__()
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"pixel_values": x.numpy()})[0])


def score(encoder: nn.Module, transform, args: argparse.Namespace, seed: int = 0) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """kNN and linear probe for both labels on one feature extraction (bank: training split; queries:
    --split), plus collapse statistics."""
    train = ShapesImages("train", args.eval_train, transform, seed)
    test = ShapesImages(args.split, args.eval_test, transform, seed)
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(SSL_METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one run per seed (pass rule: >= 2)")
    p.add_argument("--split", default="test", choices=["val", "test"],
                   help="val: for choosing settings; test: for reporting (the default)")
    p.add_argument("--with-clip", action="store_true", help="also score the shipped CLIP image tower")
    p.add_argument("--backbone", default="resnet-micro", help="backbone of every method that is not ViT-only")
    p.add_argument("--vit-backbone", default="vit-micro", help="backbone of the ViT-only methods (MAE)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=None, help="ViT patch size (default image_size // 8)")
    p.add_argument("--steps", type=int, help="default: each method's config")
    p.add_argument("--batch-size", type=int, help="default: each method's config")
    p.add_argument("--optimizer", help="default: each method's config (adamw | sgd | lars; brings its lr and wd)")
    p.add_argument("--lr", type=float, help="peak learning rate of every method (default: its optimiser's)")
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiplies every method's default learning rate")
    p.add_argument("--min-crop-scale", type=float, default=0.5,
                   help="lower bound of the crop scale (papers: 0.08/0.2); small shapes vanish from small crops")
    p.add_argument("--train-size", type=int, default=10_000)
    p.add_argument("--eval-train", type=int, default=5_000, help="labelled images for the kNN bank / probe")
    p.add_argument("--eval-test", type=int, default=2_000, help="labelled images of --split scored")
    p.add_argument("--workers", type=int, default=1, help="data-loading processes (overlap augmentation)")
    p.add_argument("--out", default="runs/ssl-benchmark")
    p.add_argument("--clip-bundle", default=str(ROOT / "models" / "tandem-shapes" / "1"))
    return p.parse_args(argv)


def method_config(name: str, seed: int, args: argparse.Namespace) -> SSLConfig:
    backbone = args.vit_backbone if ssl_class(name).needs_vit else args.backbone
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                   ("optimizer", args.optimizer), ("lr", args.lr)) if v is not None}
    config = ssl_config(name, backbone=backbone, image_size=args.image_size, patch_size=args.patch_size,
                        train_size=args.train_size, min_crop_scale=args.min_crop_scale, seed=seed, **overrides)
    return replace(config, lr=config.peak_lr * args.lr_scale)


def verdict(gains: list[float], collapsed: bool) -> tuple[bool | None, float, float]:
    """(passed, mean gain, standard error); passed is None with fewer than 2 seeds (no error estimate)."""
    mean = statistics.fmean(gains)
    if len(gains) < 2:
        return None, mean, float("nan")
    se = statistics.stdev(gains) / math.sqrt(len(gains))
    return (mean > 2 * se and not collapsed), mean, se


def pm(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs: list[dict] = []  # type: ignore[type-arg]
    if args.with_clip and Path(args.clip_bundle, "image.onnx").is_file():
        enc = OnnxEncoder(Path(args.clip_bundle) / "image.onnx")
        clip = score(enc, clip_transform(Path(args.clip_bundle)), args)
        print(f"CLIP image tower (shipped): {json.dumps({k: round(v, 4) for k, v in clip.items()})}", flush=True)
    transform = eval_transform(args.image_size)
    for name in args.methods:
        for seed in args.seeds:
            config = method_config(name, seed, args)
            torch.manual_seed(seed)
            method = ssl_class(name)(config, Dist())
            base = score(method.backbone, transform, args, seed)
            loop = TrainConfig.for_run(config, out=f"{args.out}/{name}/seed{seed}", eval_every=10**9,
                                       checkpoint_every=config.steps, resume=False, workers=args.workers)
            started = time.perf_counter()
            Trainer(method, loop, Dist()).fit()
            minutes = (time.perf_counter() - started) / 60
            result = score(method.backbone, transform, args, seed)
            warn = collapse_warning({"std": result["std"], "std_healthy": result["std_healthy"],
                                     "effective_rank": result["rank"]})
            runs.append({"method": name, "seed": seed, "backbone": config.backbone, "optimizer": config.optimizer,
                         "lr": config.peak_lr, "weight_decay": config.decay, "steps": config.steps,
                         "batch_size": config.batch_size, "random_init": base, "trained": result,
                         "gain_linear_shape": result["linear_shape"] - base["linear_shape"],
                         "gain_knn_shape": result["knn_shape"] - base["knn_shape"],
                         "collapsed": warn is not None, "minutes": minutes})
            print(f"{name} seed {seed}: random init linear shape {base['linear_shape']:.3f} -> "
                  f"{result['linear_shape']:.3f} ({minutes:.1f} min)" + (f"; {warn}" if warn else ""), flush=True)

    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "results.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2) + "\n")
    return report(runs, args.methods, args)


def report(runs: list[dict], methods: list[str], args: argparse.Namespace) -> int:  # type: ignore[type-arg]
    """Print the table of `runs` (mean ± std over seeds, the 2-SE verdict); 0 when every method passes."""
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{args.image_size}px; split scored: {args.split}; seeds {args.seeds}; kNN k=20 and linear probe on "
          f"{args.eval_train} training-split / {args.eval_test} {args.split} images; gain = trained minus the "
          "same seed's random init; mean ± std over seeds")
    print("method | backbone | optimiser, lr, wd | steps x batch | random-init linear shape | linear shape | "
          "kNN shape | gain linear shape | 2 SE | gain kNN shape | eff. rank | passes")
    failed = []
    for name in methods:
        rs = [r for r in runs if r["method"] == name]
        gains = [r["gain_linear_shape"] for r in rs]
        passed, mean, se = verdict(gains, any(r["collapsed"] for r in rs))
        if not passed:
            failed.append(name)
        r0 = rs[0]
        print(" | ".join([
            name, r0["backbone"], f"{r0['optimizer']} {r0['lr']:.3g}, {r0['weight_decay']:.3g}",
            f"{r0['steps']} x {r0['batch_size']}", pm([r["random_init"]["linear_shape"] for r in rs]),
            pm([r["trained"]["linear_shape"] for r in rs]), pm([r["trained"]["knn_shape"] for r in rs]),
            pm(gains), f"{2 * se:.3f}", pm([r["gain_knn_shape"] for r in rs]),
            pm([r["trained"]["rank"] for r in rs]) + (" COLLAPSED" if any(r["collapsed"] for r in rs) else ""),
            {True: "yes", False: "NO", None: "undecided (1 seed)"}[passed]]))
    print("every method's mean gain over its own random init exceeds 2 standard errors, none collapsed: "
          + ("yes" if not failed else f"NO ({', '.join(failed)})"))
    return 0 if not failed else 1


def report_from(files: list[str]) -> int:
    """The table of several results.json (one run of the script each, e.g. a method at a time), merged."""
    loaded = [json.loads(Path(f).read_text()) for f in files]
    first = argparse.Namespace(**loaded[0]["args"])
    for other in loaded[1:]:
        differ = [k for k in ("split", "seeds", "image_size", "eval_train", "eval_test", "train_size")
                  if other["args"][k] != loaded[0]["args"][k]]
        if differ:
            raise SystemExit(f"error: the results differ in {', '.join(differ)}: not one benchmark")
    runs = [r for data in loaded for r in data["runs"]]
    seen: set[tuple[str, int]] = set()
    for r in runs:
        if (r["method"], r["seed"]) in seen:
            raise SystemExit(f"error: {r['method']} seed {r['seed']} is in more than one of the results: compare "
                             "settings with separate tables")
        seen.add((r["method"], r["seed"]))
    methods = list(dict.fromkeys(r["method"] for r in runs))
    return report(runs, methods, first)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--report-from"]:
        sys.exit(report_from(sys.argv[2:]))
    sys.exit(main())
