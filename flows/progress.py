"""Read `buildctl build --progress=rawjson` output and turn it into plain progress lines and per-step timings.

With `--progress=rawjson` buildctl writes every `client.SolveStatus` it receives
as one JSON object per line (`util/progress/progressui/display.go`,
`rawJSONDisplay.update` is `json.NewEncoder(w).Encode(ss)`). The field names
come from the struct tags in moby/buildkit `client/graph.go`:

    SolveStatus   {vertexes, statuses, logs, warnings}
    Vertex        {digest, inputs, name, started, completed, cached, error, progressGroup}
    VertexStatus  {id, vertex, name, total, current, timestamp, started, completed}
    VertexLog     {vertex, stream, data, timestamp}         data: []byte, so base64
    VertexWarning {vertex, level, short, detail, url, ...}  short/detail: base64

Timestamps are Go RFC 3339 with nanoseconds. A vertex is sent again each time
it changes (started, then completed, possibly re-sent unchanged), and a later
message may repeat it without `started`; like buildkit's own printer
(`progressui/printer.go`), a vertex is numbered when first seen and printed
when it starts and when it completes.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import BaseModel

STATUS_KEYS = frozenset({"vertexes", "statuses", "logs", "warnings"})
CANCELED_SUFFIX = "context canceled"


class BuildStep(BaseModel):
    name: str
    seconds: float | None
    cached: bool
    error: str | None
    started: datetime | None
    completed: datetime | None


def elapsed(started: datetime | None, completed: datetime | None) -> float | None:
    """A step's seconds, when both ends are known (never negative: clocks in logs can disagree)."""
    if started is None or completed is None:
        return None
    return max((completed - started).total_seconds(), 0.0)


@dataclass
class _Vertex:
    index: int
    name: str = ""
    started: datetime | None = None
    completed: datetime | None = None
    cached: bool = False
    error: str | None = None
    announced: bool = False
    finished: bool = False
    partial: str = ""
    statuses_done: set[str] = field(default_factory=set)

    def seconds(self) -> float | None:
        return elapsed(self.started, self.completed)


class ProgressTracker:
    """Follows one build's rawjson stream; `feed` it line by line."""

    def __init__(self) -> None:
        self._vertexes: dict[str, _Vertex] = {}

    def feed(self, line: str) -> list[str]:
        """One raw output line in; the human-readable lines to log for it out.

        Lines that are not a SolveStatus (buildkitd's own messages, the shell
        script's, a truncated JSON line) come back unchanged; blank lines are dropped.
        """
        text = line.rstrip("\r\n")
        if not text.strip():
            return []
        status = _parse_status(text)
        if status is None:
            return [text]
        try:
            return self._apply(status)
        except (TypeError, ValueError, AttributeError):
            return [text]

    def steps(self) -> list[BuildStep]:
        return [
            BuildStep(name=v.name or digest, seconds=v.seconds(), cached=v.cached, error=v.error,
                      started=v.started, completed=v.completed)
            for digest, v in self._vertexes.items()
        ]

    def cache_hits(self) -> tuple[int, int]:
        steps = self.steps()
        return sum(step.cached for step in steps), len(steps)

    def _apply(self, status: dict) -> list[str]:
        out: list[str] = []
        for raw in _dicts(status.get("vertexes")):
            out += self._on_vertex(raw)
        for raw in _dicts(status.get("statuses")):
            out += self._on_status(raw)
        for raw in _dicts(status.get("logs")):
            out += self._on_log(raw)
        for raw in _dicts(status.get("warnings")):
            out += self._on_warning(raw)
        return out

    def _on_vertex(self, raw: dict) -> list[str]:
        digest = raw.get("digest")
        if not isinstance(digest, str) or not digest:
            return []
        v = self._vertexes.get(digest)
        if v is None:
            v = self._vertexes[digest] = _Vertex(index=len(self._vertexes) + 1)
        if isinstance(raw.get("name"), str) and raw["name"]:
            v.name = raw["name"]
        v.started = _timestamp(raw.get("started")) or v.started
        v.completed = _timestamp(raw.get("completed")) or v.completed
        v.cached = v.cached or raw.get("cached") is True
        if isinstance(raw.get("error"), str) and raw["error"]:
            v.error = raw["error"]

        out = []
        if not v.announced and (v.started or v.completed):
            v.announced = True
            out.append(f"#{v.index} {v.name or digest}")
        if not v.finished and v.completed:
            v.finished = True
            out += self._flush_partial(v)
            out.append(f"#{v.index} {_outcome(v)}")
        return out

    def _on_status(self, raw: dict) -> list[str]:
        """Only finished transfers are printed; buildkit's printer also rate-limits the rest."""
        v = self._vertexes.get(raw.get("vertex"))
        ident = raw.get("id")
        completed = _timestamp(raw.get("completed"))
        if v is None or not isinstance(ident, str) or completed is None or ident in v.statuses_done:
            return []
        v.statuses_done.add(ident)
        size = _size_text(raw.get("current"), raw.get("total"))
        started = _timestamp(raw.get("started"))
        took = f" {(completed - started).total_seconds():.1f}s" if started else ""
        return [f"#{v.index} {ident}{size}{took} done"]

    def _on_log(self, raw: dict) -> list[str]:
        v = self._vertexes.get(raw.get("vertex"))
        data = _decode(raw.get("data"))
        if v is None or data is None:
            return []
        *complete, v.partial = (v.partial + data).split("\n")
        prefix = _log_prefix(v, _timestamp(raw.get("timestamp")))
        return [prefix + _last_redraw(text) for text in complete]

    def _on_warning(self, raw: dict) -> list[str]:
        short = _decode(raw.get("short"))
        if not short:
            return []
        v = self._vertexes.get(raw.get("vertex"))
        where = f"#{v.index} " if v else ""
        return [f"{where}WARN: {short.strip()}"]

    def _flush_partial(self, v: _Vertex) -> list[str]:
        if not v.partial:
            return []
        rest, v.partial = v.partial, ""
        return [f"#{v.index} {_last_redraw(rest)}"]


