"""The server's one typed configuration: defaults < TOML file < TANDEM_* env < flags.

Every field has a help text; ``tandem serve --help`` lists them all and the
effective configuration is logged at start-up. (Hand-written: ~60 lines over
dataclasses + argparse + tomllib, simpler than bending pydantic-settings
around the `tandem` subcommands.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "TANDEM_"
# What a [server.model."NAME"] table of the TOML file may set for one model (docs/operations.md).
PER_MODEL = ("max_batch_size", "max_queue_delay_us", "max_queue_rows", "model_runners", "intra_op_threads",
             "precision")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class ServerConfig:
    models: str = _f("models", "model repository folder: <name>/<version>/manifest.json")
    default_model: str = _f("", "model used when a request names none (empty: the first one found)")
    host: str = _f("127.0.0.1", "address to listen on (0.0.0.0 for all interfaces)")
    port: int = _f(50051, "gRPC port")
    metrics_port: int = _f(9100, "Prometheus /metrics port (0 disables)")
    metrics_host: str = _f("", "address /metrics listens on (empty: the same as host), e.g. an internal "
                           "interface when gRPC is public")
    reflection: bool = _f(True, "serve gRPC server reflection, for grpcurl and similar tools (with tokens on, "
                          "it needs a valid token)")
    tls_cert: str = _f("", "PEM certificate chain of the gRPC port: TLS on (with tls_key)")
    tls_key: str = _f("", "PEM private key of tls_cert")
    tls_client_ca: str = _f("", "PEM CA certificate(s): clients must present a certificate signed by one (mTLS)")
    tokens_file: str = _f("", "bearer tokens with scopes, one 'NAME SCOPES TOKEN' per line, re-read when it "
                          "changes or on SIGHUP (docs/security.md); or the TANDEM_TOKENS environment variable")
    allow_insecure_public: bool = _f(False, "listen on a non-loopback host without TLS or without tokens "
                                     "(logs a warning); off, the server refuses to start that way")
    device: str = _f("auto", "where models run (ONNX Runtime) and collections search (FAISS): auto (the GPU when "
                     "available: onnxruntime-gpu, faiss-gpu), cpu or cuda")
    precision: str = _f("auto", "what fp32 bundles run in: auto (fp16 on CUDA, fp32 on the CPU), fp16 (converted "
                        "when loaded, with ONNX Runtime's float16 converter, and kept only if it agrees with fp32 on "
                        "a probe batch to cosine 0.999, as tandem export --precision fp16 must; needs the onnx "
                        "package) or bundle (always as exported)")
    model_runners: int = _f(1, "ONNX Runtime runs in progress at once per model and tower: above 1, the next batch "
                            "forms and starts while one runs (on 2 CPU cores 1 measured faster: docs/benchmarks.md)")
    intra_op_threads: int = _f(0, "threads per ONNX Runtime run (0: the CPUs this process may use, container CPU "
                               "limit included, divided among model_runners)")
    inter_op_threads: int = _f(1, "ONNX Runtime inter-op threads")
    uvloop: bool = _f(True, "run the event loop on uvloop (part of the serving install on Linux and macOS; asyncio's "
                      "own loop when it is missing): 1.2-1.4x the requests/s at concurrency 32 on 2 cores "
                      "(docs/benchmarks.md)")
    ort_spinning: bool = _f(False, "let ONNX Runtime's threads spin-wait between runs (its own default): a lone "
                            "request is ~0.4 ms faster, but under load the spinning takes the CPU that decoding, "
                            "tokenising and gRPC need (off: 1.2 to 1.6 times the throughput at concurrency 32 on 2 "
                            "cores, docs/benchmarks.md)")
    preprocess_threads: int = _f(4, "threads that decode and resize images")
    image_decoder: str = _f("auto", "who decodes and resizes images: pil (Pillow), torch (torchvision: JPEGs with "
                            "nvJPEG on the GPU when the model runs on CUDA; JPEGs and PNGs on the CPU otherwise: "
                            "1.6-2.2x Pillow's images a thread, no gain end to end on 2 cores; needs torchvision, "
                            "the nvjpeg extra) or auto (torch "
                            "when the model runs on CUDA and torchvision is installed, else pil). What torchvision "
                            "would not decode as Pillow does goes to Pillow")
    max_batch_size: int = _f(32, "most items per ONNX Runtime run")
    max_queue_delay_us: int = _f(2000, "longest an item waits for others to fill a batch, microseconds")
    max_queue_rows: int = _f(4096, "items waiting per model and tower before requests get RESOURCE_EXHAUSTED")
    max_items_per_request: int = _f(256, "most images or texts in one request")
    max_labels: int = _f(1000, "most candidate labels in one Classify request")
    max_text_chars: int = _f(4096, "longest text accepted, in characters (token truncation is separate)")
    max_request_text_chars: int = _f(262_144, "most characters of text one request may make the server tokenise: "
                                     "its texts, or a Classify request's prompts (labels x templates), counted "
                                     "before any work")
    max_templates: int = _f(100, "most prompt templates in one Classify request (CLIP's ImageNet ensemble has 80)")
    max_template_chars: int = _f(256, "longest prompt template, in characters")
    max_template_slots: int = _f(4, "most '{}' label slots in one prompt template")
    max_image_pixels: int = _f(40_000_000, "largest image accepted, width x height, checked before decoding")
    max_image_decode_bytes: int = _f(160 * 1024 * 1024, "most memory decoding one image may take, estimated from "
                                     "its header before decoding: width x height x bytes per pixel of its mode "
                                     "(4 for RGB, 2 for 16-bit grey) plus the mode it is converted to")
    max_inflight_items: int = _f(4096, "images or texts being preprocessed, queued or run per model and tower; a "
                                 "request that would pass it gets RESOURCE_EXHAUSTED at once, before any decoding")
    max_preprocess_items: int = _f(4096, "images and texts waiting for or in a preprocessing thread, all models "
                                   "together; past it requests get RESOURCE_EXHAUSTED at once")
    queue_timeout_ms: int = _f(0, "a request that waited this long in the server's queues before its work started "
                               "gets UNAVAILABLE without running (Triton's queue policy; 0: no limit)")
    max_message_bytes: int = _f(16 * 1024 * 1024, "largest gRPC message, received or sent (16 MiB holds 256 "
                                "images of 64 KB, or a 256 x 4096 float32 answer, with room to spare)")
    max_concurrent_streams: int = _f(256, "most RPCs in flight on one client connection (HTTP/2 "
                                     "SETTINGS_MAX_CONCURRENT_STREAMS)")
    keepalive_time_s: int = _f(60, "ping an idle client connection after this many seconds, to find dead peers")
    keepalive_timeout_s: int = _f(20, "close a connection whose keepalive ping is not answered within this")
    max_connection_age_s: int = _f(1800, "close client connections older than this (with GOAWAY), so that load "
                                   "balancers spread long-lived gRPC connections over new replicas (0: never)")
    max_connection_age_grace_s: int = _f(30, "how long RPCs in flight on a connection closed for its age may finish")
    label_cache_size: int = _f(256, "zero-shot label sets whose embeddings are cached")
    label_cache_bytes: int = _f(64 * 1024 * 1024, "memory the zero-shot label cache may use per model: label "
                                "and template strings plus embeddings")
    verify_hashes: bool = _f(True, "check each ONNX file's sha256 against its manifest at load")
    model_poll_seconds: int = _f(0, "look for added, changed and removed bundles in the model repository every "
                                 "this many seconds and load or unload them (0: off; LoadModel/UnloadModel work either way)")
    bundle_public_key: str = _f("", "PEM ed25519 public key: every bundle must carry a manifest.sig made with its "
                                "private key (tandem bundle sign), or it is not loaded (empty: signatures not checked)")
    reveal_source_paths: bool = _f(False, "show the checkpoint path a bundle was exported from in ModelInfo.source "
                                   "(off: only its kind and sha256, no local paths)")
    shutdown_grace_seconds: int = _f(5, "on SIGTERM, how long calls in progress get to finish before they are cancelled")
    data_dir: str = _f("data", "folder that holds the collections (created if missing; one server at a time: a "
                       "second one on the same folder refuses to start)")
    max_top_k: int = _f(1000, "most hits one search query may ask for")
    max_queries_per_search: int = _f(64, "most queries in one Search request")
    max_query_terms: int = _f(16, "most weighted terms in one query")
    max_metadata_bytes: int = _f(16384, "largest item metadata, as JSON bytes")
    hit_cache_bytes: int = _f(256 * 1024 * 1024, "memory for the ids and metadata of items written or found since "
                              "the start, all collections together, ready to answer searches without reading SQLite "
                              "(about 320 bytes an item plus its id and metadata; least recently used out first; "
                              "0: off)")
    snapshot_every_changes: int = _f(20_000, "write a collection's index snapshot after this many added or deleted "
                                     "vectors (start-up replays the writes after the last snapshot)")
    log_level: str = _f("INFO", "DEBUG, INFO, WARNING or ERROR")
    # Only in the TOML file: [server.model."NAME"] tables of PER_MODEL settings for the model NAME.
    model_settings: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "help": "per-model batching and threads, from [server.model.\"NAME\"] tables of the TOML file", "toml_only": True})

    def for_model(self, name: str) -> ServerConfig:
        """This configuration with model `name`'s own settings ([server.model."NAME"]) over it."""
        own = self.model_settings.get(name)
        return dataclasses.replace(self, **own) if own else self

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


