"""``recflm tune``: a sweep over fine-tune settings on Ray Tune, with ASHA early stopping.

Every trial fine-tunes the same bundle with its own settings: a Tune function (the trial's driver,
0.01 CPU) builds the trial's ``TorchTrainer`` with ``train.setup`` / ``train.make_trainer`` and its
own workers, and Train's ``TuneReportCallback`` forwards each epoch's validation metrics to Tune (the
Ray Train V2 way). ASHA stops trials whose validation NDCG@10 (``val_ndcg10``: full ranking over
the catalog, a few fixed validation users, see train.py) trails at an epoch rung. Random search by
default, Optuna with ``search: optuna`` (the ``optuna`` extra).

The search space is a YAML mapping from ``TrainConfig`` keys (dotted for the nested ones:
``augment.crop``, ``family_weights.rating``) to a fixed value or one distribution::

    lr: {loguniform: [1.0e-4, 3.0e-3]}      # also uniform: [lo, hi], quniform: [lo, hi, q]
    epochs: {randint: [1, 3]}               # integers lo..hi, both included (also lograndint)
    batch_size: {choice: [16, 32]}          # any values, lists included
    families: {choice: [[sequential, direct], [sequential, direct, rating]]}
    label_smoothing: 0.1                    # a plain value: the same in every trial
    dropout: {grid: [0.0, 0.1]}             # every value, each with ``trials`` samples of the rest

The sweep directory ``<storage_path>/<name>`` holds Tune's state (``recflm tune --resume NAME``
continues an interrupted sweep: finished trials are kept, unfinished ones resume from their last
epoch checkpoint), each trial's Train run under ``train/``, and at the end ``results.csv`` (one row
per trial, best first), ``<metric>.png`` (the metric per trial over epochs) and ``best_bundle/``
(the best trial's model; its manifest records the trial's settings under ``tune``).

The module is a little over the house's ~450 lines: the space parser (every value each entry can take,
checked against TrainConfig before anything runs) is half of it and belongs with the sweep it feeds.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, flags_into, from_dict, load_config, read_yaml_mapping, set_dotted, to_dict

HELP = "search fine-tune settings of a bundle with Ray Tune (ASHA early stopping, resumable)"

# distribution name -> (number of arguments, description for error messages)
DISTRIBUTIONS = {
    "uniform": (2, "[lo, hi]"), "quniform": (3, "[lo, hi, q]"), "loguniform": (2, "[lo, hi], lo > 0"),
    "randint": (2, "[lo, hi] integers, hi included"), "lograndint": (2, "[lo, hi] integers, lo > 0, hi included"),
    "choice": (None, "[v1, v2, ...]"), "grid": (None, "[v1, v2, ...]"),
}
# TrainConfig keys the sweep sets itself (the same for every trial, or per trial)
SWEEP_KEYS = {"data", "init_bundle", "out", "name", "storage_path", "workers", "cpus_per_worker", "gpu",
              "checkpoint_every"}


@dataclass
class TuneConfig:
    bundle: str = ""  # the bundle every trial fine-tunes
    data: str = ""  # prepared dataset directory (default: the one the bundle was trained on)
    space: str | dict = "jobs/configs/tune_space.yaml"  # search space: a YAML file or an inline mapping
    trials: int = 8  # samples drawn from the space (per grid point)
    name: str = ""  # sweep name (default: tune-<date>-<time>)
    resume: str = ""  # the name of an interrupted sweep to continue
    storage_path: str = "runs/tune"  # sweeps live in <storage_path>/<name> (on a cluster: shared storage)
    out: str = ""  # best bundle (default: <sweep dir>/best_bundle)
    train: dict = field(default_factory=dict)  # fixed TrainConfig settings of every trial, e.g. {max_steps: 200}
    metric: str = "val_ndcg10"
    mode: str = "max"
    search: str = "random"  # random | optuna
    scheduler: str = "asha"  # asha | fifo (no early stopping)
    grace_period: int = 1  # ASHA: epochs every trial gets
    reduction_factor: float = 2.0  # ASHA: keep the best 1/reduction_factor at each rung
    workers: int = 1  # Ray Train workers per trial
    cpus_per_worker: float = 0.5  # fractional: leaves CPUs to Ray Data, which feeds the workers
    gpu: bool = False  # one GPU per worker
    driver_cpus: float = 0.01  # the trial's driver function only waits on its TorchTrainer
    max_concurrent_trials: int = 0  # 0: as many as the cluster holds (CPU left for Ray Data: data_cpus)
    data_cpus: float = 1.0  # CPUs kept free for Ray Data when max_concurrent_trials is 0
    max_failures: int = 1  # Tune-level retries of a trial's driver (Train retries its workers itself)
    seed: int = 2022  # the searcher's seed


# ----------------------------------------------------------------------------- search space
def load_space(spec) -> dict:
    """The space as a mapping (from a YAML file path or inline), unparsed."""
    if isinstance(spec, dict):
        return dict(spec)
    return read_yaml_mapping(spec, "search space file", "be a mapping of TrainConfig keys", missing=FileNotFoundError)


def _number(key: str, v, integer: bool = False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise ConfigError(f"space {key}: {v!r} is not {'an integer' if integer else 'a number'}")
    return v


def _sampler(key: str, spec):
    """One space entry -> a Tune domain (or the fixed value), with the values it can take for checks."""
    from ray import tune

    if not isinstance(spec, dict):
        return spec, [spec]
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        known = "; ".join(f"{d}: {a}" for d, (_, a) in DISTRIBUTIONS.items())
        raise ConfigError(f"space {key}: {spec!r} is not one distribution (known: {known}); nested keys are "
                          f"written dotted, e.g. family_weights.rating")
    dist, args = next(iter(spec.items()))
    n, shape = DISTRIBUTIONS[dist]
    if not isinstance(args, list) or (n and len(args) != n) or not args:
        raise ConfigError(f"space {key}: {dist} takes {shape}, got {args!r}")
    if dist in ("choice", "grid"):
        return (tune.choice(args) if dist == "choice" else tune.grid_search(args)), list(args)
    integer = dist in ("randint", "lograndint")
    lo, hi = (_number(key, a, integer) for a in args[:2])
    if not lo < hi:
        raise ConfigError(f"space {key}: {dist} needs lo < hi, got {args!r}")
    if dist.startswith("log") and lo <= 0:
        raise ConfigError(f"space {key}: {dist} needs lo > 0, got {args!r}")
    if dist == "uniform":
        return tune.uniform(lo, hi), [lo, hi]
    if dist == "loguniform":
        return tune.loguniform(lo, hi), [lo, hi]
    if dist == "quniform":
        return tune.quniform(lo, hi, _number(key, args[2])), [lo, hi]
    if dist == "randint":
        return tune.randint(lo, hi + 1), [lo, hi]  # Tune's upper bound is exclusive
    return tune.lograndint(lo, hi + 1), [lo, hi]


def trial_train_config(base: dict, settings: dict):
    """The TrainConfig of one trial: the fixed settings with the trial's sampled ones on top."""
    from .train import TrainConfig

    data = json.loads(json.dumps(base))  # a deep copy
    for key, value in settings.items():
        set_dotted(data, key, value, what="space")
    return from_dict(TrainConfig, data)


