"""Read back what each experiment tracker stored locally, with the tracker's own formats:
TensorBoard's EventAccumulator, MLflow's client on its file store, trackio's SQLite storage, and
wandb's offline run file (a log of length-prefixed blocks holding wandb's own protobuf records).

Each reader returns {metric name: {step: value}}.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_WANDB_BLOCK = 32 * 1024
_WANDB_FILE_HEADER = 7  # ":W&B", a 2-byte magic number, a 1-byte version
_WANDB_RECORD_HEADER = 7  # crc32, 2-byte length, 1-byte chunk type (1 full, 2 first, 3 middle, 4 last)


def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def tensorboard_images(log_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    return events.Tags()["images"]


def mlflow_metrics(store: Path) -> tuple[dict[str, dict[int, float]], dict[str, str], list[str]]:
    """Metrics, parameters and artifact paths of the one run in the file store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    experiment = client.get_experiment_by_name("dpokit")
    (run,) = client.search_runs([experiment.experiment_id])
    metrics = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
               for key in run.data.metrics}
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    return metrics, run.data.params, artifacts


def trackio_metrics(project: str, run: str) -> dict[str, dict[int, float]]:
    from trackio.sqlite_storage import SQLiteStorage

    out: dict[str, dict[int, float]] = {}
    for row in SQLiteStorage.get_logs(project, run):
        for key, value in row.items():
            if key not in ("step", "timestamp") and isinstance(value, (int, float)):
                out.setdefault(key, {})[int(row["step"])] = float(value)
    return out


def _wandb_chunks(data: bytes):
    """The records of a wandb run file, reassembled from their block-aligned chunks."""
    position, pending = _WANDB_FILE_HEADER, b""
    while position + _WANDB_RECORD_HEADER <= len(data):
        left_in_block = _WANDB_BLOCK - position % _WANDB_BLOCK
        if left_in_block < _WANDB_RECORD_HEADER:  # a block's tail too short for a header is padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + _WANDB_RECORD_HEADER])
        position += _WANDB_RECORD_HEADER
        pending += data[position:position + length]
        position += length
        if kind in (1, 4):  # a full record, or the last chunk of one
            yield pending
            pending = b""


def wandb_offline_history(run_dir: Path) -> dict[str, dict[int, float]]:
    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    out: dict[str, dict[int, float]] = {}
    for chunk in _wandb_chunks(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        if record.WhichOneof("record_type") != "history":
            continue
        items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        step = int(items.get("_step", record.history.step.num))
        for key, value in items.items():
            if not key.startswith("_") and isinstance(value, (int, float)):
                out.setdefault(key, {})[step] = float(value)
    return out
