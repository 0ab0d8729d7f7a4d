"""What a run produces, per component and in all: outcome, image, release, and each stage's seconds and span.

The flow (`flows/pipeline.py`) fills these in and the report (`flows/report.py`) reads them; both import this
module, and it imports neither.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

from pydantic import BaseModel

from flows.build import BuiltImage
from flows.config import Builder
from flows.deploy import DeployedRelease

STAGES = ("package", "queue", "upload", "registry-auth", "build", "deploy", "verify")
RUN_STARTED: ContextVar[float] = ContextVar("run_started", default=0.0)


class ComponentResult(BaseModel):
    name: str
    outcome: Literal["deployed", "built", "unchanged", "planned", "failed", "skipped"] = "failed"
    archive_sha256: str | None = None
    context_uploaded: bool | None = None
    image: BuiltImage | None = None
    release: DeployedRelease | None = None
    seconds: dict[str, float] = {}
    spans: dict[str, tuple[float, float]] = {}
    error: str | None = None
    steps: list[dict] = []
    cache_hits: tuple[int, int] | None = None
    builder: Builder | None = None


class PipelineResult(BaseModel):
    commit: str
    ref: str
    components: list[ComponentResult]
    seconds: dict[str, float] = {}

    @property
    def failed(self) -> list[ComponentResult]:
        return [c for c in self.components if c.outcome in ("failed", "skipped")]


class PipelineFailed(RuntimeError):
    pass


def record_span(result: ComponentResult, stage: str, started: float, ended: float) -> None:
    """A stage's duration, and its start and end in seconds since the run started (`time.perf_counter()` values)."""
    result.seconds[stage] = round(ended - started, 3)
    result.spans[stage] = (round(started - RUN_STARTED.get(), 3), round(ended - RUN_STARTED.get(), 3))


@contextmanager
def timed(result: ComponentResult, stage: str):
    """Record a stage's duration, and its start and end in seconds since the run started."""
    started = time.perf_counter()
    try:
        yield
    finally:
        record_span(result, stage, started, time.perf_counter())
