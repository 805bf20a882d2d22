"""Metric writers: `metrics.jsonl`, TensorBoard events and log lines, behind one interface.

The interface is clu's `MetricWriter` (write_scalars / write_images / write_texts /
write_hparams / flush / close). clu's own writers import TensorFlow at import time, which
the GPU/TPU images often lack, so TensorBoard events are written with clu's TF writer when
TensorFlow is importable and with tensorboardX otherwise. Only process 0 writes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from typing import Any, Mapping

import numpy as np


def _scalar(value: Any) -> float:
  return float(np.asarray(value))


class JsonlWriter:
  """One JSON object per line: {"step": s, "time": t, "<name>": value, ...}."""

  def __init__(self, path: str):
    self.path = path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    self._file = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step), "time": round(time.time(), 3)}
    record.update({k: _scalar(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    self._file.write(json.dumps({"step": int(step), **texts}) + "\n")

  def write_images(self, step, images) -> None:
    del step, images  # images go to TensorBoard / PNG files, not JSON

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._file.write(json.dumps({"hparams": {k: str(v) for k, v in hparams.items()}}) + "\n")

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class TensorBoardXWriter:
  """TensorBoard event files without TensorFlow."""

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self._writer = SummaryWriter(logdir, flush_secs=30)

  def write_scalars(self, step, scalars):
    for name, value in scalars.items():
      self._writer.add_scalar(name, _scalar(value), int(step))

  def write_texts(self, step, texts):
    for name, text in texts.items():
      self._writer.add_text(name, text, int(step))

  def write_images(self, step, images):
    for name, image in images.items():  # [H, W, C] or [N, H, W, C]
      image = np.asarray(image)
      if image.ndim == 3:
        self._writer.add_image(name, image, int(step), dataformats="HWC")
      else:
        self._writer.add_images(name, image, int(step), dataformats="NHWC")

  def write_hparams(self, hparams):
    self._writer.add_text("hparams", json.dumps({k: str(v) for k, v in hparams.items()}), 0)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class LoggingWriter:
  """Scalars as one log line per write, so a terminal shows the same numbers."""

  def write_scalars(self, step, scalars):
    parts = ", ".join(f"{k}={_scalar(v):.5g}" for k, v in sorted(scalars.items()))
    logging.info("[%d] %s", step, parts)

  def write_texts(self, step, texts):
    for name, text in texts.items():
      logging.info("[%d] %s: %s", step, name, text)

  def write_images(self, step, images):
    del step, images

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    pass

  def close(self):
    pass


class MultiWriter:
  def __init__(self, writers):
    self.writers = list(writers)

  def __getattr__(self, method):
    def call(*args, **kwargs):
      for writer in self.writers:
        getattr(writer, method)(*args, **kwargs)
    return call


def tensorboard_writer(logdir: str):
  if importlib.util.find_spec("tensorflow") is not None:
    from clu.metric_writers import SummaryWriter  # pylint: disable=import-outside-toplevel
    return SummaryWriter(logdir)
  return TensorBoardXWriter(logdir)


def create(workdir: str, *, active: bool, log_lines: bool = True) -> MultiWriter:
  """Writers for a binary's workdir; a no-op on processes other than the writer."""
  if not active:
    return MultiWriter([])
  writers = [JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
             tensorboard_writer(os.path.join(workdir, "tensorboard"))]
  if log_lines:
    writers.append(LoggingWriter())
  return MultiWriter(writers)


class Progress:
  """Steps/s, images/s and ETA between reports (host time, after blocking on the step)."""

  def __init__(self, total_steps: int, batch_size: int, first_step: int = 0):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self._last_step = first_step
    self._last_time = time.perf_counter()

  def update(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    elapsed = max(now - self._last_time, 1e-9)
    steps_per_sec = (step - self._last_step) / elapsed
    self._last_step, self._last_time = step, now
    eta = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
    return {"perf/steps_per_sec": steps_per_sec,
            "perf/images_per_sec": steps_per_sec * self.batch_size,
            "perf/eta_minutes": eta / 60}


def format_eta(minutes: float) -> str:
  if not np.isfinite(minutes):
    return "?"
  seconds = int(round(minutes * 60))
  hours, seconds = divmod(seconds, 3600)
  mins, seconds = divmod(seconds, 60)
  return f"{hours}h{mins:02d}m" if hours else f"{mins}m{seconds:02d}s"
