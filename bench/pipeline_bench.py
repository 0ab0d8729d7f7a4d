"""Benchmark the whole flow on the sandbox: critical path, parallel speed-up, an unchanged rerun, 50 components.

What it measures
----------------
Every run is the real `build-and-deploy` flow in its own process
(`bench/run_flow.py`) against a real Prefect server on SQLite, moto, the
Kubernetes emulator, the simulated BuildKit pod and the real helm binary, all on
127.0.0.1. Wall times are taken inside that process around the flow call, so
Python's start-up is left out; peak RSS is that process's (`wait4`).

1. The example app with three components: weather-mcp, and weather-agent and
   travel-agent whose releases deploy after it. Simulated build times are the
   measured EKS figures divided by 20 (58, 134, 139 s -> 2.9, 6.7, 6.95 s; how long
   the simulated build pod runs, its own download, checks and push included). The
   apps run as local processes (sandbox/apps) and a pod is Ready when its
   readiness probe passes; the ideal counts 1 s for a rollout, about what a
   small Python service takes to start and pass its first probe.
   One untimed run installs the releases; then, ROUNDS times, alternately:
   the three components in one run (`parallel`), and the same three run one
   after another, one run each in release order (`serial`). Every one of these
   builds a new commit, so every release really rolls out.
   - `critical_path_overhead_s` = median parallel wall - ideal critical path,
     where the ideal is the longest chain of simulated build and rollout times
     along `after:` (here travel-agent: 6.95 + 1 = 7.95 s): what a run with
     zero overhead would take. The seconds the pipeline adds do not shrink with
     the builds, so this is the figure to judge (EKS builds are 20 times longer
     than these); `critical_path_ratio` (wall / ideal) is printed too.
   - `verify_on_critical_path_s`: the verify stage's seconds (helm test, the MCP
     handshake, HTTP checks) along the chain of releases that ended last.
   - `parallel_outside_stages_s`: of a parallel run's wall time, what is not
     the flow's stages (from the flow function's start to its result): Prefect
     starting and ending the flow run, and the timing artifacts at the end.
   - `parallel_speedup` = median serial wall / median parallel wall.
2. `noop_rebuild_jobs`, `noop_rebuild_wall_s`: a run with skip_unchanged on the
   same commit: Jobs created (from the emulator's request log) and its wall time.
3. 50 components (tiny contexts, no releases, so builds only), 1 s builds, at
   most 10 builds at once (`max_parallel_builds=10` and the global `buildkit`
   limit of 10), alternated with the first 5 of them, ROUNDS times:
   `scale50_wall_s` and `scale50_peak_rss_mb` (medians), and
   `scale_growth` = median wall of 50 / median wall of 5. Ten at a time, 50
   one-second builds need five waves where 5 need one, so about 5 is ideal.

Output: one `name: value` line per figure. From the repository root:

    .venv/bin/python -m bench.pipeline_bench [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.servers import postgres, prefect_server, sqlite
from flows.config import PipelineConfig, load_config
from sandbox.example import add_agent, commit_all, create_example_repo
from sandbox.stack import Sandbox

EKS_BUILD_SECONDS = {"weather-mcp": 58, "weather-agent": 134, "travel-agent": 139}
TIME_SCALE = 20
SCALED_BUILD_SECONDS = {name: seconds / TIME_SCALE for name, seconds in EKS_BUILD_SECONDS.items()}
ROLLOUT_SECONDS = 1.0
SCALE_COMPONENTS, SCALE_SMALL, SCALE_PARALLEL, SCALE_BUILD_SECONDS = 50, 5, 10, 1.0


@dataclass
class FlowRun:
    wall_s: float
    stages_s: float | None
    cpu_s: float
    peak_rss_mb: float
    components: dict


class FlowRunner:
    """Runs the flow in a child process against one sandbox and one Prefect server."""

    def __init__(self, sandbox: Sandbox, workdir: Path, api_url: str) -> None:
        self.sandbox = sandbox
        self.workdir = workdir
        self.env = {**os.environ, "PREFECT_API_URL": api_url,
                    "BUILDKIT_PIPELINE_CACHE": str(workdir / "cache")}
        self.runs = len(list(workdir.glob("run-*.log")))

    def __call__(self, pipeline_file: Path, **params) -> FlowRun:
        config = load_config(pipeline_file)
        self.runs += 1
        log = self.workdir / f"run-{self.runs}.log"
        command = [sys.executable, "-m", "bench.run_flow", str(pipeline_file), "--aws-url", self.sandbox.aws.url,
                   "--region", config.aws.region, "--kubeconfig", str(self.sandbox.kubeconfig),
                   "--params", json.dumps(params)]
        with log.open("w") as stderr:
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, env=self.env, text=True)
            output = child.stdout.read()
            _, status, usage = os.wait4(child.pid, 0)
            child.returncode = os.waitstatus_to_exitcode(status)
        lines = [line for line in output.splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"the flow process exited {child.returncode} without a result; see {log}")
        run = json.loads(lines[-1])
        if not run["completed"]:
            raise RuntimeError(f"a benchmark run failed: {run['message']}; see {log}")
        return FlowRun(run["wall_s"], run["stages_s"], usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, run["components"])


def ideal_critical_path(config: PipelineConfig, build_seconds: dict[str, float], rollout: float) -> float:
    """The longest chain of build and rollout times: a release rolls out after its build and its `after:`."""
    owner = {c.release.name: c for c in config.components if c.release}
    deployed: dict[str, float] = {}

    def deployed_at(component) -> float:
        if component.name not in deployed:
            after = [deployed_at(owner[name]) for name in component.release.after if name in owner]
            deployed[component.name] = max([build_seconds[component.name], *after]) + rollout
        return deployed[component.name]

    return max(deployed_at(c) for c in config.components)


def verify_on_critical_path(config: PipelineConfig, components: dict) -> float:
    """The seconds the verify stage adds to a run: its spans along the chain of releases that ended last (the last
    release to finish, then, through `after:`, the release it waited for longest)."""
    owner = {c.release.name: c for c in config.components if c.release}
    ended = {name: max(end for _, end in data["spans"].values()) for name, data in components.items() if data["spans"]}
    current = max((c for c in config.components if c.name in ended), key=lambda c: ended[c.name])
    total = 0.0
    while current is not None:
        total += components[current.name]["seconds"].get("verify", 0.0)
        before = [owner[name] for name in current.release.after if name in owner and owner[name].name in ended]
        current = max(before, key=lambda c: ended[c.name]) if before else None
    return total


def three_component_app(workdir: Path) -> Path:
    """The example app plus travel-agent, without the registry cache, so every build takes its simulated time."""
    pipeline_file = create_example_repo(workdir / "three-components")
    add_agent(pipeline_file, "travel-agent")
    pipeline_file.write_text(pipeline_file.read_text().replace("mode: privileged}", "mode: privileged, cache: none}"))
    commit_all(pipeline_file.parent, "No registry cache")
    return pipeline_file


def many_component_app(workdir: Path, count: int) -> Path:
    """The example repository with `count` components that build the MCP server's context, without releases."""
    pipeline_file = create_example_repo(workdir / f"{count}-components")
    document = yaml.safe_load(pipeline_file.read_text())
    context = document["components"][0]["context"]
    document["components"] = [{"name": f"c-{i:02}", "context": context, "image": f"bench/c-{i:02}"}
                              for i in range(count)]
    pipeline_file.write_text(yaml.safe_dump(document, sort_keys=False))
    commit_all(pipeline_file.parent, f"{count} components")
    return pipeline_file


