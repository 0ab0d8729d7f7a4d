"""What a finished run reports: per-stage timing rows, the CLI table, the critical path and a timeline.

Pure functions of a `PipelineResult` (flows/results.py); nothing here talks to Prefect or the network,
so `flows/pipeline.py` can turn their output into artifacts and log lines.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from flows.results import STAGES, ComponentResult, PipelineResult

BAR_WIDTH = 50
# Spans are rounded to milliseconds, so "ended before it started" needs a little slack.
SLACK = 0.002


class Segment(NamedTuple):
    """One stage of one component on the critical path, in seconds since the run started."""

    component: str
    stage: str
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def _stage_order(stages: Sequence[str] | None) -> tuple[str, ...]:
    return tuple(stages) if stages is not None else STAGES


def _ordered(names: Iterable[str], stages: Sequence[str]) -> list[str]:
    """Stage names in pipeline order; a stage the order does not know goes last, by name."""
    return sorted(names, key=lambda s: (stages.index(s), "") if s in stages else (len(stages), s))


# --- table artifact -----------------------------------------------------------------------------


def timing_rows(result: PipelineResult, *, stages: Sequence[str] | None = None) -> list[dict]:
    """One row per component and stage that ran, for a Prefect table artifact.

    Every row has the same keys (a table artifact wants uniform columns); the
    cache hits and digest belong on the build row, the revision on the deploy row.
    """
    order = _stage_order(stages)
    return [_row(component, stage) for component in result.components
            for stage in _ordered(component.seconds, order)]


def _row(component: ComponentResult, stage: str) -> dict:
    started, ended = component.spans.get(stage, ("", ""))
    build, deploy = stage == "build", stage == "deploy"
    return {
        "component": component.name,
        "stage": stage,
        "seconds": component.seconds[stage],
        "started_s": started,
        "ended_s": ended,
        "outcome": component.outcome,
        "cache_hits": _cache_hits(component) if build else "",
        "digest": component.image.digest if build and component.image else "",
        "revision": component.release.revision if deploy and component.release else "",
    }


def _cache_hits(component: ComponentResult) -> str:
    if component.cache_hits is None:
        return ""
    cached, total = component.cache_hits
    return f"{cached}/{total}"


# --- CLI table ----------------------------------------------------------------------------------


def format_timing(result: PipelineResult, *, stages: Sequence[str] | None = None) -> str:
    """The plain-text table printed at the end of a CLI run.

    One line per component, one right-aligned column of seconds per stage ("-"
    for a stage that did not run), the outcome, and the run's wall time last.
    """
    order = _stage_order(stages)
    header = ["component", *order, "outcome"]
    lines = [header] + [
        [c.name, *(f"{c.seconds[s]:.2f}" if s in c.seconds else "-" for s in order), c.outcome]
        for c in result.components
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = [False, *(True for _ in order), False]
    text = [
        "  ".join(cell.rjust(w) if right else cell.ljust(w) for cell, w, right in zip(line, widths, numeric)).rstrip()
        for line in lines
    ]
    if "total" in result.seconds:
        text.append(f"wall time {result.seconds['total']:.2f}s")
    return "\n".join(text)


# --- critical path ------------------------------------------------------------------------------


def critical_path(
    result: PipelineResult, after: dict[str, list[str]], *, stages: Sequence[str] | None = None
) -> list[tuple[str, str, float, float]]:
    """The chain of stages that determined the run's wall time, earliest first.

    Starts at the stage that ended last and walks back to whatever that stage
    was waiting for: the component's own previous stage; for a deploy, also the
    last stage of each component in `after` (the deploy waits until they are
    finished); for a component's first stage after packaging, also every
    package stage (packaging all components is a barrier before anything remote).
    Of those, the one that ended last is what it waited for. A candidate from
    another component only counts if it ended before this stage started.
    Gaps between segments are time spent waiting for something else (an event
    loop turn, reading secrets): they are the differences between end and start.

    Each element is a `Segment(component, stage, start, end)`, a plain tuple.
    """
    order = _stage_order(stages)
    segments = _segments(result, order)
    if not segments:
        return []
    current = max(segments.values(), key=lambda s: (s.end, s.start))
    path, seen = [current], {(current.component, current.stage)}
    while (previous := _waited_for(current, segments, after, order)) is not None:
        if (previous.component, previous.stage) in seen:  # cannot happen with consistent spans
            break
        seen.add((previous.component, previous.stage))
        path.append(previous)
        current = previous
    return path[::-1]


def _segments(result: PipelineResult, order: Sequence[str]) -> dict[tuple[str, str], Segment]:
    return {
        (c.name, stage): Segment(c.name, stage, *c.spans[stage])
        for c in result.components for stage in _ordered(c.spans, order)
    }


def _waited_for(
    segment: Segment, segments: dict[tuple[str, str], Segment], after: dict[str, list[str]], order: Sequence[str]
) -> Segment | None:
    own = _own_previous(segment, segments, order)
    others = [s for s in _other_waits(segment, own, segments, after, order) if s.end <= segment.start + SLACK]
    candidates = ([own] if own else []) + others
    if not candidates:
        return None
    # max() keeps the first of equals: on a tie, the component's own previous stage wins.
    return max(candidates, key=lambda s: s.end)


def _own_previous(segment: Segment, segments: dict[tuple[str, str], Segment], order: Sequence[str]) -> Segment | None:
    """Of the component's earlier stages that had ended when this one started, the last to end.

    Stages may overlap (the upload runs while the build waits for a slot), so
    the one in the order just before is not always the one waited for.
    """
    ran = _ordered([s.stage for s in segments.values() if s.component == segment.component], order)
    earlier = [segments[(segment.component, stage)] for stage in ran[:ran.index(segment.stage)]]
    ended = [s for s in earlier if s.end <= segment.start + SLACK] or earlier[-1:]
    return max(ended, key=lambda s: s.end, default=None)


def _other_waits(
    segment: Segment, own: Segment | None, segments: dict[tuple[str, str], Segment],
    after: dict[str, list[str]], order: Sequence[str],
) -> list[Segment]:
    """Stages of other components that `segment` may have been waiting for."""
    if segment.stage == "deploy":
        return [last for name in after.get(segment.component, []) if (last := _last_stage(name, segments))]
    first_stage = order[0] if order else None
    if own is not None and own.stage == first_stage:
        return [s for s in segments.values() if s.stage == first_stage and s.component != segment.component]
    return []


def _last_stage(component: str, segments: dict[tuple[str, str], Segment]) -> Segment | None:
    return max((s for s in segments.values() if s.component == component), key=lambda s: s.end, default=None)


# --- markdown timeline --------------------------------------------------------------------------


def timeline_markdown(
    result: PipelineResult,
    after: dict[str, list[str]],
    previous_rows: list[dict] | None,
    *,
    stages: Sequence[str] | None = None,
) -> str:
    """Markdown for a Prefect markdown artifact: the critical path as a bar chart, then the change per stage."""
    order = _stage_order(stages)
    path = [Segment(*s) for s in critical_path(result, after, stages=order)]
    wall = _wall_time(result, path)
    parts = [
        f"# build-and-deploy {result.commit[:12]} ({result.ref}): {wall:.2f}s",
        "## Critical path",
        _path_chart(path, wall),
        "## Change against the previous run",
        _comparison(timing_rows(result, stages=order), previous_rows or [], order),
    ]
    return "\n\n".join(parts) + "\n"


def _wall_time(result: PipelineResult, path: list[Segment]) -> float:
    measured = result.seconds.get("total")
    return measured if measured else max((s.end for s in path), default=0.0)


def _path_chart(path: list[Segment], wall: float) -> str:
    if not path:
        return "no stage ran"
    width = max(len(s.component) for s in path)
    lines = [_bar_line(s, width, wall) for s in path]
    working = sum(s.seconds for s in path)
    waiting = max(0.0, path[-1].end - path[0].start - working)
    summary = f"{len(path)} stages on the critical path: {working:.2f}s working, {waiting:.2f}s between stages"
    return "```\n" + "\n".join(lines) + "\n```\n\n" + summary


def _bar_line(segment: Segment, width: int, wall: float) -> str:
    offset, length = _bar(segment, wall)
    return (f"{segment.component:<{width}} {segment.stage:<13} "
            f"|{' ' * offset}{'█' * length}| {segment.seconds:6.2f}s")


def _bar(segment: Segment, wall: float) -> tuple[int, int]:
    """Columns of blank before and of block in a segment's bar, at BAR_WIDTH columns for the wall time.

    Every segment gets at least one block so that none disappears from the chart.
    """
    scale = BAR_WIDTH / wall if wall > 0 else 0.0
    offset = min(BAR_WIDTH - 1, max(0, round(segment.start * scale)))
    length = max(1, round(segment.seconds * scale))
    return offset, min(length, BAR_WIDTH - offset)


def _comparison(rows: list[dict], previous_rows: list[dict], order: Sequence[str]) -> str:
    """A component × stage table of this run's seconds, the previous run's and the difference.

    A component or stage only one of the runs has shows "-" on the other side and no change.
    """
    if not previous_rows:
        return "no previous run"
    now = {(r["component"], r["stage"]): r["seconds"] for r in rows}
    before = {(r["component"], r["stage"]): _seconds(r.get("seconds")) for r in previous_rows
              if "component" in r and "stage" in r}
    lines = ["| component | stage | this run | previous | change |", "| --- | --- | ---: | ---: | ---: |"]
    for key in _union_keys(list(now), list(before), order):
        current, previous = now.get(key), before.get(key)
        change = f"{current - previous:+.2f}s" if current is not None and previous is not None else ""
        lines.append(f"| {key[0]} | {key[1]} | {_cell(current)} | {_cell(previous)} | {change} |")
    return "\n".join(lines)


def _union_keys(now: list[tuple[str, str]], before: list[tuple[str, str]], order: Sequence[str]) -> list[tuple[str, str]]:
    """This run's (component, stage) pairs in their order, then the previous run's extra ones, stages in order."""
    components = list(dict.fromkeys([c for c, _ in now] + [c for c, _ in before]))
    keys = set(now) | set(before)
    return [(c, s) for c in components for s in _ordered({s for k, s in keys if k == c}, order)]


def _seconds(value: object) -> float | None:
    """Seconds from a JSON-decoded row: a number, a numeric string, or nothing usable."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _cell(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}s"
