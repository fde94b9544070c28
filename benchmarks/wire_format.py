"""CPU cost of putting embeddings on the wire: one raw Matrix vs one float list per item.

Baseline, in the same process: the pre-0.2 response layout (`repeated Embedding
embeddings`, each `repeated float values`), rebuilt here from a descriptor
since it left the API. For an N x DIM float32 result it times, per response:

    build+serialise   what the server does: numpy -> message -> bytes
    parse+decode      what the Python client does: bytes -> message -> numpy

    .venv-dev/bin/python benchmarks/wire_format.py --rows 256 --dim 512
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proto"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tandem.v1 import tandem_pb2 as pb  # noqa: E402

from server import wire  # noqa: E402


def old_messages() -> tuple[type, type]:
    """tandem.v1.EmbedResponse as it was: ModelRef, dim, repeated Embedding{repeated float values}, ..."""
    f = descriptor_pb2.FileDescriptorProto(name="old_tandem.proto", package="old", syntax="proto3")
    emb = f.message_type.add(name="Embedding")
    emb.field.add(name="values", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT,
                  label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED)
    resp = f.message_type.add(name="EmbedResponse")
    resp.field.add(name="dim", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_UINT32,
                   label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    resp.field.add(name="embeddings", number=3, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                   type_name=".old.Embedding", label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName("old.Embedding")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName("old.EmbedResponse")))


def cpu_per_call(fn: Callable[[], object], seconds: float) -> float:
    """CPU seconds per call (process time), over at least `seconds` of CPU."""
    fn()
    n, start = 0, time.process_time()
    while (used := time.process_time() - start) < seconds:
        fn()
        n += 1
    return used / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--seconds", type=float, default=2.0, help="CPU seconds per measurement")
    args = p.parse_args()
    x = np.random.default_rng(0).standard_normal((args.rows, args.dim)).astype(np.float32)
    Embedding, OldResponse = old_messages()

    def old_build() -> bytes:
        return OldResponse(dim=args.dim, embeddings=[Embedding(values=r) for r in x.tolist()]).SerializeToString()

    def new_build(dtype: int = pb.DTYPE_FLOAT32, float_list: bool = False) -> bytes:
        return pb.EmbedResponse(dim=args.dim, embeddings=wire.encode(x, dtype, float_list)).SerializeToString()

    old_bytes, new_bytes = old_build(), new_build()
    list_bytes, half_bytes = new_build(float_list=True), new_build(pb.DTYPE_FLOAT16)

    def old_decode() -> np.ndarray:
        r = OldResponse.FromString(old_bytes)
        return np.array([e.values for e in r.embeddings], np.float32)

    def new_decode(data: bytes = new_bytes) -> np.ndarray:
        return wire.decode(pb.EmbedResponse.FromString(data).embeddings)

    assert np.array_equal(old_decode(), new_decode()) and np.array_equal(new_decode(list_bytes), x)
    rows = [
        ("repeated Embedding (before)", old_build, old_decode, len(old_bytes)),
        ("Matrix float32 raw (now)", new_build, new_decode, len(new_bytes)),
        ("Matrix float16 raw", lambda: new_build(pb.DTYPE_FLOAT16), lambda: new_decode(half_bytes), len(half_bytes)),
        ("Matrix float_list (JSON tools)", lambda: new_build(float_list=True), lambda: new_decode(list_bytes),
         len(list_bytes)),
    ]
    base_build = cpu_per_call(old_build, args.seconds)
    base_decode = cpu_per_call(old_decode, args.seconds)
    print(f"{args.rows} x {args.dim} float32 embeddings, CPU time per response (process time)\n")
    print("| layout | bytes | build+serialise µs | vs before | parse+decode µs | vs before |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, build, decode, size in rows:
        b = base_build if build is old_build else cpu_per_call(build, args.seconds)
        d = base_decode if decode is old_decode else cpu_per_call(decode, args.seconds)
        print(f"| {name} | {size:,} | {b * 1e6:,.0f} | {base_build / b:.1f}x | {d * 1e6:,.0f} | {base_decode / d:.1f}x |")


if __name__ == "__main__":
    main()
