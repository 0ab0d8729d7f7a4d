"""The context the packager sends, against BuildKit's own rules for a local context.

Every row is ported from the upstream projects' tests, at the versions moby/buildkit
v0.31.2 vendors, or from issue 14 (the trees a team moving from `docker buildx build`
tried), and names its source. Each builds real files in tmp_path, writes the ignore
file, runs the real `package_context` and reads the archive it wrote.

Sources:
- PM: moby/patternmatcher patternmatcher_test.go (v0.6.1), `TestMatches` (table and
  multiPatternTests, run there through MatchesUsingParentResults) and `matchTests`
  (Go's filepath.Match table, run there through `Matches`), plus the named tests.
- IF: moby/patternmatcher ignorefile/ignorefile_test.go (v0.6.1) `TestReadAll`.
- FS: tonistiigi/fsutil filter_test.go (30cd4fc5d911, buildkit-v0.31).
- UI: moby/buildkit frontend/dockerui/config.go (v0.31.2).
- I14: issue 14.

Rows of TestMatches whose text ends in `/` (`file/`, `/`) name no path a walk can
meet and are left out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from flows.package import ARCHIVE_CONTEXT_DIR, PackagingError, package_context

DOCKERFILE_TEXT = "FROM scratch\nCOPY . /app\n"


def write(root: Path, relpath: str, content: str | bytes = "x\n") -> Path:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def packaged(tmp_path: Path, files: list[str], ignore: str | bytes | None, *,
             ignore_name: str = ".dockerignore", dockerfile: str | None = None) -> set[str]:
    """Paths under context/ in the archive of a context holding `files` and the ignore file."""
    ctx = tmp_path / "ctx"
    ctx.mkdir(exist_ok=True)
    for relpath in files:
        if relpath.endswith("/"):
            (ctx / relpath).mkdir(parents=True, exist_ok=True)
        else:
            write(ctx, relpath)
    if ignore is not None:
        write(ctx, ignore_name, ignore)
    dockerfile_path = ctx / dockerfile if dockerfile else write(tmp_path, "Dockerfile", DOCKERFILE_TEXT)
    if dockerfile:
        write(ctx, dockerfile, DOCKERFILE_TEXT)
    result = package_context(ctx, dockerfile_path, tmp_path / "out")
    prefix = ARCHIVE_CONTEXT_DIR + "/"
    with tarfile.open(result.path, "r:gz") as tar:
        return {name[len(prefix):] for name in tar.getnames() if name.startswith(prefix)}


# --- one pattern, one path: excluded or not --------------------------------------------

# (source, pattern, path, excluded)
SINGLE = [
    ("PM TestWildcardMatches", "*", "fileutils.go", True),
    ("PM TestPatternMatches", "*.go", "fileutils.go", True),
    ("PM TestMatches", "**", "file", True),
    ("PM TestMatches", "**/", "file", True),
    ("PM TestMatches", "**", "dir/file", True),
    ("PM TestMatches", "**/", "dir/file", True),
    ("PM TestMatches", "**/**", "dir/file", True),
    ("PM TestMatches", "dir/**", "dir/file", True),
    ("PM TestMatches", "dir/**", "dir/dir2/file", True),
    ("PM TestMatches", "**/dir", "dir", True),
    ("PM TestMatches", "**/dir", "dir/file", True),
    ("PM TestMatches", "**/dir2/*", "dir/dir2/file", True),
    ("PM TestMatches", "**/dir2/**", "dir/dir2/dir3/file", True),
    ("PM TestMatches", "**file", "file", True),
    ("PM TestMatches", "**file", "dir/file", True),
    ("PM TestMatches", "**/file", "dir/file", True),
    ("PM TestMatches", "**file", "dir/dir/file", True),
    ("PM TestMatches", "**/file", "dir/dir/file", True),
    ("PM TestMatches", "**/file*", "dir/dir/file", True),
    ("PM TestMatches", "**/file*", "dir/dir/file.txt", True),
    ("PM TestMatches", "**/file*txt", "dir/dir/file.txt", True),
    ("PM TestMatches", "**/file*.txt", "dir/dir/file.txt", True),
    ("PM TestMatches", "**/file*.txt*", "dir/dir/file.txt", True),
    ("PM TestMatches", "**/**/*.txt", "dir/dir/file.txt", True),
    ("PM TestMatches", "**/**/*.txt2", "dir/dir/file.txt", False),
    ("PM TestMatches", "**/*.txt", "file.txt", True),
    ("PM TestMatches", "**/**/*.txt", "file.txt", True),
    ("PM TestMatches", "a**/*.txt", "a/file.txt", True),
    ("PM TestMatches", "a**/*.txt", "a/dir/file.txt", True),
    ("PM TestMatches", "a**/*.txt", "a/dir/dir/file.txt", True),
    ("PM TestMatches", "a/*.txt", "a/dir/file.txt", False),
    ("PM TestMatches", "a/*.txt", "a/file.txt", True),
    ("PM TestMatches", "a/*.txt**", "a/file.txt", True),
    ("PM TestMatches", "a[b-d]e", "ae", False),
    ("PM TestMatches", "a[b-d]e", "ace", True),
    ("PM TestMatches", "a[b-d]e", "aae", False),
    ("PM TestMatches", "a[^b-d]e", "aze", True),
    ("PM TestMatches", ".*", ".foo", True),
    ("PM TestMatches", ".*", "foo", False),
    ("PM TestMatches", "abc.def", "abcdef", False),
    ("PM TestMatches", "abc.def", "abc.def", True),
    ("PM TestMatches", "abc.def", "abcZdef", False),
    ("PM TestMatches", "abc?def", "abcZdef", True),
    ("PM TestMatches", "abc?def", "abcdef", False),
    ("PM TestMatches", "a\\\\", "a\\", True),
    ("PM TestMatches", "**/foo/bar", "foo/bar", True),
    ("PM TestMatches", "**/foo/bar", "dir/foo/bar", True),
    ("PM TestMatches", "**/foo/bar", "dir/dir2/foo/bar", True),
    ("PM TestMatches", "abc/**", "abc", False),
    ("PM TestMatches", "abc/**", "abc/def", True),
    ("PM TestMatches", "abc/**", "abc/def/ghi", True),
    ("PM TestMatches", "**/.foo", ".foo", True),
    ("PM TestMatches", "**/.foo", "bar.foo", False),
    ("PM TestMatches", "a(b)c/def", "a(b)c/def", True),
    ("PM TestMatches", "a(b)c/def", "a(b)c/xyz", False),
    ("PM TestMatches", "a.|)$(}+{bc", "a.|)$(}+{bc", True),
    ("PM TestMatches", "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
     "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", True),
    ("PM TestMatches", "dist/*.whl", "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", True),
    ("PM TestMatches (not windows)", "a\\*b", "a*b", True),
    ("PM matchTests", "abc", "abc", True),
    ("PM matchTests", "*", "abc", True),
    ("PM matchTests", "*c", "abc", True),
    ("PM matchTests", "a*", "a", True),
    ("PM matchTests", "a*", "abc", True),
    ("PM matchTests", "a*", "ab/c", True),
    ("PM matchTests", "a*/b", "abc/b", True),
    ("PM matchTests", "a*/b", "a/c/b", False),
    ("PM matchTests", "a*b*c*d*e*/f", "axbxcxdxe/f", True),
    ("PM matchTests", "a*b*c*d*e*/f", "axbxcxdxexxx/f", True),
    ("PM matchTests", "a*b*c*d*e*/f", "axbxcxdxe/xxx/f", False),
    ("PM matchTests", "a*b*c*d*e*/f", "axbxcxdxexxx/fff", False),
    ("PM matchTests", "a*b?c*x", "abxbbxdbxebxczzx", True),
    ("PM matchTests", "a*b?c*x", "abxbbxdbxebxczzy", False),
    ("PM matchTests", "ab[c]", "abc", True),
    ("PM matchTests", "ab[b-d]", "abc", True),
    ("PM matchTests", "ab[e-g]", "abc", False),
    ("PM matchTests", "ab[^c]", "abc", False),
    ("PM matchTests", "ab[^b-d]", "abc", False),
    ("PM matchTests", "ab[^e-g]", "abc", True),
    ("PM matchTests", "a\\*b", "ab", False),
    ("PM matchTests", "a?b", "a☺b", True),
    ("PM matchTests", "a[^a]b", "a☺b", True),
    ("PM matchTests", "a???b", "a☺b", False),
    ("PM matchTests", "a[^a][^a][^a]b", "a☺b", False),
    ("PM matchTests", "[a-ζ]*", "α", True),
    ("PM matchTests", "*[a-ζ]", "A", False),
    ("PM matchTests", "a?b", "a/b", False),
    ("PM matchTests", "a*b", "a/b", False),
    ("PM matchTests", "[\\]a]", "]", True),
    ("PM matchTests", "[\\-]", "-", True),
    ("PM matchTests", "[x\\-]", "x", True),
    ("PM matchTests", "[x\\-]", "-", True),
    ("PM matchTests", "[x\\-]", "z", False),
    ("PM matchTests", "[\\-x]", "x", True),
    ("PM matchTests", "[\\-x]", "-", True),
    ("PM matchTests", "[\\-x]", "a", False),
    ("PM matchTests", "*x", "xxx", True),
    # issue 14: Go's syntax, case, ** without a slash, .. cleaned
    ("I14 **.log", "**.log", "app.log", True),
    ("I14 **.log", "**.log", "x/y/z.log", True),
    ("I14 case-sensitive", "*.LOG", "a.log", False),
    ("I14 case-sensitive", "*.LOG", "A.LOG", True),
    ("I14 [^x] negates", "[^x].txt", "a.txt", True),
    ("I14 [^x] negates", "[^x].txt", "x.txt", False),
    ("I14 [!x] does not negate", "[!x].txt", "a.txt", False),
    ("I14 [!x] does not negate", "[!x].txt", "x.txt", True),
    ("I14 [!x] does not negate", "[!x].txt", "!.txt", True),
    ("I14 backslash escape", "a\\*b.txt", "a*b.txt", True),
    ("I14 backslash escape", "a\\*b.txt", "axb.txt", False),
    ("I14 .. cleaned (path.Clean)", "docs/../secret.env", "secret.env", True),
    ("I14 .. cleaned (path.Clean)", "/../secret.env", "secret.env", True),
    ("I14 .. cleaned (path.Clean)", "../secret.env", "secret.env", False),
    ("I14 leading slash", "/app/*.pyc", "app/x.pyc", True),
    ("I14 trailing slash", "build/", "build/out.bin", True),
    # RE2 meaning of what patternmatcher writes into its regexp (golang/go regexp/syntax)
    ("PM compile: [ ] copied into RE2, POSIX class", "[[:digit:]].txt", "7.txt", True),
    ("PM compile: [ ] copied into RE2, POSIX class", "[[:digit:]].txt", "a.txt", False),
    ("PM compile: ^ not escaped, an RE2 anchor", "a^b*", "a^bc", False),
    ("PM compile: ^ literal in an exact pattern", "a^b", "a^b", True),
    ("PM compile: $ escaped", "a$*", "a$b", True),
    ("PM compile: * inside [ ] is written as [^/]*, so [*] is no class of *", "[*]", "*", False),
    ("PM compile: \\d reaches RE2, a digit class", "a\\d*", "a7b", True),
    ("PM compile: \\d reaches RE2, a digit class", "a\\d*", "axb", False),
    ("PM compile: \\101 reaches RE2, octal for A", "a\\101*", "aAx", True),
]


@pytest.mark.parametrize(("source", "pattern", "path", "excluded"), SINGLE,
                         ids=[f"{r[0]}: {r[1]!r} {r[2]!r}" for r in SINGLE])
def test_one_pattern_one_path(tmp_path, source, pattern, path, excluded):
    paths = packaged(tmp_path, [path, "_/0.bin"], pattern + "\n")
    assert (path not in paths) is excluded
    assert "_/0.bin" in paths or pattern in {"*", "**", "**/", "**/**"}


# --- several patterns --------------------------------------------------------------------

# (source, ignore-file lines, files, kept, dropped)
MULTI = [
    ("PM TestExclusionPatternMatchesPatternBefore", ["!fileutils.go", "*.go"], ["fileutils.go"], [], ["fileutils.go"]),
    ("PM TestPatternMatchesFolderExclusions", ["docs", "!docs/README.md"],
     ["docs/README.md", "docs/other.md"], ["docs", "docs/README.md"], ["docs/other.md"]),
    ("PM TestPatternMatchesFolderWithSlashExclusions", ["docs/", "!docs/README.md"],
     ["docs/README.md", "docs/other.md"], ["docs/README.md"], ["docs/other.md"]),
    ("PM TestPatternMatchesFolderWildcardExclusions", ["docs/*", "!docs/README.md"],
     ["docs/README.md", "docs/other.md"], ["docs/README.md"], ["docs/other.md"]),
    ("PM TestExclusionPatternMatchesPatternAfter", ["*.go", "!fileutils.go"],
     ["fileutils.go", "main.go"], ["fileutils.go"], ["main.go"]),
    ("PM TestMatches multi", ["**", "!util/docker/web"], ["util/docker/web/foo", "util/other"],
     ["util", "util/docker", "util/docker/web", "util/docker/web/foo"], ["util/other"]),
    ("PM TestMatches multi", ["**", "!util/docker/web", "util/docker/web/foo"],
     ["util/docker/web/foo", "util/docker/web/bar"], ["util/docker/web/bar"], ["util/docker/web/foo"]),
    ("PM TestMatches multi", ["**", "!dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl"],
     ["dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", "dist/x.whl"],
     ["dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl"], ["dist/x.whl"]),
    ("PM TestMatches multi", ["**", "!dist/*.whl"], ["dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                                                   "dist/x.tar.gz"],
     ["dist", "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl"], ["dist/x.tar.gz"]),
    ("PM TestCleanPatternsLeadingSpaceTrimmed", ["docs", "  !docs/README.md"], ["docs/README.md", "docs/a"],
     ["docs/README.md"], ["docs/a"]),
    ("PM TestCleanPatternsTrailingSpaceTrimmed", ["docs", "!docs/README.md  "], ["docs/README.md", "docs/a"],
     ["docs/README.md"], ["docs/a"]),
    ("IF TestReadAll", ["test1", "/test2", "/a/file/here", "", "lastfile", "# this is a comment",
                        "! /inverted/abs/path"],
     ["test1", "test2", "a/file/here", "a/file/there", "lastfile", "# this is a comment", "inverted/abs/path"],
     ["a/file/there", "# this is a comment", "inverted/abs/path"], ["test1", "test2", "a/file/here", "lastfile"]),
    ("FS TestWalkerExclude", ["foo*", "!foo/bar2"], ["bar", "foo/bar2", "foo2", "foo/other"],
     ["bar", "foo", "foo/bar2"], ["foo2", "foo/other"]),
    ("FS TestFSWalkNested", ["foo", "!foo/bar"], ["foo/bar"], ["foo", "foo/bar"], []),
    ("FS TestFSWalkNested (an exception alone excludes nothing)", ["!foo/bar"], ["foo/bar", "foo/baz"],
     ["foo/bar", "foo/baz"], []),
    ("FS TestWalkerPermissionDenied (the tree as root reads it)", ["**/bar", "!foo/bar/baz"], ["foo/bar/"],
     ["foo"], ["foo/bar"]),
    ("I14 allow-list", ["**", "!src/**/*.py", "src/**/test_*.py"],
     ["README.md", "src/pkg/b.py", "src/a.py", "src/pkg/test_b.py", "src/pkg/data.json"],
     ["src", "src/pkg", "src/pkg/b.py", "src/a.py"], ["README.md", "src/pkg/test_b.py", "src/pkg/data.json"]),
    ("I14 re-include through a wildcard", ["cache", "!*/keep.me"], ["cache/keep.me", "cache/junk", "app.py"],
     ["cache", "cache/keep.me", "app.py"], ["cache/junk"]),
    ("I14 **/target with one exception", ["**/target", "!lib/app/target/keep.txt"],
     ["lib/app/target/junk.bin", "lib/app/target/keep.txt", "target/x", "lib/app/src.rs"],
     ["lib/app/target/keep.txt", "lib/app/src.rs"], ["lib/app/target/junk.bin", "target/x", "target"]),
    ("I14 # comments in the first column only", ["#keep", "  #drop", "# also a comment"],
     ["#keep", "#drop"], ["#keep"], ["#drop"]),
    ("I14 last match wins", ["build", "!build/keep", "build/keep/other.txt"],
     ["build/keep/important.txt", "build/keep/other.txt", "build/out.bin"],
     ["build/keep/important.txt"], ["build/keep/other.txt", "build/out.bin"]),
    (".dockerignore follows its own patterns", [".dockerignore", "secret.env"], ["secret.env", "app.py"],
     ["app.py"], [".dockerignore", "secret.env"]),
]


@pytest.mark.parametrize(("source", "lines", "files", "kept", "dropped"), MULTI,
                         ids=[f"{r[0]}: {' | '.join(r[1])}" for r in MULTI])
def test_several_patterns(tmp_path, source, lines, files, kept, dropped):
    paths = packaged(tmp_path, files, "\n".join(lines) + "\n")
    assert set(kept) <= paths
    assert not set(dropped) & paths


def test_parents_of_kept_paths_are_sent_and_no_other_excluded_folder_is(tmp_path):
    """FS filterFS.Walk: an excluded directory is sent only before a kept path below it."""
    paths = packaged(tmp_path, ["a/b/c/keep.txt", "a/b/drop.txt", "a/empty/", "z.txt"],
                     "a\n!a/b/c/keep.txt\n")
    assert paths == {"a", "a/b", "a/b/c", "a/b/c/keep.txt", "z.txt", ".dockerignore"}


# --- how the file is read ---------------------------------------------------------------


@pytest.mark.parametrize(("source", "content", "kept", "dropped"), [
    ("IF ReadAll: a UTF-8 BOM is stripped", b"\xef\xbb\xbfsecret.env\n", ["app.py"], ["secret.env"]),
    ("IF ReadAll (bufio.ScanLines): CRLF line ends", b"secret.env\r\napp.log\r\n", ["app.py"],
     ["secret.env", "app.log"]),
    ("IF ReadAll: no newline at the end", b"app.py\nsecret.env", [], ["secret.env", "app.py"]),
    ("IF ReadAll (bufio.ScanLines): only \\n ends a line, \\v is trimmed", b"secret.env\x0bapp.log\n",
     ["app.log", "secret.env"], ["secret.env\x0bapp.log"]),
])
def test_ignore_file_bytes(tmp_path, source, content, kept, dropped):
    paths = packaged(tmp_path, ["secret.env", "app.py", "app.log", "secret.env\x0bapp.log"], content)
    assert set(kept) <= paths
    assert not set(dropped) & paths


@pytest.mark.parametrize(("source", "lines", "line", "reason"), [
    ("PM TestSingleExclamationError / FS TestInvalidExcludePatterns", ["app.py", "!"], 2,
     'illegal exclusion pattern: "!"'),
    ("IF TestReadAll ('! ' is '!')", ["app.py", "", "! "], 3, 'illegal exclusion pattern: "!"'),
    ("PM TestMatchesWithMalformedPatterns", ["["], 1, "syntax error in pattern"),
    ("PM matchTests", ["[]a]"], 1, "syntax error in pattern"),
    ("PM matchTests", ["[-]"], 1, "syntax error in pattern"),
    ("PM matchTests", ["[x-]"], 1, "syntax error in pattern"),
    ("PM matchTests", ["[-x]"], 1, "syntax error in pattern"),
    ("PM matchTests", ["\\"], 1, "syntax error in pattern"),
    ("PM matchTests", ["[a-b-c]"], 1, "syntax error in pattern"),
    ("PM matchTests", ["[^"], 1, "syntax error in pattern"),
    ("PM matchTests", ["[^bc"], 1, "syntax error in pattern"),
    ("PM matchTests", ["a["], 1, "syntax error in pattern"),
    ("PM compile: RE2 refuses the range", ["ok", "[z-a]"], 2, "syntax error in pattern"),
    ("PM compile: RE2 refuses the escape", ["a\\q"], 1, "syntax error in pattern"),
    ("PM compile: RE2 refuses \\C", ["a\\C*"], 1, "syntax error in pattern"),
    ("PM compile: RE2 refuses a lone \\1 (backreference)", ["a\\1*"], 1, "syntax error in pattern"),
    ("PM compile: Unicode classes are not ported, so refused", ["a\\p{Greek}*"], 1, "not supported by the packager"),
])
def test_a_bad_pattern_is_named_before_anything_is_written(tmp_path, source, lines, line, reason):
    with pytest.raises(PackagingError) as raised:
        packaged(tmp_path, ["app.py"], "\n".join(lines) + "\n")
    message = str(raised.value)
    assert ".dockerignore" in message and f"line {line}:" in message and reason in message
    assert not (tmp_path / "out").exists()


def test_a_line_longer_than_bufio_allows_is_refused(tmp_path):
    """IF ReadAll uses bufio.Scanner, whose lines stop at bufio.MaxScanTokenSize (64 KiB)."""
    with pytest.raises(PackagingError, match=r"\.dockerignore: line 2: .*token too long"):
        packaged(tmp_path, ["app.py"], "ok\n" + "a" * (64 * 1024) + "\n")


# --- which ignore file ------------------------------------------------------------------


def test_dockerfile_specific_ignore_file_replaces_the_context_one(tmp_path):
    """UI ReadEntrypoint: `<Dockerfile>.dockerignore` next to the Dockerfile wins over .dockerignore."""
    ctx = tmp_path / "ctx"
    write(ctx, ".dockerignore", "docs\n")
    write(ctx, "api.Dockerfile.dockerignore", "secret.env\n")
    paths = packaged(tmp_path, ["docs/a.md", "secret.env", "app.py"], None, dockerfile="api.Dockerfile")
    assert {"docs/a.md", "app.py", ".dockerignore"} <= paths
    assert "secret.env" not in paths


def test_an_empty_dockerfile_specific_ignore_file_still_wins(tmp_path):
    """UI: BuildKit's in-process frontend reads the empty file as a non-nil slice, so .dockerignore is not read."""
    ctx = tmp_path / "ctx"
    write(ctx, ".dockerignore", "docs\n")
    paths = packaged(tmp_path, ["docs/a.md", "app.py"], "", ignore_name="Dockerfile.dockerignore",
                     dockerfile="Dockerfile")
    assert "docs/a.md" in paths