def markdown_table() -> str:
    """The settings as the table in docs/operations.md (`python -c 'import server.config as c;
    print(c.markdown_table())'`; tests/server/test_config.py checks that the docs hold it)."""
    rows = ["| field | flag | environment | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for f in _settable():
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            flag = f"{flag}` / `--no-{f.name.replace('_', '-')}"
        help_text = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{flag}` | `{ENV_PREFIX}{f.name.upper()}` | `{json.dumps(f.default)}` | {help_text} |")
    return "\n".join(rows)


def _settable() -> list[Any]:
    """The fields a flag, an environment variable or a top-level TOML key sets."""
    return [f for f in fields(ServerConfig) if not f.metadata.get("toml_only")]


def _model_settings(tables: Any, where: str) -> dict[str, dict[str, Any]]:
    """[server.model."NAME"] tables -> {NAME: {setting: value}}, checked."""
    kinds = {f.name: f.type for f in fields(ServerConfig)}
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ValueError(f'{where}: "model" must hold tables, one per model: [server.model."NAME"]')
    out = {}
    for name, table in tables.items():
        unknown = sorted(set(table) - set(PER_MODEL))
        if unknown:
            raise ValueError(f"{where}: [server.model.{json.dumps(name)}] sets {', '.join(unknown)}; a model may set "
                             f"only {', '.join(PER_MODEL)}")
        out[name] = {k: _convert(kinds[k], v, f"{where}: [server.model.{json.dumps(name)}] {k}")
                     for k, v in table.items()}
    return out


def _convert(kind: Any, raw: Any, where: str) -> Any:
    if isinstance(raw, str) and kind in (bool, "bool"):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: expected true/false, got {raw!r}")
    try:
        return {"int": int, "str": str, "bool": bool}.get(kind, kind)(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected {kind}, got {raw!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file ([server] table or top level)")
    for f in _settable():
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            parser.add_argument(flag, default=None, metavar=f.name.upper(),
                                help=f"{f.metadata['help']} (default {f.default!r}; env {ENV_PREFIX}{f.name.upper()})")


def load(args: argparse.Namespace | None = None, env: dict[str, str] | None = None) -> ServerConfig:
    env = dict(os.environ) if env is None else env
    values: dict[str, Any] = {}
    known = {f.name: f for f in _settable()}
    config_file = getattr(args, "config", None) or env.get(ENV_PREFIX + "CONFIG")
    if config_file:
        data = tomllib.loads(Path(config_file).read_text())
        data = dict(data.get("server", data))
        if "model" in data:
            values["model_settings"] = _model_settings(data.pop("model"), config_file)
        for key, raw in data.items():
            if key not in known:
                raise ValueError(f"{config_file}: unknown setting {key!r}; known: {', '.join(known)}")
            values[key] = _convert(known[key].type, raw, f"{config_file}: {key}")
    for name, f in known.items():
        if (raw := env.get(ENV_PREFIX + name.upper())) is not None:
            values[name] = _convert(f.type, raw, f"{ENV_PREFIX}{name.upper()}")
        if args is not None and (raw := getattr(args, name, None)) is not None:
            values[name] = _convert(f.type, raw, "--" + name.replace("_", "-"))
    config = ServerConfig(**values)
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ValueError("TLS needs both tls_cert and tls_key (PEM files), got only "
                         + ("tls_cert" if config.tls_cert else "tls_key"))
    if config.tls_client_ca and not config.tls_cert:
        raise ValueError("tls_client_ca (mTLS) needs TLS on: set tls_cert and tls_key too")
    for model, each in [("", config)] + [(n, config.for_model(n)) for n in config.model_settings]:
        where = f' (model "{model}")' if model else ""
        for name in ("model_runners", "max_batch_size"):
            if getattr(each, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(each, name)}{where}")
        if each.precision not in ("auto", "fp16", "bundle"):
            raise ValueError(f"precision must be auto, fp16 or bundle, got {each.precision!r}{where}")
        if each.intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be 0 (the cores shared by model_runners) or more, "
                             f"got {each.intra_op_threads}{where}")
        if each.max_items_per_request > each.max_queue_rows:
            raise ValueError(f"max_items_per_request ({each.max_items_per_request}) must not exceed max_queue_rows "
                             f"({each.max_queue_rows}){where}, or large requests could never be queued")
    if config.hit_cache_bytes < 0:
        raise ValueError(f"hit_cache_bytes must be 0 (no cache) or more, got {config.hit_cache_bytes}")
    if config.image_decoder not in ("auto", "pil", "torch"):
        raise ValueError(f"image_decoder must be auto, pil or torch, got {config.image_decoder!r}")
    if config.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {config.device!r}")
    if config.max_items_per_request > config.max_inflight_items:
        raise ValueError(f"max_items_per_request ({config.max_items_per_request}) must not exceed max_inflight_items "
                         f"({config.max_inflight_items}), or large requests could never be admitted")
    if config.max_items_per_request > config.max_preprocess_items:
        raise ValueError(f"max_items_per_request ({config.max_items_per_request}) must not exceed "
                         f"max_preprocess_items ({config.max_preprocess_items}), or large requests could never "
                         "be admitted")
    return config


def grpc_server_options(config: ServerConfig) -> list[tuple[str, Any]]:
    """The grpc.aio server's channel arguments: message sizes, streams per connection, keepalive, connection age."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        # grpc turns SO_REUSEPORT on by default: a second server started on this port would then take a share of
        # the connections without a word. Off, it fails to start ("in use?"). Several processes on one port
        # measured +2-10% on 2 cores (docs/benchmarks.md): replicas behind a load balancer do that job.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", config.keepalive_time_s * 1000),
        ("grpc.keepalive_timeout_ms", config.keepalive_timeout_s * 1000),
        # Clients may ping as often as every 10 s (grpc's own default minimum is 5 min, which makes clients
        # that keep their connections alive with pings get GOAWAY "too_many_pings").
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if config.max_connection_age_s:
        options += [("grpc.max_connection_age_ms", config.max_connection_age_s * 1000),
                    ("grpc.max_connection_age_grace_ms", config.max_connection_age_grace_s * 1000)]
    return options
