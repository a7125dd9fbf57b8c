"""The `formwork` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from worker.artifacts import LocalArtifacts
from worker.browser import BrowserHost
from worker.contract import (
    BrowserJob,
    JobReport,
    JobStatus,
    StepReport,
    StepStatus,
    contract_schemas,
)
from worker.errors import FormworkError
from worker.executor import Runtime, run_job
from worker.script import ScriptStore
from worker.secretstore import SecretStore
from worker.settings import Settings

_MARK = {
    StepStatus.succeeded: "ok  ",
    StepStatus.failed: "FAIL",
    StepStatus.skipped: "skip",
    StepStatus.running: "... ",
    StepStatus.pending: "    ",
}


def _parse_inputs(pairs: Sequence[str]) -> dict[str, str]:
    inputs: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"formwork: --input takes key=value, got {pair!r}")
        inputs[key] = value
    return inputs


def _script_ref(arg: str, settings: Settings) -> tuple[str, Settings]:
    """`billing/issue_credit[@1]`, or a path to a script file (its folders locate the rest)."""
    path = Path(arg)
    if arg.endswith(".yaml"):
        if not path.is_file():
            raise SystemExit(f"formwork: no script file {arg}")
        scripts_dir = path.resolve().parent.parent
        selectors_dir = settings.selectors_dir
        if not selectors_dir.is_dir() and (scripts_dir.parent / "selectors").is_dir():
            selectors_dir = scripts_dir.parent / "selectors"
        name = f"{path.parent.name}/{path.name.removesuffix('.yaml')}"
        updated = settings.model_copy(
            update={"scripts_dir": scripts_dir, "selectors_dir": selectors_dir}
        )
        return name, updated
    return arg, settings


class _Printer:
    """Prints each step as it ends: status, duration, the selector that matched."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    async def step_changed(self, report: JobReport, step: StepReport) -> None:
        if step.status == StepStatus.running:
            return
        print(format_step(step), file=self.stream, flush=True)

    async def job_changed(self, report: JobReport) -> None:
        return None


def format_step(step: StepReport) -> str:
    duration = f"{step.duration_ms:7.0f} ms" if step.duration_ms is not None else " " * 10
    selector = ""
    if step.selector is not None:
        drift = " (fallback)" if step.selector.index else ""
        selector = f"  {step.selector.element} -> {step.selector.candidate}{drift}"
    line = f"  {_MARK[step.status]} {step.id:<28} {step.action:<9}{duration}{selector}"
    if step.failure is not None:
        line += f"\n         {step.failure.code}: {step.failure.message}"
        if step.failure.evidence:
            line += f"\n         page says: {step.failure.evidence}"
    return line


def print_summary(report: JobReport, stream: Any) -> None:
    print(f"job {report.job_id}: {report.status}", file=stream)
    if report.error is not None:
        where = f" at step {report.error.step_id}" if report.error.step_id else ""
        print(f"  {report.error.code}{where}: {report.error.message}", file=stream)
    for key, value in report.outputs.items():
        print(f"  output {key} = {value}", file=stream)
    if report.artifacts is not None:
        root = Path(report.artifacts.root)
        print(f"  report:      {root / report.artifacts.report}", file=stream)
        print(f"  screenshots: {root / report.artifacts.path}/", file=stream)


async def _run(args: argparse.Namespace) -> int:
    settings = Settings.from_env(
        artifacts_dir=args.artifacts,
        secrets_file=args.secrets_file,
        scripts_dir=args.scripts_dir,
        selectors_dir=args.selectors_dir,
    )
    name, settings = _script_ref(args.script, settings)
    try:
        job = BrowserJob(
            job_id=args.job_id or f"run-{uuid.uuid4().hex[:12]}",
            script=name,
            inputs=_parse_inputs(args.input),
            site_url=args.site_url,
        )
        secrets = SecretStore(settings.secrets_file)
    except ValidationError as exc:
        print(f"formwork: invalid job: {exc}", file=sys.stderr)
        return 2
    except FormworkError as exc:
        print(f"formwork: {exc.message}", file=sys.stderr)
        return 2
    runtime = Runtime(
        scripts=ScriptStore(settings.scripts_dir, settings.selectors_dir),
        browser=BrowserHost(settings.chromium),
        artifacts=LocalArtifacts(settings.artifacts_dir),
        secrets=secrets,
    )
    out = sys.stderr if args.json else sys.stdout
    if not args.json:
        print(f"running {job.script} as job {job.job_id}", file=out, flush=True)
    try:
        report = await run_job(job, runtime, _Printer(out))
    finally:
        await runtime.browser.stop()
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print_summary(report, out)
    if report.status == JobStatus.succeeded:
        return 0
    return 2 if report.status == JobStatus.rejected else 1


def _schema(args: argparse.Namespace) -> int:
    schemas = contract_schemas()
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, schema in schemas.items():
            (out / f"{name}.schema.json").write_text(json.dumps(schema, indent=2) + "\n")
        print(f"wrote {len(schemas)} schemas to {out}")
    else:
        print(json.dumps(schemas, indent=2))
    return 0


def _validate(args: argparse.Namespace) -> int:
    settings = Settings.from_env(scripts_dir=args.scripts_dir, selectors_dir=args.selectors_dir)
    store = ScriptStore(settings.scripts_dir, settings.selectors_dir)
    failures = 0
    paths = sorted(settings.scripts_dir.glob("*/*.yaml"))
    for path in paths:
        try:
            loaded = store.load_path(path)
            print(f"ok    {loaded.name}@{loaded.script.version}  ({len(loaded.plan)} steps)")
        except FormworkError as exc:
            failures += 1
            print(f"FAIL  {path}\n      " + exc.message.replace("\n", "\n      "))
    print(f"{len(paths) - failures} valid, {failures} invalid")
    return 1 if failures else 0


def _fixtures(args: argparse.Namespace) -> int:
    from fixtures.server import serve_forever

    serve_forever(args.site, args.host, args.port)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from worker.demo import demo

    return asyncio.run(demo())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="formwork", description="Browser-automation worker for AI customer support."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one script in-process and print each step")
    run.add_argument("script", help="a script file, or a name like billing/issue_credit[@1]")
    run.add_argument("--input", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--site-url", help="base URL of the site (overrides the registry)")
    run.add_argument("--job-id")
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    run.add_argument("--artifacts", type=Path, help="artifacts root (default ./artifacts)")
    run.add_argument("--secrets-file", type=Path, help="YAML file of secret name: value")
    run.add_argument("--scripts-dir", type=Path)
    run.add_argument("--selectors-dir", type=Path)
    run.set_defaults(handler=lambda a: asyncio.run(_run(a)))

    schema = sub.add_parser("schema", help="print the wire contract as JSON Schema")
    schema.add_argument("--out", help="write one file per model into this directory")
    schema.set_defaults(handler=_schema)

    validate = sub.add_parser("validate", help="load and check every script")
    validate.add_argument("--scripts-dir", type=Path)
    validate.add_argument("--selectors-dir", type=Path)
    validate.set_defaults(handler=_validate)

    fixtures = sub.add_parser("fixtures", help="local fixture sites")
    fixtures_sub = fixtures.add_subparsers(dest="fixtures_command", required=True)
    serve = fixtures_sub.add_parser("serve", help="serve a fixture site in the foreground")
    serve.add_argument("site")
    serve.add_argument("--port", type=int, default=8811)
    serve.add_argument("--host", default="127.0.0.1")
    serve.set_defaults(handler=_fixtures)

    demo = sub.add_parser("demo", help="run the billing demo end to end")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
