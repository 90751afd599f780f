"""``recflm pretrain`` / ``recflm finetune``: the model trained data-parallel on Ray Train.

The driver trains the tokenizer (pretrain) or takes the bundle's (finetune), builds the lazy
example stream (every epoch re-drawn, see augment.py) and runs a ``TorchTrainer``: DDP over gloo on
CPU and NCCL on GPU. Each worker streams its shard with ``get_dataset_shard``, trains with AdamW,
linear warm-up and decay, clipping and accumulation (bf16 autocast on GPU), reports loss per task
family, learning rate, samples/s and tokens/s, checkpoints every ``checkpoint_every`` steps (model,
optimizer, scheduler, step = data position) and, at each epoch end, validation loss and a cheap
ranking metric (HR@10 of the next item among 100 candidates, teacher-forced scores).

A run has a name; the same command with the same name resumes it from its last checkpoint, and
``FailureConfig(max_failures)`` restarts a failed worker group from there. The result is a bundle.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import PrepareConfig, from_dict, to_dict


@dataclass
class TrainConfig:
    data: str = "runs/data"  # prepared dataset directory
    out: str = "runs/model"  # the bundle written at the end
    name: str = ""  # run name (default: the bundle directory's name); the same name resumes
    storage_path: str = "runs/train"  # Ray Train storage: local path or pyarrow URI (s3://...)
    preset: str = "mini"
    workers: int = 1  # 0 = Ray Train local mode (in-process, for tests)
    gpu: bool = False
    cpus_per_worker: float = 1.0
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    warmup: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    grad_accum: int = 1
    max_source_len: int = 256
    max_target_len: int = 48
    vocab_size: int = 4000
    item_token_mode: str = "pieces"  # pieces (P5 sub-word IDs) | token (one token per item)
    families: list = field(default_factory=lambda: ["rating", "sequential", "explanation", "review", "direct", "span"])
    family_weights: dict = field(default_factory=dict)  # family -> extra keep probability (0..1), after mixing
    mix: str = "balanced"  # balanced: no family has more than mix_cap x the largest per-user family | natural
    mix_cap: float = 2.0
    checkpoint_every: int = 200
    log_every: int = 20
    max_failures: int = 2
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    val_examples: int = 256
    val_users: int = 100
    shuffle_buffer: int = 2000
    seed: int = 2022
    init_bundle: str = ""  # finetune: the bundle to start from
    fail_at_step: int = -1  # fault injection for tests: rank 0 raises once at this step


# ----------------------------------------------------------------------------- per worker
def _family_filter(batch, weights: dict, seed: int):
    """Keep each example with its family's probability (a pure function of the example and epoch)."""
    from .augment import _row_uniforms

    if not weights or len(batch) == 0:
        return batch
    keys = (batch["source"] + "|" + batch["target"] + "|" + batch["epoch"].astype(str)).to_numpy(dtype=object)
    u = _row_uniforms(keys, seed, 0, "train", 1)[:, 0]
    p = batch["family"].map(lambda f: float(weights.get(f, 1.0))).to_numpy(dtype=float)
    return batch[u < p]


PER_USER_FAMILIES = ("sequential", "direct", "span")


def mixing_weights(counts: dict, cfg: "TrainConfig") -> dict:
    """Keep probability per family. ``balanced``: the families built per interaction (rating,
    explanation, review: one example per row, ~100x more than per-user ones on MovieLens) are
    down-sampled to at most ``mix_cap`` x the largest per-user family; a new sample every epoch.
    ``family_weights`` multiply on top."""
    keep = {f: 1.0 for f in counts}
    if cfg.mix == "balanced":
        per_user = [counts[f] for f in counts if f in PER_USER_FAMILIES]
        if per_user:
            cap = cfg.mix_cap * max(per_user)
            keep = {f: (1.0 if f in PER_USER_FAMILIES else min(1.0, cap / max(1, n))) for f, n in counts.items()}
    elif cfg.mix != "natural":
        raise ValueError(f"unknown mix {cfg.mix!r} (balanced, natural)")
    for f, w in cfg.family_weights.items():
        if not 0 <= float(w) <= 1:
            raise ValueError(f"family_weights[{f!r}] = {w}: must be between 0 and 1")
        keep[f] = keep.get(f, 1.0) * float(w)
    return keep


