"""Run one daily period's steps in one process, in the daily pipeline's order, by calling the
functions the KFP tasks run (``components.ops.<step>.python_func``).

The fault-injection tests start it as a child process with ``SMLREC_FAILPOINTS`` set
(:mod:`smlrec.faults`), so that it dies or fails at an exact place, then check the stores
and run it again. One process instead of one per task keeps each case to a few seconds; the
per-task process boundaries of the real runner are covered by ``tests/test_pipeline.py``.

Usage: ``python tests/fault_driver.py PERIOD --data D --state S --features F --bento B
--work W [--input-file FILE]``; prints the run's outcome as one JSON line.

``python tests/fault_driver.py --zygote`` imports everything once (Feast alone takes about
7 s to import), then reads one JSON request per line on stdin (``{"argv": [...],
"failpoints": "...", "log": "file"}``), runs each in a forked child (a fresh process with
the imports done) and answers ``{"returncode": N}`` (-9 for a SIGKILL) per line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kfp import dsl  # noqa: E402

from components import ops  # noqa: E402
from smlrec.daily import is_done  # noqa: E402
from smlrec.faults import failpoint  # noqa: E402
from smlrec.registry import StateStore  # noqa: E402


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("period")
    for name in ("--data", "--state", "--features", "--bento", "--work"):
        ap.add_argument(name, required=True)
    ap.add_argument("--input-file", default="")
    ap.add_argument("--period-spec", default="1D")
    args = ap.parse_args(argv)
    os.environ["BENTOML_HOME"] = args.bento
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    def art(cls, name):
        return cls(name=name, uri=str(work / name), metadata={})

    store = StateStore(args.state)
    if is_done(store, args.period):
        print(json.dumps({"period": args.period, "skipped": True}))
        return 0
    with store.lock(f"fault driver {args.period}"):
        ops.validate_op.python_func(
            period=args.period, data_uri=args.data, input_file=args.input_file,
            period_spec=args.period_spec, min_rows=1, max_rows=5_000_000,
            report=art(dsl.Markdown, "validate.md"))
        failpoint("step.after", "validate")
        frame = art(dsl.Dataset, "training_frame.parquet")
        ops.features_op.python_func(
            period=args.period, data_uri=args.data, feature_repo=str(ROOT / "feature_repo"),
            feature_data=args.features, period_spec=args.period_spec, training_frame=frame,
            report=art(dsl.Markdown, "features.md"))
        failpoint("step.after", "features")
        decision = ops.gate_op.python_func(
            period=args.period, data_uri=args.data, state_uri=args.state, tolerance=0.05,
            metrics=art(dsl.Metrics, "gate-metrics"), report=art(dsl.Markdown, "g.md"))
        failpoint("step.after", "gate")
        if decision == "promote":
            ops.package_op.python_func(state_uri=args.state, period=args.period,
                                       bentoml_home=args.bento, stage="production",
                                       data_uri=args.data)
            failpoint("step.after", "package")
        meta = art(dsl.Model, "meta-state")
        ops.meta_update_op.python_func(
            period=args.period, state_uri=args.state, training_frame=frame, state=meta,
            metrics=art(dsl.Metrics, "meta-metrics"))
        failpoint("step.after", "meta_update")
        learned = art(dsl.Model, "learn-state")
        ops.learn_op.python_func(state_uri=args.state, data_uri=args.data, training_frame=frame,
                                 state_in=meta, state=learned,
                                 metrics=art(dsl.Metrics, "learn-metrics"))
        failpoint("step.after", "learn")
        others = art(dsl.Model, "challengers")
        ops.challengers_op.python_func(
            period=args.period, data_uri=args.data, state_uri=args.state, training_frame=frame,
            models=others, metrics=art(dsl.Metrics, "challengers-metrics"))
        failpoint("step.after", "challengers")
        ops.transfer_op.python_func(state_uri=args.state, data_uri=args.data,
                                    training_frame=frame, state_in=learned, others=others,
                                    metrics=art(dsl.Metrics, "t-metrics"))
        failpoint("step.after", "transfer")
        ops.package_op.python_func(state_uri=args.state, period=args.period,
                                   bentoml_home=args.bento, stage="candidate",
                                   data_uri=args.data)
    print(json.dumps({"period": args.period, "skipped": False, "decision": decision}))
    return 0


def zygote() -> int:
    """Serve runs from forked children of one warm process (see the module docstring)."""
    import adapters.feast_store  # noqa: F401
    import components.expectations  # noqa: F401 - warm imports, shared by every child
    import components.packaging  # noqa: F401
    import smlrec.daily  # noqa: F401
    from smlrec.device import configure_threads

    configure_threads()
    import bentoml  # noqa: F401
    import pandas as pd

    # Great Expectations imports most of itself on first use: validate once here.
    components.expectations.validate_frame(pd.DataFrame(
        {"user_id": ["1"], "item_id": ["2"], "timestamp": ["2024-01-01T10:00:00Z"]}),
        "2024-01-01")
    import tempfile  # and Feast on first use of a store: register the repo once, aside

    with tempfile.TemporaryDirectory() as tmp:
        adapters.feast_store.FeatureStoreAdapter(ROOT / "feature_repo", tmp, env={}).apply()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: one run, then exit without running the parent's cleanup
            code = 1
            try:
                log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                os.environ["SMLREC_FAILPOINTS"] = request.get("failpoints", "")
                code = main(request["argv"])
            except BaseException:  # noqa: BLE001 - report it as the run's failure
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"returncode": code}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(zygote() if sys.argv[1:] == ["--zygote"] else main(sys.argv[1:]))
