"""A deliberately small model of a container's `/bin/sh -c SCRIPT [NAME [ARGS...]]` (BusyBox ash, as in Alpine).

It knows lists (`&&`, `||`, `;`, newlines), words with single and double quotes, `$1`..`$9`, `$@`, `"$@"`, `$#`,
`$0` and `$NAME` from the environment, `>` and `>>` redirection of stdout, `exit [N]`, and the programs it is given
(`cat`, `cp`, plus what the image carries). Anything else is stricter than a real shell: an unknown command is
`NAME: not found` with status 127, and syntax it does not model (pipes, subshells, `2>`, backticks, `$(...)`)
fails the script with status 2 before it runs.

Texts and statuses follow mirror/busybox shell/ash.c (1.36): messages start with `arg0: ` and, when a name was
given after the script (`commandname` is set), `line N: ` (`ash_vmsg`); `X: not found` is status 127
(`shellexec`); a redirection that cannot be opened prints `can't create F: <strerror>` ("nonexistent directory"
for ENOENT, `errmsg`) and the command gets status 1 (`redirectsafe`). BusyBox's cat and cp print
`cat: can't open 'F': <strerror>` and `cp: can't stat 'F': <strerror>` (libbb `bb_perror_msg`), status 1.

Source: BusyBox shell/ash.c and libbb/xfuncs_printf.c (1.36, the shell of the Alpine-based moby/buildkit images).
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from typing import Callable

from sandbox.kube.containerfs import ContainerFS

# musl's strerror texts (src/errno/__strerror.h) where they differ from glibc's
MUSL_STRERROR = {errno.EBUSY: "Resource busy"}
OPERATORS = ("&&", "||", ";", "\n", ">>", ">")
UNSUPPORTED = re.compile(r"(?<!\|)\|(?!\|)|[`()<]|\d>|(?<!&)&(?!&)")


def musl_strerror(code: int) -> str:
    return MUSL_STRERROR.get(code, os.strerror(code))


class ShellSyntaxError(Exception):
    """Syntax the model does not know."""


@dataclass
class Process:
    """What a program gets: its arguments, the container's filesystem and environment, and its two streams."""

    args: list[str]
    fs: ContainerFS
    env: dict[str, str]
    stdout: Callable[[str], None]
    stderr: Callable[[str], None]


Program = Callable[[Process], int]


def cat(process: Process) -> int:
    status = 0
    for path in process.args:
        try:
            process.stdout(process.fs.read(path).decode(errors="replace"))
        except OSError as exc:
            process.stderr(f"cat: can't open '{path}': {musl_strerror(exc.errno)}")
            status = 1
    return status


def cp(process: Process) -> int:
    if len(process.args) != 2:
        process.stderr("cp: the sandbox shell models only `cp SOURCE DEST`")
        return 1
    source, dest = process.args
    try:
        data = process.fs.read(source)
    except OSError as exc:
        process.stderr(f"cp: can't stat '{source}': {musl_strerror(exc.errno)}")
        return 1
    try:
        process.fs.write(dest, data)
    except OSError as exc:
        process.stderr(f"cp: can't create '{dest}': {musl_strerror(exc.errno)}")
        return 1
    return 0


BUSYBOX = {"cat": cat, "cp": cp}


@dataclass
class _Word:
    parts: list[tuple[str, bool]] = field(default_factory=list)  # (text, quoted) pieces, `$...` unexpanded


def _tokens(script: str) -> list[str | _Word]:
    """Operators as strings, words as `_Word`s."""
    if UNSUPPORTED.search(re.sub(r"'[^']*'", "''", script)):
        raise ShellSyntaxError(f"unsupported syntax in {script!r}")
    tokens: list[str | _Word] = []
    i, word = 0, None
    while i < len(script):
        ch = script[i]
        operator = next((op for op in OPERATORS if script.startswith(op, i)), None)
        if operator or ch in " \t":
            if word is not None:
                tokens.append(word)
                word = None
            if operator:
                tokens.append(operator)
                i += len(operator)
            else:
                i += 1
            continue
        word = word or _Word()
        if ch == "'":
            end = script.index("'", i + 1)
            word.parts.append((script[i + 1:end], True))
            i = end + 1
        elif ch == '"':
            end = script.index('"', i + 1)
            word.parts.append(("\0" + script[i + 1:end], True))  # \0: expand `$` inside
            i = end + 1
        else:
            end = i
            while end < len(script) and script[end] not in " \t'\"" and not any(
                    script.startswith(op, end) for op in OPERATORS):
                end += 1
            word.parts.append(("\0" + script[i:end], False))
            i = end
    if word is not None:
        tokens.append(word)
    return tokens


_PARAMETER = re.compile(r"\$(?:\{(\w+|@|#)\}|(\w+|@|#))")


