"""Read a Kaniko executor's log (`--log-format=text`): readable lines, and one step per Dockerfile command.

With `--log-format=text` kaniko sets logrus' `TextFormatter{DisableColors: true}`
(pkg/logging/logging.go), so without a TTY every log call is one line of
key=value fields, time first:

    time="2026-11-29T12:00:00Z" level=info msg="Retrieving image manifest python:3.12-slim"

`time` is RFC 3339 to the second, `level` is logrus' lower-case name (`warning`,
not `warn`), and a value is written bare when it is only letters, digits and
`-._/@^+`, otherwise Go-quoted (`%q`). The rest of the pod log is not logrus:
what RUN commands print, kaniko's fatal error, printed with `fmt.Println` before
it exits (`error building image: ...`, cmd/executor/cmd/root.go `exitWithCode`),
and cobra's `Error: ...` plus the usage text when the context or the Dockerfile
cannot be resolved.

Steps follow pkg/executor/build.go: before executing a Dockerfile command kaniko
logs the command as written (`RUN pip install ...`); a command taken from the
layer cache then logs `Found cached layer, extracting to filesystem`, and one
that ran and is cacheable logs `Pushing layer <cache>:<key> to cache now`. A step
lasts until the next command, the end of its stage, or the push of the image.

Kaniko prints the context URL in its error when the download fails; the query of
a presigned URL (its signature) is withheld from every line given back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime

from flows.progress import BuildStep, elapsed

INSTRUCTIONS = (
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
)
CACHED_LAYER = "Found cached layer, extracting to filesystem"
_FIELD = re.compile(r'([\w.-]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?: +|$)')
_GO_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.DOTALL)
_GO_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}

_COMMAND = re.compile(rf"(?i:{'|'.join(INSTRUCTIONS)})\s")
_CACHE_PUSH = re.compile(r"Pushing layer (\S+) to cache now")
_IMAGE_PUSH = re.compile(r"Pushing image to (\S+)")
_STEP_ENDS = re.compile(
    r"Building stage |Storing source image |Saving file |Deleting filesystem|Retrieving image manifest |Skipping push "
)
_FATAL = re.compile(
    r"error (?:building image|pushing image|checking push permissions|resolving relative paths|changing to root dir)\b"
    r"|kaniko should only be run inside of a container"
)
_KANIKO_SAYS = re.compile(
    r"^(?:INFO (?:Retrieving https tar file|Retrieving image manifest |Building stage '|Executing \d+ build triggers)"
    r"|error (?:building|pushing) image: |error checking push permissions"
    r"|Error: error resolving (?:source context|dockerfile path): )",
    re.MULTILINE,
)


@dataclass(frozen=True)
class LogEntry:
    """One logrus text line: `level` as logrus names it, `msg` unquoted, other fields as written."""

    level: str
    msg: str
    time: datetime | None = None
    fields: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        extra = "".join(f" {key}={value}" for key, value in self.fields.items())
        msg = self.msg.rstrip("\n")
        return f"{self.level.upper()} {msg}{extra}".split("\n")


def parse_line(text: str) -> LogEntry | None:
    """The logrus entry of one line, or None when the line is not all key=value fields with a level and a msg."""
    fields, pos = {}, 0
    text = text.rstrip()
    while pos < len(text):
        found = _FIELD.match(text, pos)
        if found is None:
            return None
        fields[found[1]] = found[2]
        pos = found.end()
    if "level" not in fields or "msg" not in fields:
        return None
    level, msg, stamp = (go_unquote(fields.pop(key, "")) for key in ("level", "msg", "time"))
    return LogEntry(level=level, msg=msg, time=_timestamp(stamp), fields=fields)


def go_unquote(value: str) -> str:
    """Undo Go's `%q` (strconv.Quote): like a JSON string, plus \\a \\v \\xHH \\UHHHHHHHH. Bare values come back as they are."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value

    def unescape(found: re.Match) -> str:
        code = found[1]
        if len(code) > 1:
            return chr(int(code[1:], 16))
        return _GO_SIMPLE_ESCAPES.get(code, code)

    return _GO_ESCAPE.sub(unescape, value[1:-1])


@dataclass
class _Step:
    name: str
    started: datetime | None
    completed: datetime | None = None
    cached: bool = False
    error: str | None = None

    def seconds(self) -> float | None:
        return elapsed(self.started, self.completed)


class KanikoLog:
    """Follows one Kaniko build's log; `feed` it line by line (the interface of `ProgressTracker`)."""

    def __init__(self) -> None:
        self._steps: list[_Step] = []
        self._running: _Step | None = None
        self._last_time: datetime | None = None
        self._cache_pushes: set[str] = set()

    def feed(self, line: str) -> list[str]:
        """One raw log line in; the readable lines to log for it out (`INFO Retrieving image manifest ...`).

        Lines that are not logrus lines (RUN output, the fatal error) come back
        unchanged; blank lines are dropped.
        """
        text = line.rstrip("\r\n")
        if not text.strip():
            return []
        entry = parse_line(text)
        if entry is None:
            if _FATAL.match(text):
                self._fail(text)
            return [text]
        self._apply(entry)
        return entry.lines()

    def steps(self) -> list[BuildStep]:
        return [
            BuildStep(name=s.name, seconds=s.seconds(), cached=s.cached, error=s.error,
                      started=s.started, completed=s.completed)
            for s in self._steps
        ]

    def cache_hits(self) -> tuple[int, int]:
        """(commands taken from the layer cache, commands that could have been).

        A cacheable command either comes from the cache or runs and pushes its
        layer to the cache, so the total is hits plus cache pushes; metadata
        commands (ENV, WORKDIR, ...) never count. (0, 0) without `--cache`.
        """
        hits = sum(step.cached for step in self._steps)
        return hits, hits + len(self._cache_pushes)

    def _apply(self, entry: LogEntry) -> None:
        self._last_time = entry.time or self._last_time
        msg = entry.msg
        if entry.level in ("fatal", "panic"):
            self._fail(msg)
        elif entry.level == "info" and _COMMAND.match(msg):
            self._end_step()
            self._running = _Step(name=msg.strip(), started=self._last_time)
            self._steps.append(self._running)
        elif msg.startswith(CACHED_LAYER):
            if self._running:
                self._running.cached = True
        elif found := _CACHE_PUSH.match(msg):
            self._cache_pushes.add(found[1])
        elif found := _IMAGE_PUSH.match(msg):
            if found[1] not in self._cache_pushes:
                self._end_step()
        elif _STEP_ENDS.match(msg):
            self._end_step()

    def _end_step(self) -> None:
        if self._running:
            self._running.completed = self._last_time
            self._running = None

    def _fail(self, error: str) -> None:
        """The fatal error ends the running step; when is unknown, since the command's own output has no timestamps."""
        if self._running:
            self._running.error = error
            self._running = None


def kaniko_plain(log: str) -> str:
    """A whole saved log with every logrus text line rendered as `LEVEL msg` and the msg unquoted, one line per msg line.

    Other lines are kept, so BuildKit's plain output passes through unchanged
    (buildkitd's own logrus lines are rendered the same way).
    """
    reader = KanikoLog()
    return "\n".join(out for line in log.splitlines() for out in reader.feed(line))


def is_kaniko_log(plain: str) -> bool:
    """Whether text `kaniko_plain` returned carries lines only Kaniko writes."""
    return _KANIKO_SAYS.search(plain) is not None


def _timestamp(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:
        return None