def simulate_builds(sandbox: Sandbox, config: PipelineConfig, seconds: dict[str, float]) -> None:
    sandbox.prepare(config)
    for component in config.components:
        sandbox.buildkit.build_seconds[f"{config.registry}/{component.image}"] = seconds[component.name]


def jobs_created(sandbox: Sandbox) -> int:
    return sum(1 for r in sandbox.kube.requests if r.verb == "create" and r.resource == "jobs")


def figure(name: str, value: float, digits: int = 2) -> None:
    print(f"{name}: {value if isinstance(value, int) else round(value, digits)}", flush=True)


def new_commit(app: Path, config: PipelineConfig) -> None:
    """Change every component's context and commit, so the next run builds new images and really rolls them out
    (helm leaves a Deployment whose image did not change alone, and no pod would wait out the rollout delay)."""
    marker = app.parent / config.components[0].context / "BENCH_REVISION"
    revision = int(marker.read_text()) + 1 if marker.exists() else 1
    for component in config.components:
        (app.parent / component.context / "BENCH_REVISION").write_text(str(revision))
    commit_all(app.parent, f"Benchmark revision {revision}")


def three_components(run: FlowRunner, app: Path, rounds: int, suffix: str = "") -> None:
    config = load_config(app)
    new_commit(app, config)
    run(app)
    parallel, serial = [], []
    for _ in range(rounds):
        new_commit(app, config)
        parallel.append(run(app))
        new_commit(app, config)
        serial.append(sum(run(app, components=[c.name]).wall_s for c in config.components))
    parallel_wall = statistics.median(r.wall_s for r in parallel)
    ideal = ideal_critical_path(config, SCALED_BUILD_SECONDS, ROLLOUT_SECONDS)
    figure(f"parallel_wall_s{suffix}", parallel_wall)
    figure(f"parallel_queue_max_s{suffix}", statistics.median(
        max(c["seconds"].get("queue", 0) for c in r.components.values()) for r in parallel))
    figure(f"serial_wall_s{suffix}", statistics.median(serial))
    figure(f"critical_path_overhead_s{suffix}", parallel_wall - ideal)
    figure(f"verify_on_critical_path_s{suffix}", statistics.median(
        verify_on_critical_path(config, r.components) for r in parallel))
    figure(f"critical_path_ratio{suffix}", parallel_wall / ideal)
    figure(f"parallel_outside_stages_s{suffix}", statistics.median(r.wall_s - r.stages_s for r in parallel))
    figure(f"parallel_speedup{suffix}", statistics.median(serial) / parallel_wall)


