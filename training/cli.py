"""The training commands of `tandem`: train, eval, export, bundle, architectures, shapes.

Arguments are argparse only and every command imports torch (and the rest of
the training extra) when it runs, so cli/__init__.py can list these commands
in a serving install. `python -m training ARGS` (and `torchrun ... -m
training ARGS`) is `tandem train ARGS`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _setup_logging(level: str = "INFO") -> None:
    # Libraries (open_clip logs to the root logger) speak at WARNING; Tandem at `level`.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tandem").setLevel(getattr(logging, level.upper(), logging.INFO))


# -- train ----------------------------------------------------------------------
CLIP_DEFAULTS = ("adamw", 2000, 4e-3, 0.1, 256)  # optimiser, steps, lr, weight decay, batch size
SSL_STEPS, SSL_BATCH = 500, 128  # optimiser, lr (at batch 128) and weight decay: the method's default_optimizer


def cmd_train(args: argparse.Namespace) -> int:
    _setup_logging()
    from training import distributed
    from training.trainer import TrainConfig, Trainer

    if args.method == "clip":
        optimizer, steps, lr, wd, batch = CLIP_DEFAULTS
    else:
        from training.methods import ssl_class

        optimizer, lr, wd = ssl_class(args.method).default_optimizer
        steps, batch = SSL_STEPS, SSL_BATCH
        lr *= (args.batch_size or batch) / 128
    args.out = args.out or f"runs/{args.method}"
    dist = distributed.setup(args.device)
    try:
        if args.method == "clip":
            from training.methods.clip import Clip, ClipConfig

            method = Clip(ClipConfig(model=args.model, data=args.data, init=args.init, train_size=args.train_size,
                                     val_size=args.val_size, test_size=args.test_size, seed=args.seed), dist)
        else:
            from training.methods import ssl_class
            from training.methods.base import SSLConfig

            config = SSLConfig(method=args.method.replace("-", "_"), backbone=args.backbone,
                               image_size=args.image_size, patch_size=args.patch_size, data=args.data,
                               train_size=args.train_size, eval_bank_size=args.eval_bank_size,
                               eval_size=args.val_size, seed=args.seed, hidden_dim=args.hidden_dim,
                               out_dim=args.out_dim, temperature=args.temperature, momentum=args.momentum,
                               queue_size=args.queue_size, prototypes=args.prototypes, local_crops=args.local_crops,
                               mask_ratio=args.mask_ratio, min_crop_scale=args.min_crop_scale)
            method = ssl_class(args.method)(config, dist)
        config = TrainConfig(out=args.out, steps=args.steps or steps, batch_size=args.batch_size or batch,
                             lr=args.lr or lr, weight_decay=args.weight_decay if args.weight_decay is not None else wd,
                             warmup_steps=args.warmup_steps, eval_every=args.eval_every,
                             checkpoint_every=args.checkpoint_every, seed=args.seed, workers=args.workers,
                             resume=not args.no_resume, progress=not args.no_progress,
                             optimizer=args.optimizer or optimizer)
        metrics = Trainer(method, config, dist).fit()
        if dist.is_main:
            print(json.dumps(metrics, indent=2))
            print(f"checkpoint: {Path(args.out) / 'checkpoints' / 'latest.pt'}\n"
                  f"curves: {Path(args.out) / 'curves.png'}; TensorBoard: tensorboard --logdir {args.out}")
    finally:
        distributed.teardown()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _setup_logging()
    import torch

    from training.evaluation.probe import evaluate_encoder, labelled_sets

    encoder, transform, what = _encoder_for_eval(args)
    train, test = labelled_sets(args.data, transform, args.train_size, args.test_size, args.split, args.seed,
                                args.label)
    result = evaluate_encoder(encoder, train, test, linear=args.kind == "linear")
    torch.set_printoptions(precision=4)
    print(f"{what}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    if args.json:
        print(json.dumps({"encoder": what, **result}))
    return 0


def _encoder_for_eval(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """(encoder module, its eval transform, description) from a checkpoint or a random init."""
    from training.backbones import build_backbone
    from training.models import read_checkpoint
    from training.transforms import eval_transform

    if args.checkpoint:
        state = read_checkpoint(Path(args.checkpoint))
        if "ssl_config" in state:
            from training.methods import load_ssl_method

            method = load_ssl_method(state)
            c = method.config
            return method.backbone, eval_transform(c.image_size), f"{method.name}/{c.backbone} step {state.get('step')}"
        import open_clip

        from training.models import build_model, preprocess_config

        model, name, _ = build_model(None, Path(args.checkpoint))
        pp = preprocess_config(model)
        transform = open_clip.image_transform(pp["size"], is_train=False, mean=pp["mean"], std=pp["std"])
        return model.visual, transform, f"CLIP image tower {name}"
    return (build_backbone(args.backbone, args.image_size, args.patch_size), eval_transform(args.image_size),
            f"random-init {args.backbone}")


# -- export ---------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    _setup_logging()
    from training.export import ParityError, export_bundle

    try:
        result = export_bundle(args.model, Path(args.out), args.name, args.version,
                               Path(args.checkpoint) if args.checkpoint else None, args.precision,
                               image_only=args.image_only, force=args.force, source_note=args.note,
                               with_projector=args.with_projector)
    except ParityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    p = result.manifest.parity
    print(f"wrote {result.path}  (parity: min cosine {p['min_cosine']:.6f} >= {p['threshold']})")
    return 0


def cmd_bundle_upgrade(args: argparse.Namespace) -> int:
    _setup_logging()
    from .export import upgrade_bundle

    for path in args.paths:
        m = upgrade_bundle(Path(path))
        print(f"{path}: {m.format}" + (f", tokenizer {m.text.tokenizer_file}" if m.text else ""))
    return 0


def cmd_architectures(args: argparse.Namespace) -> int:
    from .models import list_architectures

    print("\n".join(list_architectures()))
    return 0


def cmd_shapes(args: argparse.Namespace) -> int:
    # The procedural shapes are numpy + Pillow: this works in the serving install too.
    from training.data import procedural

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (img, spec) in enumerate(procedural.ShapesDataset(args.split, args.count, args.seed, args.canvas)):
        held_out = "_held-out" if procedural.is_held_out(spec.label) else ""  # never seen in training
        path = out / f"{i:04d}_{spec.label.replace(' ', '_')}{held_out}.png"
        img.save(path)
        print(path)
    (out / "labels.txt").write_text("\n".join(procedural.class_labels()) + "\n")
    print(f"{out / 'labels.txt'}: the {len(procedural.class_labels())} class names, for --labels-file")
    return 0


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("method", choices=["clip", "simclr", "moco-v2", "moco-v3", "byol", "simsiam", "swav", "mae"],
                   help="training method")
    p.add_argument("--data", default="shapes",
                   help="'shapes' (procedural, with evaluation) or a folder: captions.csv/.jsonl for clip; "
                   "an ImageFolder or a flat folder of images for the others")
    p.add_argument("--out", help="run folder: checkpoints, TensorBoard logs, curves.png (default runs/METHOD)")
    p.add_argument("--steps", type=int, help="optimiser steps (default per method, see below)")
    p.add_argument("--batch-size", type=int, help="images (pairs) per step per process")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--optimizer", choices=["adamw", "lars", "sgd"],
                   help="default per method (below); LARS as in SimCLR/BYOL/SwAV for large batches "
                   "(use lr 0.3 x batch/256)")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=250, help="evaluate on the val split every N steps")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--train-size", type=int, default=20_000, help="procedural training images")
    p.add_argument("--val-size", type=int, default=1_000)
    p.add_argument("--test-size", type=int, default=2_000)
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    g = p.add_argument_group("clip")
    g.add_argument("--model", default="tandem-shapes-vit",
                   help="open_clip architecture name, one of training/configs/*.json, or a .json config path")
    g.add_argument("--init", help="start from the weights in this checkpoint file")
    g = p.add_argument_group("self-supervised methods")
    g.add_argument("--backbone", default="resnet18-small",
                   help="resnet18-small, resnet18, resnet-micro (CPU-sized), vit-micro, vit-tiny, vit-small or "
                   "timm:NAME (MAE: a ViT)")
    g.add_argument("--image-size", type=int, default=32, help="training resolution in pixels")
    g.add_argument("--patch-size", type=int, help="ViT patch size (default image_size // 8)")
    g.add_argument("--hidden-dim", type=int, default=512, help="projector/predictor hidden width")
    g.add_argument("--out-dim", type=int, default=128, help="projection width")
    g.add_argument("--temperature", type=float, help="contrastive/softmax temperature (default: the paper's)")
    g.add_argument("--momentum", type=float, default=0.99, help="EMA momentum of MoCo/BYOL target networks (start)")
    g.add_argument("--queue-size", type=int, default=4096, help="MoCo v2 negatives queue")
    g.add_argument("--prototypes", type=int, default=100, help="SwAV prototypes")
    g.add_argument("--local-crops", type=int, default=4, help="SwAV small crops per image")
    g.add_argument("--mask-ratio", type=float, default=0.75, help="MAE fraction of patches hidden")
    g.add_argument("--min-crop-scale", type=float,
                   help="lower bound of the random crops' area (default: the paper's 0.08 or 0.2); raise it when "
                   "objects are small enough to be cropped away")
    g.add_argument("--eval-bank-size", type=int, default=2_000, help="labelled images the kNN monitor searches")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("train",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train CLIP on procedural shapes (default) or your image-caption folder, or a "
                       "self-supervised visual encoder (SimCLR, MoCo v2/v3, BYOL, SimSiam, SwAV, MAE) on "
                       "procedural shapes or a folder of images. Resumes from OUT/checkpoints/latest.pt when it "
                       "exists. Several GPUs (or CPU processes): torchrun --nproc_per_node N -m training ...",
                       epilog="defaults per method (optimiser, steps, lr, weight decay, batch): clip adamw, 2000, "
                       "4e-3, 0.1, 256; simclr, moco-v2, moco-v3, byol, swav adamw, 500, 2e-3, 1e-4, 128; simsiam "
                       "sgd, 500, 0.25, 1e-5, 128; mae adamw, 500, 1e-3, 0.05, 128. The self-supervised lr scales "
                       "with --batch-size / 128.")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)


    p = sub.add_parser("eval",
                       description="Evaluate the image encoder of a checkpoint (self-supervised or CLIP), or a "
                       "random-init backbone, on labelled data: weighted kNN (k=20) and, with 'linear', a linear "
                       "probe; plus collapse statistics (per-dimension std, effective rank).")
    p.add_argument("kind", choices=["knn", "linear"])
    p.add_argument("--checkpoint", help="checkpoint file; omitted = random-init --backbone")
    p.add_argument("--data", default="shapes", help="'shapes' or an ImageFolder (80/20 split)")
    p.add_argument("--split", default="test", choices=["val", "test"], help="procedural split to score on")
    p.add_argument("--label", default="class", choices=["class", "shape"],
                   help="shapes: score the 56 size-colour-shape classes or the 4 shapes")
    p.add_argument("--train-size", type=int, default=5_000, help="labelled training images (kNN bank / probe)")
    p.add_argument("--test-size", type=int, default=2_000)
    p.add_argument("--backbone", default="resnet18-small", help="for a random-init baseline")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="also print one JSON line")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export",
                       description="Export an open_clip model to models/NAME/VERSION: manifest.json, "
                       "image.onnx, text.onnx. ONNX Runtime must reproduce PyTorch (min cosine >= 0.9999 fp32, "
                       "0.999 fp16) on a fixed probe batch, or nothing is written.")
    p.add_argument("--model", help="architecture; optional with a Tandem checkpoint (it records its own)")
    p.add_argument("--checkpoint", help="local weights file (Tandem or open_clip); omitted = random init")
    p.add_argument("--name", required=True, help="bundle name, e.g. my-clip")
    p.add_argument("--version", default="1")
    p.add_argument("--out", default="models", help="model repository folder")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--image-only", action="store_true", help="export only the image tower")
    p.add_argument("--with-projector", action="store_true",
                   help="self-supervised checkpoints: export backbone + projector (default: backbone features)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle version")
    p.add_argument("--note", help="free text stored in the manifest's source")
    p.set_defaults(func=cmd_export)


    p = sub.add_parser("bundle",
                       description="upgrade: bring tandem-bundle/1 folders to the current format in place. A CLIP "
                       "bundle gains tokenizer.json (open_clip's vocabulary, the one it was exported with, so "
                       "token ids do not change); the ONNX files are untouched.")
    bsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    u = bsub.add_parser("upgrade", help="upgrade bundle folders in place")
    u.add_argument("paths", nargs="+", help="bundle folders, e.g. models/my-clip/1")
    u.set_defaults(func=cmd_bundle_upgrade)

    p = sub.add_parser("architectures", description="list the open_clip architectures export and train know (offline)")
    p.set_defaults(func=cmd_architectures)

    p = sub.add_parser("shapes", description="draw procedural shape images (PNG) to try the default model on")
    p.add_argument("--out", default="shapes", help="output folder")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--canvas", type=int, default=64, help="image side in pixels")
    p.set_defaults(func=cmd_shapes)


def train_main(argv: list[str] | None = None) -> int:
    """`python -m training ARGS` = `tandem train ARGS` (the entry point for torchrun)."""
    parser = argparse.ArgumentParser(prog="python -m training", description="Same as `tandem train`; "
                                     "start it with torchrun for several processes, e.g. torchrun "
                                     "--nproc_per_node 2 -m training clip --out runs/clip-ddp")
    add_train_arguments(parser)
    return cmd_train(parser.parse_args(argv))
