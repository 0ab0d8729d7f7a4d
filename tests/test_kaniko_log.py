"""KanikoLog on Kaniko executor logs written with `--log-format=text` (fixtures in tests/fixtures/kaniko/)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from flows.builders import log_reader
from flows.kaniko_log import KanikoLog, go_unquote, is_kaniko_log, kaniko_plain, parse_line
from flows.progress import step_table
from flows.secrecy import QUERY_WITHHELD

FIXTURES = Path(__file__).parent / "fixtures" / "kaniko"
BUILDKIT_FIXTURES = Path(__file__).parent / "fixtures" / "buildkit"
FAILED_RUN = "error building image: error building stage: failed to execute command: waiting for process to exit: exit status 1"


def sample(name: str, fixtures: Path = FIXTURES) -> list[str]:
    """A fixture's lines without its `# ` header."""
    lines = (fixtures / name).read_text().splitlines()
    while lines and lines[0].startswith("# "):
        lines.pop(0)
    return lines


def read(name: str) -> tuple[KanikoLog, list[str]]:
    reader = KanikoLog()
    return reader, [out for line in sample(name) for out in reader.feed(line + "\n")]


def at(second: int) -> datetime:
    return datetime(2026, 11, 29, 12, 0, second, tzinfo=timezone.utc)


def test_logrus_lines_read_as_level_and_message():
    reader = KanikoLog()
    assert reader.feed('time="2026-11-29T12:00:02Z" level=info msg="Retrieving image manifest python:3.12-slim"\n') == [
        "INFO Retrieving image manifest python:3.12-slim"
    ]
    assert reader.feed('time="2026-11-29T12:00:47Z" level=warning msg="Retrying operation after 1s due to EOF"') == [
        "WARNING Retrying operation after 1s due to EOF"
    ]
    assert reader.feed('time="2026-11-29T12:00:47Z" level=info msg=Done') == ["INFO Done"]


def test_go_quoting_is_undone():
    assert go_unquote(r'"CMD [\"python\", \"-m\", \"app\"]"') == 'CMD ["python", "-m", "app"]'
    assert go_unquote(r'"a\tb\\c\x1bd\u00e9\U0001F600\a\v"') == "a\tb\\c\x1bd\u00e9\U0001F600\a\v"
    assert go_unquote('"caf\u00e9"') == "caf\u00e9"
    assert go_unquote("bare/value-1.2") == "bare/value-1.2"


def test_a_msg_with_newlines_gives_one_line_each_and_other_fields_follow_it():
    reader = KanikoLog()
    assert reader.feed(r'time="2026-11-29T12:00:03Z" level=error msg="first\nsecond\n"') == ["ERROR first", "second"]
    assert reader.feed(
        'time="2025-03-14T09:26:53Z" level=warning msg="failed to lookup cache for remote context" error="not found"'
    ) == ['WARNING failed to lookup cache for remote context error="not found"']


def test_parse_line_reads_time_level_and_msg():
    entry = parse_line('time="2026-11-29T12:00:00Z" level=info msg="Retrieving https tar file"')
    assert (entry.time, entry.level, entry.msg, entry.fields) == (at(0), "info", "Retrieving https tar file", {})
    assert parse_line("Collecting fastapi==0.115.6 (from -r requirements.txt (line 1))") is None
    assert parse_line("PATH=/usr/local/bin") is None


def test_other_lines_come_back_unchanged_and_blank_ones_are_dropped():
    reader = KanikoLog()
    for line in ["ERROR: No matching distribution found for flask==9.9.9",
                 "  Downloading fastapi-0.115.6-py3-none-any.whl.metadata (27 kB)", "Usage:"]:
        assert reader.feed(line + "\n") == [line]
    assert reader.feed("\n") == []
    assert reader.feed("   \r\n") == []


def test_one_step_per_dockerfile_command_with_its_seconds_and_cache_flag():
    reader, _ = read("success-cached.log")
    assert [(s.name, s.seconds, s.cached, s.error) for s in reader.steps()] == [
        ("WORKDIR /app", 0.0, False, None),
        ("COPY requirements.txt .", 1.0, False, None),
        ("RUN pip install --no-cache-dir -r requirements.txt", 4.0, True, None),
        ("COPY . .", 1.0, False, None),
        ("RUN python -m compileall -q /app", 26.0, False, None),
        ('CMD ["python", "-m", "app"]', 3.0, False, None),
    ]


def test_a_step_ends_at_the_next_command_or_the_image_push_not_at_a_cache_push():
    reader, _ = read("success-cached.log")
    steps = reader.steps()
    assert (steps[4].started, steps[4].completed) == (at(15), at(41))
    assert (steps[5].started, steps[5].completed) == (at(41), at(44))


def test_cache_hits_count_the_cacheable_commands():
    reader, _ = read("success-cached.log")
    assert reader.cache_hits() == (1, 2)
    assert step_table(reader.steps())[2] == {
        "step": "RUN pip install --no-cache-dir -r requirements.txt", "seconds": 4.0, "cached": True, "error": "",
    }