def to_plain(log: str) -> str:
    """A whole saved log, rawjson or already plain, as buildctl's plain progress would show it."""
    tracker = ProgressTracker()
    return "\n".join(out for line in log.splitlines() for out in tracker.feed(line))


def step_table(steps: list[BuildStep]) -> list[dict]:
    """Rows for a Prefect table artifact."""
    return [
        {
            "step": step.name,
            "seconds": round(step.seconds, 2) if step.seconds is not None else None,
            "cached": step.cached,
            "error": step.error or "",
        }
        for step in steps
    ]


def _parse_status(text: str) -> dict | None:
    if not text.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, dict) and set(value) <= STATUS_KEYS:
        return value
    return None


def _dicts(value) -> list[dict]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _timestamp(value) -> datetime | None:
    """Go's RFC 3339 with nanoseconds; fromisoformat keeps microseconds. Go's zero time means unset."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return None if parsed.year <= 1 else parsed


def _decode(value) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True).decode("utf-8", errors="replace")
    except (binascii.Error, ValueError):
        return None


def _outcome(v: _Vertex) -> str:
    if v.error:
        return "CANCELED" if v.error.endswith(CANCELED_SUFFIX) else f"ERROR: {v.error}"
    if v.cached:
        return "CACHED"
    seconds = v.seconds()
    return "DONE" if seconds is None else f"DONE {seconds:.1f}s"


def _log_prefix(v: _Vertex, at: datetime | None) -> str:
    """`#N 1.234 ` like buildctl's plain output: seconds since the step started."""
    if v.started and at:
        return f"#{v.index} {max((at - v.started).total_seconds(), 0.0):.3f} "
    return f"#{v.index} "


def _last_redraw(text: str) -> str:
    """Progress bars redraw a line with carriage returns; keep what was shown last."""
    parts = [part for part in text.split("\r") if part]
    return parts[-1] if parts else ""


def _size_text(current, total) -> str:
    if isinstance(total, int) and total > 0:
        return f" {_bytes(current if isinstance(current, int) else 0)} / {_bytes(total)}"
    if isinstance(current, int) and current > 0:
        return f" {_bytes(current)}"
    return ""


def _bytes(n: float) -> str:
    units = ("B", "kB", "MB", "GB")
    step = 0
    while n >= 1000 and step < len(units) - 1:
        n /= 1000
        step += 1
    return f"{n:.0f}{units[step]}" if step == 0 else f"{n:.2f}{units[step]}"
