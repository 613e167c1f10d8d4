"""Test helpers for the signal/report tests: a logger that records what it receives, and an offline W&B run reader."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from lightning.pytorch.loggers import Logger


class RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict]] = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        self.rows.append((None, {"hparams": params}))

    def values(self, key):
        return {step: row[key] for step, row in self.rows if key in row}


def _wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunks, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        else:
            chunks.append(pending + chunk)
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def read_wandb_history(run_dir: Path, timeout: float = 30.0) -> list[dict]:
    """History rows of a finished offline run, decoded from its ``run-*.wandb`` file.

    wandb 0.31 writes the offline run as a LevelDB-style log (a 7-byte file header ``:W&B`` + magic + version, then
    32 KiB blocks of records, each with a 7-byte header: crc32 ``<I``, length ``<H``, type ``B`` with 1 = full,
    2/3/4 = first/middle/last fragment) of ``wandb_internal_pb2.Record`` protobufs, and no longer ships a Python
    reader (nor a ``wandb-summary.json`` offline). The records are parsed with wandb's own protobuf classes.
    ``run.finish()`` can return before wandb-core has written the last records, so this waits for the run's
    ``exit`` record (up to ``timeout`` seconds).
    """
    (path,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = _wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    rows = [
        {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert rows, f"no history records in {path}"
    return rows
