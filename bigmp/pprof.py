"""bigmp profiles in pprof's format: a gzipped ``profile.proto`` message.

``go tool pprof``, pprof's web UI and the tools that read Go profiles (speedscope,
Pyroscope, Parca) read it, as they read bigmachine's profiles. The encoder is written out
here (a few kinds of protobuf field) rather than taking a protobuf dependency for one
message. Each sample is one stack of one thread of one machine, its value the
microseconds it stands for, with ``machine`` and ``thread`` string labels; each function
is one location, at the line where the function starts (the sampler records functions,
not lines).
"""
from __future__ import annotations

import gzip
import time
from typing import Dict, List, Tuple

__all__ = ["encode"]


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64            # int64 as protobuf writes it: two's complement, 10 bytes
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value) if value else b""


def _bytes(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _packed(field: int, values: List[int]) -> bytes:
    return _bytes(field, b"".join(_varint(v) for v in values)) if values else b""


def encode(profile) -> bytes:
    """The gzipped pprof message of a :class:`bigmp.profiling.Profile`."""
    strings: List[str] = [""]
    index: Dict[str, int] = {"": 0}

    def s(text: str) -> int:
        i = index.get(text)
        if i is None:
            i = index[text] = len(strings)
            strings.append(text)
        return i

    kind = {"cpu": "cpu", "wall": "wall"}.get(profile.mode, "time")
    value_type = _int(1, s(kind)) + _int(2, s("microseconds"))
    functions: Dict[Tuple[str, int, str], int] = {}
    body = [_bytes(1, value_type)]
    label_machine, label_thread = s("machine"), s("thread")
    for (machine, thread, stack), us in profile.values.items():
        ids = []
        for frame in reversed(stack):          # pprof lists the leaf first
            file, line, name = frame
            fid = functions.get(frame)
            if fid is None:
                fid = functions[frame] = len(functions) + 1
            ids.append(fid)
        labels = (_bytes(3, _int(1, label_machine) + _int(2, s(machine))) +
                  _bytes(3, _int(1, label_thread) + _int(2, s(thread))))
        body.append(_bytes(2, _packed(1, ids) + _packed(2, [int(us)]) + labels))
    for (file, line, name), fid in functions.items():
        line_msg = _int(1, fid) + _int(2, int(line))
        body.append(_bytes(4, _int(1, fid) + _bytes(4, line_msg)))                 # Location
        body.append(_bytes(5, _int(1, fid) + _int(2, s(name)) + _int(3, s(name)) +  # Function
                           _int(4, s(file)) + _int(5, int(line))))
    durations = [info.get("duration") or 0 for info in profile.machines.values()]
    tail = (_int(9, time.time_ns()) + _int(10, int(max(durations, default=0) * 1e9)) +
            _bytes(11, value_type) + _int(12, int(profile.interval * 1e6)))
    table = b"".join(_bytes(6, t.encode()) for t in strings)
    return gzip.compress(b"".join(body) + table + tail)
