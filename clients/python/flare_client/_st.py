"""safetensors files without the `safetensors` package.

The format: an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`),
then the tensors' bytes, packed, little-endian, C order, offsets relative to the end of the
header.

Reading maps the file once (a private, copy-on-write mapping) and hands out numpy arrays or
torch tensors over it, so a model is never copied as a whole; writing streams tensor by
tensor. Both work with only the standard library underneath (numpy or torch for the arrays).
"""

import json
import mmap
import os
import struct
import sys

from .errors import FlareModelError

# safetensors dtype -> (item size, numpy dtype or None, torch dtype name or None)
DTYPES = {
    "F64": (8, "<f8", "float64"),
    "F32": (4, "<f4", "float32"),
    "F16": (2, "<f2", "float16"),
    "BF16": (2, None, "bfloat16"),
    "I64": (8, "<i8", "int64"),
    "I32": (4, "<i4", "int32"),
    "I16": (2, "<i2", "int16"),
    "I8": (1, "|i1", "int8"),
    "U8": (1, "|u1", "uint8"),
    "U16": (2, "<u2", "uint16"),
    "U32": (4, "<u4", "uint32"),
    "U64": (8, "<u8", "uint64"),
    "BOOL": (1, "|b1", "bool"),
    "F8_E4M3": (1, None, "float8_e4m3fn"),
    "F8_E5M2": (1, None, "float8_e5m2"),
}

MAX_HEADER = 100 * 1024 * 1024
LITTLE = sys.byteorder == "little"


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def read_header(f, size):
    """Reads and checks the header of an open file of `size` bytes: returns
    (entries in file order as [(name, dtype, shape, begin, end)], metadata, data start)."""
    head = f.read(8)
    if len(head) != 8:
        raise FlareModelError("not a safetensors file: %d bytes" % size)
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size:
        raise FlareModelError("not a safetensors file: a header of %d bytes in %d" % (n, size))
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FlareModelError("not a safetensors file: bad header: %s" % e)
    if not isinstance(header, dict):
        raise FlareModelError("not a safetensors file: the header is not an object")
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    entries = []
    for name, info in header.items():
        try:
            dtype = info["dtype"]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FlareModelError("safetensors header: bad entry for %r: %r" % (name, info))
        if dtype not in DTYPES:
            raise FlareModelError("tensor %r: unsupported dtype %s" % (name, dtype))
        if end - begin != _numel(shape) * DTYPES[dtype][0] or begin < 0 or start + end > size:
            raise FlareModelError("tensor %r: data_offsets %r do not fit %s %r" % (name, [begin, end], dtype, shape))
        entries.append((name, dtype, shape, begin, end))
    entries.sort(key=lambda e: e[3])
    return entries, meta, start


class SafetensorsFile:
    """One safetensors file, mapped; tensors are views over the mapping (which stays alive as
    long as any of them does, even once the file is removed)."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self.entries, self.metadata, self.start = read_header(f, size)
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        self.index = {e[0]: e for e in self.entries}

    def names(self):
        return [e[0] for e in self.entries]

    def numpy(self, name):
        import numpy as np

        _, dtype, shape, begin, end = self.index[name]
        npd = DTYPES[dtype][1]
        if npd is None:
            raise FlareModelError(
                "tensor %r is %s, which numpy cannot represent; use params_format \"pytorch\" "
                "(torch has bfloat16)" % (name, dtype)
            )
        count = _numel(shape)
        if count == 0:
            return np.zeros(shape, dtype=npd)
        arr = np.frombuffer(self._map, dtype=npd, count=count, offset=self.start + begin)
        return arr.reshape(shape)

    def torch(self, name):
        import torch

        _, dtype, shape, begin, end = self.index[name]
        tdt = getattr(torch, DTYPES[dtype][2], None)
        if tdt is None:
            raise FlareModelError("tensor %r is %s, which this torch does not have" % (name, dtype))
        count = _numel(shape)
        if count == 0:
            return torch.zeros(shape, dtype=tdt)
        if not LITTLE:
            raise FlareModelError("big-endian hosts are not supported")
        t = torch.frombuffer(self._map, dtype=tdt, count=count, offset=self.start + begin)
        return t.reshape(shape)

    def raw(self, name):
        """The tensor's bytes (a copy)."""
        _, _, _, begin, end = self.index[name]
        if begin == end:
            return b""
        return bytes(self._map[self.start + begin : self.start + end])

    def load(self, framework):
        get = self.torch if framework == "pytorch" else self.numpy
        return {name: get(name) for name in self.names()}


def write(path, items, metadata=None):
    """Writes a safetensors file from `items`: (name, dtype, shape, nbytes, produce), where
    `produce()` returns the tensor's bytes as a buffer, or (buffer, owner) where the buffer points
    into memory that owner keeps alive (called once, in order, while the file is
    written, so at most one tensor is staged at a time)."""
    header = {}
    offset = 0
    for name, dtype, shape, nbytes, _ in items:
        if name in header:
            raise FlareModelError("tensor %r appears twice" % name)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)))
        f.write(body)
        for name, dtype, shape, nbytes, produce in items:
            buf = produce()
            owner = None
            if isinstance(buf, tuple):
                buf, owner = buf
            n = memoryview(buf).nbytes
            if n != nbytes:
                raise FlareModelError("tensor %r: %d bytes, expected %d" % (name, n, nbytes))
            f.write(buf)
            del buf, owner


def write_raw(path, tensors, metadata=None):
    """Writes {name: (dtype, shape, bytes)} (the standard library's view of a model)."""
    items = [
        (name, dtype, shape, len(data), (lambda d=data: d)) for name, (dtype, shape, data) in tensors.items()
    ]
    write(path, items, metadata)


def read_raw(path):
    """Reads a file into {name: (dtype, shape, bytes)}, in file order."""
    f = SafetensorsFile(path)
    return {name: (dtype, shape, f.raw(name)) for name, dtype, shape, _, _ in f.entries}