def _batch_tensors(tok, batch, cfg: dict, device):
    enc = tok.encode_batch(list(batch["source"]), cfg["max_source_len"])
    labels = tok.encode_targets(list(batch["target"]), cfg["max_target_len"])
    enc = {k: v.to(device) for k, v in enc.items()}
    return enc, labels.to(device)


def _example_losses(model, enc, labels):
    """Mean token loss per example (so losses can be split by task family)."""
    import torch
    import torch.nn.functional as F

    out = model(**enc, labels=labels)
    logp = F.cross_entropy(out.logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    n = (labels != -100).sum(1).clamp(min=1)
    return logp.sum(1) / n, out


def _rank_hr10(model, tok, val_rank: list, device, batch: int = 4) -> float:
    """HR@10 of the true next item among 100 candidates (teacher-forced sequence log-probs)."""
    import torch

    if not val_rank:
        return float("nan")
    hits = 0
    model.eval()
    with torch.no_grad():
        for ex in val_rank:
            enc = tok.encode_batch([ex["source"]], 256)
            enc = {k: v.to(device) for k, v in enc.items()}
            enc_out = model.encode(enc["input_ids"], enc["attention_mask"], enc["whole_word_ids"])
            cands = ex["candidates"]
            scores = []
            for i in range(0, len(cands), 50):
                chunk = cands[i:i + 50]
                labels = tok.encode_targets(chunk, 32).to(device)
                n = len(chunk)
                hs = enc_out.last_hidden_state.expand(n, -1, -1)
                out = model(encoder_outputs=(hs,), attention_mask=enc["attention_mask"].expand(n, -1), labels=labels)
                lp = torch.log_softmax(out.logits.float(), -1)
                tgt = labels.clamp(min=0)
                tok_lp = lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) * (labels != -100)
                scores.append(tok_lp.sum(1))
            s = torch.cat(scores)
            hits += int((s > s[0]).sum().item() < 10)  # candidate 0 is the true item
    model.train()
    return hits / len(val_rank)


