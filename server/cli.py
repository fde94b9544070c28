"""The serving commands of `tandem`: serve, embed, classify, models, search and index (collections).

Arguments are argparse only; each command imports what it needs when it
runs (cli/__init__.py dispatches). Nothing here may import training/ or
anything the serving install lacks (tests/test_layout.py checks).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import posixpath
import re
import signal
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any


def setup_logging(level: str = "INFO") -> None:
    # Libraries speak at WARNING; Tandem at `level`.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tandem").setLevel(getattr(logging, level.upper(), logging.INFO))


def run_event_loop(main: Any, use_uvloop: bool) -> None:
    """asyncio.run(main), on uvloop's event loop when asked for and installed."""
    log = logging.getLogger("tandem.server")
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed: running on asyncio's own event loop (pip install uvloop, or "
                        "set uvloop = false to silence this)")
        else:
            log.info("event loop: uvloop %s", uvloop.__version__)
            uvloop.run(main)
            return
    asyncio.run(main)


def cmd_serve(args: argparse.Namespace) -> int:
    # Until the event loop takes SIGTERM over (server/app.py serve), a SIGTERM ends the process cleanly, status 0
    # as at any later moment, not 143 while the server's libraries are still being imported.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from . import config as cfg
    from .app import serve

    config = cfg.load(args)
    setup_logging(config.log_level)
    logging.getLogger("tandem.server").info("configuration:\n%s", config.describe())
    try:
        run_event_loop(serve(config), config.uvloop)
    except (RuntimeError, OSError) as e:  # start-up refused: port or data_dir in use, no model loaded ...
        logging.getLogger("tandem.server").debug("start-up failed", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        _exit_now_if_still_loading(1)
        return 1
    _exit_now_if_still_loading(0)
    return 0


def _exit_now_if_still_loading(status: int) -> None:
    """SIGTERM during start-up leaves the bundle being loaded to its daemon thread. That thread may be inside
    ONNX Runtime building a session, and C++ code running on while the interpreter and the libraries' static
    objects are torn down aborted the process (std::terminate, SIGABRT, about 1 stop in 15). Nothing of that
    model was ever served and every collection write is already in SQLite, so end the process here, with
    the logs flushed and the exit status it would have had."""
    from .registry import loading_in_background

    if loading_in_background():
        logging.getLogger("tandem.server").info("stopped (a model that was still loading is abandoned)")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .client import TandemClient

    return TandemClient(args.server, model=args.model or "", version=args.version or "", timeout_s=args.timeout,
                        **_access(args))


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
    from google.protobuf.json_format import MessageToDict
    from tandem.v1 import tandem_pb2 as pb

    with _client(args) as c:
        r = c.list_models()
    models = [m for m in r.models if (not args.model or m.model.name == args.model)
              and (not args.version or m.model.version == args.version)]
    if (args.model or args.version) and not models:
        print(f"error: no model {args.model or '*'}/{args.version or '*'} on {args.server}; it has "
              + (", ".join(f"{m.model.name}/{m.model.version}" for m in r.models) or "none"), file=sys.stderr)
        return 1
    for m in models:
        default = (m.model.name, m.model.version) == (r.default_model.name, r.default_model.version)
        if args.json:
            print(json.dumps({**MessageToDict(m, preserving_proto_field_name=True), "default": default}))
            continue
        name = f"{m.model.name}/{m.model.version}{' (default)' if default else ''}"
        if m.status != pb.MODEL_STATUS_READY:  # no manifest fields: its status and why
            status = pb.ModelStatus.Name(m.status).removeprefix("MODEL_STATUS_")
            print(f"{name}: {status}" + (f": {m.reason}" if m.reason else ""))
            continue
        print(f"{name}: {m.kind}, {m.architecture}, dim {m.dim}, image {m.image_size}px, context "
              f"{m.context_length}, {m.precision}, {m.execution_provider}, parity {m.parity_min_cosine:.6f}")
    return 0


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="127.0.0.1:50051", help="host:port of a running `tandem serve`")
    p.add_argument("--model", default="", help="model name (default: the server's default model)")
    p.add_argument("--version", default="", help="model version (default: the latest)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before the call is abandoned")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    _access_args(p)