def parse_space(spec: dict, base: dict, search: str = "random") -> dict:
    """The YAML space -> Tune's ``param_space``; every value each entry can take is checked against
    TrainConfig (key names, types, family names, family weights in 0..1), so a bad spec stops here."""
    if not spec:
        raise ConfigError("the search space is empty")
    out = {}
    for key, entry in spec.items():
        key = str(key)
        if key.split(".")[0] in SWEEP_KEYS:
            raise ConfigError(f"space {key}: set by the sweep itself (tune config keys bundle, data, workers, "
                              f"cpus_per_worker, gpu, storage_path), not searchable")
        domain, values = _sampler(key, entry)
        if search == "optuna" and isinstance(entry, dict) and "grid" in entry:
            raise ConfigError(f"space {key}: grid is not supported with search: optuna (use choice)")
        if search == "optuna" and any(isinstance(v, (list, dict)) for v in values) and isinstance(entry, dict):
            raise ConfigError(f"space {key}: Optuna only chooses among plain values (numbers, strings), "
                              f"got {values!r}")
        for v in values:
            try:
                check_train_config(trial_train_config(base, {key: v}))
            except ValueError as e:
                raise ConfigError(f"space {key}: {e}") from None
        out[key] = domain
    return out


def check_train_config(cfg) -> None:
    """What a trial would only find out after starting: family names and weights, augment / prompt keys."""
    from .augment import SELF_SUPERVISED
    from .config import AugmentConfig, PromptConfig
    from .prompts import FAMILIES
    from .train import mixing_weights

    bad = [f for f in cfg.families if f not in FAMILIES and f not in SELF_SUPERVISED]
    if bad:
        raise ConfigError(f"unknown task family {bad[0]!r} (known: {', '.join(FAMILIES + SELF_SUPERVISED)})")
    mixing_weights({}, cfg)
    from_dict(AugmentConfig, cfg.augment, prefix="augment.")
    from_dict(PromptConfig, cfg.prompts, prefix="prompts.")


