"""Frames: a 4-byte big-endian length, then one JSON object with a string member `type`."""

import json
import struct

PROTOCOL = 1
MAX_TO_NODE = 4 << 20
MAX_TO_PROGRAM = 16 << 20
MAX_LOG_RECORDS = 10_000


class Closed(EOFError):
    """The peer closed the connection (between frames or inside one)."""


class BadFrame(ValueError):
    """A frame that is not a message of this protocol."""


def encode(msg, max_len):
    body = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(body) > max_len:
        raise BadFrame("a %s message of %d bytes, at most %d" % (msg.get("type"), len(body), max_len))
    return struct.pack(">I", len(body)) + body


def _read_exact(sock, n):
    chunks = []
    got = 0
    while got < n:
        b = sock.recv(min(n - got, 1 << 20))
        if not b:
            raise Closed("the connection was closed")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def read_frame(sock, max_len):
    (n,) = struct.unpack(">I", _read_exact(sock, 4))
    if n > max_len:
        raise BadFrame("a frame of %d bytes, at most %d" % (n, max_len))
    body = _read_exact(sock, n)
    try:
        msg = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadFrame("not JSON: %s" % e)
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise BadFrame("not an object with a string member type")
    return msg