def train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from .model import RecT5, build_model
    from .tokenizer import RecTokenizer

    torch.manual_seed(config["seed"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tok = RecTokenizer.load(config["tokenizer"])
    if config.get("init_bundle"):
        model = RecT5.from_pretrained(config["init_bundle"], use_safetensors=True)
    else:
        model = build_model(config["preset"], tok.vocab_size, tok.pad_id, tok.eos_id)
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"], eps=1e-6)
    total = max(1, config["total_steps"])
    warm = max(1, int(config["warmup"] * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))

    step, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        from safetensors.torch import load_model

        with ckpt.as_directory() as d:
            load_model(core, os.path.join(d, "model.safetensors"), strict=False, device=str(device))
            state = torch.load(os.path.join(d, "train_state.pt"), map_location=device, weights_only=True)
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            step = int(state["step"])
            history = json.loads(Path(d, "history.json").read_text())
    resumed_at = step

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    shard = ray.train.get_dataset_shard("train")
    accum, bs = config["grad_accum"], config["batch_size"]
    skip = step * accum  # data position: batches already consumed by this worker
    window = {"t0": time.perf_counter(), "samples": 0, "tokens": 0, "loss": {}, "n": {}}
    epoch, micro = 0, 0
    fail_at = config.get("fail_at_step", -1)
    fail_marker = Path(config["run_dir"]) / "injected_failure"

    def save_and_report(metrics: dict, final: bool = False):
        history.append(metrics)
        if rank == 0:
            # Ray Train copies a reported checkpoint to storage; local mode keeps a reference to the
            # directory instead, so there it must outlive this call
            local = config["workers"] == 0
            d = tempfile.mkdtemp(dir=config["run_dir"], prefix="local_ckpt_") if local else tempfile.mkdtemp()
            core.save_pretrained(d, safe_serialization=True)  # config.json + model.safetensors (tied weights)
            torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step},
                       os.path.join(d, "train_state.pt"))
            Path(d, "history.json").write_text(json.dumps(history))
            ray.train.report({**metrics, "final": final}, checkpoint=ray.train.Checkpoint.from_directory(d))
            if not local:
                shutil.rmtree(d, ignore_errors=True)
        else:
            ray.train.report({**metrics, "final": final})

    def validate(ep: int) -> dict:
        val = ray.train.get_dataset_shard("val")
        core.eval()
        losses = []
        with torch.no_grad():
            for b in val.iter_batches(batch_size=bs, batch_format="pandas"):
                enc, labels = _batch_tensors(tok, b, config, device)
                with autocast:
                    l, _ = _example_losses(core, enc, labels)
                losses.append(l.float().cpu())
        core.train()
        vl = float(torch.cat(losses).mean()) if losses else float("nan")
        hr = _rank_hr10(core, tok, config["val_rank"], device) if rank == 0 else float("nan")
        return {"epoch": ep, "val_loss": vl, "val_hr10_of_100": hr}

    model.train()
    it = shard.iter_batches(batch_size=bs, batch_format="pandas", local_shuffle_buffer_size=config["shuffle_buffer"],
                            drop_last=True)
    for batch in it:
        if skip > 0:
            skip -= 1
            continue
        b_epoch = min(step // config["steps_per_epoch"], config["epochs"] - 1)  # the same on every rank
        if b_epoch > epoch:
            m = validate(epoch)
            m.update(step=step, lr=sched.get_last_lr()[0])
            if rank == 0:
                print(f"[recflm] epoch {epoch} done: val_loss {m['val_loss']:.4f} "
                      f"val HR@10/100 {m['val_hr10_of_100']:.3f}", flush=True)
            save_and_report(m)
            epoch = b_epoch
        enc, labels = _batch_tensors(tok, batch, config, device)
        with autocast:
            per_ex, _ = _example_losses(model, enc, labels)
            loss = per_ex.mean() / accum
        loss.backward()
        for fam, l in zip(batch["family"], per_ex.detach().float().cpu().tolist()):
            window["loss"][fam] = window["loss"].get(fam, 0.0) + l
            window["n"][fam] = window["n"].get(fam, 0) + 1
        window["samples"] += len(batch)
        window["tokens"] += int(enc["attention_mask"].sum()) + int((labels != -100).sum())
        micro += 1
        if micro % accum:
            continue
        torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if rank == 0 and step == fail_at and not fail_marker.exists():
            fail_marker.write_text(str(step))
            raise RuntimeError(f"injected failure at step {step} (fail_at_step)")
        if step % config["log_every"] == 0:
            dt = time.perf_counter() - window["t0"]
            m = {"step": step, "epoch": epoch, "lr": sched.get_last_lr()[0],
                 "samples_per_s": window["samples"] * world / dt, "tokens_per_s": window["tokens"] * world / dt,
                 **{f"loss/{f}": window["loss"][f] / window["n"][f] for f in window["loss"]}}
            m["loss"] = sum(window["loss"].values()) / max(1, sum(window["n"].values()))
            if rank == 0:
                fams = " ".join(f"{f}={v:.3f}" for f, v in m.items() if f.startswith("loss/"))
                print(f"[recflm] step {step}/{total} loss {m['loss']:.4f} lr {m['lr']:.2e} "
                      f"{m['samples_per_s']:.0f} samples/s {m['tokens_per_s']:.0f} tok/s | {fams}", flush=True)
            window = {"t0": time.perf_counter(), "samples": 0, "tokens": 0, "loss": {}, "n": {}}
            if step % config["checkpoint_every"] == 0:
                save_and_report(m)
        if config["max_steps"] and step >= config["max_steps"]:
            break
    m = validate(epoch)
    m.update(step=step, resumed_at=resumed_at, world_size=world)
    save_and_report(m, final=True)


# ----------------------------------------------------------------------------- driver
def _val_ranking(data, cfg: PrepareConfig, n_users: int, seed: int) -> list[dict]:
    """Validation users' next items with 99 fixed negatives, rendered with one seen template."""
    from .augment import _negatives
    from .prompts import load_templates

    seqs = data.sequences_pandas(columns=["user", "ids", "index", "n_train"])
    seqs = seqs[seqs["ids"].map(len) > seqs["n_train"]].head(n_users)
    temp = [t for t in load_templates(cfg.prompts.templates_dir or None)["sequential"] if not t.held_out][0]
    ids = data.id_texts
    rng = np.random.default_rng(seed)
    out = []
    for user, seq, index, n_train in seqs.itertuples(index=False):
        hist = list(seq[max(0, n_train - cfg.prompts.max_history):n_train])
        src, tgt = temp.render({"user": user, "history": ", ".join(hist), "item": seq[n_train]})
        neg = [ids[j] for j in _negatives(rng, len(ids), set(int(i) for i in index), 99)]
        out.append({"source": src, "candidates": [tgt] + neg})
    return out


def run(cfg: TrainConfig, log=print) -> Path:
    """Train (or resume) a run and write its bundle; returns the bundle path."""
    import ray
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .augment import example_dataset
    from .bundle import load_bundle, save_bundle
    from .dataset import PreparedData
    from .model import RecT5
    from .runtime import ensure_ray
    from .tokenizer import RecTokenizer, train_tokenizer

    data = PreparedData.open(cfg.data)
    ensure_ray(quiet=False)  # the workers' progress lines reach the console
    name = cfg.name or Path(cfg.out).name
    storage = cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).resolve())
    run_dir = Path(storage) / name if "://" not in storage else Path(tempfile.mkdtemp()) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    pcfg = from_dict(PrepareConfig, data.manifest["config"])
    init = None
    tok_path = run_dir / "tokenizer.json"
    if cfg.init_bundle:
        init = load_bundle(cfg.init_bundle)
        init.tokenizer.save(tok_path)
    elif not tok_path.exists():
        texts = example_dataset(cfg.data, pcfg, split="train", epoch=0, families=cfg.families,
                                log=lambda *a: None).limit(30_000).to_pandas()
        corpus = list(texts["source"]) + list(texts["target"]) + data.id_texts
        items = data.id_texts if cfg.item_token_mode == "token" else None
        train_tokenizer(corpus, cfg.vocab_size, item_tokens=items).save(tok_path)
        log(f"pretrain: tokenizer trained on {len(corpus)} texts -> {tok_path}")
    tok = RecTokenizer.load(tok_path)

    # one lazy stream per epoch (each re-draws its examples), globally shuffled so that every batch
    # mixes the task families (built from two tables); block-order shuffling alone left windows of
    # hundreds of steps with one family
    counts = (example_dataset(cfg.data, pcfg, split="train", epoch=0, families=cfg.families, log=log)
              .groupby("family").count().to_pandas())
    counts = dict(zip(counts["family"], counts["count()"].astype(int)))
    keep = mixing_weights(counts, cfg)
    per_epoch = sum(n * keep.get(f, 1.0) for f, n in counts.items())
    log("pretrain: examples per epoch " + ", ".join(f"{f} {counts[f] * keep[f]:.0f}/{counts[f]}" for f in counts))
    epochs = []
    for e in range(cfg.epochs):
        ds = example_dataset(cfg.data, pcfg, split="train", epoch=e, families=cfg.families, log=lambda *a: None)
        if any(v < 1 for v in keep.values()):
            ds = ds.map_batches(_family_filter, fn_kwargs={"weights": keep, "seed": cfg.seed}, batch_format="pandas")
        epochs.append(ds.random_shuffle(seed=cfg.seed + e))
    train_ds = epochs[0].union(*epochs[1:]) if len(epochs) > 1 else epochs[0]
    workers = max(1, cfg.workers)
    total = math.ceil(per_epoch * cfg.epochs / (cfg.batch_size * workers * cfg.grad_accum))
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    val_ds = example_dataset(cfg.data, pcfg, split="valid", families=[f for f in cfg.families if f != "span"],
                             log=lambda *a: None).limit(cfg.val_examples).materialize()
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    log(f"pretrain: run {name!r}: {per_epoch:.0f} examples/epoch, {total} steps, {cfg.workers} worker(s), "
        f"storage {storage}")
    loop_cfg = {**to_dict(cfg), "tokenizer": str(tok_path), "total_steps": total, "run_dir": str(run_dir),
                "steps_per_epoch": max(1, math.ceil(total / cfg.epochs)),
                "val_rank": _val_ranking(data, pcfg, cfg.val_users, cfg.seed),
                "init_bundle": str(Path(cfg.init_bundle).resolve()) if cfg.init_bundle else ""}
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.gpu else {})}),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": train_ds, "val": val_ds}, dataset_config=DataConfig(datasets_to_split=["train"]))
    result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        model = RecT5.from_pretrained(d, use_safetensors=True)
        history = json.loads(Path(d, "history.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps(history, indent=2))
    manifest = {"data": {"path": str(Path(cfg.data).resolve()), "sources": data.manifest.get("sources"),
                         "indexing": data.manifest.get("indexing")},
                "train_config": to_dict(cfg), "run": {"name": name, "storage_path": storage},
                "metrics": history[-1] if history else {}, "init_bundle": cfg.init_bundle or None}
    out = save_bundle(cfg.out, model, tok, data.catalog, manifest,
                      templates_dir=(init.templates_dir if init else pcfg.prompts.templates_dir or None))
    log(f"pretrain: bundle written to {out}")
    return out
