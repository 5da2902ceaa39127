"""The step channel's messages as bytes: msgpack of plain types and registered dataclasses.

Process 0 sends its workers tuples such as `("call", "prefill", (slot, token_ids, start, table),
{"embeds": rows})`. Only what engine calls carry is encodable: None, bool, int, float, str, bytes,
lists, tuples, dicts with str keys, numpy arrays and scalars of plain numeric dtypes, and the
frozen dataclasses in `DATACLASSES`. Anything else fails at `encode` with a TypeError naming its
type, so a new engine argument is caught on process 0 rather than on a worker.

`decode` never runs code named by the data (no pickle, no imports by name) and bounds what it
builds: nesting depth, container lengths, array sizes; anything unexpected is a ValueError.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import msgpack
import numpy as np

from model.sampling import SamplingParams

# Stable names on the wire -> the frozen dataclasses engine calls carry; rebuilt from their fields.
DATACLASSES: dict[str, type] = {"SamplingParams": SamplingParams}
_DATACLASS_NAMES = {cls: name for name, cls in DATACLASSES.items()}

_DTYPES: dict[str, np.dtype] = {np.dtype(t).name: np.dtype(t) for t in (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64)}
try:  # ships with JAX; bf16 activations may cross the channel
    import ml_dtypes
    _DTYPES["bfloat16"] = np.dtype(ml_dtypes.bfloat16)
except ImportError:
    pass

# Ext codes (msgpack's own -1, timestamps, is not accepted).
_TUPLE, _ARRAY, _SCALAR, _DATACLASS = 1, 2, 3, 4

MAX_BYTES = 1 << 30  # one message; prefill embeddings (f32[T, D]) are the largest part
MAX_DEPTH = 32  # a step message nests 4 deep (message, args, a block table list, its ints)
MAX_ITEMS = 1 << 20  # elements of one list, tuple or dict
MAX_DIMS = 8
_PLAIN = (type(None), bool, int, float, str, bytes)


def encode(message: Any) -> bytes:
    """`message` as msgpack; TypeError for anything that is not a supported type."""
    return msgpack.packb(_to_wire(message, 0), use_bin_type=True)


def decode(data: bytes) -> Any:
    """What `encode` made of a message; ValueError for anything else (never runs its code)."""
    return _from_wire(_unpack(data), 0)


# ---- encoding -------------------------------------------------------------------------------


def _to_wire(x: Any, depth: int) -> Any:
    """`x` as msgpack-native values, with ExtType for tuples, arrays and dataclasses."""
    if depth > MAX_DEPTH:
        raise TypeError(f"step message nests deeper than {MAX_DEPTH} levels")
    kind = type(x)  # exact types: a subclass (an IntEnum, a str subclass) would not round-trip
    if kind is int and not -(1 << 63) <= x < (1 << 64):
        raise TypeError(f"int {x} does not fit 64 bits")
    if kind in _PLAIN:
        return x
    if kind is list:
        return [_to_wire(v, depth + 1) for v in x]
    if kind is tuple:
        return _ext(_TUPLE, [_to_wire(v, depth + 1) for v in x])
    if kind is dict:
        bad = [k for k in x if type(k) is not str]
        if bad:
            raise TypeError(f"step message dict key {bad[0]!r} of type {type(bad[0]).__name__}: "
                            "keys must be str")
        return {k: _to_wire(v, depth + 1) for k, v in x.items()}
    if kind is np.ndarray:
        return _ext(_ARRAY, _array_fields(x))
    if isinstance(x, np.generic):
        return _ext(_SCALAR, _array_fields(np.asarray(x)))
    if kind in _DATACLASS_NAMES:
        fields = {f.name: _to_wire(getattr(x, f.name), depth + 1)
                  for f in dataclasses.fields(x) if f.init}
        return _ext(_DATACLASS, [_DATACLASS_NAMES[kind], fields])
    raise TypeError(f"step messages cannot carry {kind.__module__}.{kind.__qualname__} "
                    f"({x!r:.60}); register a frozen dataclass in step_codec.DATACLASSES or send "
                    "plain types")


def _array_fields(a: np.ndarray) -> list:
    dtype = _DTYPES.get(a.dtype.name)
    if dtype is None:
        raise TypeError(f"step messages cannot carry arrays of dtype {a.dtype} (supported: "
                        f"{', '.join(_DTYPES)})")
    # C order, native byte order: the processes of one mesh share one architecture.
    return [dtype.name, list(a.shape), np.ascontiguousarray(a, dtype=dtype).tobytes()]


def _ext(code: int, fields: Any) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb(fields, use_bin_type=True))


# ---- decoding -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Ext:
    """An ext value as read; decoded by `_from_wire`, which knows how deep it sits."""

    code: int
    data: bytes


def _unpack(data: bytes) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"step message must be bytes, not {type(data).__name__}")
    if len(data) > MAX_BYTES:
        raise ValueError(f"step message of {len(data)} bytes (limit {MAX_BYTES})")
    try:
        # Lengths are checked against the bytes at hand before anything is allocated.
        items = min(len(data), MAX_ITEMS)
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True,
                               ext_hook=_Ext, max_array_len=items, max_map_len=items)
    except ValueError:  # msgpack's format errors, bad UTF-8, trailing bytes
        raise
    except Exception as error:  # noqa: BLE001 - whatever the parser chokes on is bad data
        raise ValueError(f"undecodable step message: {error!r}") from error


def _from_wire(x: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError(f"step message nests deeper than {MAX_DEPTH} levels")
    kind = type(x)
    if kind in _PLAIN:
        return x
    if kind is list:
        return [_from_wire(v, depth + 1) for v in x]
    if kind is dict:
        if any(type(k) is not str for k in x):
            raise ValueError("step message dict with a key that is not a str")
        return {k: _from_wire(v, depth + 1) for k, v in x.items()}
    if kind is not _Ext:  # e.g. msgpack's Timestamp (ext -1)
        raise ValueError(f"unknown value in step message: {kind.__name__}")
    fields = _unpack(x.data)
    if x.code == _TUPLE:
        if type(fields) is not list:
            raise ValueError("tuple ext must hold a list")
        return tuple(_from_wire(v, depth + 1) for v in fields)
    if x.code == _ARRAY:
        return _array(fields)
    if x.code == _SCALAR:
        scalar = _array(fields)
        if scalar.ndim:
            raise ValueError(f"numpy scalar of shape {scalar.shape}")
        return scalar[()]
    if x.code == _DATACLASS:
        return _dataclass(fields, depth)
    raise ValueError(f"unknown ext code {x.code} in step message")


def _array(fields: Any) -> np.ndarray:
    if type(fields) is not list or len(fields) != 3:
        raise ValueError("array ext must hold [dtype, shape, bytes]")
    name, shape, raw = fields
    dtype = _DTYPES.get(name) if type(name) is str else None
    if dtype is None:
        raise ValueError(f"unknown dtype {name!r} in step message")
    if (type(shape) is not list or len(shape) > MAX_DIMS
            or any(type(n) is not int or n < 0 for n in shape)):
        raise ValueError(f"bad array shape {shape!r:.80} in step message")
    if type(raw) is not bytes or math.prod(shape) * dtype.itemsize != len(raw):
        raise ValueError(f"array {name}{shape} needs {math.prod(shape) * dtype.itemsize} bytes, "
                         f"the message holds {len(raw) if type(raw) is bytes else raw!r:.40}")
    if dtype == np.bool_ and raw.translate(None, b"\0\1"):
        raise ValueError("bool array with bytes other than 0 and 1")
    return np.frombuffer(raw, dtype).reshape(shape).copy()  # a writable array of its own


def _dataclass(fields: Any, depth: int) -> Any:
    if type(fields) is not list or len(fields) != 2 or type(fields[1]) is not dict:
        raise ValueError("dataclass ext must hold [name, fields]")
    name, values = fields
    cls = DATACLASSES.get(name) if type(name) is str else None
    if cls is None:
        raise ValueError(f"unknown dataclass {name!r:.60} in step message")
    expected = {f.name for f in dataclasses.fields(cls) if f.init}
    if set(values) != expected:
        raise ValueError(f"{name} fields {sorted(values)!r:.200}, expected {sorted(expected)}")
    kwargs = {k: _from_wire(v, depth + 1) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except Exception as error:  # noqa: BLE001 - its own validation rejected the values
        raise ValueError(f"{name} rejected the message's fields: {error}") from error
