"""What one pre-flight check found, how it is shown, and what `doctor` exits with."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Literal

Status = Literal["pass", "warn", "fail"]
MARKS: dict[Status, str] = {"pass": "✓", "warn": "!", "fail": "✗"}


@dataclass(frozen=True)
class Finding:
    """One check's outcome: what it looked at, what it found and, unless it passed, the exact fix.

    `repair`, when set, is what `doctor --fix` may do for it: safe to repeat, and
    described by `fix`, which is printed before it runs.
    """

    check: str
    status: Status
    found: str
    fix: str = ""
    repair: Callable[[], Awaitable[None]] | None = field(default=None, compare=False, repr=False)

    def as_json(self) -> dict:
        return {"check": self.check, "status": self.status, "found": self.found, "fix": self.fix,
                "fixable": self.repair is not None}


def passed(check: str, found: str) -> Finding:
    return Finding(check, "pass", found)


def failed(check: str, found: str, fix: str, repair: Callable[[], Awaitable[None]] | None = None) -> Finding:
    return Finding(check, "fail", found, fix, repair)


def warned(check: str, found: str, fix: str, repair: Callable[[], Awaitable[None]] | None = None) -> Finding:
    return Finding(check, "warn", found, fix, repair)


def render(findings: list[Finding]) -> str:
    """One line per check (mark, name, what was found), the fix indented under each that did not pass."""
    width = max((len(f.check) for f in findings), default=0)
    lines = []
    for finding in findings:
        lines.append(f"{MARKS[finding.status]} {finding.check:<{width}}  {finding.found}")
        if finding.status != "pass" and finding.fix:
            lines.extend(f"    {'fix: ' if i == 0 else '     '}{line}" for i, line in enumerate(finding.fix.splitlines()))
    failures = sum(f.status == "fail" for f in findings)
    warnings = sum(f.status == "warn" for f in findings)
    lines.append(f"{len(findings)} checks: {failures} failed, {warnings} warnings")
    return "\n".join(lines)


def render_json(findings: list[Finding]) -> str:
    return json.dumps({"ok": exit_code(findings) == 0, "checks": [f.as_json() for f in findings]}, indent=2)


def exit_code(findings: list[Finding]) -> int:
    """0 when nothing failed (warnings allowed), 1 otherwise; bad input (2) never gets this far."""
    return 1 if any(f.status == "fail" for f in findings) else 0
