"""`buildkit-pipeline`: plan a run without AWS or a cluster, or run the flow (optionally on the local sandbox)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator

from flows.config import ConfigError
from flows.source import SourceError

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2
# Prefect's own default is 20 s (prefect/settings/models/server/ephemeral.py, `startup_timeout_seconds`); the first
# start of a local ephemeral server migrates a new SQLite database, which takes longer on a small machine. Set before
# Prefect is imported, as its settings are read once at import; a value already in the environment wins.
PREFECT_DEFAULTS = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def _components(value: str | None) -> list[str] | None:
    return [name.strip() for name in value.split(",") if name.strip()] if value else None


def _plan(args: argparse.Namespace) -> int:
    from flows.plan import make_plan

    plan = make_plan(Path(args.config), args.ref, _components(args.components), list_files=args.list_files)
    if args.json:
        print(json.dumps(plan, indent=2))
        return 0
    print(f"commit {plan['commit']} ({plan['ref']}{', with uncommitted changes' if plan['source']['dirty'] else ''})")
    for component in plan["components"]:
        archive = component["archive"]
        print(f"- {component['name']}: {archive['files']} files, {archive['bytes']} bytes, sha256 {archive['sha256'][:12]}")
        print(f"  image {component['image']['repository']}:{', '.join(component['image']['tags'])}")
        print(f"  job   {component['job']['metadata']['namespace']}/{component['job']['metadata']['name']}")
        print(f"  helm  {' '.join(component['helm']) if component['helm'] else '(no release)'}")
        if args.list_files:
            print(f"  ignore file {archive['ignore_file'] or '(none)'}; archive members:")
            for path in archive["paths"]:
                print(f"    {path}")
    return 0


@contextlib.contextmanager
def _connection(args: argparse.Namespace, config) -> Iterator[tuple[dict, object]]:
    """The connection arguments of a command, and the sandbox it runs on (started and prepared) with `--sandbox`."""
    connection = {"kubeconfig": args.kubeconfig}
    if not args.sandbox:
        yield connection, None
        return
    from sandbox.stack import Sandbox

    sandbox = Sandbox().start()
    try:
        connection.update(sandbox.prepare(config))
        yield connection, sandbox
    finally:
        sandbox.stop()


def _call_flow(args: argparse.Namespace, flow, report, check=lambda config, selected: None, **kwargs) -> int:
    """Run a flow with the command's config, ref and components, on the sandbox when asked; print its report.

    Bad input (an unknown component, or what `check` refuses) exits 2 before a flow run exists.
    """
    from flows.pipeline import connected_locally
    from flows.plan import prepare_source, select
    from flows.results import PipelineFailed

    kwargs.update(config=str(Path(args.config).resolve()), ref=args.ref, components=_components(args.components))
    config, _ = prepare_source(Path(args.config), args.ref)
    check(config, select(config, kwargs["components"]))
    with _connection(args, config) as (connection, sandbox):
        with connected_locally(**connection):
            state = flow(**kwargs, return_state=True)
            if asyncio.iscoroutine(state):
                state = asyncio.run(state)
        try:
            result = state.result()
        except PipelineFailed as exc:
            print(f"error: the run failed: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(report(result))
        if sandbox and args.then:
            return args.then(sandbox, config)
        return 0


def _run(args: argparse.Namespace) -> int:
    from flows.pipeline import build_and_deploy, format_timing

    return _call_flow(args, build_and_deploy, format_timing, deploy=not args.no_deploy,
                      skip_unchanged=args.skip_unchanged, no_cache=args.no_cache)


def _compare(args: argparse.Namespace) -> int:
    from flows.compare import check_comparable, compare_builders, format_comparison

    return _call_flow(args, compare_builders, format_comparison, check_comparable, no_cache=args.no_cache)


def _doctor(args: argparse.Namespace) -> int:
    """Every pre-flight check against the pipeline file's target (or a prepared sandbox); exit 1 when one fails."""
    from flows.doctor.findings import exit_code, render, render_json
    from flows.doctor.flow import check_target
    from flows.plan import prepare_source

    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    prepared = prepare_source(Path(args.config), args.ref)
    with _connection(args, prepared[0]) as (connection, _sandbox):
        findings = asyncio.run(check_target(Path(args.config), args.ref, args.target, fix=args.fix, say=say,
                                            prepared=prepared, **connection))
    print(render_json(findings) if args.json else render(findings))
    return exit_code(findings)


def _diagnose(args: argparse.Namespace) -> int:
    from flows.diagnose import diagnose_file

    return diagnose_file(Path(args.logfile))


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="buildkit-pipeline", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    for name, handler, help_text in (
        ("plan", _plan, "show what a run would create; needs neither AWS nor a cluster"),
        ("run", _run, "run the build-and-deploy flow"),
        ("compare", _compare, "build with BuildKit and with Kaniko from one commit and compare; deploys nothing"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.set_defaults(handler=handler)
        command.add_argument("--config", required=True, help="the pipeline file (YAML)")
        command.add_argument("--ref", help="branch, tag or commit to build (default: the file's source.ref)")
        command.add_argument("--components", help="comma-separated component names (default: all)")
    plan, run = commands.choices["plan"], commands.choices["run"]
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--list-files", action="store_true", help="list every path in each archive (and the ignore file applied)")
    for command in (run, commands.choices["compare"]):
        command.add_argument("--sandbox", action="store_true",
                             help="run against the local sandbox (moto + emulated cluster)")
        command.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then ~/.kube/config)")
        command.add_argument("--no-cache", action="store_true", help="build without importing the registry cache")
    run.add_argument("--no-deploy", action="store_true", help="build and push only")
    run.add_argument("--skip-unchanged", action="store_true",
                     help="reuse the image of a context that was built before instead of building it again")
    doctor = commands.add_parser("doctor", help="check the AWS account, the cluster, the pipeline file and Prefect "
                                                "before a first run; exit 1 when a check fails")
    doctor.set_defaults(handler=_doctor)
    doctor.add_argument("--config", required=True, help="the pipeline file (YAML)")
    doctor.add_argument("--ref", help="branch, tag or commit whose charts and values are checked")
    doctor.add_argument("--target", help="the BuildKit Pipeline Target block to check (default: this machine's "
                                         "AWS credentials and kubeconfig)")
    doctor.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then ~/.kube/config)")
    doctor.add_argument("--sandbox", action="store_true", help="check a prepared local sandbox")
    doctor.add_argument("--json", action="store_true", help="print the findings as JSON")
    doctor.add_argument("--fix", action="store_true",
                        help="create what is safe to create (ECR repositories, the namespace and its label, RBAC, "
                             "the lifecycle rule, the concurrency limit), each printed first; then check again")
    diagnose = commands.add_parser("diagnose", help="explain a saved build log (exit 0 when a known failure matched)")
    diagnose.set_defaults(handler=_diagnose)
    diagnose.add_argument("logfile")
    return root


def main(argv: list[str] | None = None, *, then=None) -> int:
    """`then(sandbox, config)`, if given, runs after a successful run on the sandbox, before the sandbox stops;
    its return is the exit status (`make demo` asks the deployed agent)."""
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    args = parser().parse_args(argv)
    args.then = then
    try:
        return args.handler(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (SourceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
