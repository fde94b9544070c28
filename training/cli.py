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

log = logging.getLogger("tandem.train")


def _setup_logging(level: str = "INFO") -> None:
    # Libraries (open_clip logs to the root logger) speak at WARNING; Tandem at `level`.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tandem").setLevel(getattr(logging, level.upper(), logging.INFO))


# -- train ----------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    _setup_logging()
    run = run_config(args)  # checks the options before torch is imported
    from training import distributed
    from training.trainer import Trainer

    loop = train_loop_config(args, run)
    dist = distributed.setup(args.device, loop.dist_timeout_min)
    try:
        if args.method == "clip":
            from training.methods.clip import Clip

            method = Clip(run, dist)  # type: ignore[arg-type]
        else:
            from training.methods import ssl_class

            method = ssl_class(args.method)(run, dist)  # type: ignore[arg-type]
        if dist.is_main:
            log.info("%s: %s", args.method, run)
            log.info("loop: %s", loop)
        metrics = Trainer(method, loop, dist).fit()  # type: ignore[arg-type]
        if dist.is_main:
            print(json.dumps(metrics, indent=2))
            print(f"checkpoint: {Path(loop.out) / 'checkpoints' / 'latest.pt'}\n"
                  f"curves: {Path(loop.out) / 'curves.png'}; TensorBoard: tensorboard --logdir {loop.out}")
    finally:
        distributed.teardown()
    return 0


def run_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The method's config from the parsed options (its class checks them; ValueError says what is wrong)."""
    from training.config import config_class, options

    cls = config_class(args.method)
    return cls(**{name: getattr(args, name) for name, *_ in options(cls)})


def train_loop_config(args: argparse.Namespace, run):  # type: ignore[no-untyped-def]
    from training.config import TrainConfig, options

    loop = {name: getattr(args, name) for name, *_ in options(TrainConfig)}
    return TrainConfig.for_run(run, out=args.out or f"runs/{args.method}", resume=not args.no_resume,
                               progress=not args.no_progress, **loop)


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


def cmd_bundle_sign(args: argparse.Namespace) -> int:
    from bundle.signing import sign_bundle  # cryptography only: works in the serving install too

    for path in args.paths:
        print(f"wrote {sign_bundle(Path(path), Path(args.key))}")
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


TRAIN_DESCRIPTION = """Train CLIP or a self-supervised visual encoder.

Data: procedural shapes (default, with evaluation), a folder, or webdataset tar shards
('data/{00000..00099}.tar', as img2dataset writes them). Every --eval-every steps the val split is
evaluated (for choosing settings); at the end, once, the test split (for reporting). Running the same
command again resumes from OUT/checkpoints/latest.pt (mid-epoch for shards). Several GPUs or CPU processes:
torchrun --nproc_per_node N -m training METHOD ...

methods (`tandem train METHOD --help` lists each one's options and defaults):
"""


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """One sub-command per method; its options and their defaults are its config class's fields."""
    from training.config import METHODS, TrainConfig, cli_name, defaults_table

    p.description = TRAIN_DESCRIPTION + "\n".join(f"  {cli_name(m):9} {c.SUMMARY}" for m, c in METHODS.items())
    p.epilog = ("run defaults per method; --optimizer brings the lr and weight decay shown for it, and an lr that "
                "scales is multiplied by --batch-size / the batch named:\n\n" + defaults_table())
    methods = p.add_subparsers(dest="method", required=True, metavar="METHOD")
    for name, cls in METHODS.items():
        m = methods.add_parser(cli_name(name), description=cls.SUMMARY + ".\n\n" + (
            "--optimizer brings its own peak lr and weight decay: " + "; ".join(
                f"{o} lr {lr:g}, weight decay {wd:g}" for o, (lr, wd) in cls.OPTIMIZERS.items())
            + (f" (lr at batch {cls.LR_BATCH}, scaled by --batch-size / {cls.LR_BATCH})" if cls.LR_BATCH else "")
            + "."), formatter_class=argparse.RawDescriptionHelpFormatter)
        m.set_defaults(method=name)
        _add_options(m.add_argument_group(f"{cli_name(name)} settings (training/config.py)"), cls)
        loop = m.add_argument_group("the run")
        loop.add_argument("--out", help="run folder: checkpoints, TensorBoard logs, curves.png, metrics.json "
                          f"(default: runs/{cli_name(name)})")
        _add_options(loop, TrainConfig)
        loop.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        loop.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
        loop.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def _add_options(group: argparse._ArgumentGroup, cls: type) -> None:
    from training.config import OPTIMIZER_HELP, flag, options

    for name, kind, default, help in options(cls):
        if name == "optimizer":
            group.add_argument(flag(name), default=default, choices=list(cls.OPTIMIZERS),  # type: ignore[attr-defined]
                               help=help.replace(OPTIMIZER_HELP, "brings its own lr and weight decay (above)"))
        else:
            group.add_argument(flag(name), type=kind, default=default, help=help)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from training.config import SSLConfig

    p = sub.add_parser("train", formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--backbone", default=SSLConfig.backbone, help="for a random-init baseline")
    p.add_argument("--image-size", type=int, default=SSLConfig.image_size)
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
                       "token ids do not change); the ONNX files are untouched. sign: write manifest.sig, an "
                       "ed25519 signature of manifest.json, for servers started with --bundle-public-key "
                       "(docs/models.md). Sign after upgrading: upgrade rewrites manifest.json.")
    bsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    u = bsub.add_parser("upgrade", help="upgrade bundle folders in place")
    u.add_argument("paths", nargs="+", help="bundle folders, e.g. models/my-clip/1")
    u.set_defaults(func=cmd_bundle_upgrade)
    sg = bsub.add_parser("sign", help="write manifest.sig: an ed25519 signature of manifest.json (docs/models.md)")
    sg.add_argument("paths", nargs="+", help="bundle folders, e.g. models/my-clip/1")
    sg.add_argument("--key", required=True, metavar="PRIVATE.pem",
                    help="ed25519 private key in PEM (openssl genpkey -algorithm ed25519 -out PRIVATE.pem)")
    sg.set_defaults(func=cmd_bundle_sign)

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
    parser = argparse.ArgumentParser(prog="python -m training", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    parser.description = ("Same as `tandem train`; start it with torchrun for several processes, e.g. torchrun "
                          "--nproc_per_node 2 -m training clip --out runs/clip-ddp\n\n" + (parser.description or ""))
    return cmd_train(parser.parse_args(argv))
