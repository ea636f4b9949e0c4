"""Turning a user's params (torch tensors, numpy arrays, numbers and lists) into the items
`_st.write` streams, and computing DIFF against the task's model file tensor by tensor."""

import ctypes
import sys

from . import _st
from .errors import FlareModelError

_NP_KIND = {
    ("f", 8): "F64",
    ("f", 4): "F32",
    ("f", 2): "F16",
    ("i", 8): "I64",
    ("i", 4): "I32",
    ("i", 2): "I16",
    ("i", 1): "I8",
    ("u", 8): "U64",
    ("u", 4): "U32",
    ("u", 2): "U16",
    ("u", 1): "U8",
    ("b", 1): "BOOL",
}


def _torch():
    mod = sys.modules.get("torch")
    return mod


def _numpy():
    mod = sys.modules.get("numpy")
    if mod is None:
        try:
            import numpy as mod  # noqa: F811
        except ImportError:
            return None
    return mod


def _is_torch(v):
    torch = _torch()
    return torch is not None and isinstance(v, torch.Tensor)


def _is_numpy(v):
    np = sys.modules.get("numpy")
    return np is not None and isinstance(v, (np.ndarray, np.generic))


def _torch_dtype_name(t, name):
    torch = _torch()
    for st, (_, _, tname) in _st.DTYPES.items():
        if getattr(torch, tname, None) == t.dtype:
            return st
    raise FlareModelError("tensor %r: dtype %s cannot be written to safetensors" % (name, t.dtype))


def _numpy_dtype_name(a, name):
    key = (a.dtype.kind, a.dtype.itemsize)
    if key not in _NP_KIND:
        raise FlareModelError("array %r: dtype %s cannot be written to safetensors" % (name, a.dtype))
    return _NP_KIND[key]


def _torch_bytes(t):
    """A CPU, contiguous copy of `t` where needed and a buffer over its bytes (no copy)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    t = t.contiguous()
    n = t.numel() * t.element_size()
    if n == 0:
        return b""
    if not _st.LITTLE:
        raise FlareModelError("big-endian hosts are not supported")
    buf = (ctypes.c_ubyte * n).from_address(t.data_ptr())
    # the buffer points into t: the writer keeps t alive while it writes
    return buf, t


def _numpy_bytes(a):
    np = _numpy()
    a = np.asarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    a = np.ascontiguousarray(a)
    if a.size == 0:
        return b""
    return a.reshape(-1).view(np.uint8).data


def _coerce(name, v):
    """A tensor, an array, or (numbers, lists) an array or a tensor."""
    if _is_torch(v):
        if v.layout != _torch().strided:
            raise FlareModelError("tensor %r: a %s tensor; send dense tensors" % (name, v.layout))
        return v
    if _is_numpy(v):
        a = _numpy().asarray(v)
        if a.dtype.kind == "O":
            raise FlareModelError("param %r: an object array cannot be sent" % name)
        return a
    np = _numpy()
    if np is not None:
        a = np.asarray(v)
        if a.dtype.kind in "OUS":
            raise FlareModelError("param %r: a %s cannot be sent as a tensor" % (name, type(v).__name__))
        return a
    torch = _torch()
    if torch is not None:
        try:
            return torch.as_tensor(v)
        except Exception:
            pass
    raise FlareModelError(
        "param %r: a %s; params must be torch tensors or numpy arrays" % (name, type(v).__name__)
    )


def items_for(params, base=None):
    """The items `_st.write` streams for `params` ({name: tensor}); with `base` (the task's
    `_st.SafetensorsFile`), each is `params[name] - base[name]` (DIFF), computed when the
    tensor is written."""
    if not isinstance(params, dict):
        raise FlareModelError("params must be a dict of name -> tensor, not %s" % type(params).__name__)
    items = []
    for name, v in params.items():
        if not isinstance(name, str):
            raise FlareModelError("param names must be strings, not %r" % (name,))
        v = _coerce(name, v)
        torch_ = _is_torch(v)
        dtype = _torch_dtype_name(v, name) if torch_ else _numpy_dtype_name(v, name)
        shape = list(v.shape)
        nbytes = _st._numel(shape) * _st.DTYPES[dtype][0]
        if base is not None:
            if name not in base.index:
                raise FlareModelError(
                    "cannot send DIFF: %r is not in the task's model (its tensors: %s)"
                    % (name, ", ".join(base.names()[:10]))
                )
            _, bdtype, bshape, _, _ = base.index[name]
            if list(bshape) != shape:
                raise FlareModelError(
                    "cannot send DIFF: %r has shape %s, the task's model %s" % (name, shape, bshape)
                )
            if dtype == "BOOL":
                raise FlareModelError("cannot send DIFF of the bool tensor %r" % name)
        produce = _producer(name, v, torch_, base)
        items.append((name, dtype, shape, nbytes, produce))
    return items


def _producer(name, v, torch_, base):
    def produce():
        x = v
        if base is not None:
            if torch_:
                orig = base.torch(name)
                x = x.detach()
                if x.device.type != "cpu":
                    x = x.cpu()
                x = x - orig.to(x.dtype)
            else:
                np = _numpy()
                orig = base.numpy(name)
                x = (np.asarray(x) - orig.astype(x.dtype, copy=False)).astype(x.dtype, copy=False)
        return _torch_bytes(x) if torch_ else _numpy_bytes(x)

    return produce


def torch_format_name(fmt):
    f = str(fmt).lower()
    if f in ("pytorch", "torch", "pt"):
        return "pytorch"
    if f in ("numpy", "np"):
        return "numpy"
    raise ValueError('params_format must be "pytorch" or "numpy", not %r' % (fmt,))
