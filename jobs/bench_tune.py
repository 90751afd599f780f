"""Benchmark: what a ``recflm tune`` sweep costs on top of its trials, and what ASHA saves.

Three measurements on the same bundle, data and per-trial settings (the same epochs, batch size
and steps in every trial; only lr, label smoothing, dropout and crop probability are searched):

1. one trial's fine-tune run alone (``recflm finetune`` with the trial's settings: ``train.run``);
2. an N-trial sweep with no early stopping (FIFO scheduler): its wall time against N x (1) is the
   sweep's scheduling overhead (Tune's controller, each trial's driver, Train and Data start-up);
3. the same N-trial sweep with ASHA (grace 1 epoch, reduction factor 2): the trials it stopped
   early and the wall time saved.

Prints one table and a SUMMARY line. Without ``--bundle``/``--data`` it prepares the bundled data
and pretrains a tiny bundle first (not timed).

    python -m jobs.bench_tune                       # 4 trials, tiny preset, 2 epochs x 15 steps
    python -m jobs.bench_tune --trials 8 --bundle runs/demo/bundle --data runs/demo/data --steps 40
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--bundle", help="bundle to fine-tune (default: a tiny one pretrained here)")
    ap.add_argument("--data", help="prepared dataset (default: the bundled data prepared here)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=15, help="optimizer steps per epoch")
    ap.add_argument("--val-users", type=int, default=300,
                    help="validation users of the ASHA metric (too few and a weak model scores 0 in every trial, "
                         "so ASHA cannot tell trials apart)")
    # 4 logical CPUs on a 2-core laptop, as in the tests: with 2, a trial's worker (0.5) plus the CPUs
    # a stopped trial has not yet given back can leave Ray Data less than the 1 CPU a read task needs
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray (0: the cores)")
    args = ap.parse_args(argv)

    import ray

    from recflm.config import to_dict
    from recflm.runtime import ensure_ray
    from recflm.train import TrainConfig, run as train
    from recflm.tune import TuneConfig, run as tune, trial_train_config

    ray.init(address="local", num_cpus=args.num_cpus or None, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    ensure_ray()
    tmp = Path(tempfile.mkdtemp(prefix="bench_tune_"))
    quiet = lambda *a: None  # noqa: E731
    data, bundle = args.data, args.bundle
    if not data:
        from recflm.config import PrepareConfig
        from recflm.prepare import run as prepare

        data = str(tmp / "data")
        prepare(PrepareConfig(out=data), log=quiet)
    if not bundle:
        bundle = str(train(TrainConfig(data=data, out=str(tmp / "bundle"), storage_path=str(tmp / "pre"), name="pre",
                                       preset="tiny", workers=0, epochs=1, batch_size=16, vocab_size=600,
                                       max_steps=60, checkpoint_every=60, val_examples=32, val_users=10,
                                       families=["rating", "sequential", "direct", "span"]), log=quiet))

    fixed = {"epochs": args.epochs, "max_steps": args.epochs * args.steps, "batch_size": 16, "val_examples": 64,
             "val_users": args.val_users, "val_beams": 20, "shuffle_buffer": 200, "families": ["sequential", "direct"]}
    space = {"lr": {"loguniform": [1.0e-5, 3.0e-3]}, "label_smoothing": {"choice": [0.0, 0.1]},
             "dropout": {"uniform": [0.0, 0.2]}, "augment.crop": {"uniform": [0.0, 0.4]}}
    sweep = dict(bundle=bundle, data=data, space=space, trials=args.trials, storage_path=str(tmp / "sweeps"),
                 train=fixed, workers=1, cpus_per_worker=0.5)

    # 1. one trial alone: the fine-tune run a trial makes, outside Tune
    t = time.perf_counter()
    alone_cfg = trial_train_config({**to_dict(TrainConfig()), **fixed, "data": data, "init_bundle": bundle,
                                    "workers": 1, "cpus_per_worker": 0.5, "checkpoint_every": 0,
                                    "out": str(tmp / "alone"), "storage_path": str(tmp / "alone_runs"),
                                    "name": "alone"}, {"lr": 1e-3, "label_smoothing": 0.0, "dropout": 0.1,
                                                       "augment.crop": 0.2})
    train(alone_cfg, log=quiet)
    alone = time.perf_counter() - t

    rows = [("one trial alone (train.run)", 1, alone, "", "", "")]
    results = {}
    for scheduler in ("fifo", "asha"):
        t = time.perf_counter()
        out = tune(TuneConfig(**sweep, name=scheduler, scheduler=scheduler), log=quiet)
        wall = time.perf_counter() - t
        table = out["table"]
        stopped = int((table["status"] == "stopped").sum())
        results[scheduler] = (wall, stopped, int(table["epochs"].sum()))
        rows.append((f"sweep, {scheduler}", args.trials, wall, f"{wall / (args.trials * alone):.2f}",
                     f"{stopped}/{args.trials}", f"{int(table['epochs'].sum())}/{args.trials * args.epochs}"))

    head = ("run", "trials", "wall s", "wall / (N x alone)", "stopped early", "epochs run")
    width = [max(len(str(r[i])) if not isinstance(r[i], float) else 7 for r in [head, *rows]) for i in range(6)]
    fmt = lambda r: "  ".join((f"{v:.1f}" if isinstance(v, float) else str(v)).ljust(w)  # noqa: E731
                              for v, w in zip(r, width))
    print(f"recflm tune on {ray.cluster_resources().get('CPU', 0):.0f} CPU(s): {args.trials} trials x "
          f"{args.epochs} epochs x {args.steps} steps, 1 worker per trial at 0.5 CPU")
    print(fmt(head))
    print(fmt(["-" * w for w in width]))
    for r in rows:
        print(fmt(r))
    (fifo, _, _), (asha, stopped, epochs) = results["fifo"], results["asha"]
    print(f"SUMMARY: a {args.trials}-trial sweep took {fifo / (args.trials * alone):.2f}x the time of "
          f"{args.trials} trials run alone without early stopping (scheduling overhead "
          f"{(fifo - args.trials * alone) / args.trials:+.1f} s per trial); ASHA stopped {stopped}/{args.trials} "
          f"trials early, ran {epochs}/{args.trials * args.epochs} epochs and took {asha / fifo:.2f}x the FIFO sweep")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