def test_dockerfile_outside_the_context_brings_its_ignore_file(tmp_path):
    ctx = tmp_path / "ctx"
    write(ctx, "secret.env")
    write(ctx, "app.py")
    write(ctx, ".dockerignore", "app.py\n")
    dockerfile = write(tmp_path / "docker", "web.Dockerfile", DOCKERFILE_TEXT)
    write(tmp_path / "docker", "web.Dockerfile.dockerignore", "secret.env\n")
    result = package_context(ctx, dockerfile, tmp_path / "out")
    with tarfile.open(result.path, "r:gz") as tar:
        names = set(tar.getnames())
    assert "context/app.py" in names and "context/secret.env" not in names


# --- which folders are read -------------------------------------------------------------


def test_excluded_folder_is_read_when_a_wildcard_exception_could_reach_into_it(tmp_path):
    """FS NewFilterFS: a `!` pattern with a wildcard turns the skip off, so `run/keep.me` is found.

    The FIFO beside it is read as a directory entry only and left out; it is never opened.
    """
    ctx = tmp_path / "ctx"
    write(ctx, "run/keep.me")
    os.mkfifo(ctx / "run" / "events.fifo")
    paths = packaged(tmp_path, ["app.py"], "run\n!*/keep.me\n")
    assert paths == {"app.py", ".dockerignore", "run", "run/keep.me"}


