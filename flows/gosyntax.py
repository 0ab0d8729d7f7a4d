"""Go's pattern and path primitives that `.dockerignore` handling rests on, ported to Python.

- golang/go src/path/path.go `Clean` (= path/filepath on Linux): `go_clean`;
- golang/go src/path/filepath/match.go `Match` (Go 1.16+, which checks the whole
  pattern's syntax): `match_syntax`, raising `BadPattern` where Match returns ErrBadPattern;
- golang/go src/regexp/syntax/parse.go (parseClass, parseNamedClass,
  parsePerlClassEscape, parseEscape, the `\\A \\b \\B \\C \\Q \\z` cases) and
  perl_groups.go: `re2_to_python` compiles an RE2 expression, as moby/patternmatcher
  builds them, into Python's `re` with RE2's meaning (Perl flags: `$` only at the very
  end, `.` not matching `\\n`, ASCII `\\d \\s \\w`, POSIX classes).
"""

from __future__ import annotations

import re

# Go's unicode.IsSpace (what strings.TrimSpace trims); Python's str.strip also trims \x1c-\x1f
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
            "\u2028\u2029\u202f\u205f\u3000"


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


def go_trim_space(text: str) -> str:
    return text.strip(_GO_SPACE)


def _is_bad_rune(char: str) -> bool:
    """A byte that is not UTF-8 (decoded with surrogateescape), which Go reads as utf8.RuneError."""
    return "\udc80" <= char <= "\udcff"


def _go_get_esc(chunk: str) -> tuple[str, str]:
    # golang/go src/path/filepath/match.go getEsc (Go 1.16+)
    if not chunk or chunk[0] in "-]":
        raise BadPattern
    if chunk[0] == "\\":
        chunk = chunk[1:]
        if not chunk:
            raise BadPattern
    char, rest = chunk[0], chunk[1:]
    if _is_bad_rune(char) or not rest:
        raise BadPattern
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
                    raise BadPattern
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


def match_syntax(pattern: str) -> None:
    """Raise BadPattern where Go's `filepath.Match(pattern, ".")` returns ErrBadPattern, as `New` calls it."""
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


class BadPattern(Exception):
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


class Unsupported(Exception):
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
        raise BadPattern  # trailing backslash
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
    raise BadPattern


def _re2_hex_escape(text: str, i: int) -> tuple[str, int]:
    hex_digits = "0123456789abcdefABCDEF"
    if text[i] == "{":
        end = text.find("}", i + 1)
        digits = text[i + 1:end] if end >= 0 else ""
        if not digits or any(d not in hex_digits for d in digits) or int(digits, 16) > _MAX_RUNE:
            raise BadPattern
        return chr(int(digits, 16)), end + 1
    pair = text[i:i + 2]
    if len(pair) < 2 or any(d not in hex_digits for d in pair):
        raise BadPattern
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
            raise BadPattern  # missing closing ]
        first = False
        if text.startswith("[:", i):
            end = text.find(":]", i + 2)
            if end >= 0:
                name = text[i + 2:end]
                group_negated = name.startswith("^")
                spec = _POSIX_CLASSES.get(name[1:] if group_negated else name)
                if spec is None:
                    raise BadPattern  # invalid character class range
                group = _ranges(spec)
                ranges += _negate(group) if group_negated else group
                i = end + 2
                continue
        if text[i] == "\\" and i + 1 < len(text):
            letter = text[i + 1]
            if letter in "pP":
                raise Unsupported(f"\\{letter}")
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
                raise BadPattern  # invalid character class range
        ranges.append((ord(low), ord(high)))
    ranges = _negate(ranges) if negated else ranges
    return _class_regex(ranges), i + 1


def _re2_class_char(text: str, i: int) -> tuple[str, int]:
    if i >= len(text):
        raise BadPattern
    if text[i] == "\\":
        return _re2_escape(text, i + 1)
    return text[i], i + 1


def re2_to_python(regex: str) -> re.Pattern[str]:
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
                raise BadPattern  # RE2: \C (any byte) is not supported
            elif letter in ("p", "P"):
                raise Unsupported(f"\\{letter}")
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
        raise BadPattern from error
