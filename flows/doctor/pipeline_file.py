"""Pre-flight checks: pipeline_file (filled in by its own change)."""

from __future__ import annotations

from flows.doctor import Subject
from flows.doctor.findings import Finding


async def checks(subject: Subject) -> list[Finding]:
    return []
