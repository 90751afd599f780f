"""Benchmark: training throughput of the recflm model on Ray Train: supervised next-item targets per
second of the quality recipe against P5-style prompts, and 1 worker against 2 workers.

``--compare recipe`` (the default): one worker each, the same threads and batch size, P5 prompts (the
``mini`` preset, sub-word item IDs, one next-item target per example: the pre-recipe default) against
the dense recipe of ``jobs/configs/pretrain_quality.yaml`` (the ``seq`` preset, one token per item,
every history position a target). A *target* is a next-item prediction that receives a loss: one per
sequential prompt, one per position of a dense row. ``--compare workers``: the P5 setting on 1 and 2
workers (DDP scaling), as before.

Both runs use the same per-worker setting (torch threads, batch size, model preset) and the same
rendered prompt examples of the bundled data (tokenized inside the loop, as in ``recflm pretrain``),
streamed to the workers from a Ray Dataset with ``get_dataset_shard``. Each worker does
``--warmup`` untimed steps, then ``--steps`` timed ones; throughput is the sum over workers of
samples (and source + target tokens) per second of the timed window. Prints one table and a
summary line with the 2-worker / 1-worker ratio. With ``--gpu`` (one GPU per worker, bf16 autocast)
it also prints model FLOPs utilisation against the card's dense bf16 peak.

    python -m jobs.bench_train                       # CPU: targets/s of the dense recipe vs P5 prompts
    python -m jobs.bench_train --compare workers     # CPU, mini preset, 1 vs 2 workers
    python -m jobs.bench_train --gpu --preset small --workers 1 --batch-size 64
    ray job submit --working-dir . -- python -m jobs.bench_train --workers 1,2,4
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

# dense bf16 peak FLOP/s per card (without sparsity), by a substring of torch.cuda.get_device_name()
BF16_PEAK = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
             "L4": 121e12, "RTX A5000": 111e12}


def model_flops_per_example(model, src_tokens: float, tgt_tokens: float) -> float:
    """Training FLOPs (forward + backward = 6 x multiply-adds) for one example of the given mean
    lengths: encoder weights see the source tokens, decoder weights and the output projection the
    target tokens, plus the attention score/value products."""
    cfg = model.config
    enc = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder."))
    dec = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder."))
    head = cfg.d_model * cfg.vocab_size  # tied output projection
    inner = cfg.num_heads * cfg.d_kv
    attn = 2 * inner * (cfg.num_layers * src_tokens * src_tokens + cfg.num_decoder_layers *
                        (tgt_tokens * tgt_tokens + tgt_tokens * src_tokens))
    return 6 * (enc * src_tokens + (dec + head) * tgt_tokens) + 3 * 2 * attn


def bench_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from recflm.model import build_model
    from recflm.tokenizer import RecTokenizer
    from recflm.train import _batch_tensors, _example_losses

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    tok = RecTokenizer.load(config["tokenizer"])
    model = ray.train.torch.prepare_model(build_model(config["preset"], tok.vocab_size, tok.pad_id, tok.eos_id))
    device = ray.train.torch.get_device()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    shard = ray.train.get_dataset_shard("train")
    n, t0, samples, src_tok, tgt_tok, targets, micro, accum = 0, None, 0, 0, 0, 0, 0, config["grad_accum"]
    pending = [0, 0, 0, 0]  # samples, source and target tokens, next-item targets of the current accumulation
    lens = {"max_source_len": 256, "max_target_len": 48, "dense_templates": config["dense_templates"],
            "dense_max_len": config["dense_max_len"]}
    for batch in shard.iter_batches(batch_size=config["batch_size"], batch_format="pandas", drop_last=True):
        enc, labels, dense = _batch_tensors(tok, batch, lens, device)
        micro += 1
        if micro % accum == 1 or accum == 1:
            pending = [0, 0, 0, 0]
        n_targets = int((labels[torch.as_tensor(dense)] != -100).sum()) + int(
            ((batch["family"] == "sequential").to_numpy() & ~dense).sum())
        pending = [pending[0] + len(batch), pending[1] + int(enc["attention_mask"].sum()),
                   pending[2] + int((labels != -100).sum()), pending[3] + n_targets]
        sync = micro % accum == 0
        # DDP all-reduces gradients only on the last micro-batch of an accumulation (no_sync before)
        with (contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()), autocast:
            loss = _example_losses(model, enc, labels, dense)[0] / accum  # the training loop's loss
            loss.backward()
        if not sync:
            continue
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        n += 1
        if n == max(1, config["warmup"]):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        elif n > max(1, config["warmup"]):
            samples += pending[0]
            src_tok += pending[1]
            tgt_tok += pending[2]
            targets += pending[3]
        if n == max(1, config["warmup"]) + config["steps"]:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    core = model.module if hasattr(model, "module") else model
    flops = model_flops_per_example(core, src_tok / max(1, samples), tgt_tok / max(1, samples)) * samples
    m = {"samples": samples, "src_tokens": src_tok, "tgt_tokens": tgt_tok, "targets": targets, "seconds": dt,
         "flops": flops,
         "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    if ray.train.get_context().get_world_rank() == 0:  # Train V2 keeps metrics with checkpoints only
        d = tempfile.mkdtemp()
        Path(d, "bench.json").write_text(json.dumps(m))
        ray.train.report(m, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(m)


def run_one(workers: int, examples, tok_path: str, args, preset: str = "", dense: tuple = ((), 0),
            label: str = "") -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    per_worker = args.batch_size * args.grad_accum * (args.warmup + args.steps + 2)
    ds = ray.data.from_pandas(examples.sample(n=per_worker * workers, replace=True, random_state=workers))
    res = {"GPU": 1} if args.gpu else {"CPU": args.cpus_per_worker}
    trainer = TorchTrainer(
        bench_loop, train_loop_config={"threads": args.threads, "tokenizer": tok_path, "preset": preset or args.preset,
                                       "dense_templates": list(dense[0]), "dense_max_len": dense[1],
                                       "batch_size": args.batch_size, "grad_accum": args.grad_accum, "warmup": args.warmup, "steps": args.steps},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=args.gpu, resources_per_worker=res),
        run_config=RunConfig(name=f"bench_train_{workers}w_{int(time.time())}", storage_path=args.storage),
        datasets={"train": ds.materialize()})
    result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:  # rank 0's figures; every worker timed the same steps and batch
        m = json.loads(Path(d, "bench.json").read_text())
    return {"workers": workers, "setting": label or f"{workers} worker(s)",
            "samples_per_s": m["samples"] * workers / m["seconds"],
            "targets_per_s": m["targets"] * workers / m["seconds"],
            "tokens_per_s": (m["src_tokens"] + m["tgt_tokens"]) * workers / m["seconds"],
            "flops_per_s": m["flops"] * workers / m["seconds"], "device": m["device"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="prepared dataset (default: prepare the bundled data into a temp dir)")
    ap.add_argument("--compare", choices=["recipe", "workers"], default="recipe",
                    help="recipe: targets/s of the dense quality recipe vs P5 prompts (1 worker each); "
                         "workers: P5 prompts on each --workers count")
    ap.add_argument("--recipe", default="jobs/configs/pretrain_quality.yaml", help="the dense recipe's config")
    ap.add_argument("--preset", default="mini", help="model preset of the P5-prompt runs")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts, the first is the baseline")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (the same for every run)")
    ap.add_argument("--cpus-per-worker", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (one all-reduce)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--storage", default=str(Path(tempfile.gettempdir()) / "recflm_bench_train"))
    args = ap.parse_args(argv)

    from recflm.augment import example_dataset
    from recflm.config import PrepareConfig, from_dict
    from recflm.dataset import PreparedData
    from recflm.prepare import run as run_prepare
    from recflm.runtime import ensure_ray
    from recflm.tokenizer import train_tokenizer

    ensure_ray()
    tmp = Path(tempfile.mkdtemp(prefix="recflm_bench_train_"))
    data_dir = args.data
    if not data_dir:
        data_dir = str(tmp / "data")
        run_prepare(PrepareConfig(out=data_dir), log=lambda *a: None)
    pcfg = from_dict(PrepareConfig, PreparedData.open(data_dir).manifest["config"])
    examples = example_dataset(data_dir, pcfg, families=["rating", "sequential", "direct", "explanation", "span"],
                               log=lambda *a: None).to_pandas()[["family", "template", "source", "target"]]
    tok_path = str(tmp / "tokenizer.json")
    train_tokenizer(list(examples["source"]) + list(examples["target"]), 4000).save(tok_path)

    if args.compare == "workers":
        rows = [run_one(int(w), examples, tok_path, args) for w in args.workers.split(",")]
    else:
        # the P5 sequential prompts alone: the other families' rows are no next-item targets
        seq = examples[examples["family"] == "sequential"]
        rows = [run_one(1, seq, tok_path, args, label="P5 sequential prompts, " + args.preset)]
        rows.append(_dense_run(data_dir, pcfg, tmp, args))
    base = rows[0]
    peak = next((v for k, v in BF16_PEAK.items() if k in rows[0]["device"]), None) if args.gpu else None
    print(f"\nbench_train: batch {args.batch_size}/worker, {args.threads} torch thread(s)/worker, "
          f"{args.steps} timed steps, device {base['device']}")
    key = "targets_per_s" if args.compare == "recipe" else "samples_per_s"
    head = (f"{'setting':<34} {'samples/s':>11} {'targets/s':>11} {'tokens/s':>11} {'vs 1st':>7}"
            + (f" {'MFU':>6}" if args.gpu else ""))
    print(head)
    for r in rows:
        line = (f"{r['setting']:<34} {r['samples_per_s']:>11.1f} {r['targets_per_s']:>11.1f} {r['tokens_per_s']:>11.0f} "
                f"{r[key] / base[key]:>7.2f}")
        if args.gpu:
            line += f" {r['flops_per_s'] / r['workers'] / peak:>6.1%}" if peak else "    n/a"
        print(line)
    last = rows[-1]
    if args.compare == "recipe":
        summary = (f"SUMMARY bench_train targets/s dense recipe / P5 prompts = {last[key] / base[key]:.1f} "
                   f"({last[key]:.0f} vs {base[key]:.0f})")
    else:
        summary = (f"SUMMARY bench_train preset={args.preset} scaling {last['workers']}w/{base['workers']}w = "
                   f"{last['samples_per_s'] / base['samples_per_s']:.2f}")
    if args.gpu and peak:
        summary += f" mfu_1st={base['flops_per_s'] / base['workers'] / peak:.1%}"
    print(summary)
    return 0


def _dense_run(data_dir: str, pcfg, tmp: Path, args) -> dict:
    """The dense recipe on the same data: its examples, a one-token-per-item tokenizer, its preset."""
    from recflm.augment import example_dataset
    from recflm.config import PromptConfig, from_dict, load_config, to_dict
    from recflm.dataset import PreparedData
    from recflm.prompts import is_dense, load_templates
    from recflm.tokenizer import train_tokenizer
    from recflm.train import TrainConfig

    recipe = load_config(TrainConfig, args.recipe)
    pcfg.prompts = from_dict(PromptConfig, {**to_dict(pcfg.prompts), **recipe.prompts})
    examples = example_dataset(data_dir, pcfg, families=["sequential"],
                               log=lambda *a: None).to_pandas()[["family", "template", "source", "target"]]
    ids = PreparedData.open(data_dir).id_texts
    tok_path = str(tmp / "tokenizer_dense.json")
    train_tokenizer(list(examples["source"]) + ids, recipe.vocab_size, item_tokens=ids).save(tok_path)
    dense = [t.id for t in load_templates()["sequential"] if is_dense(t)]
    return run_one(1, examples, tok_path, args, preset=recipe.preset, dense=(dense, pcfg.prompts.dense_max_len),
                   label=f"dense recipe, {recipe.preset}")


if __name__ == "__main__":
    raise SystemExit(main())