def _access_args(p: argparse.ArgumentParser) -> None:
    """TLS and token options, the same for every command that calls a server."""
    g = p.add_argument_group("TLS and tokens", "for a server that has them on (docs/security.md)")
    g.add_argument("--tls", action="store_true", help="connect with TLS, checking the server's certificate "
                   "against the system's root certificates (implied by the other --tls-* options)")
    g.add_argument("--tls-ca", metavar="CA.pem", help="check the server's certificate against this CA instead")
    g.add_argument("--tls-cert", metavar="CERT.pem", help="client certificate, for a server that requires one "
                   "(mTLS); give --tls-key too")
    g.add_argument("--tls-key", metavar="KEY.pem", help="private key of --tls-cert")
    g.add_argument("--tls-server-name", metavar="NAME", help="the name the server's certificate must carry, when "
                   "it is not --server's host (e.g. connecting by IP address)")
    g.add_argument("--token", help="bearer token sent with every call (default: the TANDEM_TOKEN environment "
                   "variable, which other users cannot see in the process list)")


def _access(args: argparse.Namespace) -> dict[str, Any]:
    """TandemClient's TLS and token arguments from _access_args' options."""
    return {"tls": args.tls, "tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key,
            "tls_server_name": args.tls_server_name, "token": args.token or os.environ.get("TANDEM_TOKEN") or None}



# -- collections: shared helpers -----------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
MAX_QUERIES_PER_REQUEST = 64  # the server's default max_queries_per_search
# Contact sheet geometry (pixels): each cell is a square thumbnail plus two caption lines.
SHEET_PAD, SHEET_LINE = 6, 13
MISSING_GREY = (200, 200, 200)

# What the less obvious CollectionInfo fields mean, for `tandem index describe`.
INFO_HINTS = {
    "index_spec": "as created: 'auto' or a FAISS index_factory string",
    "index_kind": "the index searched now",
    "count": "items stored",
    "device": "where searches run",
    "model_sha256": "sha256 of the bound bundle's image.onnx",
    "model_loaded": "no: every call answers FAILED_PRECONDITION until the bound bundle is loaded",
    "trained": "no: an approximate index still waits for enough vectors",
    "exact": "searches are exact (Flat, or an approximate index not trained yet)",
    "durable_seq": "last acknowledged write",
    "snapshot_seq": "writes included in the last index snapshot on disk",
    "deleted_pending": "deleted vectors still in the index; `tandem index rebuild` drops them",
    "created_at": "RFC 3339",
}


def _server_args(p: argparse.ArgumentParser, timeout: float = 30.0) -> None:
    p.add_argument("--server", default="127.0.0.1:50051", help="host:port of a running `tandem serve`")
    p.add_argument("--timeout", type=float, default=timeout,
                   help=f"seconds before one call is abandoned (default {timeout:g})")
    p.add_argument("--json", action="store_true", help="print JSON (lines) instead of a table")
    _access_args(p)


def _collections_client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .client import TandemClient

    return TandemClient(args.server, timeout_s=args.timeout, **_access(args))


def _retrying(fn, *args, attempts: int = 5):  # type: ignore[no-untyped-def]
    """fn(*args), retried with backoff on the retryable failures (queue full, unavailable, deadline)."""
    from .client import TandemError

    for attempt in range(attempts):
        try:
            return fn(*args)
        except TandemError as e:
            if not e.retryable or attempt == attempts - 1:
                raise
            time.sleep(min(8.0, 0.5 * 2**attempt))
    raise AssertionError("unreachable")


