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
a Go (RE2) regular expression built from it; `_re2_to_python` carries that expression
over to Python's `re` with RE2's meaning (POSIX classes, `\\d`, `$` at the very end).
Before that, `New` validates each pattern with Go's `filepath.Match` (`_go_match_syntax`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

DOCKERIGNORE = ".dockerignore"

# bufio.MaxScanTokenSize: bufio.Scanner refuses a longer line (bufio.ErrTooLong)
_MAX_LINE_BYTES = 64 * 1024
_UTF8_BOM = b"\xef\xbb\xbf"
# Go's unicode.IsSpace (what strings.TrimSpace trims); Python's str.strip also trims \x1c-\x1f
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
            "\u2028\u2029\u202f\u205f\u3000"


class IgnoreFileError(ValueError):
    """The ignore file cannot be used as BuildKit would refuse it; the message names file, line and pattern."""

    def __init__(self, path: Path, detail: str):
        super().__init__(f"{path}: {detail}")
        self.path, self.detail = path, detail


# --------------------------------------------------------------------------- Go helpers


def go_clean(path: str) -> str:
    """Go's `path.Clean` (= `filepath.Clean` on Linux); unlike `posixpath.normpath`, `//a` becomes `/a`."""
    if path == "":
        return "."
    rooted = path.startswith("/")
    parts: list[str] = []
    for element in path.split("/"):
        if element in ("", "."):
            continue
        if element == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            continue
        parts.append(element)
    cleaned = "/".join(parts)
    if rooted:
        return "/" + cleaned
    return cleaned or "."


def _go_trim_space(text: str) -> str:
    return text.strip(_GO_SPACE)


def _is_bad_rune(char: str) -> bool:
    """A byte that is not UTF-8 (decoded with surrogateescape), which Go reads as utf8.RuneError."""
    return "\udc80" <= char <= "\udcff"


def _go_get_esc(chunk: str) -> tuple[str, str]:
    # golang/go src/path/filepath/match.go getEsc (Go 1.16+)
    if not chunk or chunk[0] in "-]":
        raise _BadPattern
    if chunk[0] == "\\":
        chunk = chunk[1:]
        if not chunk:
            raise _BadPattern
    char, rest = chunk[0], chunk[1:]
    if _is_bad_rune(char) or not rest:
        raise _BadPattern
    return char, rest


def _go_match_chunk(chunk: str, s: str) -> tuple[str, bool]:
    # golang/go src/path/filepath/match.go matchChunk (Go 1.16+): keeps parsing after a
    # failed match so that a malformed rest of the chunk is still reported
    failed = False
    while chunk:
        failed = failed or not s
        head = chunk[0]
        if head == "[":
            char = ""
            if not failed:
                char, s = s[0], s[1:]
            chunk = chunk[1:]
            negated = bool(chunk) and chunk[0] == "^"
            if negated:
                chunk = chunk[1:]
            matched, ranges = False, 0
            while True:
                if chunk and chunk[0] == "]" and ranges > 0:
                    chunk = chunk[1:]
                    break
                low, chunk = _go_get_esc(chunk)
                high = low
                if chunk[0] == "-":
                    high, chunk = _go_get_esc(chunk[1:])
                matched = matched or (bool(char) and low <= char <= high)
                ranges += 1
            failed = failed or matched == negated
        elif head == "?":
            if not failed:
                failed = s[0] == "/"
                s = s[1:]
            chunk = chunk[1:]
        else:
            if head == "\\":
                chunk = chunk[1:]
                if not chunk:
                    raise _BadPattern
            if not failed:
                failed = chunk[0] != s[0]
                s = s[1:]
            chunk = chunk[1:]
    return ("", False) if failed else (s, True)


def _go_scan_chunk(pattern: str) -> tuple[bool, str, str]:
    # golang/go src/path/filepath/match.go scanChunk
    star = False
    while pattern.startswith("*"):
        pattern, star = pattern[1:], True
    in_range, i = False, 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            if i + 1 < len(pattern):
                i += 1
        elif char == "[":
            in_range = True
        elif char == "]":
            in_range = False
        elif char == "*" and not in_range:
            break
        i += 1
    return star, pattern[:i], pattern[i:]


