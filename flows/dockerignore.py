"""`.dockerignore` as BuildKit applies it to a local context: parse, match, walk.

BuildKit never filters a remote (HTTP) context, so this module decides alone what a
build sees. It ports, at the versions moby/buildkit v0.31.2 vendors (go.mod):

- moby/patternmatcher ignorefile/ignorefile.go `ReadAll` (v0.6.1): the file's lines
  (`read_patterns`);
- moby/patternmatcher patternmatcher.go `New`, `Pattern.compile`, `Pattern.match` and
  `MatchesUsingParentResults` (v0.6.1): the matcher (`PatternMatcher`);
- tonistiigi/fsutil filter.go `filterFS.Walk` (v0.0.0-20260716115106-30cd4fc5d911) over
  fs.go `fs.Walk` (Go's `filepath.WalkDir`): which paths are visited and kept (`walk`);
- moby/buildkit frontend/dockerui/config.go `ReadEntrypoint` / `dockerIgnorePatterns`
  (v0.31.2): `<Dockerfile>.dockerignore` next to the Dockerfile, when that file exists
  (even empty), replaces the context's `.dockerignore` (`choose_ignore_file`).

Patterns are matched the way patternmatcher does it: a pattern without wildcards is
compared as a string, `**`-led and `**`-ended ones by suffix / prefix, the rest through
a Go (RE2) regular expression built from it, which flows/gosyntax.py carries over to
Python's `re` with RE2's meaning. Before that, `New` validates each pattern with Go's
`filepath.Match` (flows/gosyntax.py `match_syntax`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from flows.gosyntax import BadPattern, Unsupported, go_clean, go_trim_space, match_syntax, re2_to_python

DOCKERIGNORE = ".dockerignore"

# bufio.MaxScanTokenSize: bufio.Scanner refuses a longer line (bufio.ErrTooLong)
_MAX_LINE_BYTES = 64 * 1024
_UTF8_BOM = b"\xef\xbb\xbf"


class IgnoreFileError(ValueError):
    """The ignore file cannot be used as BuildKit would refuse it; the message names file, line and pattern."""

    def __init__(self, path: Path, detail: str):
        super().__init__(f"{path}: {detail}")
        self.path, self.detail = path, detail


# --------------------------------------------------------------------------- patterns

_SHOULD_ESCAPE = set(".+()|{}$")  # patternmatcher.go shouldEscape


@dataclass
class Pattern:
    """One cleaned pattern of moby/patternmatcher (v0.6.1) `Pattern`."""

    cleaned: str
    exclusion: bool
    match: Callable[[str], bool] = field(repr=False)


def compile_pattern(cleaned: str) -> Callable[[str], bool]:
    """patternmatcher.go `Pattern.compile` + `Pattern.match` (v0.6.1), separator `/`."""
    regex, kind = "^", "exact"
    i, n = 0, len(cleaned)
    position = 0
    while i < n:
        char = cleaned[i]
        i += 1
        if char == "*":
            if i < n and cleaned[i] == "*":
                i += 1
                if i < n and cleaned[i] == "/":
                    i += 1
                if i >= n:
                    if kind == "exact":
                        kind = "prefix"
                    else:
                        regex += ".*"
                        kind = "regexp"
                else:
                    regex += "(.*/)?"
                    kind = "regexp"
                if position == 0:
                    kind = "suffix"
            else:
                regex += "[^/]*"
                kind = "regexp"
        elif char == "?":
            regex += "[^/]"
            kind = "regexp"
        elif char in _SHOULD_ESCAPE:
            regex += "\\" + char
        elif char == "\\":
            if i < n:
                regex += "\\" + cleaned[i]
                i += 1
                kind = "regexp"
            else:
                regex += "\\"
        elif char in "[]":
            regex += char
            kind = "regexp"
        else:
            regex += char
        position += 1

    if kind == "exact":
        return cleaned.__eq__
    if kind == "prefix":
        prefix = cleaned[:-2]
        return lambda path: path.startswith(prefix)
    if kind == "suffix":
        suffix = cleaned[2:]
        return lambda path: path.endswith(suffix) or (suffix.startswith("/") and path == suffix[1:])
    compiled = re2_to_python(regex + "$")
    return lambda path: compiled.match(path) is not None


class PatternMatcher:
    """moby/patternmatcher (v0.6.1) `New` and `MatchesUsingParentResults`."""

    def __init__(self, patterns: list[str]):
        self.patterns: list[Pattern] = []
        for number, raw in enumerate(patterns):
            text = go_trim_space(raw)
            if not text:
                continue
            text = go_clean(text)
            exclusion = text.startswith("!")
            if exclusion:
                if len(text) == 1:
                    raise _PatternError(number, raw, 'illegal exclusion pattern: "!"')
                text = text[1:]
            try:
                match_syntax(text)
                match = compile_pattern(text)
            except BadPattern:
                raise _PatternError(number, raw, "syntax error in pattern") from None
            except Unsupported as unsupported:
                raise _PatternError(
                    number, raw, f"the regular-expression escape {unsupported} is not supported by the packager"
                ) from None
            self.patterns.append(Pattern(text, exclusion, match))
        self.exclusions = any(p.exclusion for p in self.patterns)

    def matches(self, path: str, parent: list[bool] | None) -> tuple[bool, list[bool]]:
        """(excluded?, match info for the children); `parent` is the parent directory's info, None at the top."""
        matched = False
        info = [False] * len(self.patterns)
        for index, pattern in enumerate(self.patterns):
            match = bool(parent) and parent[index]
            if not match:
                if pattern.exclusion != matched:
                    continue
                match = pattern.match(path)
                if not match and not parent:
                    parent_path = os.path.dirname(path)
                    if parent_path:
                        dirs = parent_path.split("/")
                        match = any(pattern.match("/".join(dirs[:k + 1])) for k in range(len(dirs)))
            info[index] = match
            if match:
                matched = not pattern.exclusion
        return matched, info