def max_epochs(spec: dict, base: dict) -> int:
    """The most epochs a trial can run (ASHA's max_t)."""
    entry = spec.get("epochs", base.get("epochs", 3))
    if isinstance(entry, dict):
        return int(max(next(iter(entry.values()))))
    return int(entry)


# ----------------------------------------------------------------------------- one trial
def finetune_trial(config: dict, base: dict, train_storage: str, counts: dict) -> None:
    """A trial's driver: fine-tune with this trial's settings in its own TorchTrainer. ``counts``:
    examples per family of the sweep's data, unless the trial changes what is generated."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .train import make_trainer, setup

    cfg = trial_train_config(base, config)
    # the Train run's name is the trial's id (no timestamp), so a resumed trial resumes its run
    cfg.name, cfg.storage_path = f"train-{ray.tune.get_context().get_trial_id()}", train_storage
    if any(k.startswith("prompts.") or k in ("prompts", "augment.merge_sources", "augment") for k in config):
        counts = None  # the trial changes how many examples there are: setup counts them
    s = setup(cfg, log=lambda *a: None, counts={f: n for f, n in (counts or {}).items() if f in cfg.families} or None)
    result = make_trainer(s, callbacks=[TuneReportCallback()]).fit()
    if result.error:
        raise result.error


def _planned_trials(cfg: TuneConfig, spec: dict) -> int:
    grid = [len(next(iter(v.values()))) for v in spec.values() if isinstance(v, dict) and "grid" in v]
    return cfg.trials * math.prod(grid)


def _unfinished(sweep: Path, planned: int) -> bool:
    """Whether the sweep stopped early (Ctrl+C): its saved state lacks trials or has unfinished ones.
    (Tune marks every trial terminated when it stops, but saves the state just before.)"""
    states = sorted(sweep.glob("experiment_state-*.json"))  # named by start time; the newest is the current run
    if not states:
        return True
    trials = [json.loads(t)["status"] for t, _ in json.loads(states[-1].read_text())["trial_data"]]
    return len(trials) < planned or any(s not in ("TERMINATED", "ERROR") for s in trials)


def _count_examples(sweep: Path, spec: dict, base: dict) -> dict:
    """Examples per family of the sweep's data (every family any trial trains), counted once."""
    from .dataset import PreparedData
    from .train import family_counts, prepare_config

    path = sweep / "counts.json"
    if not path.exists():
        cfg = trial_train_config(base, {})
        entry = spec.get("families")
        choices = next(iter(entry.values())) if isinstance(entry, dict) else [entry] if entry else []
        fams = set(cfg.families).union(*choices)
        pcfg = prepare_config(cfg, PreparedData.open(cfg.data))
        path.write_text(json.dumps(family_counts(cfg.data, pcfg, sorted(fams), log=lambda *a: None)))
    return json.loads(path.read_text())


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _trainable(cfg: TuneConfig, base: dict, train_storage: str, counts: dict):
    from ray import tune

    fn = tune.with_parameters(finetune_trial, base=base, train_storage=train_storage, counts=counts)
    return tune.with_resources(fn, {"cpu": cfg.driver_cpus})


