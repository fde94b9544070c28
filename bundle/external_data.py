"""Which files an ONNX model keeps its weights in ("external data"), read without the onnx package.

A model over 2 GB cannot be one protobuf, so ONNX lets a tensor point at another file through
``TensorProto.external_data`` (key ``location``). ONNX Runtime reads those files when it opens the
model, so a bundle must list each one with its sha256 or it could be changed unnoticed.

The serving install has protobuf (gRPC needs it) but not onnx, so this declares the few fields of
onnx.proto that can hold a tensor (field numbers from onnx/onnx.proto3, stable since IR version 3)
and lets protobuf skip everything else.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

# The ONNX messages, trimmed to the fields on the way to a TensorProto's external_data.
_SCHEMA = """
name: "tandem_onnx_subset.proto" package: "tandem_onnx_subset" syntax: "proto3"
message_type { name: "Entry"
  field { name: "key" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL }
  field { name: "value" number: 2 type: TYPE_STRING label: LABEL_OPTIONAL } }
message_type { name: "Tensor"
  field { name: "external_data" number: 13 type: TYPE_MESSAGE type_name: ".tandem_onnx_subset.Entry" label: LABEL_REPEATED } }
message_type { name: "Sparse"
  field { name: "values" number: 1 type: TYPE_MESSAGE type_name: ".tandem_onnx_subset.Tensor" label: LABEL_OPTIONAL }
  field { name: "indices" number: 2 type: TYPE_MESSAGE type_name: ".tandem_onnx_subset.Tensor" label: LABEL_OPTIONAL } }
message_type { name: "Attribute"
  field { name: "t" number: 5 type: TYPE_MESSAGE type_name: ".tandem_onnx_subset.Tensor" label: LABEL_OPTIONAL }
  field { name: "g" number: 6 type: TYPE_MESSAGE type_name: ".tandem_onnx_subset.Graph" label: LABEL_OPTIONAL }
  field { name: "tensors" number: 10 type: TYPE_MESSAGE type_name: ".tandem_onnx_subset.Tensor" label: LABEL_REPEATED }
  field { name: "graphs" number: 11 type: TYPE_MESSAGE type_name: ".tandem_onnx_subset.Graph" label: LABEL_REPEATED }
  field { name: "sparse_tensor" number: 22 type: TYPE_MESSAGE type_name: ".tandem_onnx_subset.Sparse" label: LABEL_OPTIONAL }
  field { name: "sparse_tensors" number: 23 type: TYPE_MESSAGE type_name: ".tandem_onnx_subset.Sparse" label: LABEL_REPEATED } }
message_type { name: "Node"
  field { name: "attribute" number: 5 type: TYPE_MESSAGE type_name: ".tandem_onnx_subset.Attribute" label: LABEL_REPEATED } }
message_type { name: "Graph"
  field { name: "node" number: 1 type: TYPE_MESSAGE type_name: ".tandem_onnx_subset.Node" label: LABEL_REPEATED }
  field { name: "initializer" number: 5 type: TYPE_MESSAGE type_name: ".tandem_onnx_subset.Tensor" label: LABEL_REPEATED }
  field { name: "sparse_initializer" number: 15 type: TYPE_MESSAGE type_name: ".tandem_onnx_subset.Sparse" label: LABEL_REPEATED } }
message_type { name: "Function"
  field { name: "node" number: 7 type: TYPE_MESSAGE type_name: ".tandem_onnx_subset.Node" label: LABEL_REPEATED }
  field { name: "attribute_proto" number: 11 type: TYPE_MESSAGE type_name: ".tandem_onnx_subset.Attribute" label: LABEL_REPEATED } }
message_type { name: "Model"
  field { name: "graph" number: 7 type: TYPE_MESSAGE type_name: ".tandem_onnx_subset.Graph" label: LABEL_OPTIONAL }
  field { name: "functions" number: 25 type: TYPE_MESSAGE type_name: ".tandem_onnx_subset.Function" label: LABEL_REPEATED } }
"""


@cache
def _model_class() -> Any:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

    pool = descriptor_pool.DescriptorPool()
    pool.Add(text_format.Parse(_SCHEMA, descriptor_pb2.FileDescriptorProto()))
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tandem_onnx_subset.Model"))


def external_data_files(onnx_file: Path) -> set[str]:
    """The `location` of every tensor of the model stored outside the .onnx file, as written in it."""
    model = _model_class()()
    model.ParseFromString(Path(onnx_file).read_bytes())
    found: set[str] = set()

    def tensor(t: Any) -> None:
        found.update(e.value for e in t.external_data if e.key == "location")

    def sparse(s: Any) -> None:
        tensor(s.values)
        tensor(s.indices)

    def attribute(a: Any) -> None:
        tensor(a.t)
        graph(a.g)
        for t in a.tensors:
            tensor(t)
        for g in a.graphs:
            graph(g)
        sparse(a.sparse_tensor)
        for s in a.sparse_tensors:
            sparse(s)

    def nodes(ns: Any) -> None:
        for n in ns:
            for a in n.attribute:
                attribute(a)

    def graph(g: Any) -> None:
        for t in g.initializer:
            tensor(t)
        for s in g.sparse_initializer:
            sparse(s)
        nodes(g.node)

    graph(model.graph)
    for f in model.functions:
        nodes(f.node)
        for a in f.attribute_proto:
            attribute(a)
    return found
