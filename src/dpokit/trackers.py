"""Experiment trackers (`--report-to`): TensorBoard, Weights & Biases, trackio, MLflow.

Each tracker receives the values `metrics.jsonl` holds, at the same steps, under transformers'
names (`train/loss`, `train/rewards/accuracies`, ..., `eval/loss`), the resolved config as
hyperparameters, and the run's pictures. Each one is optional (`pip install 'dpokit[mlflow]'`);
a missing library is refused before training starts. A tracker that fails during the run (disk
full, server gone) warns once and is switched off: training and `metrics.jsonl` never depend on it.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from dpokit.errors import DpokitError, first_line
from dpokit.io import Log

# tracker -> (the module it needs, the pip extra that brings it); the names are config's TRACKERS
_LIBRARIES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
    "mlflow": ("mlflow", "mlflow"),
}


def chosen_trackers(report_to: Sequence[str]) -> tuple[str, ...]:
    """--report-to's trackers (`none` means no tracker); the values were checked with the config."""
    return tuple(name for name in report_to if name != "none")


def require_trackers(names: Iterable[str], option: str = "--report-to") -> None:
    """Refuse, before training, a tracker whose library is not installed."""
    for name in chosen_trackers(names):
        module, extra = _LIBRARIES[name]
        if importlib.util.find_spec(module) is None:
            raise DpokitError(f"{option} {name} needs the {module} package: pip install 'dpokit[{extra}]'")


def tracker_key(name: str) -> str:
    """A metrics.jsonl key under transformers' naming: eval_x -> eval/x, anything else -> train/x."""
    return f"eval/{name.removeprefix('eval_')}" if name.startswith("eval_") else f"train/{name}"


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """`{section: {name: value}}` -> `{section.name: value}`, lists joined, for hyperparameter tables."""
    flat = {}
    for section, values in config.items():
        for name, value in (values or {}).items():
            flat[f"{section}.{name}"] = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return flat


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        rows = "\n".join(f"| {k} | {v} |" for k, v in flat_config(config).items())
        self.writer.add_text("config", "| option | value |\n| --- | --- |\n" + rows, 0)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_image(self, tag: str, path: Path, step: int) -> None:
        import matplotlib.image

        self.writer.add_image(tag, matplotlib.image.imread(str(path))[..., :3], step, dataformats="HWC")
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


class _Wandb:
    name = "wandb"

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any]):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dpokit"), name=run_name, dir=str(run_dir),
                              config=flat_config(config), reinit="create_new")

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_image(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def finish(self) -> None:
        self.run.finish()


class _Trackio:
    name = "trackio"

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any]):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "dpokit"), name=run_name,
                                config=flat_config(config), resume="never")

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_image(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.trackio.Image(str(path))}, step=step)

    def finish(self) -> None:
        self.run.finish()


class _MLflow:
    """Through MLflow's client (no process-wide active run): MLFLOW_TRACKING_URI when set, else a
    file store in the run folder (`mlruns/`)."""

    name = "mlflow"

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any]):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow 3 keeps its file store only on request; it is what works with no server
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "dpokit")
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        for key, value in flat_config(config).items():
            self.client.log_param(self.run_id, key, str(value)[:6000])

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, step) for k, v in values.items()])

    def log_image(self, tag: str, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path="images")

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "trackio": _Trackio, "mlflow": _MLflow}


class Trackers:
    """The run's trackers as one: every call goes to each, and a failing one is dropped with a warning."""

    def __init__(self, backends: list[Any], log: Log):
        self.backends, self.log = backends, log
        self.last_step = 0  # pictures go at the last step logged

    def _each(self, call: Callable[[Any], None]) -> None:
        for backend in list(self.backends):
            try:
                call(backend)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops training
                self.backends.remove(backend)
                self.log(f"warning: --report-to {backend.name} failed ({type(exc).__name__}: {first_line(exc)}); "
                         "it is off for the rest of this run, metrics.jsonl keeps every figure")

    def log_record(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record: its numbers, renamed, at its step."""
        step = self.last_step = int(record["step"])
        values = {tracker_key(k): float(v) for k, v in record.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self._each(lambda b: b.log_metrics(values, step))

    def log_images(self, images: dict[str, Path], step: int | None = None) -> None:
        step = self.last_step if step is None else step
        for tag, path in images.items():
            if Path(path).is_file():
                self._each(lambda b, tag=tag, path=path: b.log_image(tag, Path(path), step))

    def finish(self) -> None:
        self._each(lambda b: b.finish())
        self.backends = []


def open_trackers(names: Sequence[str], *, run_dir: str | Path, run_name: str, config: dict[str, Any],
                  log: Log = print) -> Trackers:
    """Start each named tracker; one that cannot start warns and is left out (as one failing later)."""
    started = []
    for name in chosen_trackers(names):
        try:
            started.append(_BACKENDS[name](Path(run_dir), run_name, config))
        except Exception as exc:  # noqa: BLE001 - a tracker never stops training
            log(f"warning: --report-to {name} could not start ({type(exc).__name__}: {first_line(exc)}); "
                "training goes on without it, metrics.jsonl keeps every figure")
    return Trackers(started, log)
