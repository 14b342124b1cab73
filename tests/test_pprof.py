"""pprof output, read back with the protobuf library from pprof's own profile.proto schema."""
from __future__ import annotations

import gzip
import threading

import pytest

from bigmp import profiling

pb = pytest.importorskip("google.protobuf", reason="protobuf reads the pprof file back")
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # noqa: E402

F = descriptor_pb2.FieldDescriptorProto
_I64, _U64, _STR, _MSG, _BOOL = F.TYPE_INT64, F.TYPE_UINT64, F.TYPE_STRING, F.TYPE_MESSAGE, F.TYPE_BOOL
_ONE, _MANY = F.LABEL_OPTIONAL, F.LABEL_REPEATED

# github.com/google/pprof/proto/profile.proto, the fields bigmp writes and a few it leaves out
_SCHEMA = {
    "Profile": [("sample_type", 1, _MSG, _MANY, "ValueType"), ("sample", 2, _MSG, _MANY, "Sample"),
                ("mapping", 3, _MSG, _MANY, "Mapping"), ("location", 4, _MSG, _MANY, "Location"),
                ("function", 5, _MSG, _MANY, "Function"), ("string_table", 6, _STR, _MANY, None),
                ("drop_frames", 7, _I64, _ONE, None), ("keep_frames", 8, _I64, _ONE, None),
                ("time_nanos", 9, _I64, _ONE, None), ("duration_nanos", 10, _I64, _ONE, None),
                ("period_type", 11, _MSG, _ONE, "ValueType"), ("period", 12, _I64, _ONE, None),
                ("comment", 13, _I64, _MANY, None), ("default_sample_type", 14, _I64, _ONE, None)],
    "ValueType": [("type", 1, _I64, _ONE, None), ("unit", 2, _I64, _ONE, None)],
    "Sample": [("location_id", 1, _U64, _MANY, None), ("value", 2, _I64, _MANY, None),
               ("label", 3, _MSG, _MANY, "Label")],
    "Label": [("key", 1, _I64, _ONE, None), ("str", 2, _I64, _ONE, None),
              ("num", 3, _I64, _ONE, None), ("num_unit", 4, _I64, _ONE, None)],
    "Mapping": [("id", 1, _U64, _ONE, None), ("memory_start", 2, _U64, _ONE, None)],
    "Location": [("id", 1, _U64, _ONE, None), ("mapping_id", 2, _U64, _ONE, None),
                 ("address", 3, _U64, _ONE, None), ("line", 4, _MSG, _MANY, "Line"),
                 ("is_folded", 5, _BOOL, _ONE, None)],
    "Line": [("function_id", 1, _U64, _ONE, None), ("line", 2, _I64, _ONE, None)],
    "Function": [("id", 1, _U64, _ONE, None), ("name", 2, _I64, _ONE, None),
                 ("system_name", 3, _I64, _ONE, None), ("filename", 4, _I64, _ONE, None),
                 ("start_line", 5, _I64, _ONE, None)],
}


def _profile_class():
    fdp = descriptor_pb2.FileDescriptorProto(name="bigmp_test_profile.proto",
                                             package="perftools.profiles", syntax="proto3")
    for name, fields in _SCHEMA.items():
        msg = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = f".perftools.profiles.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("perftools.profiles.Profile"))


def _spin_in_pprof_test(stop):
    while not stop.is_set():
        sum(range(1000))


def test_pprof_file_reads_back_with_the_same_stacks_and_times(tmp_path):
    stop = threading.Event()
    t = threading.Thread(target=_spin_in_pprof_test, args=(stop,), name="spinner")
    t.start()
    try:
        prof = profiling.Profile("cpu", 0.01)
        prof.add("m-1", profiling.sample(0.3, 0.01, "cpu"))
        prof.add("m-2", profiling.sample(0.2, 0.01, "cpu"))
    finally:
        stop.set()
        t.join(10)
    path = tmp_path / "cluster.pb.gz"
    assert prof.write(str(path)) == "pprof"

    msg = _profile_class()()
    msg.ParseFromString(gzip.decompress(path.read_bytes()))
    st = list(msg.string_table)
    assert st[0] == ""
    assert [(st[v.type], st[v.unit]) for v in msg.sample_type] == [("cpu", "microseconds")]
    assert msg.period == 10000 and msg.duration_nanos > 0 and msg.time_nanos > 0
    functions = {f.id: (st[f.name], st[f.filename], f.start_line) for f in msg.function}
    locations = {loc.id: [ln.function_id for ln in loc.line] for loc in msg.location}
    assert set(locations) == set(functions) and all(len(v) == 1 for v in locations.values())
    assert sum(s.value[0] for s in msg.sample) == prof.total

    # Every sample: the same stack (leaf first in pprof), time and labels as the profile's.
    got = {}
    for s in msg.sample:
        labels = {st[lb.key]: st[lb.str] for lb in s.label}
        stack = tuple((functions[locations[i][0]][1], functions[locations[i][0]][2],
                       functions[locations[i][0]][0]) for i in reversed(s.location_id))
        got[(labels["machine"], labels["thread"], stack)] = s.value[0]
    assert got == {k: v for k, v in prof.values.items()}
    spinning = [f for f in functions.values() if f[0] == "_spin_in_pprof_test"]
    assert spinning and spinning[0][1].endswith("test_pprof.py")
    assert {m for (m, _t, _s) in got} == {"m-1", "m-2"}
