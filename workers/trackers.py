"""Experiment trackers (``report_to``): every progress event a training job reports is also logged to
TensorBoard, Weights & Biases or MLflow, under the event's own names (``train/reward``,
``lagrange/lambda``, …) at the event's ``step``, with the job's params.

- ``tensorboard``: event files in the attempt's folder, ``tensorboard/`` (listed among the job's files;
  ``tensorboard --logdir`` reads them);
- ``wandb``: a run named after the job, configured by the worker's own environment (``WANDB_API_KEY``,
  ``WANDB_PROJECT``, ``WANDB_MODE=offline``, …); its local files stay in the attempt's hidden ``.wandb/``;
- ``mlflow``: a run named after the job at the worker's ``MLFLOW_TRACKING_URI`` (and
  ``MLFLOW_EXPERIMENT_NAME``).

A tracker is an observer: one that cannot start (its package not installed, a bad URI, no credentials)
or fails while logging is turned off for the rest of the job, an event says which and why, and the job
goes on. The wrapper sits around ``ctx.report`` in the job's main process (``workers.ranks``), the one
place every job type's events pass through.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable

log = logging.getLogger("beaver.worker")

TRACKERS = ("tensorboard", "wandb", "mlflow")
NOT_LOGGED = ("step", "total_steps")  # the x axis, not a curve
PARAM_TEXT = 500  # characters of one param's value an MLflow param keeps


def flat_params(params: dict, prefix: str = "") -> dict[str, str]:
    """Nested params as dotted names → text (``optim.lr``), as MLflow's params take them."""
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = (value if isinstance(value, str) else json.dumps(value))[:PARAM_TEXT]
    return out


def scalars(event: dict) -> dict[str, float]:
    """The event's numbers, as the job's metrics hold them (booleans and text are not curves)."""
    return {k: float(v) for k, v in event.items()
            if k not in NOT_LOGGED and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoard:
    def __init__(self, output_dir: Path, job_id: str, params: dict):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        self.writer.add_text("params", "```json\n" + json.dumps(params, indent=2) + "\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, output_dir: Path, job_id: str, params: dict):
        import wandb

        folder = output_dir / ".wandb"  # hidden from the job's files: W&B's metadata names hosts and paths
        folder.mkdir(exist_ok=True)
        self.run = wandb.init(name=job_id, config=params, dir=str(folder), reinit="create_new")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, output_dir: Path, job_id: str, params: dict):
        import mlflow

        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=job_id)
        flat = list(flat_params(params).items())
        for start in range(0, len(flat), 100):  # MLflow takes at most 100 params a call
            mlflow.log_params(dict(flat[start:start + 100]))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


CLASSES = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


class Trackers:
    """``report`` for the job: the event goes to the job first, then to each tracker still on."""

    def __init__(self, names, output_dir: Path, job_id: str, params: dict, report: Callable[[dict], None]):
        self.inner, self.on, self.step = report, {}, 0
        self.seen: set[str] = set()  # metric names the events carried
        for name in names:
            try:
                self.on[name] = CLASSES[name](Path(output_dir), job_id, params)
            except Exception as e:  # noqa: BLE001 — an ImportError, a bad URI, no credentials: all alike
                self._off(name, "could not start", e)

    def _off(self, name: str, when: str, e: Exception) -> None:
        self.on.pop(name, None)
        why = f"{type(e).__name__}: {str(e).strip()}"[:300] if not isinstance(e, ImportError) \
            else f"its package is not installed on this worker ({str(e)[:200]}; pip install 'beaver[trackers]')"
        log.warning("report_to %s %s: %s", name, when, why)
        self.inner({"message": f"report_to: {name} {when} ({why}); the job goes on without it", "tracker": name})

    def report(self, event: dict) -> None:
        self.inner(event)
        if isinstance(event.get("step"), int):
            self.step = event["step"]
        metrics = scalars(event)
        self.seen.update(metrics)
        self.log(metrics)

    def log(self, metrics: dict[str, float]) -> None:
        if not metrics:
            return
        for name, tracker in list(self.on.items()):
            try:
                tracker.log(metrics, self.step)
            except Exception as e:  # noqa: BLE001
                self._off(name, "failed while logging", e)

    def final(self, metrics: dict) -> None:
        """The job's final metrics that no event carried (an evaluation's), at its last step: the others
        are logged already, at their own steps."""
        self.log({k: v for k, v in scalars(metrics).items() if k not in self.seen})

    def close(self) -> None:
        for name, tracker in list(self.on.items()):
            try:
                tracker.close()
            except Exception as e:  # noqa: BLE001
                self._off(name, "failed while closing", e)
