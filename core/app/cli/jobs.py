"""``age-explorer jobs``: the background job store: list, show, cancel, resume, submit, run a worker."""

from __future__ import annotations

import argparse
import sys

from .common import THREADS_HELP, use_threads

HELP = "the background job store: list, show, cancel, resume, run a worker"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ...erasure import METHODS

    parser.add_argument("--data-dir", default=None, help="job store folder (env AGE_EXPLORER_DATA_DIR, default ./runs)")
    verbs = parser.add_subparsers(dest="jobs_command", required=True)
    listing = verbs.add_parser("list")
    listing.add_argument("--status", default=None)
    for verb in ("show", "cancel", "resume"):
        verbs.add_parser(verb).add_argument("job_id")
    submit = verbs.add_parser("submit-erase", help="queue an erasure job")
    submit.add_argument("--model", default="toy")
    submit.add_argument("--concept", action="append", required=True)
    submit.add_argument("--method", choices=list(METHODS), default="age")
    submit.add_argument("--preset", default="toy")
    submit.add_argument("--iterations", type=int, default=None)
    submit.add_argument("--checkpoint-every", type=int, default=None)
    submit.add_argument("--device", default="cpu")
    worker = verbs.add_parser("worker", help="run the queued jobs of one device")
    worker.add_argument("--device", default="cpu")
    worker.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    worker.add_argument("--once", action="store_true", help="exit when the queue is empty")
    parser.set_defaults(func=run)


def check_erase_job(model: str, method: str, preset: str | None, options: dict) -> None:
    """Refuse at submit what the worker would refuse later: an unknown preset, values out of range and,
    on the toy model (a closed vocabulary; an open model takes any text), an unknown concept."""
    from ...erasure import make_config

    config = make_config(method, preset, **options)
    if model == "toy":
        from ...bundle import load_bundle

        bundle = load_bundle("toy", device="cpu")
        bundle.backend.check_concepts(bundle, config.concepts, getattr(config, "target", None))


def run(args: argparse.Namespace) -> int:
    import json

    from ..job_store import JobStore
    from ..worker import Worker

    if args.jobs_command == "submit-erase":  # checked before the store is opened: a refusal writes nothing
        options = {"concepts": args.concept, **({"checkpoint_every": args.checkpoint_every} if args.checkpoint_every else {})}
        if args.iterations is not None:
            options["iterations"] = args.iterations
        check_erase_job(args.model, args.method, args.preset, options)
    store = JobStore(args.data_dir)
    if args.jobs_command == "list":
        damaged: list[str] = []
        jobs = store.list(status=args.status, damaged=damaged)
        print(f"{'id':32s}  {'kind':8s}  {'device':6s}  {'status':11s}  {'progress':>11s}  config")
        for job in jobs:
            cfg = job.config
            what = ", ".join(cfg.get("options", {}).get("concepts", [])) or ", ".join(cfg.get("prompts", []))
            print(f"{job.id:32s}  {job.kind:8s}  {job.device:6s}  {job.status:11s}  {job.step:>5d}/{job.total:<5d}  "
                  f"{cfg.get('method', '')} {what}")
        for message in damaged:  # the other jobs are listed all the same
            print(f"warning: {message}", file=sys.stderr)
    elif args.jobs_command == "show":
        job = store.get(args.job_id)
        print(json.dumps({k: v for k, v in job.__dict__.items()}, indent=2, default=str))
    elif args.jobs_command == "cancel":
        print(f"{args.job_id}: {store.cancel(args.job_id)}")
    elif args.jobs_command == "resume":
        store.resume(args.job_id)
        print(f"{args.job_id}: queued again; a worker continues it from its last checkpoint")
    elif args.jobs_command == "submit-erase":
        job_id = store.submit("erase", {"model": args.model, "method": args.method, "preset": args.preset,
                                        "options": options}, device=args.device)
        print(job_id)
    elif args.jobs_command == "worker":
        use_threads(args.threads)
        worker = Worker(store, args.device)
        if worker.recovered:
            print(f"marked interrupted: {', '.join(worker.recovered)}", flush=True)
        if args.once:
            while worker.run_one() is not None:
                pass
        else:
            worker.serve_forever()
    return 0
