"""The serving commands of `tandem`: serve, embed, classify, models.

Arguments are argparse only; each command imports what it needs when it
runs (cli/__init__.py dispatches).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path


def setup_logging(level: str = "INFO") -> None:
    # Libraries speak at WARNING; Tandem at `level`.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tandem").setLevel(getattr(logging, level.upper(), logging.INFO))


def cmd_serve(args: argparse.Namespace) -> int:
    from . import config as cfg
    from .app import serve

    config = cfg.load(args)
    setup_logging(config.log_level)
    logging.getLogger("tandem.server").info("configuration:\n%s", config.describe())
    asyncio.run(serve(config))
    return 0


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .client import TandemClient

    return TandemClient(args.server, model=args.model or "", version=args.version or "", timeout_s=args.timeout)


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    if not args.text and not args.images:
        print("error: give --text and/or image files", file=sys.stderr)
        return 2
    with _client(args) as c:
        rows = []
        if args.text:
            r = c.embed_text(args.text, normalize=not args.unnormalized)
            rows += [(t, e, tr) for t, e, tr in zip(args.text, r.embeddings, r.truncated)]
        if args.images:
            r = c.embed_image(args.images, normalize=not args.unnormalized)
            rows += [(str(p), e, False) for p, e in zip(args.images, r.embeddings)]
    if args.output:
        np.save(args.output, np.stack([e for _, e, _ in rows]))
        print(f"saved {len(rows)} x {len(rows[0][1])} float32 to {args.output}")
    for item, emb, truncated in rows:
        if args.json:
            print(json.dumps({"input": item, "embedding": [round(float(v), 6) for v in emb], "truncated": truncated}))
        else:
            head = " ".join(f"{v:+.3f}" for v in emb[:6])
            print(f"{item[:50]!r:54} dim {len(emb)}  [{head} ...]" + ("  (truncated)" if truncated else ""))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    labels = list(args.labels or [])
    if args.labels_file:
        labels += [line.strip() for line in Path(args.labels_file).read_text().splitlines() if line.strip()]
    if not labels:
        print("error: give --labels and/or --labels-file", file=sys.stderr)
        return 2
    with _client(args) as c:
        results = c.classify(args.images, labels, args.template or None, args.top_k)
    for path, top in zip(args.images, results):
        if args.json:
            print(json.dumps({"image": str(path), "top": [vars(s) for s in top]}))
            continue
        print(path)
        for s in top:
            print(f"  {s.probability:7.2%}  {s.label}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as c:
        r = c.list_models()
    for m in r.models:
        default = " (default)" if (m.model.name, m.model.version) == (r.default_model.name, r.default_model.version) else ""
        print(f"{m.model.name}/{m.model.version}{default}: {m.kind}, {m.architecture}, dim {m.dim}, "
              f"image {m.image_size}px, context {m.context_length}, {m.precision}, {m.execution_provider}, "
              f"parity {m.parity_min_cosine:.6f}")
    return 0


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="127.0.0.1:50051", help="host:port of a running `tandem serve`")
    p.add_argument("--model", default="", help="model name (default: the server's default model)")
    p.add_argument("--version", default="", help="model version (default: the latest)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before the call is abandoned")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from . import config as cfg

    p = sub.add_parser("serve",
                       description="Serve every bundle under --models over gRPC, with health, reflection "
                       "and Prometheus metrics. Health answers NOT_SERVING until every model is loaded and "
                       "warmed, then SERVING. Settings: defaults < --config FILE.toml < TANDEM_* env < flags.")
    cfg.add_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("embed",
                       description="Print (or save with --output) the embeddings a running server computes.")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--text", nargs="+", default=[], help="texts to embed")
    p.add_argument("--unnormalized", action="store_true", help="raw tower outputs, not unit length")
    p.add_argument("--output", help="also save all embeddings to this .npy file")
    _client_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("classify",
                       description="Score each image against candidate labels, CLIP style: no classifier is "
                       "trained; each label is embedded as text through prompt templates.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--labels", nargs="+", help="candidate labels")
    p.add_argument("--labels-file", help="more candidate labels, one per line")
    p.add_argument("--template", action="append", help="prompt template with {} (repeatable); default ensemble")
    p.add_argument("--top-k", type=int, default=5)
    _client_args(p)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("models", description="list the models a running server has loaded")
    _client_args(p)
    p.set_defaults(func=cmd_models)