def test_excluded_folder_no_exception_can_reach_is_not_read(tmp_path):
    """FS filterFS.Walk returns SkipDir: a FIFO inside would otherwise be refused as a special file."""
    ctx = tmp_path / "ctx"
    (ctx / "node_modules").mkdir(parents=True)
    os.mkfifo(ctx / "node_modules" / "events.fifo")
    paths = packaged(tmp_path, ["app.py", "lib/x.py"], "node_modules\n!lib/x.py\n")
    assert paths == {"app.py", "lib", "lib/x.py", ".dockerignore"}


def reads_unreadable_folders() -> bool:
    """Whether this process reads a mode-000 folder: root does, through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH."""
    folder = Path(tempfile.mkdtemp()) / "locked"
    folder.mkdir(mode=0)
    try:
        os.listdir(folder)
        return True
    except PermissionError:
        return False
    finally:
        folder.chmod(0o700)
        shutil.rmtree(folder.parent)


READS_UNREADABLE = reads_unreadable_folders()
DROP_DAC_CAPABILITIES = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
                         "--inh-caps", "-dac_override,-dac_read_search"]


@pytest.mark.skipif(READS_UNREADABLE, reason="this process reads a mode-000 folder (as upstream skips it for root); "
                    "test_unreadable_folder_rows_without_root_s_file_capabilities runs these rows")