class _PatternError(Exception):
    def __init__(self, index: int, raw: str, reason: str):
        super().__init__(reason)
        self.index, self.raw, self.reason = index, raw, reason


# --------------------------------------------------------------------------- ignore file


@dataclass(frozen=True)
class IgnoreFile:
    """The ignore file a build uses, its patterns (as ReadAll returns them) and their line numbers."""

    path: Path | None
    patterns: list[str]
    lines: list[int]


class _LineTooLong(Exception):
    pass


def read_patterns(data: bytes) -> tuple[list[str], list[int]]:
    """moby/patternmatcher ignorefile.ReadAll (v0.6.1), with each pattern's 1-based line number.

    Lines split on `\\n` only (bufio.ScanLines drops one trailing `\\r`); a UTF-8 BOM is
    dropped from the first line; a line whose first byte is `#` is a comment (an
    indented `#` is a pattern); whitespace is trimmed, `!` split off and trimmed again,
    the rest cleaned as Go's path.Clean, one leading `/` removed.
    """
    chunks = data.split(b"\n")
    if chunks and chunks[-1] == b"":
        chunks.pop()
    patterns, lines = [], []
    for number, line in enumerate(chunks, start=1):
        if len(line) >= _MAX_LINE_BYTES:
            raise _LineTooLong(f"line {number}: bufio.Scanner: token too long (BuildKit reads lines up to 64 KiB)")
        if line.endswith(b"\r"):
            line = line[:-1]
        if number == 1 and line.startswith(_UTF8_BOM):
            line = line[len(_UTF8_BOM):]
        text = line.decode("utf-8", "surrogateescape")
        if text.startswith("#"):
            continue
        text = go_trim_space(text)
        if not text:
            continue
        invert = text[0] == "!"
        if invert:
            text = go_trim_space(text[1:])
        if text:
            text = go_clean(text)
            if len(text) > 1 and text[0] == "/":
                text = text[1:]
        patterns.append("!" + text if invert else text)
        lines.append(number)
    return patterns, lines