def _plain(value: Any) -> Any:
    """Metadata as JSON would write it: protobuf Structs hold every number as a double, so 3.0 becomes 3 again."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _at_least_1(text: str) -> int:
    """argparse type: a whole number of 1 or more (argparse's own message names the option)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is less than 1")
    return n


def _short(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, str):
        return value if re.fullmatch(r"[\w./@:+-]+", value) else json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return json.dumps(value)


def _compact(item_id: str, metadata: dict[str, Any], width: int = 100) -> str:
    """key=value pairs on one line, cut at `width`; `path` is left out when it only repeats the id."""
    text = " ".join(f"{k}={_short(v)}" for k, v in metadata.items() if not (k == "path" and v == item_id))
    return text if len(text) <= width else text[: width - 3] + "..."


def _info_dict(info: Any) -> dict[str, Any]:
    """Every CollectionInfo field, in declaration order (new fields appear without a change here)."""
    from google.protobuf import json_format

    out: dict[str, Any] = {}
    for f in info.DESCRIPTOR.fields:
        value = getattr(info, f.name)
        if f.message_type is not None:
            value = ({"name": value.name, "version": value.version} if f.message_type.name == "ModelRef"
                     else json_format.MessageToDict(value, preserving_proto_field_name=True))
        out[f.name] = value
    return out


def _print_info(info: Any) -> None:
    for key, value in _info_dict(info).items():
        if isinstance(value, dict) and set(value) == {"name", "version"}:
            value = f"{value['name']}/{value['version']}"
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        hint = INFO_HINTS.get(key, "")
        print(f"{key:16} {str(value).ljust(24)}  {hint}" if hint else f"{key:16} {value}")


def _info_line(info: Any) -> str:
    state = "" if info.model_loaded else "  (bound model NOT loaded)"
    return (f"{info.name}: {info.model.name}/{info.model.version}, dim {info.dim}, {info.metric}, "
            f"index {info.index_kind} (spec {info.index_spec}{', exact' if info.exact else ''}), "
            f"{info.count} items{state}")


# -- tandem index create / list / describe / drop / rebuild -----------------------------------------------------------


def cmd_index_create(args: argparse.Namespace) -> int:
    with _collections_client(args) as c:
        info = c.create_collection(args.name, model=args.model, version=args.version, index_spec=args.index_spec,
                                   metric=args.metric)
    if args.json:
        print(json.dumps(_info_dict(info)))
    else:
        print(f"created {_info_line(info)}")
    return 0


def cmd_index_list(args: argparse.Namespace) -> int:
    with _collections_client(args) as c:
        infos = sorted(c.list_collections(), key=lambda i: i.name)
    if args.json:
        for info in infos:
            print(json.dumps(_info_dict(info)))
        return 0
    if not infos:
        print("no collections (create one with `tandem index create NAME`)")
        return 0
    rows = [("NAME", "MODEL", "DIM", "METRIC", "INDEX", "COUNT", "STATE")]
    for i in infos:
        index = i.index_kind if i.index_kind == i.index_spec else f"{i.index_kind} ({i.index_spec})"
        state = "ok" if i.model_loaded else "model not loaded"
        rows.append((i.name, f"{i.model.name}/{i.model.version}", str(i.dim), i.metric, index, str(i.count), state))
    widths = [max(len(r[col]) for r in rows) for col in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


def cmd_index_describe(args: argparse.Namespace) -> int:
    with _collections_client(args) as c:
        info = c.get_collection(args.name)
    if args.json:
        print(json.dumps(_info_dict(info)))
    else:
        _print_info(info)
    return 0


def cmd_index_drop(args: argparse.Namespace) -> int:
    with _collections_client(args) as c:
        if not args.yes and sys.stdin.isatty():
            info = c.get_collection(args.name)
            answer = input(f"drop collection {info.name!r} and its {info.count} items for good? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("not dropped", file=sys.stderr)
                return 1
        c.drop_collection(args.name)
    print(json.dumps({"dropped": args.name}) if args.json else f"dropped {args.name}")
    return 0


def cmd_index_rebuild(args: argparse.Namespace) -> int:
    with _collections_client(args) as c:
        info = c.rebuild(args.name)
    print(json.dumps(_info_dict(info)) if args.json else f"rebuilt {_info_line(info)}")
    return 0


# -- tandem index ingest ------------------------------------------------------------------------------------------------


def find_images(folder: Path) -> list[str]:
    """Every image file under `folder` (recursive), as sorted posix paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _caption_key(image: str) -> str:
    return posixpath.normpath(str(image).replace("\\", "/"))


def read_captions(path: Path) -> dict[str, list[str]]:
    """{image path relative to the ingested folder: its captions} from training's caption index format:
    a CSV with an `image,caption` header (more columns ignored) or JSONL lines {"image": ..., "caption": ...}."""
    from bundle.captions import read_caption_rows

    rows = read_caption_rows(path)
    out: dict[str, list[str]] = {}
    for image, caption in rows:
        captions = out.setdefault(_caption_key(image), [])
        if caption and str(caption) not in captions:
            captions.append(str(caption))
    return out


def cmd_index_ingest(args: argparse.Namespace) -> int:
    import grpc

    from .client import NotFound

    folder = Path(args.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}")
    ids = find_images(folder)
    if not ids:
        print(f"error: no images ({' '.join(IMAGE_SUFFIXES)}) under {folder}", file=sys.stderr)
        return 2
    captions = read_captions(Path(args.captions)) if args.captions else {}
    unmatched = sorted(set(captions) - set(ids))
    if unmatched:
        print(f"warning: {len(unmatched)} images named in {args.captions} are not under {folder} (e.g. "
              f"{unmatched[:3]}); their captions are ignored", file=sys.stderr)
    top = folder.resolve().name
    codes = {s.value[0]: s.name for s in grpc.StatusCode}

    def item(rel: str, data: bytes) -> dict[str, Any]:
        metadata: dict[str, Any] = {"path": rel, "folder": posixpath.basename(posixpath.dirname(rel)) or top}
        found = captions.get(rel, [])
        if found:
            metadata["caption"] = found[0] if len(found) == 1 else found
        return {"id": rel, "image": data, "metadata": metadata}

    stored, skipped, failed = 0, 0, []
    with _collections_client(args) as c:
        try:
            c.get_collection(args.collection)
        except NotFound as e:
            if not args.create:
                print(f"error: {e.code.name}: {e.message} (add --create, or run `tandem index create "
                      f"{args.collection}` first)", file=sys.stderr)
                return 1
            info = c.create_collection(args.collection)
            print(f"created {_info_line(info)}", file=sys.stderr)
        from tqdm import tqdm

        progress = tqdm(total=len(ids), desc=f"ingest {args.collection}", unit="img")
        try:
            for start in range(0, len(ids), args.batch):
                batch = ids[start : start + args.batch]
                # Resumable: ids stored already (an earlier, interrupted run) are not sent again.
                present = set() if args.overwrite else set(_retrying(c.get, args.collection, batch).items)
                skipped += sum(rel in present for rel in batch)
                items = []
                for rel in batch:
                    if rel in present:
                        continue
                    try:
                        items.append(item(rel, (folder / rel).read_bytes()))
                    except OSError as e:
                        failed.append((rel, f"cannot read the file: {e}"))
                if items:
                    r = _retrying(c.upsert, args.collection, items)
                    for res in r.results:
                        if res.code:
                            failed.append((res.id, f"{codes.get(res.code, res.code)}: {res.message}"))
                        else:
                            stored += 1
                progress.set_postfix_str(f"stored {stored}, skipped {skipped}, failed {len(failed)}", refresh=False)
                progress.update(len(batch))
        except KeyboardInterrupt:
            progress.close()
            print(f"interrupted: {stored} stored, {skipped} skipped (already stored), {len(failed)} failed so far; "
                  "run the same command again to send the rest", file=sys.stderr)
            raise
        progress.close()
        count = c.get_collection(args.collection).count
    if args.json:
        print(json.dumps({"collection": args.collection, "stored": stored, "skipped": skipped, "count": count,
                          "failed": [{"id": i, "message": m} for i, m in failed]}))
    else:
        print(f"{stored} stored, {skipped} skipped (already stored), {len(failed)} failed; "
              f"{args.collection} holds {count} items")
        for item_id, message in failed:
            print(f"  failed {item_id}: {message}")
    return 1 if failed else 0


# -- tandem search ------------------------------------------------------------------------------------------------------


def sheet_size(rows: int, columns: int, thumb: int) -> tuple[int, int]:
    """(width, height) of a contact sheet: columns = 1 (the query) + top_k hits."""
    return columns * (thumb + 2 * SHEET_PAD), rows * (thumb + 2 * SHEET_PAD + 2 * SHEET_LINE)


def _root_file(root: Path, path: Any) -> Path | None:
    """root/path for a relative path that stays inside root; None otherwise (absolute, '..', not a string)."""
    if not isinstance(path, str) or not path:
        return None
    rel = PurePosixPath(path.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts:
        return None
    return root / rel


def write_contact_sheet(out: Path, queries: list[tuple[str, Any, str]], results: list[list[Any]], top_k: int,
                        root: Path, thumb: int) -> tuple[int, int]:
    """A PNG: one row per query, its text (or image) first, then its hits' images with rank, id and score.
    Hit images are root/metadata["path"]; a hit without a readable image gets a grey box."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    font = ImageFont.load_default()
    cell_w, cell_h = thumb + 2 * SHEET_PAD, thumb + 2 * SHEET_PAD + 2 * SHEET_LINE
    sheet = Image.new("RGB", sheet_size(len(queries), 1 + top_k, thumb), "white")
    draw = ImageDraw.Draw(sheet)

    def fit(text: str, keep_end: bool = False) -> str:
        if draw.textlength(text, font=font) <= thumb:
            return text
        while text and draw.textlength(("..." + text) if keep_end else (text + "..."), font=font) > thumb:
            text = text[1:] if keep_end else text[:-1]
        return ("..." + text) if keep_end else (text + "...")

    def picture(source: Path | bytes | None) -> Image.Image | None:
        try:
            img = Image.open(source if isinstance(source, Path) else io.BytesIO(source or b""))
            return ImageOps.contain(ImageOps.exif_transpose(img).convert("RGB"), (thumb, thumb))
        except (OSError, ValueError, Image.DecompressionBombError):
            return None

    def cell(row: int, col: int, img: Image.Image | None, lines: list[str], missing: str = "missing") -> None:
        x, y = col * cell_w + SHEET_PAD, row * cell_h + SHEET_PAD
        if img is None:
            draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill=MISSING_GREY)
            draw.text((x + 3, y + thumb - SHEET_LINE - 2), fit(missing), fill=(90, 90, 90), font=font)
        else:
            sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
        for n, line in enumerate(lines[:2]):
            draw.text((x, y + thumb + 2 + n * SHEET_LINE), line, fill="black", font=font)

    def text_cell(row: int, text: str) -> None:
        x, y = SHEET_PAD, row * cell_h + SHEET_PAD
        draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill=(232, 238, 250))
        lines: list[str] = []
        for word in text.split():
            if lines and draw.textlength(lines[-1] + " " + word, font=font) <= thumb - 6:
                lines[-1] += " " + word
            else:
                lines.append(word)
        for n, line in enumerate(lines[: max(1, (thumb - 6) // SHEET_LINE)]):
            draw.text((x + 3, y + 3 + n * SHEET_LINE), fit(line), fill="black", font=font)

    for row, ((kind, query, label), hits) in enumerate(zip(queries, results)):
        if kind == "text":
            text_cell(row, query)
            draw.text((SHEET_PAD, row * cell_h + SHEET_PAD + thumb + 2), f"query {row + 1} (text)", fill="black",
                      font=font)
        else:
            cell(row, 0, picture(query), [f"query {row + 1} (image)", fit(Path(label).name, keep_end=True)],
                 missing="not an image")
        for rank, hit in enumerate(hits[:top_k], 1):
            path = _root_file(root, hit.metadata.get("path"))
            img = picture(path) if path is not None and path.is_file() else None
            cell(row, rank, img, [fit(f"{rank}. {hit.id}", keep_end=True), f"{hit.score:.3f}"])
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return sheet.size


def cmd_search(args: argparse.Namespace) -> int:
    queries: list[tuple[str, Any, str]] = [("text", t, t) for t in args.queries]
    for path in args.image or []:
        queries.append(("image", Path(path).read_bytes(), str(path)))
    if not queries:
        print("error: give at least one text QUERY or --image FILE", file=sys.stderr)
        return 2
    results: list[list[Any]] = []
    with _collections_client(args) as c:
        for start in range(0, len(queries), MAX_QUERIES_PER_REQUEST):
            chunk = [q for _, q, _ in queries[start : start + MAX_QUERIES_PER_REQUEST]]
            results += c.search(args.collection, *chunk, top_k=args.top_k, filter=args.filter, exact=args.exact)
    for (kind, _, label), hits in zip(queries, results):
        if args.json:
            print(json.dumps({"query": label, "kind": kind,
                              "hits": [{"rank": r, "id": h.id, "score": round(h.score, 6),
                                        "metadata": _plain(h.metadata)} for r, h in enumerate(hits, 1)]},
                             ensure_ascii=False))
            continue
        print(json.dumps(label, ensure_ascii=False) if kind == "text" else f"image {label}")
        if not hits:
            print("     (no hits)")
        for rank, h in enumerate(hits, 1):
            print(f"  {rank:3d}  {h.score:8.4f}  {h.id}  {_compact(h.id, h.metadata)}".rstrip())
    if args.sheet:
        width, height = write_contact_sheet(Path(args.sheet), queries, results, args.top_k, Path(args.root),
                                            args.thumb)
        print(f"wrote {args.sheet}: {len(queries)} rows x {1 + args.top_k} columns, {width}x{height} pixels",
              file=sys.stderr if args.json else sys.stdout)
    return 0


# -- tandem index eval --------------------------------------------------------------------------------------------------


def _probe_ids(c: Any, info: Any, want: int, rng: Any, rounds: int = 20, per_round: int = 32) -> tuple[list[str], str]:
    """Ids of stored items, found without a list-ids call: search exactly with random probe vectors and keep
    the hits. The first round's probes are standard normal; later ones follow a normal distribution fitted
    (mean, per-dimension spread) to the vectors found so far, so they land where the data is. Stops once
    2 x `want` ids (or every item) are found, or after `rounds` rounds."""
    import numpy as np

    k = int(min(100, info.count))
    mean, spread = np.zeros(info.dim, np.float32), np.ones(info.dim, np.float32)
    seen: dict[str, None] = {}
    probes = 0
    for round_ in range(rounds):
        q = (rng.standard_normal((per_round, info.dim)) * spread + mean).astype(np.float32)
        for hits in c.search(info.name, *q, top_k=k, exact=True, with_metadata=False):
            seen.update((h.id, None) for h in hits)
        probes += per_round
        if len(seen) >= min(info.count, 2 * want):
            break
        if round_ == 0 and seen:
            vectors = c.get(info.name, list(seen)[:256], with_vectors=True).vectors
            mean, spread = vectors.mean(0), vectors.std(0) + 1e-6
    return list(seen), f"found by {probes} random probe vectors (exact search, top {k} each)"


def _ids_from_file(c: Any, name: str, path: Path) -> tuple[list[str], str]:
    ids = list(dict.fromkeys(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()))
    present: list[str] = []
    for start in range(0, len(ids), 128):
        present += list(c.get(name, ids[start : start + 128]).items)
    if len(present) < len(ids):
        print(f"warning: {len(ids) - len(present)} ids of {path} are not stored in {name}; left out", file=sys.stderr)
    return present, f"from {path}"


def cmd_index_eval(args: argparse.Namespace) -> int:
    import numpy as np

    from .client import ById

    if args.queries < 1 or args.k < 1 or args.batch < 1:
        raise ValueError("--queries, --k and --batch must be at least 1")
    rng = np.random.default_rng(args.seed)
    with _collections_client(args) as c:
        info = c.get_collection(args.collection)
        if info.count == 0:
            print(f"error: collection {args.collection!r} is empty", file=sys.stderr)
            return 1
        if args.ids_file:
            pool, how = _ids_from_file(c, args.collection, Path(args.ids_file))
        else:
            pool, how = _probe_ids(c, info, args.queries, rng)
        if not pool:
            print("error: no stored ids to query with", file=sys.stderr)
            return 1
        ids = [pool[i] for i in sorted(rng.choice(len(pool), min(args.queries, len(pool)), replace=False))]

        def run(exact: bool) -> tuple[list[list[str]], float]:
            c.search(args.collection, ById(ids[0]), top_k=args.k, exact=exact, with_metadata=False)  # warm up
            found: list[list[str]] = []
            t0 = time.perf_counter()
            for start in range(0, len(ids), args.batch):
                chunk = [ById(i) for i in ids[start : start + args.batch]]
                found += [[h.id for h in hits] for hits in
                          c.search(args.collection, *chunk, top_k=args.k, exact=exact, with_metadata=False)]
            return found, len(ids) / (time.perf_counter() - t0)

        approx, qps_index = run(False)
        exact, qps_exact = run(True)
        before, info = info, c.get_collection(args.collection)
    if (before.index_kind, before.durable_seq) != (info.index_kind, info.durable_seq):
        # A background training run can swap the index in (or writes arrive) while the queries run.
        print(f"warning: the collection changed during the measurement (index {before.index_kind} -> "
              f"{info.index_kind}, writes {before.durable_seq} -> {info.durable_seq}); run it again for a clean "
              "number", file=sys.stderr)
    recalls = [len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact) if e]
    recall = float(np.mean(recalls)) if recalls else 0.0
    below = sum(r < 1.0 for r in recalls)
    if args.json:
        print(json.dumps({"collection": info.name, "count": info.count, "index_kind": info.index_kind,
                          "index_exact": info.exact, "k": args.k, "queries": len(ids), "sampling": how,
                          f"recall@{args.k}": round(recall, 6), "queries_below_full_recall": below,
                          "qps_index": round(qps_index, 1), "qps_exact": round(qps_exact, 1)}))
        return 0
    print(f"collection {info.name}: {info.count} items, metric {info.metric}, index {info.index_kind}"
          + (" (exact: no approximation to measure)" if info.exact else ""))
    print(f"queries: {len(ids)} stored items' own vectors, ids {how}")
    rk = f"recall@{args.k}"
    print(f"{'search':22} {rk:>10} {'queries/s':>10}")
    print(f"{'index (exact=False)':22} {recall:10.3f} {qps_index:10.1f}")
    print(f"{'exact (exact=True)':22} {1.0:10.3f} {qps_exact:10.1f}")
    print(f"queries below full recall: {below} of {len(recalls)}")
    return 0



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

    p = sub.add_parser("models", description="list the models of a running server's repository: READY ones with "
                       "their manifest fields, the others with their status and reason (--model/--version to "
                       "show one, --json for JSON lines)")
    _client_args(p)
    p.set_defaults(func=cmd_models)

    register_collections(sub)
    from . import bench  # module level is argparse and the standard library only; the work imports lazily

    bench.add_parser(sub)


def register_collections(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    raw = argparse.RawDescriptionHelpFormatter
    search = p = sub.add_parser(
        "search", formatter_class=raw,
        description="Search a collection of a running server. Each QUERY is a text query and each --image FILE an "
        "image query; every one is a separate query, embedded by the collection's model, and gets its own list "
        "of hits: rank, score (higher is better: cosine, inner product, or minus the squared L2 distance), id "
        "and the item's metadata on one line. --sheet also draws the hits as a PNG contact sheet.",
        epilog="""examples:
  tandem search 'a large red circle' --collection shapes
  tandem search 'a red circle' 'a blue square' --collection shapes --top-k 5 --filter 'folder = "test"'
  tandem search --image query.png --collection photos --exact
  tandem search 'a cat on a sofa' --collection photos --sheet hits.png --root ~/photos

filters: key = "value", key != 1, key < 3.5, key in ["a", "b"], exists key, combined with
and / or / not and parentheses (docs/filters.md). A list in the metadata matches when one of its
elements does. A bad filter is `error: INVALID_ARGUMENT: ...` and exit status 1.

contact sheet: one row per query, the query text (or image) first, then the top-k hits with
rank, id and score. Hit images are read from ROOT/metadata["path"] (ingest stores that path,
relative to the folder it ingested: give that folder as --root); a hit whose file is missing
gets a grey box.""")
    p.add_argument("queries", nargs="*", metavar="QUERY", help="text queries (each one a query)")
    p.add_argument("--image", action="append", metavar="FILE", help="an image query (repeatable)")
    p.add_argument("--collection", required=True, help="the collection to search")
    p.add_argument("--top-k", type=_at_least_1, default=10, help="hits per query (default 10)")
    p.add_argument("--filter", default="", metavar="EXPR", help="only items whose metadata match (see below)")
    p.add_argument("--exact", action="store_true", help="score every (matching) item instead of using the "
                   "approximate index")
    p.add_argument("--sheet", metavar="OUT.png", help="also write a PNG contact sheet of the hits")
    p.add_argument("--root", default=".", metavar="FOLDER",
                   help="--sheet: the folder hit paths are relative to (default: the current folder)")
    p.add_argument("--thumb", type=_at_least_1, default=128, help="--sheet: thumbnail side in pixels (default 128)")
    _server_args(p)
    p.set_defaults(func=cmd_search)

    index = sub.add_parser(
        "index", formatter_class=raw,
        description="Manage the vector collections of a running server: create, list, describe, drop, rebuild, "
        "ingest a folder of images, and measure the index's recall. A collection is bound to one model bundle; "
        "its items are embedded by that bundle. Search with `tandem search`.",
        epilog="""examples:
  tandem index create photos --metric cosine
  tandem index ingest ~/photos --collection photos --captions ~/photos/captions.csv
  tandem search 'a dog on a beach' --collection photos --sheet hits.png --root ~/photos
  tandem index describe photos
  tandem index eval --collection photos --queries 200 --k 10
  tandem index drop photos

`tandem index ACTION --help` explains each action.""")
    actions = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    p = actions.add_parser(
        "create", help="create a collection", formatter_class=raw,
        description="Create an empty collection bound to a model bundle (the server's default model unless "
        "--model), with an index and a metric that cannot change later.",
        epilog="""examples:
  tandem index create photos
  tandem index create photos-hnsw --index-spec HNSW32 --metric ip
  tandem index create big --model my-clip --version 3 --index-spec IVF1024,Flat

index specs are FAISS index_factory strings: Flat (exact), HNSW32, IVF1024,Flat, IVF256,PQ16, ...
The default, auto, searches exactly (Flat) while the collection is small and switches to an IVF
index trained in the background once it is large enough.""")
    p.add_argument("name", help="collection name: [A-Za-z0-9_-], 1 to 64 characters")
    p.add_argument("--model", default="", help="model whose embeddings it holds (default: the server's default)")
    p.add_argument("--version", default="", help="model version (default: the latest loaded, recorded now)")
    p.add_argument("--index-spec", default="", metavar="SPEC", help="FAISS index_factory string (default: auto)")
    p.add_argument("--metric", choices=["cosine", "ip", "l2"], default="cosine", help="default: cosine")
    _server_args(p)
    p.set_defaults(func=cmd_index_create)

    p = actions.add_parser("list", help="list the collections", formatter_class=raw,
                           description="One line per collection: model, dimension, metric, index, item count, and "
                           "whether its bound model is loaded.",
                           epilog="examples:\n  tandem index list\n  tandem index list --json | jq .count")
    _server_args(p)
    p.set_defaults(func=cmd_index_list)

    p = actions.add_parser("describe", help="every detail of one collection", formatter_class=raw,
                           description="Print every field the server reports for a collection (CollectionInfo), "
                           "with what the less obvious ones mean.",
                           epilog="examples:\n  tandem index describe photos\n  tandem index describe photos --json")
    p.add_argument("name")
    _server_args(p)
    p.set_defaults(func=cmd_index_describe)

    p = actions.add_parser("drop", help="delete a collection and its items", formatter_class=raw,
                           description="Delete a collection and everything in it, for good. On a terminal it asks "
                           "first unless --yes.",
                           epilog="examples:\n  tandem index drop photos\n  tandem index drop photos --yes")
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="do not ask")
    _server_args(p)
    p.set_defaults(func=cmd_index_drop)

    p = actions.add_parser("rebuild", help="retrain the index and drop deleted vectors", formatter_class=raw,
                           description="Retrain the collection's approximate index on the stored vectors and drop "
                           "deleted ones (deleted_pending in `describe`). Large collections take a while: raise "
                           "--timeout.",
                           epilog="examples:\n  tandem index rebuild photos\n  tandem index rebuild big --timeout 3600")
    p.add_argument("name")
    _server_args(p, timeout=600.0)
    p.set_defaults(func=cmd_index_rebuild)

    p = actions.add_parser(
        "ingest", help="embed and store every image of a folder", formatter_class=raw,
        description="Embed and store every image under FOLDER (recursive; "
        + " ".join(IMAGE_SUFFIXES) + "). Each item's id is its path relative to FOLDER (with /), and its "
        'metadata is {"path": that path, "folder": the name of its parent folder, "caption": its caption when '
        "--captions gives one (a list when it gives several)}. Images go in batches of --batch.\n\n"
        "Resumable: before sending a batch it asks which of its ids are stored already and skips those, so "
        "running the same command again after an interruption sends only the rest (an image whose file changed "
        "since is skipped too: --overwrite sends everything). At the end it reports stored, skipped and failed "
        "items and why each failed; the exit status is 1 when any failed.",
        epilog="""examples:
  tandem index ingest ~/photos --collection photos --create
  tandem index ingest ~/photos --collection photos --captions ~/photos/captions.csv --batch 64
  tandem shapes --out shapes && tandem index ingest shapes --collection shapes --create

captions: training's caption index format, image paths relative to FOLDER:
  captions.csv    a header row with image,caption (more columns are ignored)
  captions.jsonl  one {"image": "cats/1.jpg", "caption": "a cat on a sofa"} per line""")
    p.add_argument("folder", metavar="FOLDER", help="folder of images (searched recursively)")
    p.add_argument("--collection", required=True, help="collection to store them in")
    p.add_argument("--captions", metavar="FILE", help="captions.csv or captions.jsonl: captions go into metadata")
    p.add_argument("--batch", type=int, default=32, help="images per request (default 32)")
    p.add_argument("--create", action="store_true",
                   help="create the collection if it does not exist, bound to the server's default model")
    p.add_argument("--overwrite", action="store_true", help="send every image, also those stored already")
    _server_args(p, timeout=120.0)
    p.set_defaults(func=cmd_index_ingest)

    p = actions.add_parser(
        "eval", help="recall@k of the index against exact search", formatter_class=raw,
        description="Measure how much of the exact top-k the collection's (approximate) index finds: for each "
        "of --queries stored items, search with the item's own stored vector once through the index "
        "(exact=False) and once exactly (exact=True), and report recall@k: the mean over the queries of "
        "|index top-k & exact top-k| / |exact top-k| (k unless the collection holds fewer items; the item itself "
        "counts), with the queries per second of each (--batch queries per request, over "
        "gRPC, so the rate includes the round trips).\n\n"
        "Which items: there is no call that lists ids, so by default the ids are collected by searching "
        "exactly with random probe vectors (the first round standard normal, the rest drawn from a normal "
        "fitted to the vectors found) until twice --queries ids (or every item) turn up, and --queries of "
        "them are drawn at random. That favours items near many probes, so it is close to, not exactly, "
        "a uniform sample; --ids-file FILE (one id per line) samples from your ids instead. A Flat (or not yet "
        "trained) index is exact and scores 1.0.",
        epilog="""examples:
  tandem index eval --collection photos
  tandem index eval --collection photos --queries 1000 --k 100 --seed 1
  tandem index eval --collection photos --ids-file ids.txt --json""")
    p.add_argument("--collection", required=True)
    p.add_argument("--queries", type=int, default=200, help="stored items to query with (default 200)")
    p.add_argument("--k", type=int, default=10, help="hits per query (default 10)")
    p.add_argument("--ids-file", metavar="FILE", help="sample query ids from this file (one id per line)")
    p.add_argument("--batch", type=int, default=32, help="queries per Search request (default 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the probes and the sample")
    _server_args(p, timeout=120.0)
    p.set_defaults(func=cmd_index_eval)

    for parser in (search, index, *actions.choices.values()):
        parser.description = _wrap(parser.description or "")


def _wrap(text: str, width: int = 100) -> str:
    """Paragraphs filled to `width` (the parsers use RawDescriptionHelpFormatter to keep the examples as written)."""
    import textwrap

    return "\n\n".join(textwrap.fill(para, width) for para in text.split("\n\n"))