class Shell:
    """One `sh -c` run: positional parameters, environment, filesystem and the programs on the PATH."""

    def __init__(self, fs: ContainerFS, env: dict[str, str], programs: dict[str, Program],
                 log: Callable[[str], None], arg0: str = "sh", params: list[str] | None = None,
                 named: bool = False) -> None:
        self.fs, self.env, self.log = fs, env, log
        self.programs = {**BUSYBOX, **programs}
        self.arg0, self.params, self.named = arg0, params or [], named
        self.line = 1

    def message(self, text: str) -> None:
        self.log(f"{self.arg0}: " + (f"line {self.line}: " if self.named else "") + text)

    def _expand(self, word: _Word) -> list[str]:
        """A word's fields: `"$@"` is one field per parameter; unquoted expansions split on blanks."""
        fields: list[str] = [""]
        for text, quoted in word.parts:
            if not text.startswith("\0"):
                fields[-1] += text
                continue
            text, last = text[1:], 0
            for found in _PARAMETER.finditer(text):
                fields[-1] += text[last:found.start()]
                last = found.end()
                name = found.group(1) or found.group(2)
                if name == "@":
                    values = list(self.params)
                    if not values:
                        continue
                    fields[-1] += values[0]
                    fields.extend(values[1:])
                    continue
                value = (str(len(self.params)) if name == "#" else self.arg0 if name == "0"
                         else (self.params[int(name) - 1] if int(name) <= len(self.params) else "")
                         if name.isdigit() else self.env.get(name, ""))
                if quoted:
                    fields[-1] += value
                else:
                    first, *rest = value.split() or [""]
                    fields[-1] += first
                    fields.extend(rest)
            fields[-1] += text[last:]
        return [f for f in fields if f] if not any(q for _, q in word.parts) else fields

    def run(self, script: str) -> int:
        try:
            tokens = _tokens(script)
        except (ShellSyntaxError, ValueError) as exc:
            self.message(f"syntax error: {exc}")
            return 2
        status, previous = 0, ";"
        command: list[str | _Word] = []
        for token in [*tokens, ";"]:
            if token not in ("&&", "||", ";", "\n"):
                command.append(token)
                continue
            # an and-or list runs a command after && only on success, after || only on failure
            if command and (previous in (";", "\n") or (previous == "&&") == (status == 0)):
                ran = self._simple(command)
                if ran is None:
                    return self.exit_status
                status = ran
            if command:
                previous = token
            command = []
            if token == "\n":
                self.line += 1
        return status

    def _simple(self, tokens: list[str | _Word]) -> int | None:
        """Run one simple command; None when it was `exit`."""
        argv: list[str] = []
        redirect: tuple[str, bool] | None = None
        it = iter(tokens)
        for token in it:
            if token in (">", ">>"):
                target = next(it, None)
                if not isinstance(target, _Word):
                    self.message("syntax error: unexpected newline")
                    return 2
                redirect = (self._expand(target)[0], token == ">>")
            else:
                argv += self._expand(token)
        out: list[str] = []
        if redirect:
            path, append = redirect
            try:
                self.fs.write(path, b"", append=True) if append else self.fs.write(path, b"")
            except OSError as exc:
                reason = "nonexistent directory" if exc.errno in (errno.ENOENT, errno.ENOTDIR) \
                    else musl_strerror(exc.errno)
                self.message(f"can't create {path}: {reason}")
                return 1
        if not argv:
            return 0
        name = argv[0]
        if name == "exit":
            self.exit_status = int(argv[1]) if len(argv) > 1 else 0
            return None
        program = self.programs.get(name) or self.programs.get(name.rsplit("/", 1)[-1]) \
            if name.startswith(("/bin/", "/usr/bin/")) or "/" not in name else None
        if program is None:
            self.message(f"{name}: not found")
            return 127
        stdout = out.append if redirect else (lambda text: [self.log(line) for line in text.splitlines()])
        status = program(Process(argv[1:], self.fs, self.env, stdout, self.log))
        if redirect:
            self.fs.write(redirect[0], "".join(out).encode(), append=True)
        return status


def run_argv(argv: list[str], fs: ContainerFS, env: dict[str, str], programs: dict[str, Program],
             log: Callable[[str], None]) -> int:
    """Run a container's argv (`command` + `args`): `/bin/sh -c SCRIPT [NAME [ARGS...]]` through the model, a
    known program directly; anything else cannot start (`exec: "X": executable file not found in $PATH`, 127)."""
    if argv[:2] in (["/bin/sh", "-c"], ["sh", "-c"]) and len(argv) >= 3:
        named = len(argv) > 3
        shell = Shell(fs, env, programs, log, arg0=argv[3] if named else "sh", params=argv[4:], named=named)
        return shell.run(argv[2])
    program = programs.get(argv[0]) or programs.get(argv[0].rsplit("/", 1)[-1]) if argv else None
    if program is None:
        log(f'exec: "{argv[0] if argv else ""}": executable file not found in $PATH')
        return 127
    return program(Process(argv[1:], fs, env, lambda text: [log(line) for line in text.splitlines()], log))