@pytest.mark.parametrize(("lines", "error"), [
    (["**/bar"], False),
    (["**/bar", "!foo/bar/baz"], False),
    (["**/bar", "!foo/bar"], True),
])
def test_unreadable_folder(tmp_path, lines, error):
    """FS TestWalkerPermissionDenied: an unreadable folder fails the walk unless it is excluded."""
    ctx = tmp_path / "ctx"
    (ctx / "foo" / "bar").mkdir(parents=True)
    (ctx / "foo" / "bar").chmod(0)
    try:
        if error:
            with pytest.raises(PackagingError, match="Permission denied"):
                packaged(tmp_path, [], "\n".join(lines) + "\n")
        else:
            assert packaged(tmp_path, [], "\n".join(lines) + "\n") == {"foo", ".dockerignore"}
    finally:
        (ctx / "foo" / "bar").chmod(0o700)


@pytest.mark.skipif(not READS_UNREADABLE or shutil.which("setpriv") is None,
                    reason="test_unreadable_folder runs itself, or setpriv (util-linux) is missing")
def test_unreadable_folder_rows_without_root_s_file_capabilities():
    """CI runs as root, which reads any folder: run the permission rows again in a process whose capability bounding
    set lacks CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so a mode-000 folder is unreadable as for any user."""
    rows = subprocess.run([*DROP_DAC_CAPABILITIES, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "no:xdist", f"{__file__}::test_unreadable_folder"],
                          capture_output=True, text=True, timeout=300)
    assert rows.returncode == 0 and "3 passed" in rows.stdout, rows.stdout + rows.stderr