def _go_match_syntax(pattern: str) -> None:
    """Raise _BadPattern where Go's `filepath.Match(pattern, ".")` returns ErrBadPattern, as `New` calls it."""
    name = "."
    while pattern:
        star, chunk, pattern = _go_scan_chunk(pattern)
        if star and not chunk:
            return
        rest, ok = _go_match_chunk(chunk, name)
        if ok and (not rest or pattern):
            name = rest
            continue
        if star:
            skipped = False
            for i in range(len(name)):
                if name[i] == "/":
                    break
                rest, ok = _go_match_chunk(chunk, name[i + 1:])
                if ok and not (not pattern and rest):
                    name, skipped = rest, True
                    break
            if skipped:
                continue
        while pattern:
            _, chunk, pattern = _go_scan_chunk(pattern)
            _go_match_chunk(chunk, "")
        return


class _BadPattern(Exception):
    """Go's filepath.ErrBadPattern: "syntax error in pattern"."""


# --------------------------------------------------------------------------- RE2 -> re

# golang/go src/regexp/syntax/perl_groups.go (posixGroup, perlGroup): ASCII only
_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z", "alpha": "A-Za-z", "ascii": "\x00-\x7f", "blank": "\t ",
    "cntrl": "\x00-\x1f\x7f", "digit": "0-9", "graph": "!-~", "lower": "a-z", "print": " -~",
    "punct": "!-/:-@[-`{-~", "space": "\t\n\v\f\r ", "upper": "A-Z", "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}
