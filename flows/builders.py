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
from flows.progress import ProgressTracker

JOB_MANIFESTS = {"buildkit": build_job_manifest, "kaniko": kaniko_job_manifest}


def job_manifest(request: BuildRequest) -> dict:
    return JOB_MANIFESTS[request.builder](request)


def log_reader(builder: Builder) -> ProgressTracker | KanikoLog:
    """Turns the build container's raw log lines into readable ones and a table of steps."""
    return KanikoLog() if builder == "kaniko" else ProgressTracker()
