"""Run logs: TensorBoard event files, a JSON-lines log with the same scalars, a progress bar.

Only the `tensorboard` package is used (no TensorFlow, no torch): events are written with its
`EventFileWriter` and protos. On resume, a `SessionLog.START` event at the resumed step tells
TensorBoard to drop the events that the interrupted run wrote after it, and the JSON log is cut
back to that step, so the curves of a resumed run read as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import time
from typing import Mapping

LOG_FILE = "log.jsonl"


class TensorBoardWriter:
    """Scalars and text into `logdir` (one event file per writer)."""

    def __init__(self, logdir: str, purge_step: int | None = None):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        os.makedirs(logdir, exist_ok=True)
        self._writer = EventFileWriter(logdir, flush_secs=30)
        if purge_step is not None:
            self._add(event_pb2.Event(step=purge_step,
                                      session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def _add(self, event) -> None:
        event.wall_time = event.wall_time or time.time()
        self._writer.add_event(event)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                             for k, v in values.items()])
        self._add(event_pb2.Event(step=step, summary=summary))

    def text(self, step: int, tag: str, text: str) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.plugins.text import metadata as text_metadata

        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode("utf-8")],
                                        tensor_shape=tensor_shape_pb2.TensorShapeProto())
        value = summary_pb2.Summary.Value(tag=tag, tensor=tensor,
                                          metadata=text_metadata.create_summary_metadata("", ""))
        self._add(event_pb2.Event(step=step, summary=summary_pb2.Summary(value=[value])))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class JsonLog:
    """One JSON object per line: {"step": s, "time": t, <scalars>}; cut back on resume."""

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            with open(path) as f:
                keep = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            from jaxcompress.io.atomic import write_text

            write_text(path, "".join(keep))

    def write(self, step: int, values: Mapping[str, object]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")


def read_json_log(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_tensorboard(logdir: str) -> dict[str, list[tuple[int, object]]]:
    """{tag: [(step, value)]} read back with TensorBoard's own event accumulator (purges applied).
    Scalars give floats, text summaries strings."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(logdir, size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    out: dict[str, list] = {}
    for tag in acc.Tags().get("scalars", []):
        out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    for tag in acc.Tags().get("tensors", []):
        out[tag] = [(e.step, e.tensor_proto.string_val[0].decode("utf-8")) for e in acc.Tensors(tag)]
    return out