_PERL_CLASSES = {"d": "0-9", "s": "\t\n\f\r ", "w": "0-9A-Za-z_"}
_SIMPLE_ESCAPES = {"a": "\a", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_MAX_RUNE = 0x10FFFF


class _Unsupported(Exception):
    """An RE2 feature this port does not carry over (Unicode classes \\p{..}, \\P{..}); refused, never guessed."""


def _ranges(spec: str) -> list[tuple[int, int]]:
    out, i = [], 0
    while i < len(spec):
        if i + 2 < len(spec) and spec[i + 1] == "-":
            out.append((ord(spec[i]), ord(spec[i + 2])))
            i += 3
        else:
            out.append((ord(spec[i]), ord(spec[i])))
            i += 1
    return out


def _negate(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, low = [], 0
    for start, end in sorted(ranges):
        if start > low:
            out.append((low, start - 1))
        low = max(low, end + 1)
    if low <= _MAX_RUNE:
        out.append((low, _MAX_RUNE))
    return out


def _class_regex(ranges: list[tuple[int, int]]) -> str:
    if not ranges:
        return "(?!)"
    body = "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)
    return f"[{body}]"


def _re2_escape(text: str, i: int) -> tuple[str, int]:
    """One escaped character at text[i] (after the backslash): (character, next index).

    golang/go src/regexp/syntax/parse.go parseEscape: ASCII punctuation is itself,
    \\a \\f \\n \\r \\t \\v, octal (\\0, \\1-\\7 only before another octal digit), \\xHH and
    \\x{H...}; anything else is "invalid escape sequence".
    """
    if i >= len(text):
        raise _BadPattern  # trailing backslash
    char = text[i]
    if ord(char) < 0x80 and not char.isalnum():
        return char, i + 1
    if char in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[char], i + 1
    octal = "01234567"
    if char in octal and (char == "0" or (i + 1 < len(text) and text[i + 1] in octal)):
        value, i = int(char), i + 1
        for _ in range(2):
            if i < len(text) and text[i] in octal:
                value, i = value * 8 + int(text[i]), i + 1
        return chr(value), i
    if char == "x" and i + 1 < len(text):
        return _re2_hex_escape(text, i + 1)
    raise _BadPattern


def _re2_hex_escape(text: str, i: int) -> tuple[str, int]:
    hex_digits = "0123456789abcdefABCDEF"
    if text[i] == "{":
        end = text.find("}", i + 1)
        digits = text[i + 1:end] if end >= 0 else ""
        if not digits or any(d not in hex_digits for d in digits) or int(digits, 16) > _MAX_RUNE:
            raise _BadPattern
        return chr(int(digits, 16)), end + 1
    pair = text[i:i + 2]
    if len(pair) < 2 or any(d not in hex_digits for d in pair):
        raise _BadPattern
    return chr(int(pair, 16)), i + 2


def _re2_class(text: str, i: int) -> tuple[str, int]:
    """Parse the RE2 class starting after `[` at text[i]; return a Python class and the index after `]`.

    golang/go src/regexp/syntax/parse.go parseClass (Perl flags: `-` allowed anywhere,
    `]` literal when first, `[:name:]` POSIX groups, \\d \\s \\w and negations).
    """
    negated = i < len(text) and text[i] == "^"
    if negated:
        i += 1
    ranges: list[tuple[int, int]] = []
    first = True
    while first or i >= len(text) or text[i] != "]":
        if i >= len(text):
            raise _BadPattern  # missing closing ]
        first = False
        if text.startswith("[:", i):
            end = text.find(":]", i + 2)
            if end >= 0:
                name = text[i + 2:end]
                group_negated = name.startswith("^")
                spec = _POSIX_CLASSES.get(name[1:] if group_negated else name)
                if spec is None:
                    raise _BadPattern  # invalid character class range
                group = _ranges(spec)
                ranges += _negate(group) if group_negated else group
                i = end + 2
                continue
        if text[i] == "\\" and i + 1 < len(text):
            letter = text[i + 1]
            if letter in "pP":
                raise _Unsupported(f"\\{letter}")
            if letter.lower() in _PERL_CLASSES:
                group = _ranges(_PERL_CLASSES[letter.lower()])
                ranges += _negate(group) if letter.isupper() else group
                i += 2
                continue
        low, i = _re2_class_char(text, i)
        high = low
        if i + 1 < len(text) and text[i] == "-" and text[i + 1] != "]":
            high, i = _re2_class_char(text, i + 1)
            if high < low:
                raise _BadPattern  # invalid character class range
        ranges.append((ord(low), ord(high)))
    ranges = _negate(ranges) if negated else ranges
    return _class_regex(ranges), i + 1


def _re2_class_char(text: str, i: int) -> tuple[str, int]:
    if i >= len(text):
        raise _BadPattern
    if text[i] == "\\":
        return _re2_escape(text, i + 1)
    return text[i], i + 1


def _re2_to_python(regex: str) -> re.Pattern[str]:
    """Compile the RE2 expression patternmatcher builds, with RE2's meaning, for Python's `re`.

    The expression holds only what `Pattern.compile` writes: `^`, `$`, `.`, `*`, `?`,
    `(`, `)`, escapes and classes copied from the pattern, and literals.
    """
    out, i = [], 0
    while i < len(regex):
        char = regex[i]
        if char == "\\":
            letter = regex[i + 1] if i + 1 < len(regex) else ""
            if letter.lower() in _PERL_CLASSES:
                group = _ranges(_PERL_CLASSES[letter.lower()])
                out.append(_class_regex(_negate(group) if letter.isupper() else group))
                i += 2
            elif letter in ("b", "B", "A"):
                out.append("\\" + letter)
                i += 2
            elif letter == "z":
                out.append(r"\Z")
                i += 2
            elif letter == "Q":
                end = regex.find("\\E", i + 2)
                literal = regex[i + 2:] if end < 0 else regex[i + 2:end]
                out.append(re.escape(literal))
                i = len(regex) if end < 0 else end + 2
            elif letter == "C":
                raise _BadPattern  # RE2: \C (any byte) is not supported
            elif letter in ("p", "P"):
                raise _Unsupported(f"\\{letter}")
            else:
                literal, i = _re2_escape(regex, i + 1)
                out.append(re.escape(literal))
        elif char == "[":
            piece, i = _re2_class(regex, i + 1)
            out.append(piece)
        elif char == "^":
            out.append(r"\A")
            i += 1
        elif char == "$":
            out.append(r"\Z")
            i += 1
        elif char in ".*?()":
            out.append(char)
            i += 1
        else:
            out.append(re.escape(char))
            i += 1
    try:
        return re.compile("".join(out), re.ASCII)
    except re.error as error:
        raise _BadPattern from error


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
    compiled = _re2_to_python(regex + "$")
    return lambda path: compiled.match(path) is not None


class PatternMatcher:
    """moby/patternmatcher (v0.6.1) `New` and `MatchesUsingParentResults`."""

    def __init__(self, patterns: list[str]):
        self.patterns: list[Pattern] = []
        for number, raw in enumerate(patterns):
            text = _go_trim_space(raw)
            if not text:
                continue
            text = go_clean(text)
            exclusion = text.startswith("!")
            if exclusion:
                if len(text) == 1:
                    raise _PatternError(number, raw, 'illegal exclusion pattern: "!"')
                text = text[1:]
            try:
                _go_match_syntax(text)
                match = compile_pattern(text)
            except _BadPattern:
                raise _PatternError(number, raw, "syntax error in pattern") from None
            except _Unsupported as unsupported:
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
        text = _go_trim_space(text)
        if not text:
            continue
        invert = text[0] == "!"
        if invert:
            text = _go_trim_space(text[1:])
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
