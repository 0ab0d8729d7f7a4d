"""Benchmark `flows.package.package_context` against `tar -czf` on the same tree.

What it measures
----------------
1. Speed against the reference. A seeded, deterministic tree (default ~150 MB in
   6,000 files: compressible text-like files and incompressible random ones in
   nested folders, a Dockerfile, no .dockerignore) is archived by
   `tar -czf out.tar.gz -C tree .` (GNU tar piping into gzip -6) and by
   `package_context(tree, tree/"Dockerfile", outdir)`, alternately, ROUNDS times
   each after one untimed warm-up of each (the page cache cannot be dropped, so
   both run from a warm cache). The medians are compared:
   `package_vs_tar_ratio = median package_s / median tar_s`.

   Every package_context round runs in a fresh Python process, like tar, so no
   state (imports, thread pools, allocator arenas) carries over between rounds.
   `package_s` is timed inside that process around the package_context call
   only: the project's import (about 0.3-1 s) is left out, as a
   long-running pipeline pays it once, and tar has no comparable start-up cost.
   `package_wall_s` (process start to exit, imports included) and `import_s`
   are printed too, so the figure with imports is visible.

2. Excluded folders are skipped, not read. The same tree gets a .dockerignore
   excluding `node_modules`, a large folder (default ~300 MB) holding a FIFO and
   a mode-000 file. package_context is timed with and without that folder
   present (moved in and out by rename, alternating):
   `excluded_folder_ratio = median with / median without` (~1.0 when skipped).
   One extra untimed run traces every open/listdir/scandir/stat/lstat the
   packaging makes (audit hook plus os.stat/os.lstat wrappers) and counts those
   under the folder. `excluded_folder_walked: no` is printed only when that
   count is 0 and the run succeeded (a walk would have met the FIFO: packaging
   refuses special files, and opening it would block until the timeout). The
   mode-000 file only proves something for non-root users, as root reads it.

Everything is generated in a temporary folder that is removed at the end.
Output: one `name: value` line per figure. Run from the repository root:

    .venv/bin/python -m bench.package_bench [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SEED = 20241129
CHILD_TIMEOUT_S = 300
EXCLUDED_FOLDER = "node_modules"
DOCKERFILE_TEXT = b"FROM scratch\nCOPY . /app\n"


@dataclass(frozen=True)
class Size:
    tree_bytes: int
    tree_files: int
    excluded_bytes: int
    excluded_files: int


FULL = Size(tree_bytes=150 << 20, tree_files=6000, excluded_bytes=300 << 20, excluded_files=3000)
QUICK = Size(tree_bytes=20 << 20, tree_files=800, excluded_bytes=40 << 20, excluded_files=400)


# --------------------------------------------------------------------------- tree


def _text_corpus(rng: random.Random, size: int) -> bytes:
    """Source-code-like text (compresses ~3-4x with gzip -6), sliced into text files."""
    vocabulary = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz_", k=rng.randint(2, 12))) for _ in range(3000)
    ]
    symbols = ["=", "(", ")", ":", ",", ".", "+", "[", "]", "{", "}", "->", "#"]
    lines, total = [], 0
    while total < size:
        words = rng.choices(vocabulary, k=rng.randint(1, 12)) + rng.choices(symbols, k=rng.randint(0, 4))
        rng.shuffle(words)
        line = " " * (4 * rng.randint(0, 4)) + " ".join(words) + "\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


def _file_sizes(rng: random.Random, count: int, total: int) -> list[int]:
    """Long-tailed sizes (many small files, a few large ones) summing to about `total`."""
    raw = [rng.lognormvariate(0, 1.6) for _ in range(count)]
    scale = total / sum(raw)
    return [max(1, int(r * scale)) for r in raw]


def _folders(rng: random.Random, root: Path, count: int, max_depth: int = 5) -> list[Path]:
    folders = [root]
    for index in range(count):
        parent = rng.choice(folders)
        if len(parent.relative_to(root).parts) >= max_depth:
            parent = root
        folders.append(parent / f"dir{index:03d}")
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    return folders


def _write_files(rng: random.Random, folders: list[Path], files: int, total: int, corpus: bytes) -> int:
    """Write `files` files (60 % text-like, 40 % random); return the compressible byte count."""
    compressible = 0
    for index, length in enumerate(_file_sizes(rng, files, total)):
        folder = rng.choice(folders)
        if rng.random() < 0.6:
            start = rng.randrange(len(corpus))
            data = (corpus[start:] + corpus * (1 + length // len(corpus)))[:length]
            path = folder / f"file{index:05d}{rng.choice(['.py', '.txt', '.json', '.md'])}"
            compressible += length
        else:
            data = rng.randbytes(length)
            path = folder / f"blob{index:05d}{rng.choice(['.bin', '.png', '.gz', '.so'])}"
        path.write_bytes(data)
        if rng.random() < 0.02:
            path.chmod(0o755)
    return compressible


def make_tree(root: Path, size: Size) -> dict[str, float]:
    """The benchmark context: nested folders, mixed files, a Dockerfile, a symlink, no .dockerignore."""
    rng = random.Random(SEED)
    corpus = _text_corpus(rng, 1 << 20)
    folders = _folders(rng, root, max(10, size.tree_files // 20))
    compressible = _write_files(rng, folders, size.tree_files - 2, size.tree_bytes, corpus)
    (root / "Dockerfile").write_bytes(DOCKERFILE_TEXT)
    os.symlink("Dockerfile", root / "Dockerfile.link")
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    return {"bytes": total, "files": sum(1 for p in root.rglob("*") if not p.is_dir()),
            "compressible_share": compressible / total}


def make_excluded_folder(folder: Path, size: Size) -> None:
    """A large folder of random files (node_modules-like nesting) plus a FIFO and a mode-000 file."""
    rng = random.Random(SEED + 1)
    folders = _folders(rng, folder, max(5, size.excluded_files // 15), max_depth=6)
    _write_files(rng, folders, size.excluded_files, size.excluded_bytes, b"x")
    os.mkfifo(folder / "walk-trap.fifo")
    secret = folder / "walk-trap.mode000"
    secret.write_bytes(b"unreadable\n")
    secret.chmod(0o000)


# --------------------------------------------------------------------------- runs


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_tar(tree: Path, out_dir: Path) -> dict[str, float]:
    """`tar -czf` in a fresh process; wall and CPU seconds (gzip's CPU included)."""
    archive = out_dir / "out.tar.gz"
    cpu_before, start = _children_cpu_s(), time.perf_counter()
    subprocess.run(["tar", "-czf", str(archive), "-C", str(tree), "."], check=True,
                   timeout=CHILD_TIMEOUT_S)
    seconds = time.perf_counter() - start
    result = {"s": seconds, "cpu_s": _children_cpu_s() - cpu_before, "archive_bytes": archive.stat().st_size}
    archive.unlink()
    return result


def run_package(tree: Path, out_dir: Path, *, trace: str | None = None) -> dict:
    """package_context in a fresh Python process; its own timings plus the process wall time."""
    command = [sys.executable, "-m", "bench.package_bench", "--child", str(tree), str(out_dir)]
    if trace is not None:
        command += ["--trace", trace]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"ok": False, "error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(ok=True, wall_s=wall)
    for archive in out_dir.glob("*.tar.gz"):
        archive.unlink()
    return result


def child_main(tree: Path, out_dir: Path, trace: str | None) -> None:
    """Inside the fresh process: import, optionally start tracing, package, report JSON."""
    start = time.perf_counter()
    from flows.package import package_context
    import_s = time.perf_counter() - start
    touched = _start_tracing(str(tree / trace)) if trace else []

    cpu_before, start = time.process_time(), time.perf_counter()
    packaged = package_context(tree, tree / "Dockerfile", out_dir)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu_before
    print(json.dumps({"s": seconds, "cpu_s": cpu, "import_s": import_s, "archive_bytes": packaged.bytes,
                      "files": packaged.files, "touched": sorted(set(touched))[:20],
                      "touched_count": len(touched)}))


def _start_tracing(folder: str) -> list[str]:
    """Record every path under `folder` that is opened, listed or stat'ed from now on."""
    touched: list[str] = []
    prefix = os.path.abspath(folder) + os.sep

    def note(path) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(path))
            if path.startswith(prefix):
                touched.append(path)

    def audit(event: str, args: tuple) -> None:
        if event in ("open", "os.listdir", "os.scandir") and args:
            note(args[0])

    def wrap(function):
        def traced(path, *args, **kwargs):
            note(path)
            return function(path, *args, **kwargs)
        return traced

    sys.addaudithook(audit)
    os.stat, os.lstat = wrap(os.stat), wrap(os.lstat)
    return touched


