"""The two builders behind one small interface: the Job that builds, and the reader of its log.

BuildKit (`flows/build.py`) is the default; Kaniko (`flows/kaniko.py`) runs
unprivileged where a cluster refuses privileged pods. Everything else (the
Secrets, the watch, the digest from the termination message, the diagnosis
table) is the same for both.
"""

from __future__ import annotations

from flows.build import BuildRequest, build_job_manifest
from flows.config import Builder
from flows.kaniko import kaniko_job_manifest
from flows.kaniko_log import KanikoLog
from flows.progress import BuildStep, ProgressTracker
from flows.secrecy import withhold_presigned_query

JOB_MANIFESTS = {"buildkit": build_job_manifest, "kaniko": kaniko_job_manifest}


def job_manifest(request: BuildRequest) -> dict:
    return JOB_MANIFESTS[request.builder](request)


class WithheldLog:
    """A builder's log reader whose lines and steps never carry a presigned URL's query.

    Both builders print the context URL when its download fails on the way (Go's
    `Get "<url>": <error>`, net/url Error.Error, which BuildKit's http source and
    Kaniko's HTTPSTar pass on); the lines go to the run log, the steps to an artifact.
    """

    def __init__(self, reader: ProgressTracker | KanikoLog) -> None:
        self._reader = reader

    def feed(self, line: str) -> list[str]:
        return [withhold_presigned_query(out) for out in self._reader.feed(line)]

    def steps(self) -> list[BuildStep]:
        return [step.model_copy(update={"name": withhold_presigned_query(step.name),
                                        "error": step.error and withhold_presigned_query(step.error)})
                for step in self._reader.steps()]

    def cache_hits(self) -> tuple[int, int]:
        return self._reader.cache_hits()


def log_reader(builder: Builder) -> WithheldLog:
    """Turns the build container's raw log lines into readable ones and a table of steps."""
    return WithheldLog(KanikoLog() if builder == "kaniko" else ProgressTracker())
