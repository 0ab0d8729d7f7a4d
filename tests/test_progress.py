"""ProgressTracker on buildctl --progress=rawjson streams (fixtures in tests/fixtures/buildkit/)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from flows.progress import ProgressTracker, step_table, to_plain

FIXTURES = Path(__file__).parent / "fixtures" / "buildkit"
RUN = "sha256:" + "a" * 64


def feed_all(tracker: ProgressTracker, lines) -> list[str]:
    return [out for line in lines for out in tracker.feed(line)]


def status(**fields) -> str:
    return json.dumps(fields)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def failed_run():
    tracker = ProgressTracker()
    lines = (FIXTURES / "rawjson_failed_run.jsonl").read_text().splitlines()
    return tracker, feed_all(tracker, lines)


def test_vertexes_print_like_buildctl_plain(failed_run):
    _, out = failed_run
    assert "#1 [internal] load remote build context" in out
    assert "#1 DONE 0.4s" in out
    assert out.index("#4 [auth] library/python:pull token for registry-1.docker.io") < out.index("#3 DONE 1.2s")
    assert out.count("#8 [4/5] RUN pip install --no-cache-dir -r requirements.txt") == 1
    assert "#8 CACHED" in out
    assert "#10 [5/5] RUN python -m pytest -q" in out
    assert out[-2] == '#10 ERROR: process "/bin/sh -c python -m pytest -q" did not complete successfully: exit code: 1'


def test_log_data_is_decoded_and_prefixed_with_the_step_and_its_elapsed_time(failed_run):
    _, out = failed_run
    logs = [line for line in out if line.startswith("#10 ") and line[4:5].isdigit()]
    assert logs[0] == "#10 0.620 " + "=" * 29 + " test session starts " + "=" * 30
    assert "#10 2.450 tests/test_app.py ......F.....                                     [100%]" in logs
    assert logs[-1] == "#10 2.500 1 failed, 11 passed in 1.02s"


def test_non_json_lines_come_back_unchanged(failed_run):
    _, out = failed_run
    assert out[0].startswith("# Synthetic buildctl --progress=rawjson stream")
    assert 'time="2025-03-14T09:26:53Z" level=warning msg="failed to lookup cache for remote context" error="not found"' in out
    assert '{"vertexes":[{"digest":"sha256:trunc' in out
    assert "null" in out
    assert out[-1].startswith('error: failed to solve: process "/bin/sh -c python -m pytest -q"')


def test_steps_are_in_first_seen_order_with_their_final_state(failed_run):
    tracker, _ = failed_run
    steps = tracker.steps()
    assert [s.name for s in steps][:3] == [
        "[internal] load remote build context", "copy /context /",
        "[internal] load metadata for docker.io/library/python:3.12-slim",
    ]
    assert len(steps) == 10
    assert [s.cached for s in steps] == [False] * 4 + [True] * 4 + [False] * 2
    failed = steps[-1]
    assert failed.name == "[5/5] RUN python -m pytest -q"
    assert failed.error.endswith("exit code: 1")
    assert failed.seconds == pytest.approx(2.62, abs=0.01)
    assert failed.started.isoformat() == "2025-03-14T09:26:55.400000+00:00"
    assert steps[0].error is None


def test_cache_hits_count_cached_steps_over_all_steps(failed_run):
    tracker, _ = failed_run
    assert tracker.cache_hits() == (4, 10)


def test_step_table_rows():
    tracker = ProgressTracker()
    feed_all(tracker, (FIXTURES / "rawjson_success.jsonl").read_text().splitlines())
    assert step_table(tracker.steps()) == [
        {"step": "[1/5] FROM docker.io/library/python:3.12-slim@sha256:"
                 "2b0079146a74e23bb4ae8f6d2d1a4b20e9a1a8d4f5d13d8bc1b3b5f2a0b2f9e1",
         "seconds": 0.0, "cached": True, "error": ""},
        {"step": "[2/5] WORKDIR /app", "seconds": 0.0, "cached": True, "error": ""},
        {"step": "[4/5] RUN pip install --no-cache-dir -r requirements.txt", "seconds": 5.2, "cached": False,
         "error": ""},
        {"step": "exporting to image", "seconds": 4.1, "cached": False, "error": ""},
    ]
    assert tracker.cache_hits() == (2, 4)


def test_finished_transfers_are_printed_once():
    plain = to_plain((FIXTURES / "rawjson_success.jsonl").read_text()).splitlines()
    assert "#4 exporting layers 1.2s done" in plain
    assert "#4 pushing layers 2.3s done" in plain
    assert plain.count("#4 pushing layers 2.3s done") == 1
    assert plain[-1] == "#4 DONE 4.1s"


def test_a_vertex_resent_without_started_keeps_its_start_and_is_not_printed_again():
    tracker = ProgressTracker()
    started = {"digest": RUN, "name": "[2/2] RUN make", "started": "2025-03-14T09:00:00.5Z"}
    out = feed_all(tracker, [
        status(vertexes=[{"digest": RUN, "name": "[2/2] RUN make"}]),
        status(vertexes=[started]),
        status(vertexes=[started]),
        status(vertexes=[{"digest": RUN, "name": "[2/2] RUN make"}]),
        status(vertexes=[{**started, "completed": "2025-03-14T09:00:03Z"}]),
        status(vertexes=[{**started, "completed": "2025-03-14T09:00:03Z"}]),
    ])
    assert out == ["#1 [2/2] RUN make", "#1 DONE 2.5s"]
    assert tracker.steps()[0].seconds == 2.5


def test_a_partial_log_line_is_kept_until_the_rest_arrives_or_the_step_ends():
    tracker = ProgressTracker()
    out = feed_all(tracker, [
        status(vertexes=[{"digest": RUN, "name": "RUN ./build.sh", "started": "2025-03-14T09:00:00Z"}]),
        status(logs=[{"vertex": RUN, "stream": 1, "data": b64("compiling"), "timestamp": "2025-03-14T09:00:01Z"}]),
        status(logs=[{"vertex": RUN, "stream": 2, "data": b64(" 3 files\n 10%\r 50%\r100%\nwarn"),
                      "timestamp": "2025-03-14T09:00:02Z"}]),
        status(vertexes=[{"digest": RUN, "name": "RUN ./build.sh", "started": "2025-03-14T09:00:00Z",
                          "completed": "2025-03-14T09:00:02Z", "error": "rpc error: context canceled"}]),
    ])
    assert out == [
        "#1 RUN ./build.sh",
        "#1 2.000 compiling 3 files",
        "#1 2.000 100%",
        "#1 warn",
        "#1 CANCELED",
    ]


def test_a_step_seen_only_when_it_completed_is_still_announced():
    tracker = ProgressTracker()
    out = tracker.feed(status(vertexes=[{"digest": RUN, "name": "[1/2] FROM docker.io/library/alpine:3.20",
                                         "started": "2025-03-14T09:00:00Z", "completed": "2025-03-14T09:00:00Z",
                                         "cached": True}]))
    assert out == ["#1 [1/2] FROM docker.io/library/alpine:3.20", "#1 CACHED"]


def test_warnings_are_shown_with_their_step():
    tracker = ProgressTracker()
    tracker.feed(status(vertexes=[{"digest": RUN, "name": "[internal] load build definition from Dockerfile"}]))
    out = tracker.feed(status(warnings=[{"vertex": RUN, "level": 1,
                                         "short": b64("FromAsCasing: 'as' and 'FROM' keywords' casing do not match (line 1)")}]))
    assert out == ["#1 WARN: FromAsCasing: 'as' and 'FROM' keywords' casing do not match (line 1)"]


@pytest.mark.parametrize("line", [
    "",
    "   ",
    "{",
    "[1, 2]",
    '"just a string"',
    '{"level":"info","msg":"running server on /run/buildkit/buildkitd.sock"}',
    '{"vertexes": "not a list"}',
    '{"vertexes": [{"digest": ["not", "a", "string"]}, 7, null]}',
    '{"vertexes": [{"digest": "sha256:x", "started": 12, "completed": "yesterday"}]}',
    '{"logs": [{"vertex": "sha256:unknown", "data": "aGVsbG8K"}]}',
    '{"logs": [{"vertex": "sha256:x", "data": "!!! not base64"}]}',
    '{"statuses": [{"vertex": {"a": 1}, "id": "x", "completed": "2025-03-14T09:00:00Z"}]}',
    '{"warnings": [{"short": 5}]}',
    "\x00\xff binary garbage",
])
def test_garbage_never_raises(line):
    tracker = ProgressTracker()
    tracker.feed(status(vertexes=[{"digest": "sha256:x", "name": "RUN true"}]))
    out = tracker.feed(line)
    assert isinstance(out, list) and all(isinstance(text, str) for text in out)
    assert tracker.steps()[0].name == "RUN true"


def test_non_status_json_is_passed_through_as_text():
    line = '{"level":"info","msg":"running server on /run/buildkit/buildkitd.sock"}'
    assert ProgressTracker().feed(line + "\n") == [line]


def test_an_empty_status_prints_nothing():
    assert ProgressTracker().feed("{}") == []