# --------------------------------------------------------------------------- scenarios


def compare_with_tar(tree: Path, out_dir: Path, rounds: int) -> dict[str, list[dict]]:
    """Warm the cache with one untimed run of each, then alternate tar and package."""
    run_tar(tree, out_dir)
    _require_ok(run_package(tree, out_dir))
    results: dict[str, list[dict]] = {"tar": [], "package": []}
    for _ in range(rounds):
        results["tar"].append(run_tar(tree, out_dir))
        results["package"].append(_require_ok(run_package(tree, out_dir)))
    return results


def compare_excluded_folder(tree: Path, parked: Path, out_dir: Path, rounds: int) -> dict:
    """Alternate package runs without and with the excluded folder, then one traced run."""
    (tree / ".dockerignore").write_text(f"{EXCLUDED_FOLDER}\n")
    present = tree / EXCLUDED_FOLDER
    _require_ok(run_package(tree, out_dir))  # warm-up: cache holds the tree plus .dockerignore
    without, with_folder = [], []
    for _ in range(rounds):
        without.append(_require_ok(run_package(tree, out_dir)))
        parked.rename(present)
        with_folder.append(_require_ok(run_package(tree, out_dir)))
        present.rename(parked)
    parked.rename(present)
    traced = run_package(tree, out_dir, trace=EXCLUDED_FOLDER)
    present.rename(parked)
    return {"without": without, "with": with_folder, "traced": traced}