def test_the_fatal_error_lands_on_the_running_step_whose_end_is_unknown():
    reader, out = read("run-step-failed.log")
    steps = reader.steps()
    assert [(s.name, s.seconds, s.error) for s in steps] == [
        ("WORKDIR /app", 0.0, None),
        ("COPY requirements.txt .", 1.0, None),
        ("RUN pip install --no-cache-dir -r requirements.txt", None, FAILED_RUN),
    ]
    assert (steps[-1].started, steps[-1].completed) == (at(9), None)
    assert reader.cache_hits() == (0, 0)
    assert out[-3:] == [
        "ERROR: Could not find a version that satisfies the requirement flask==9.9.9 (from versions: 0.1, 0.2, 0.3, "
        "0.3.1, 0.4, 0.5, 0.5.1, 0.5.2, 0.6, 0.6.1, 0.7, 0.7.1, 0.7.2, 0.8, 0.8.1, 0.9, 0.10, 0.10.1, 0.11, 0.11.1, "
        "0.12, 3.1.0)",
        "ERROR: No matching distribution found for flask==9.9.9",
        FAILED_RUN,
    ]


def test_what_a_command_prints_is_not_taken_for_kanikos_error():
    reader = KanikoLog()
    reader.feed('time="2026-11-29T12:00:09Z" level=info msg="RUN node build.js"')
    reader.feed("Error: Cannot find module 'esbuild'")
    reader.feed("error: build failed, see above")
    reader.feed('time="2026-11-29T12:00:12Z" level=info msg="CMD [\\"node\\", \\"server.js\\"]"')
    assert [(s.name, s.seconds, s.error) for s in reader.steps()] == [
        ("RUN node build.js", 3.0, None),
        ('CMD ["node", "server.js"]', None, None),
    ]


def test_a_fatal_log_entry_fails_the_running_step():
    reader = KanikoLog()
    reader.feed('time="2026-11-29T12:00:09Z" level=info msg="RUN apt-get update"')
    reader.feed('time="2026-11-29T12:00:10Z" level=fatal msg="Invalid platform \\"linux\\": x"')
    assert reader.steps()[0].error == 'Invalid platform "linux": x'


@pytest.mark.parametrize("fixture", ["dockerfile-missing.log", "registry-auth-push-check.log", "base-image-not-found.log"])
def test_a_failure_before_the_first_command_makes_no_step(fixture):
    reader, out = read(fixture)
    assert reader.steps() == []
    assert out[-1] == sample(fixture)[-1]


@pytest.mark.parametrize("builder", ["kaniko", "buildkit"])
def test_the_query_of_a_presigned_url_is_withheld_by_the_log_reader_of_either_builder(builder):
    """flows/builders.py WithheldLog is the one place: what the run log and the steps artifact get from either
    builder's reader (BuildKit passes non-rawjson lines through, as Kaniko's reader does non-logrus ones)."""
    reader = log_reader(builder)
    out = [line for raw in sample("context-unreachable.log") for line in reader.feed(raw + "\n")]
    assert not any("X-Amz-Signature" in line for line in out)
    assert out[1].startswith(
        'Error: error resolving source context: Get "https://shop-contexts.s3.eu-west-1.amazonaws.com/api/'
        f'5e0c2d7a9b1f.tar.gz{QUERY_WITHHELD}": dial tcp: lookup'
    )
    entry = ('time="2026-11-29T12:00:01Z" level=error msg="Get \\"https://b.s3.amazonaws.com/k.tar.gz'
             '?X-Amz-Date=1&X-Amz-Signature=abc\\": EOF"')
    if builder == "kaniko":
        assert log_reader(builder).feed(entry) == [
            f'ERROR Get "https://b.s3.amazonaws.com/k.tar.gz{QUERY_WITHHELD}": EOF']


def test_kaniko_plain_renders_a_whole_log():
    plain = kaniko_plain("\n".join(sample("registry-auth-push-denied.log")))
    assert plain.splitlines()[:3] == [
        'INFO CMD ["python", "-m", "app"]',
        "INFO No files changed in this command, skipping snapshotting.",
        "INFO Pushing image to 123456789012.dkr.ecr.eu-west-1.amazonaws.com/shop/api:3f2a1c9",
    ]
    assert plain.splitlines()[3].startswith("WARNING Retrying operation after 1s due to PUT https://")


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*.log")))
def test_every_kaniko_log_is_recognised(fixture):
    assert is_kaniko_log(kaniko_plain("\n".join(sample(fixture))))


@pytest.mark.parametrize("fixture", sorted(p.name for p in BUILDKIT_FIXTURES.glob("*.log")))
def test_no_buildkit_log_is_taken_for_kanikos(fixture):
    assert not is_kaniko_log(kaniko_plain("\n".join(sample(fixture, BUILDKIT_FIXTURES))))
