"""Vectors on the wire: numpy <-> tandem.v1.Matrix (raw little-endian bytes, or a float list for JSON tools).

Used by the server (encode responses, decode vectors that clients send) and by
the Python client (decode responses without copying). numpy and the proto
stubs only.
"""

from __future__ import annotations

import numpy as np
from tandem.v1 import tandem_pb2 as pb

DTYPES = {pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_FLOAT16: np.dtype("<f2")}
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class MatrixError(ValueError):
    """A Matrix that cannot be read as the vectors it claims to be; the message says why."""


def encode(x: np.ndarray, dtype: int = pb.DTYPE_FLOAT32, float_list: bool = False) -> pb.Matrix:
    """float [rows, dim] -> Matrix: one buffer in `dtype`, or (float_list) a list of float32 values."""
    rows, dim = x.shape
    if float_list:
        if dtype != pb.DTYPE_FLOAT32:
            raise MatrixError("float_list answers float32 numbers; leave dtype unset with float_list")
        return pb.Matrix(rows=rows, dim=dim, values=np.asarray(x, np.float32).ravel().tolist())
    if dtype not in DTYPES:
        raise MatrixError(f"dtype {dtype} is not one of {', '.join(pb.DType.Name(d) for d in DTYPES)}")
    if dtype == pb.DTYPE_FLOAT16 and x.size and float(np.abs(x).max()) > _FLOAT16_MAX:
        raise MatrixError(f"the vectors reach {float(np.abs(x).max()):.4g}, past float16's {_FLOAT16_MAX:g}; "
                          "ask for DTYPE_FLOAT32 or for normalised vectors")
    return pb.Matrix(rows=rows, dim=dim, dtype=dtype, data=np.ascontiguousarray(x, DTYPES[dtype]).tobytes())


def decode(m: pb.Matrix, what: str = "matrix") -> np.ndarray:
    """Matrix -> [rows, dim] array without copying the buffer (read-only; float32 or float16).

    Raises MatrixError naming `what` when sizes, dtype or encoding disagree.
    """
    if m.data and len(m.values):
        raise MatrixError(f"{what} sets both data and values; send the numbers once, in one of them")
    if len(m.values):
        if m.rows * m.dim != len(m.values):
            raise MatrixError(f"{what} has {len(m.values)} values, but rows x dim = {m.rows} x {m.dim} = "
                              f"{m.rows * m.dim}")
        return np.asarray(m.values, np.float32).reshape(m.rows, m.dim)
    if m.dtype not in DTYPES:
        raise MatrixError(f"{what}.dtype is {m.dtype}, not one of {', '.join(pb.DType.Name(d) for d in DTYPES)}")
    dt = DTYPES[m.dtype]
    if len(m.data) != m.rows * m.dim * dt.itemsize:
        raise MatrixError(f"{what}.data has {len(m.data)} bytes, but rows x dim x {dt.itemsize} "
                          f"({pb.DType.Name(m.dtype)}) = {m.rows} x {m.dim} x {dt.itemsize} = "
                          f"{m.rows * m.dim * dt.itemsize}")
    return np.frombuffer(m.data, dt).reshape(m.rows, m.dim)
