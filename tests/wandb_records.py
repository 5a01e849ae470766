"""Read what an offline wandb run logged, from its run-*.wandb file.

The file is a record log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of
records, each with a 7-byte header (crc32, little-endian length, type: 1 full, 2 first,
3 middle, 4 last) and a serialized wandb Record protobuf."""
import json
import struct
import time

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7


def records(path):
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a wandb run file"
    pos, chunks = HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunks.append(data[pos + HEADER:pos + HEADER + length])
        pos += HEADER + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def finished(path, timeout=120):
    """The run's records once W&B has written its own end-of-run record ("exit"): wandb writes
    the file from a service process of its own, which may still be writing when the run's
    finish() returns. The timeout only bounds a run that never ends."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = list(records(path))
        except Exception:  # a record still being written: read again
            found = []
        if any(r.WhichOneof("record_type") == "exit" for r in found):
            return found
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout} s: the W&B run never finished"
        time.sleep(0.2)


def logged(path):
    """(run record, [{key: value} per history row, values decoded from JSON]), from the finished run."""
    run, rows = None, []
    for record in finished(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return run, rows