# ----------------------------------------------------------------------------- the sweep
def _sweep_dir(cfg: TuneConfig, name: str) -> Path:
    if "://" in cfg.storage_path:
        raise ConfigError(f"storage_path {cfg.storage_path}: use a directory (on a cluster, shared storage "
                          f"such as NFS mounted on every node)")
    return Path(cfg.storage_path).resolve() / name


def _concurrency(cfg: TuneConfig) -> int:
    """Trials at once: as many as the cluster's CPUs (less data_cpus) and GPUs hold."""
    import ray

    if cfg.max_concurrent_trials > 0:
        return cfg.max_concurrent_trials
    res = ray.cluster_resources()
    per_trial = max(1, cfg.workers) * cfg.cpus_per_worker + cfg.driver_cpus
    n = int((res.get("CPU", 1) - cfg.data_cpus) // per_trial)
    if cfg.gpu:
        n = min(n, int(res.get("GPU", 0) // max(1, cfg.workers)))
    return max(1, n)


def _build_tuner(cfg: TuneConfig, sweep: Path, base: dict, spec: dict, counts: dict):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    param_space = parse_space(spec, base, cfg.search)
    if cfg.scheduler == "asha":
        top = max_epochs(spec, base)
        scheduler = ASHAScheduler(time_attr="epochs_done", max_t=max(top, cfg.grace_period),
                                  grace_period=cfg.grace_period, reduction_factor=cfg.reduction_factor)
    elif cfg.scheduler == "fifo":
        scheduler = FIFOScheduler()
    else:
        raise ConfigError(f"unknown scheduler {cfg.scheduler!r} (asha, fifo)")
    k = _concurrency(cfg)
    if cfg.search == "random":  # Tune leaves its own generator's concurrency to us
        searcher = BasicVariantGenerator(random_state=cfg.seed, max_concurrent=k)
    elif cfg.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("search: optuna needs the optuna package: pip install 'recflm[optuna]'") from None
        from ray.tune.search.optuna import OptunaSearch

        searcher = ConcurrencyLimiter(OptunaSearch(seed=cfg.seed), max_concurrent=k)
    else:
        raise ConfigError(f"unknown search {cfg.search!r} (random, optuna)")
    return tune.Tuner(
        _trainable(cfg, base, str(sweep / "train"), counts), param_space=param_space,
        tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, search_alg=searcher, scheduler=scheduler,
                                    num_samples=cfg.trials,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=sweep.name, storage_path=str(sweep.parent), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures)))


def results_table(grid, cfg: TuneConfig, keys: list[str]):
    """One row per trial, best first: status, epochs, metrics, the searched settings."""
    import pandas as pd

    rows = []
    for r in grid:
        m = r.metrics or {}
        status = "error" if r.error else ("done" if m.get("final") else "stopped")
        row = {"trial": m.get("trial_id") or Path(r.path).name.removeprefix("trial_"), "status": status,
               "epochs": m.get("epochs_done", 0), cfg.metric: m.get(cfg.metric, math.nan)}
        if cfg.metric == "val_ndcg10" and m.get("best_val_ndcg10") is not None:
            row[cfg.metric] = m["best_val_ndcg10"]  # the epoch its bundle exports (select_best), not the last one
        for k in ("val_ndcg10", "val_hr10", "val_hr10_of_100", "val_loss", "step"):
            if k != cfg.metric:
                row[k] = m.get(k, math.nan)
        row.update({k: (json.dumps(r.config.get(k)) if isinstance(r.config.get(k), (list, dict))
                        else r.config.get(k)) for k in keys})
        row["checkpoint_path"] = m.get("checkpoint_path", "")
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        # ties on the metric (common early on: a weak model finds none of a few users' next items) are
        # broken by the candidate-ranking hit rate, then by the validation loss
        keys = [cfg.metric] + [k for k in ("val_hr10_of_100", "val_loss") if k != cfg.metric]
        df = df.sort_values(keys, ascending=[cfg.mode == "min"] + [k == "val_loss" for k in keys[1:]],
                            na_position="last", kind="stable")
    return df.reset_index(drop=True)


def format_table(df) -> str:
    show = df.drop(columns=["checkpoint_path"])
    cols = list(show.columns)

    def cell(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else (f"{v:.4g}" if abs(v) < 1e-2 and v else f"{v:.4f}".rstrip("0").rstrip("."))
        return str(v)

    cells = [[cell(v) for v in row] for row in show.itertuples(index=False)]
    width = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, width))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in width]), *(line(r) for r in cells)])