def _require_ok(result: dict) -> dict:
    if not result["ok"]:
        raise SystemExit(f"package_context failed: {result['error']}")
    return result


def _median(results: list[dict], key: str) -> float:
    return statistics.median(result[key] for result in results)


# --------------------------------------------------------------------------- report


def report(tree_info: dict, speed: dict, excluded: dict, excluded_bytes: int) -> None:
    tar, package = speed["tar"], speed["package"]
    tar_s, package_s = _median(tar, "s"), _median(package, "s")
    traced = excluded["traced"]
    walked = "no" if traced["ok"] and traced["touched_count"] == 0 else "yes"
    figures = {
        "tree_mb": f"{tree_info['bytes'] / 1e6:.1f}",
        "tree_files": tree_info["files"],
        "tree_compressible_share": f"{tree_info['compressible_share']:.2f}",
        "rounds": len(tar),
        "tar_s": f"{tar_s:.2f}",
        "tar_s_all": " ".join(f"{r['s']:.2f}" for r in tar),
        "tar_cpu_s": f"{_median(tar, 'cpu_s'):.2f}",
        "tar_archive_mb": f"{_median(tar, 'archive_bytes') / 1e6:.1f}",
        "package_s": f"{package_s:.2f}",
        "package_s_all": " ".join(f"{r['s']:.2f}" for r in package),
        "package_cpu_s": f"{_median(package, 'cpu_s'):.2f}",
        "package_archive_mb": f"{_median(package, 'archive_bytes') / 1e6:.1f}",
        "package_wall_s": f"{_median(package, 'wall_s'):.2f}",
        "import_s": f"{_median(package, 'import_s'):.2f}",
        "package_vs_tar_ratio": f"{package_s / tar_s:.2f}",
        "package_wall_vs_tar_ratio": f"{_median(package, 'wall_s') / tar_s:.2f}",
        "excluded_folder_mb": f"{excluded_bytes / 1e6:.1f}",
        "package_without_folder_s": f"{_median(excluded['without'], 's'):.2f}",
        "package_with_folder_s": f"{_median(excluded['with'], 's'):.2f}",
        "package_without_folder_s_all": " ".join(f"{r['s']:.2f}" for r in excluded["without"]),
        "package_with_folder_s_all": " ".join(f"{r['s']:.2f}" for r in excluded["with"]),
        "excluded_folder_ratio": f"{_median(excluded['with'], 's') / _median(excluded['without'], 's'):.2f}",
        "excluded_folder_paths_touched": traced.get("touched_count", "n/a (run failed)"),
        "excluded_folder_walked": walked,
    }
    for name, value in figures.items():
        print(f"{name}: {value}", flush=True)
    if walked == "yes":
        detail = traced.get("touched") or traced.get("error")
        print(f"excluded_folder_walked_detail: {detail}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small tree, for a fast sanity run")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each (default 3)")
    parser.add_argument("--child", nargs=2, metavar=("TREE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--trace", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(Path(args.child[0]), Path(args.child[1]), args.trace)
        return

    size = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="package-bench-"))
    try:
        tree, out_dir, parked = work / "tree", work / "out", work / "parked"
        tree.mkdir()
        out_dir.mkdir()
        tree_info = make_tree(tree, size)
        make_excluded_folder(parked, size)
        speed = compare_with_tar(tree, out_dir, args.rounds)
        excluded = compare_excluded_folder(tree, parked, out_dir, args.rounds)
        report(tree_info, speed, excluded, _folder_bytes(parked))
    finally:
        _make_removable(work)
        shutil.rmtree(work, ignore_errors=True)


def _folder_bytes(folder: Path) -> int:
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _make_removable(work: Path) -> None:
    """rmtree needs the mode-000 file's folder writable, which it is; restore the file for non-root."""
    for trap in work.rglob("walk-trap.mode000"):
        trap.chmod(0o600)


if __name__ == "__main__":
    main()
