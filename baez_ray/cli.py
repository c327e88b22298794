"""`baez-ray`: job files in, run directories out."""

from __future__ import annotations

import argparse
import sys

from baez_ray.config import ConfigError, load_job


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="baez-ray", description="Label, score and route SAE features on Ray.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("validate", help="check a job file and print the resolved job")
    p.add_argument("job")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")

    p = sub.add_parser("run", help="run a job file")
    p.add_argument("job")
    p.add_argument("--out", help="run directory (default: <out>/<name> from the job file)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")

    args = ap.parse_args(argv)
    try:
        spec = load_job(args.job, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.cmd == "validate":
        import yaml

        print(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), end="")
        print(f"ok: {args.job} is a valid '{spec.job}' job", file=sys.stderr)
        return 0

    from baez_ray.run import execute

    try:
        run = execute(spec, args.out)
    except (ValueError, FileNotFoundError) as e:
        # bad input: the message names the file and the problem
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(run.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
