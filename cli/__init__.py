"""`tandem`: one command line over serving and training, a thin dispatcher.

Serving commands come from server/cli.py, training commands from
training/cli.py. Both modules define their arguments with argparse alone and
import their real work inside the command, so `tandem serve` never loads
torch, and in a serving install (no training extra) the training commands
say how to get it instead of failing with an import error.
"""

from __future__ import annotations

import argparse
import os
import sys

from server import cli as serving
from training import cli as training

DESCRIPTION = """Tandem: learn image and text embeddings without labels, export them to ONNX, serve them over gRPC.

serving (the serving install, `make serve`):
  serve          serve every bundle under a model repository over gRPC
  embed          embed texts and/or image files with a running server
  classify       zero-shot classify image files with a running server
  models         list a running server's models: status, precision, provider (--json)
  search         search a collection with texts and/or images; --sheet draws a contact sheet
  index          collections: create, list, describe, drop, rebuild, ingest (a folder of images), eval (recall)
  bench          load-test a running server: items/s, p50/p95/p99, batch sizes, ratio to raw ONNX Runtime
  shapes         draw procedural test images to try the default model on

training (the training extra, `pip install -e '.[train]'`; `make test` installs it in .venv-dev):
  train          train CLIP or a self-supervised image encoder (torchrun -m training for several processes)
  eval           kNN or linear-probe accuracy of an image encoder
  export         export a model to a parity-checked ONNX bundle
  bundle         upgrade bundles written by earlier versions, sign them (works in the serving install too)
  architectures  list the open_clip architectures export and train know
"""

EPILOG = """examples:
  tandem serve --models models --port 50051
  tandem embed --text 'a small red circle'
  tandem index ingest photos/ --collection photos --create
  tandem search 'a small red circle' --collection photos --sheet hits.png --root photos/
  tandem train clip --steps 1500 --out runs/clip
  torchrun --nproc_per_node 2 -m training clip --out runs/clip-ddp
  tandem export --checkpoint runs/clip/checkpoints/latest.pt --name my-clip --version 1
  tandem export --model ViT-B-32 --checkpoint ~/weights/vit_b_32.pt --name vit-b-32

`tandem COMMAND --help` explains each command and its options.
"""

# Modules only the training extra installs: a missing one means "install the extra", not a bug.
TRAINING_MODULES = {"torch", "torchvision", "open_clip", "timm", "onnx", "onnxscript", "tensorboard", "matplotlib",
                    "webdataset"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serving.register(sub)
    training.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tandem search ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in TRAINING_MODULES:
            raise
        print(f"error: `tandem {args.command}` needs {e.name}, which comes with the training extra: "
              "pip install -e '.[train]' (or use .venv-dev, which `make test` sets up)", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:  # a file missing, unreadable, a folder, a place that cannot be written ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from server.client import TandemError

        if isinstance(e, TandemError):
            print(f"error: {e.code.name}: {e.message}", file=sys.stderr)
            if e.code.name == "UNAVAILABLE" and not getattr(args, "tls", False) and not getattr(args, "tls_ca", None):
                print("hint: is the server up at that address, and does it use TLS? Then add --tls "
                      "(or --tls-ca CA.pem); see docs/security.md", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