def plot_metric(grid, metric: str, path: Path) -> Path:
    """PNG: the metric of every trial over its epochs (stopped trials end early)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for r in grid:
        df = r.metrics_dataframe
        if df is None or metric not in df or "epochs_done" not in df:
            continue
        df = df.dropna(subset=[metric])
        label = (r.metrics or {}).get("trial_id") or Path(r.path).name
        ax.plot(df["epochs_done"], df[metric], marker="o", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run(cfg: TuneConfig, log=print) -> dict:
    """Run (or resume) a sweep; returns {sweep, interrupted, table (DataFrame), best (its row), bundle, plot}."""
    from ray import tune

    from .runtime import ensure_ray
    from .train import export_bundle

    if cfg.resume:
        sweep = _sweep_dir(cfg, cfg.resume)
        saved = sweep / "tune_config.json"
        if not saved.is_file() or not tune.Tuner.can_restore(str(sweep)):
            raise FileNotFoundError(f"no sweep {cfg.resume!r} to resume in {sweep.parent}")
        cfg = from_dict(TuneConfig, {**json.loads(saved.read_text()), "resume": cfg.resume})
        spec, base = json.loads((sweep / "space.json").read_text()), json.loads((sweep / "train_base.json").read_text())
    else:
        if not cfg.bundle:
            raise ConfigError("give the bundle to fine-tune: --bundle DIR (config key: bundle)")
        manifest = Path(cfg.bundle) / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{cfg.bundle}: not a recflm bundle (no manifest.json)")
        data = cfg.data or json.loads(manifest.read_text()).get("data", {}).get("path", "")
        if not data or not (Path(data) / "manifest.json").is_file():
            raise FileNotFoundError(f"prepared dataset {data or '(none)'} not found: give --data DIR")
        cfg.name = cfg.name or time.strftime("tune-%Y%m%d-%H%M%S")
        sweep = _sweep_dir(cfg, cfg.name)
        if (sweep / "tune_config.json").exists():
            raise ConfigError(f"sweep {cfg.name!r} exists in {sweep.parent}: --resume {cfg.name} continues it, "
                              f"or choose another --name")
        spec = load_space(cfg.space)
        from .train import TrainConfig

        base = {**to_dict(load_config(TrainConfig, None, [])), **cfg.train}
        base.update(data=str(Path(data).resolve()), init_bundle=str(Path(cfg.bundle).resolve()),
                    workers=cfg.workers, cpus_per_worker=cfg.cpus_per_worker, gpu=cfg.gpu, checkpoint_every=0,
                    out="")  # checkpoints at epoch ends only: every report carries the metric
        try:  # fixed settings checked before anything starts
            check_train_config(trial_train_config(base, {}))
        except ValueError as e:
            raise ConfigError(f"train: {e}") from None
        parse_space(spec, base, cfg.search)
        sweep.mkdir(parents=True, exist_ok=True)
        for fname, obj in (("tune_config.json", to_dict(cfg)), ("space.json", spec), ("train_base.json", base)):
            (sweep / fname).write_text(json.dumps(obj, indent=2))

    ensure_ray()
    counts = _count_examples(sweep, spec, base)
    if cfg.resume:
        log(f"tune: resuming sweep {cfg.resume!r} from {sweep}")
        tuner = tune.Tuner.restore(str(sweep), trainable=_trainable(cfg, base, str(sweep / "train"), counts),
                                   resume_unfinished=True, resume_errored=True)
    else:
        log(f"tune: sweep {cfg.name!r}: {cfg.trials} trial(s) of {cfg.bundle} on {base['data']}, "
            f"{len(spec)} setting(s) searched, {cfg.search} search, {cfg.scheduler} on {cfg.metric} -> {sweep}")
        tuner = _build_tuner(cfg, sweep, base, spec, counts)
    grid = tuner.fit()
    if _unfinished(sweep, _planned_trials(cfg, spec)):
        log(f"tune: sweep {sweep.name!r} interrupted; continue it with: recflm tune --resume {sweep.name}"
            + (f" --storage-path {cfg.storage_path}" if cfg.storage_path != TuneConfig.storage_path else ""))
        return {"sweep": sweep, "interrupted": True}

    keys = [k for k, v in spec.items() if isinstance(v, dict)]
    table = results_table(grid, cfg, keys)
    table.to_csv(sweep / "results.csv", index=False)
    log(format_table(table))
    plot = plot_metric(grid, cfg.metric, sweep / f"{cfg.metric}.png")
    stopped = int((table["status"] == "stopped").sum()) if len(table) else 0
    log(f"tune: {len(table)} trial(s), {stopped} stopped early by {cfg.scheduler}, "
        f"{int((table['status'] == 'error').sum()) if len(table) else 0} failed; table {sweep / 'results.csv'}, "
        f"plot {plot}")

    ok = table[(table["status"] != "error") & (table["checkpoint_path"] != "")] if len(table) else table
    if not len(ok) or (isinstance(ok.iloc[0][cfg.metric], float) and math.isnan(ok.iloc[0][cfg.metric])):
        raise RuntimeError(f"no trial of sweep {sweep.name!r} reported {cfg.metric}; see {sweep}")
    best = ok.iloc[0]
    result = next(r for r in grid if (r.metrics or {}).get("trial_id") == best["trial"])
    settings = {k: result.config[k] for k in spec if k in result.config}
    import ray.train

    bundle = export_bundle(
        trial_train_config(base, result.config), ray.train.Checkpoint(best["checkpoint_path"]),
        sweep / "train" / f"train-{best['trial']}", out=cfg.out or sweep / "best_bundle",
        extra={"tune": {"sweep": sweep.name, "trial": best["trial"], "metric": cfg.metric, "mode": cfg.mode,
                        "value": float(best[cfg.metric]), "settings": settings}}, log=lambda *a: None)
    log(f"tune: best trial {best['trial']} ({cfg.metric} {best[cfg.metric]:.4f}): bundle written to {bundle}")
    return {"sweep": sweep, "interrupted": False, "table": table, "best": best.to_dict(), "bundle": bundle,
            "plot": plot}


# ----------------------------------------------------------------------------- CLI
def add_arguments(p, name: str = "tune") -> None:
    p.add_argument("--bundle", help="the bundle every trial fine-tunes (config key: bundle)")
    p.add_argument("--data", help="prepared dataset (default: the one the bundle was trained on)")
    p.add_argument("--space", help="search space YAML (default jobs/configs/tune_space.yaml)")
    p.add_argument("--trials", type=int, help="number of trials (config key: trials)")
    p.add_argument("--name", help="sweep name (default tune-<date>-<time>)")
    p.add_argument("--resume", metavar="NAME", help="continue the interrupted sweep NAME (finished trials are kept)")
    p.add_argument("--search", choices=["random", "optuna"], help="search algorithm (default random)")
    p.add_argument("--storage-path", help="where sweeps live (default runs/tune)")
    p.add_argument("--out", "-o", help="best bundle directory (default <sweep dir>/best_bundle)")


def command(args) -> int:
    cfg = flags_into(load_config(TuneConfig, args.config, args.overrides), args,
                     ("bundle", "data", "space", "trials", "name", "resume", "search", "storage_path", "out"))
    return 130 if run(cfg)["interrupted"] else 0