def unchanged_rerun(run: FlowRunner, sandbox: Sandbox, app: Path) -> None:
    before = jobs_created(sandbox)
    noop = run(app, skip_unchanged=True)
    figure("noop_rebuild_jobs", jobs_created(sandbox) - before)
    figure("noop_rebuild_wall_s", noop.wall_s)


def many_components(run: FlowRunner, app: Path, rounds: int) -> None:
    small = [c.name for c in load_config(app).components[:SCALE_SMALL]]
    small_runs, large_runs = [], []
    for _ in range(rounds):
        small_runs.append(run(app, components=small, deploy=False, max_parallel_builds=SCALE_PARALLEL))
        large_runs.append(run(app, deploy=False, max_parallel_builds=SCALE_PARALLEL))
    small_wall = statistics.median(r.wall_s for r in small_runs)
    large_wall = statistics.median(r.wall_s for r in large_runs)
    figure(f"scale{SCALE_SMALL}_wall_s", small_wall)
    figure(f"scale{SCALE_COMPONENTS}_wall_s", large_wall)
    figure(f"scale{SCALE_COMPONENTS}_peak_rss_mb", statistics.median(r.peak_rss_mb for r in large_runs), 0)
    figure("scale_growth", large_wall / small_wall)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="buildkit-pipeline-bench-") as tmp:
        workdir = Path(tmp)
        with Sandbox(workdir / "sandbox") as sandbox:
            sandbox.kube.rollout_delay = ROLLOUT_SECONDS
            app = three_component_app(workdir)
            simulate_builds(sandbox, load_config(app), SCALED_BUILD_SECONDS)
            many = many_component_app(workdir, SCALE_COMPONENTS)
            simulate_builds(sandbox, load_config(many), {c.name: SCALE_BUILD_SECONDS
                                                         for c in load_config(many).components})
            figure("ideal_critical_path_s", ideal_critical_path(load_config(app), SCALED_BUILD_SECONDS,
                                                                ROLLOUT_SECONDS))
            with postgres() as database, prefect_server(database, workdir / "postgres-server") as api:
                run = FlowRunner(sandbox, workdir, api)
                three_components(run, app, args.rounds)
                unchanged_rerun(run, sandbox, app)
                many_components(run, many, args.rounds)
            with prefect_server(sqlite(workdir / "sqlite"), workdir / "sqlite-server") as api:
                three_components(FlowRunner(sandbox, workdir, api), app, args.rounds, suffix="_sqlite")


if __name__ == "__main__":
    main()