def choose_ignore_file(context_dir: Path, dockerfile: Path | None) -> Path | None:
    """`<Dockerfile>.dockerignore` beside the Dockerfile when it exists (even empty), else `<context>/.dockerignore`.

    moby/buildkit frontend/dockerui/config.go (v0.31.2): ReadEntrypoint reads
    `filename + ".dockerignore"` from the Dockerfile's directory and, when that read
    succeeds, dockerIgnorePatterns no longer loads the context's `.dockerignore`.
    """
    if dockerfile is not None:
        specific = Path(f"{dockerfile}{DOCKERIGNORE}")
        if specific.is_file():
            return specific
    default = Path(context_dir) / DOCKERIGNORE
    return default if default.is_file() else None


def load_ignore_file(context_dir: Path, dockerfile: Path | None = None) -> tuple[IgnoreFile, PatternMatcher | None]:
    """The chosen ignore file and its matcher (None without patterns: fsutil then filters nothing)."""
    path = choose_ignore_file(context_dir, dockerfile)
    if path is None:
        return IgnoreFile(None, [], []), None
    try:
        data = path.read_bytes()
    except OSError as error:
        raise IgnoreFileError(path, f"cannot read it: {error.strerror}") from error
    try:
        patterns, lines = read_patterns(data)
    except _LineTooLong as error:
        raise IgnoreFileError(path, str(error)) from None
    ignore = IgnoreFile(path, patterns, lines)
    if not patterns:
        return ignore, None
    try:
        return ignore, PatternMatcher(patterns)
    except _PatternError as error:
        raise IgnoreFileError(path, f"line {lines[error.index]}: pattern {error.raw!r}: {error.reason}") from None


# --------------------------------------------------------------------------- walk

_GLOB_CHARS = set("*[]?^\\")  # fsutil filter.go patternChars on Linux


def _without_trailing_glob(pattern: str) -> str:
    # fsutil filter.go patternWithoutTrailingGlob
    pattern = pattern.removesuffix("/**")
    return pattern.removesuffix("/*")


class WalkError(OSError):
    """A directory the walk must read cannot be read."""


def walk(context_dir: Path, matcher: PatternMatcher | None) -> list[tuple[str, bool]]:
    """(relative path, is directory) of every path fsutil's filtered walk would send, parents first.

    tonistiigi/fsutil filter.go filterFS.Walk: an excluded directory is skipped without
    being read only when no `!` pattern holds a wildcard (onlyPrefixExcludeExceptions)
    and none starts with that directory's path; otherwise it is read, and its excluded
    entries are dropped. A directory left out but holding kept paths is sent before them.
    A directory that cannot be read fails the walk, unless it is excluded and the error
    is a permission error (fsutil: `skip && errors.Is(walkErr, os.ErrPermission)`).
    """
    kept: list[tuple[str, bool]] = []
    prefix_only = matcher is not None and not any(
        p.exclusion and _GLOB_CHARS & set(_without_trailing_glob(p.cleaned)) for p in matcher.patterns
    )
    exception_dirs = [
        _without_trailing_glob(p.cleaned) + "/" for p in (matcher.patterns if matcher else []) if p.exclusion
    ]
    pending: list[str] = []  # directories walked but not sent yet (fsutil's parentDirs without calledFn)

    def visit(directory: str, relative: str, parent_info: list[bool] | None, skipped: bool) -> None:
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda entry: os.fsencode(entry.name))
        except OSError as error:
            if skipped and isinstance(error, PermissionError):
                return
            raise WalkError(error.errno, error.strerror, error.filename) from error
        for entry in entries:
            path = f"{relative}/{entry.name}" if relative else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            info: list[bool] | None = None
            excluded = False
            if matcher is not None:
                excluded, info = matcher.matches(path, parent_info)
            if excluded:
                if not is_dir:
                    continue
                if prefix_only and not any(d.startswith(path + "/") for d in exception_dirs):
                    continue
                pending.append(path)
                visit(entry.path, path, info, True)
                if pending and pending[-1] == path:
                    pending.pop()
                continue
            kept.extend((parent, True) for parent in pending)
            pending.clear()
            kept.append((path, is_dir))
            if is_dir:
                visit(entry.path, path, info, False)

    visit(os.fspath(context_dir), "", None, False)
    return kept
