"""``recflm pretrain`` / ``recflm finetune``: the model trained data-parallel on Ray Train.

The driver trains the tokenizer (pretrain) or takes the bundle's (finetune), builds the lazy
example stream and runs a ``TorchTrainer``: DDP over gloo on CPU and NCCL on GPU. Each epoch is one
pass over the worker's shard (``get_dataset_shard``): the stream is re-executed every pass, its
tasks read the epoch from a clock actor the loop sets (``augment.make_epoch_clock``), so each pass
re-draws its examples. Workers train with AdamW, linear warm-up and decay, clipping and accumulation
(bf16 autocast on GPU); the loss computes output logits at supervised positions only and weighs a
dense sequential row by its number of next-item targets (``_example_losses``). They report loss per
task family, learning rate, samples/s, targets/s (next-item predictions that get a loss) and tokens/s,
checkpoint every ``checkpoint_every`` steps (model, optimizer, scheduler, step, epoch and the batches
consumed of it, the best epoch's weights) and, at each epoch end, validation loss and ranking metrics
on ``val_users`` seeded validation users: HR@10 of the next item among 100 candidates and NDCG@10 /
HR@10 over the whole catalog (constrained beam search, or the exact top-k of a dense bundle, the
user's items excluded): ``val_ndcg10`` is what early stopping (``patience``), the exported best epoch
(``select_best``) and tuning sweeps select on. ``max_minutes`` caps the training time.

Fine-tune settings a sweep searches (lr, warm-up, epochs, batch size, family weights, families,
dropout, label smoothing, ``augment.*`` / ``prompts.*`` overrides of the dataset's config) are all
fields of ``TrainConfig``. ``run`` is ``setup`` -> ``make_trainer(...).fit()`` -> ``export_bundle``;
``recflm tune`` calls the same three pieces inside each trial (see tune.py).

A run has a name; the same command with the same name resumes it from its last checkpoint, and
``FailureConfig(max_failures)`` restarts a failed worker group from there. The result is a bundle.

One module on purpose (it is longer than the others): the worker loop, the driver's ``setup`` and
``export_bundle`` share the loop config's keys and the checkpoint layout, and read top to bottom in
that order (``TrainConfig``, the losses, ``train_loop``, ``setup`` / ``make_trainer``, the export, the
CLI stage); split, each change to a checkpoint or config key would touch three files.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .config import ConfigError, PrepareConfig, flags_into, from_dict, load_config, to_dict


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
    threads: int = 0  # torch threads per worker (0: Ray's default, one per reserved CPU); more than the
    # reserved CPUs leaves Ray Data its CPU while the math uses idle cores
    placement_strategy: str = "PACK"  # ScalingConfig placement: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
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
    checkpoint_every: int = 200  # 0: checkpoints at epoch ends only
    log_every: int = 20
    max_failures: int = 2
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    epoch_steps: int = 0  # end an epoch after this many optimizer steps (0: a full pass over the data)
    max_minutes: float = 0.0  # stop training after this many minutes (0: no limit); the best epoch is exported
    patience: int = 0  # early stopping: stop after this many epochs without a better val_ndcg10 (0: off)
    select_best: bool = True  # export the epoch with the best val_ndcg10, not the last step
    dropout: float | None = None  # model dropout_rate (None: the preset's 0.1, or the bundle's)
    # add an embedding of each item's attribute values (the catalog's attributes: MovieLens genres, an item table's
    # attrs column) to its token's input and output embedding (one token per item): rare items borrow what
    # their attributes learnt from the others. A fresh model only (a fine-tune keeps its bundle's choice)
    item_features: bool = False
    label_smoothing: float = 0.0
    augment: dict = field(default_factory=dict)  # overrides of the dataset's augment.* settings, e.g. {crop: 0.3}
    prompts: dict = field(default_factory=dict)  # overrides of the dataset's prompts.* settings
    val_examples: int = 256
    val_users: int = 100  # fixed validation users: HR@10 of 100 candidates and full-ranking NDCG@10 / HR@10
    val_beams: int = 20  # beam width of the full-ranking validation (constrained to the catalog)
    shuffle_buffer: int = 2000
    seed: int = 2022
    init_bundle: str = ""  # finetune: the bundle to start from
    # supervised: the task families' prompts; self-supervised: the label-free objectives over the raw training
    # sequences only (families: span and / or next; the default SELF_SUPERVISED_FAMILIES where families names
    # none of them, see self_supervised_families), validated by their loss on the valid split, for a later finetune
    objective: str = "supervised"
    users_share: float = 1.0  # train (and validate) on this seeded share of the users only (evaluation: all)
    # finetune on a dataset whose catalog is not the bundle's: keep (refused), extend (the bundle's items keep
    # their tokens, new items get new ones: prepare --update) or replace (another domain: every item token fresh)
    catalog: str = "keep"
    fail_at_step: int = -1  # fault injection for tests: rank 0 raises once at this step


# ----------------------------------------------------------------------------- per worker
def _family_counts(batch):
    return batch["family"].value_counts().rename_axis("family").reset_index(name="count")


PER_USER_FAMILIES = ("sequential", "direct", "span", "next")
OBJECTIVES = ("supervised", "self-supervised")
# the self-supervised objective's default: masked-item spans of the training sequences (no label, no prompt family).
# ``next`` (augment.NEXT: causal next-item in the dense style) is asked for by name, families=[next] or
# [span,next]: it needs one token per item (item_token_mode=token), span works with sub-word IDs too
SELF_SUPERVISED_FAMILIES = ["span"]
BEST_WEIGHTS = "best_model.safetensors"  # in a checkpoint: the weights of the best epoch so far


def self_supervised_families(families: list, log=print) -> list:
    """The families of an ``objective=self-supervised`` run. A list naming no self-supervised family (a labelled
    recipe's, e.g. pretrain_quality.yaml's [sequential, rating]) or the default list of TrainConfig (the labelled
    families plus span) is not this objective's: the default ``SELF_SUPERVISED_FAMILIES``. Any other list is
    honoured and may name self-supervised families only (``ConfigError`` naming the first other one)."""
    from .augment import SELF_SUPERVISED
    from .prompts import FAMILIES

    unknown = [f for f in families if f not in FAMILIES and f not in SELF_SUPERVISED]
    if unknown:
        raise ConfigError(f"unknown task family {unknown[0]!r} (known: {', '.join(FAMILIES + SELF_SUPERVISED)})")
    if set(families) == set(TrainConfig().families) or not set(families) & set(SELF_SUPERVISED):
        if list(families) != SELF_SUPERVISED_FAMILIES:
            log(f"pretrain: objective self-supervised: families {SELF_SUPERVISED_FAMILIES} (not {list(families)})")
        return list(SELF_SUPERVISED_FAMILIES)
    labelled = [f for f in families if f not in SELF_SUPERVISED]
    if labelled:
        raise ConfigError(f"objective=self-supervised: {labelled[0]!r} is a labelled task family; families= may name "
                          f"the self-supervised ones only ({', '.join(SELF_SUPERVISED)}), e.g. families=[span,next]")
    return list(dict.fromkeys(families))


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
    """Encoder inputs, decoder labels and which rows are dense sequences (their labels: one item token
    per position, no ``</s>``: every position is a next-item target). Dense rating rows ((item, rating)
    pairs, one token each) are read by the decoder whole but supervised at their rating tokens only: their
    item positions are -100 in the labels, and ``enc["decoder_input_ids"]`` carries the unmasked tokens."""
    import torch

    from .tokenizer import pad_labels

    enc = tok.encode_batch(list(batch["source"]), cfg["max_source_len"])
    seq = batch["template"].isin(cfg["dense_templates"]).to_numpy()
    rated = batch["template"].isin(cfg.get("dense_rating_templates", [])).to_numpy()
    dense = np.array(seq | rated, dtype=bool)
    if dense.any():
        plain = [t for t, d in zip(batch["target"], dense) if not d]
        plain_ids = iter(tok.target_ids(plain, cfg["max_target_len"]))
        pairs = 2 * max(1, int(cfg.get("rating_window", 1)))  # tokens of a rating window, whole pairs kept
        rows = [tok.item_token_ids(t.split(" "))[-cfg["dense_max_len"]:] if q else
                tok.item_token_ids(t.split(" "))[-pairs:] if r else next(plain_ids)
                for t, q, r in zip(batch["target"], seq, rated)]
        labels = pad_labels(rows)
        if rated.any():
            enc["decoder_input_ids"] = _shift_right(labels, tok.pad_id)
            item_pos = torch.zeros_like(labels, dtype=torch.bool)
            item_pos[torch.as_tensor(np.array(rated, dtype=bool)), 0::2] = True  # pairs: the item, then its rating
            labels = labels.masked_fill(item_pos, -100)
    else:
        labels = tok.encode_targets(list(batch["target"]), cfg["max_target_len"])
    enc = {k: v.to(device) for k, v in enc.items()}
    return enc, labels.to(device), dense


def _shift_right(labels, start_id: int):
    """T5's decoder inputs for ``labels``: the start token, then the labels but the last (-100 as padding)."""
    import torch

    out = torch.full_like(labels, start_id)
    out[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, start_id)
    return out


def _example_losses(model, enc, labels, dense=None, label_smoothing: float = 0.0, dense_last: bool = False):
    """(batch loss, mean token loss per example). Logits are computed at supervised positions only.
    The batch loss weighs a dense row by its number of next-item targets (each target counts once, as
    in SASRec) and every other example once (its mean token loss). ``dense_last``: a dense row's loss
    is its last position's only (validation: the held-out item, not the training items before it)."""
    import torch

    loss, row = model(**enc, labels=labels, token_losses=True, label_smoothing=label_smoothing)
    B = labels.shape[0]
    total = torch.zeros(B, device=loss.device).index_add(0, row, loss)
    count = torch.zeros(B, device=loss.device).index_add(0, row, torch.ones_like(loss)).clamp(min=1)
    per_ex = total / count
    if dense_last and dense is not None and dense.any():
        last = torch.zeros(B, dtype=torch.long, device=loss.device).index_reduce_(
            0, row, torch.arange(len(row), device=loss.device), "amax", include_self=False)
        d = torch.as_tensor(dense, device=loss.device)
        per_ex = torch.where(d, loss[last], per_ex)
    if dense is None or not dense.any():
        return per_ex.mean(), per_ex
    d = torch.as_tensor(dense, device=loss.device)
    batch_loss = (total[d].sum() + per_ex[~d].sum()) / (count[d].sum() + (~d).sum())
    return batch_loss, per_ex


def _prefix_tokens(tok, chunk: list) -> list | None:
    """Decoder prefixes (item tokens) of dense-style validation rows, None for prompt-style ones."""
    if chunk[0]["prefix"] is None:
        return None
    return [tok.item_token_ids(ex["prefix"]) for ex in chunk]


def _rank_hr10(model, tok, val_rank: list, device, batch: int = 4, search=None) -> float:
    """HR@10 of the true next item among 100 candidates (teacher-forced sequence log-probs; dense
    style: the next-item log-probs of the candidates)."""
    import torch

    if not val_rank:
        return float("nan")
    hits = 0
    model.eval()
    if val_rank[0]["prefix"] is not None:
        for i in range(0, len(val_rank), 256):
            chunk = val_rank[i:i + 256]
            s = search.item_scores(tok.encode_batch([ex["source"] for ex in chunk], 256), _prefix_tokens(tok, chunk))
            for r, ex in enumerate(chunk):
                c = s[r, ex["cand_index"]]
                hits += int((c > c[0]).sum().item() < 10)
        model.train()
        return hits / len(val_rank)
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


def _full_ranking(model, tok, search, val_rank: list, beams: int, batch: int = 16) -> dict:
    """NDCG@10 and HR@10 of the true next item over the whole catalog: constrained beam search (dense
    style: the exact top-k of the next-item scores), the user's training items excluded (the protocol
    of ``recflm evaluate``, on ``val_users`` users)."""
    from .metrics import ranking_metrics, ranks_of_truth

    if not val_rank:
        return {"val_ndcg10": float("nan"), "val_hr10": float("nan")}
    lists = []
    model.eval()
    if val_rank[0]["prefix"] is not None:
        batch = 256  # one decoder pass per user
    for i in range(0, len(val_rank), batch):
        chunk = val_rank[i:i + batch]
        items, _ = search.search(tok.encode_batch([ex["source"] for ex in chunk], 256), beams=beams, k=10,
                                 exclude=[ex["exclude"] for ex in chunk], prefix=_prefix_tokens(tok, chunk))
        lists += items.tolist()
    model.train()
    m = ranking_metrics(ranks_of_truth(lists, [ex["truth"] for ex in val_rank]), ks_hr=(10,), ks_ndcg=(10,))
    return {"val_ndcg10": m["NDCG@10"], "val_hr10": m["HR@10"]}


def train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from .augment import CLOCK_NAMESPACE
    from .generate import CatalogTrie, ConstrainedBeamSearch
    from .model import RecT5, build_model
    from .tokenizer import RecTokenizer

    torch.manual_seed(config["seed"])
    if config["threads"]:
        torch.set_num_threads(int(config["threads"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tok = RecTokenizer.from_str(config["tokenizer"])
    dropout = {} if config["dropout"] is None else {"dropout_rate": float(config["dropout"])}
    feats = config.get("item_feature_table") or {}
    if config["init_bundle"]:
        model = RecT5.from_pretrained(config["init_bundle"], use_safetensors=True, **dropout)
        if tok.vocab_size != model.config.vocab_size or config.get("fresh_tokens"):  # another catalog
            from .model import adapt_embeddings

            adapt_embeddings(model, tok.vocab_size, config.get("fresh_tokens") or [], config["seed"])
    else:
        extra = {"item_feature_attrs": feats["n_attrs"], "item_feature_slots": feats["slots"],
                 "item_feature_values": feats["values"]} if feats else {}
        model = build_model(config["preset"], tok.vocab_size, tok.pad_id, tok.eos_id, **dropout, **extra)
    if feats and hasattr(model, "item_feature_index"):  # the (extended) catalog's items by their attributes
        model.set_item_features(feats["tokens"], feats["attrs"])
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"], eps=1e-6)
    total = max(1, config["total_steps"])
    warm = max(1, int(config["warmup"] * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))

    step, history, elapsed = 0, [], 0.0  # elapsed: training seconds of earlier attempts (max_minutes counts them)
    # the best epoch so far (val_ndcg10): its weights are exported when select_best is on
    best = {"score": -math.inf, "epoch": -1, "state": None, "stale": 0}
    position = {"epoch": 0, "batches": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        from safetensors.torch import load_file, load_model

        with ckpt.as_directory() as d:
            load_model(core, os.path.join(d, "model.safetensors"), strict=False, device=str(device))
            state = torch.load(os.path.join(d, "train_state.pt"), map_location=device, weights_only=True)
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            step = int(state["step"])
            history = json.loads(Path(d, "history.json").read_text())
            if "epoch" in state:
                position.update(epoch=int(state["epoch"]), batches=int(state["epoch_batches"]))
            else:  # a checkpoint of the single-stream loop: its data position was step x accumulation
                position.update(epoch=0, batches=step * int(config["grad_accum"]))
            elapsed = float(state.get("train_seconds", 0.0))
            if "best" in state:
                best.update(score=float(state["best"]["score"]), epoch=int(state["best"]["epoch"]),
                            stale=int(state["best"]["stale"]))
            if rank == 0 and Path(d, BEST_WEIGHTS).exists():
                best["state"] = load_file(os.path.join(d, BEST_WEIGHTS))
    resumed_at = step
    t_start = time.perf_counter() - elapsed

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    shard = ray.train.get_dataset_shard("train")
    accum, bs = config["grad_accum"], config["batch_size"]

    def new_window():
        return {"t0": time.perf_counter(), "samples": 0, "tokens": 0, "targets": 0, "loss": {}, "n": {}}

    window = new_window()
    # data position: the epoch and the batches this worker had consumed of it
    start_epoch, skip = position["epoch"], position["batches"]
    epoch, micro = start_epoch, 0
    fail_at = config["fail_at_step"]
    fail_marker = Path(config["run_dir"]) / "injected_failure"
    smoothing = config["label_smoothing"]
    search = ConstrainedBeamSearch(core, CatalogTrie.from_catalog(tok, config["catalog_ids"])) if rank == 0 else None

    def save_and_report(metrics: dict, final: bool = False):
        history.append(metrics)
        if rank == 0:
            # Ray Train copies a reported checkpoint to storage; local mode keeps a reference to the
            # directory instead, so there it must outlive this call
            local = config["workers"] == 0
            d = tempfile.mkdtemp(dir=config["run_dir"], prefix="local_ckpt_") if local else tempfile.mkdtemp()
            core.save_pretrained(d, safe_serialization=True)  # config.json + model.safetensors (tied weights)
            if best["state"] is not None:  # the best epoch's weights beside the current ones
                from safetensors.torch import save_file

                save_file(best["state"], os.path.join(d, BEST_WEIGHTS))
            torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                        "epoch": position["epoch"], "epoch_batches": position["batches"],
                        "train_seconds": time.perf_counter() - t_start,
                        "best": {k: best[k] for k in ("score", "epoch", "stale")}},
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
                enc, labels, dense = _batch_tensors(tok, b, config, device)
                with autocast:
                    _, l = _example_losses(core, enc, labels, dense, dense_last=True)
                losses.append(l.float().cpu())
        core.train()
        vl = float(torch.cat(losses).mean()) if losses else float("nan")
        m = {"epoch": ep, "epochs_done": ep + 1, "val_loss": vl}  # epochs_done: ASHA's time axis in sweeps
        if rank == 0:  # only rank 0's metrics are kept
            hr = _rank_hr10(core, tok, config["val_rank"], device, search=search)
            m.update(val_hr10_of_100=hr, **_full_ranking(core, tok, search, config["val_rank"], config["val_beams"]))
            score = m["val_ndcg10"] if not math.isnan(m["val_ndcg10"]) else -vl
            if score > best["score"]:
                best.update(score=score, epoch=ep, stale=0)
                best["state"] = {k: v.detach().to("cpu", copy=True) for k, v in core.state_dict().items()}
            else:
                best["stale"] += 1
            m.update(best_epoch=best["epoch"], best_val_ndcg10=best["score"])
        return m

    def agree(flag: bool) -> bool:
        """One decision for every rank (rank 0 holds the validation metrics)."""
        if world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.broadcast(t, 0)
        return bool(t.item())

    def out_of_time() -> bool:
        return bool(config["max_minutes"]) and (time.perf_counter() - t_start) / 60 >= config["max_minutes"]

    model.train()
    clock = ray.get_actor(config["epoch_clock"], namespace=CLOCK_NAMESPACE)
    stopped, m, mid_epoch = "", {}, False
    for epoch in range(start_epoch, config["epochs"]):
        ray.get(clock.set.remote(epoch))  # this pass's tasks draw epoch `epoch`'s examples
        position["epoch"], position["batches"] = epoch, 0
        epoch_start = step - skip // accum  # a resumed epoch had made skip // accum of its steps
        for batch in shard.iter_batches(batch_size=bs, batch_format="pandas", drop_last=True,
                                        local_shuffle_buffer_size=config["shuffle_buffer"],
                                        local_shuffle_seed=config["seed"] + epoch):
            position["batches"] += 1
            if skip > 0:  # resumed mid-epoch: the batches this worker had consumed
                skip -= 1
                continue
            enc, labels, dense = _batch_tensors(tok, batch, config, device)
            # DDP all-reduces only on the last micro-batch of an accumulation
            sync = (micro + 1) % accum == 0 or not hasattr(model, "no_sync")
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                batch_loss, per_ex = _example_losses(model, enc, labels, dense, smoothing)
                loss = batch_loss / accum
                loss.backward()
            for fam, l in zip(batch["family"], per_ex.detach().float().cpu().tolist()):
                window["loss"][fam] = window["loss"].get(fam, 0.0) + l
                window["n"][fam] = window["n"].get(fam, 0) + 1
            window["samples"] += len(batch)
            window["tokens"] += int(enc["attention_mask"].sum()) + int((labels != -100).sum())
            # next-item predictions that receive a loss: every position of a dense row, one per prompt
            sequential = batch["family"].isin(("sequential", "next")).to_numpy()
            window["targets"] += int((labels[torch.as_tensor(dense & sequential)] != -100).sum()) + int(
                (sequential & ~dense).sum())
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
                     "targets_per_s": window["targets"] * world / dt,
                     **{f"loss/{f}": window["loss"][f] / window["n"][f] for f in window["loss"]}}
                m["loss"] = sum(window["loss"].values()) / max(1, sum(window["n"].values()))
                if rank == 0:
                    fams = " ".join(f"{f}={v:.3f}" for f, v in m.items() if f.startswith("loss/"))
                    print(f"[recflm] step {step}/{total} loss {m['loss']:.4f} lr {m['lr']:.2e} "
                          f"{m['samples_per_s']:.0f} samples/s {m['targets_per_s']:.0f} targets/s "
                          f"{m['tokens_per_s']:.0f} tok/s | {fams}", flush=True)
                window = new_window()
                if config["checkpoint_every"] and step % config["checkpoint_every"] == 0:
                    save_and_report(m)
            if config["max_steps"] and step >= config["max_steps"]:
                stopped, mid_epoch = f"max_steps: {config['max_steps']}", True
                break
            if config["epoch_steps"] and step - epoch_start >= config["epoch_steps"]:
                break  # a short epoch (epoch_steps): it ends here, validated below
            if step % 10 == 0 and agree(out_of_time()):
                stopped, mid_epoch = f"time limit: {config['max_minutes']} minutes", True
                break
        if stopped:
            break
        m = validate(epoch)
        m.update(step=step, lr=sched.get_last_lr()[0])
        window = new_window()  # throughput windows leave validation out
        position["epoch"], position["batches"] = epoch + 1, 0  # a checkpoint here resumes at the next epoch
        if rank == 0:
            print(f"[recflm] epoch {epoch} done: val_loss {m['val_loss']:.4f} "
                  f"val HR@10/100 {m['val_hr10_of_100']:.3f} val NDCG@10 {m['val_ndcg10']:.4f} "
                  f"(best {m['best_val_ndcg10']:.4f} at epoch {m['best_epoch']}) "
                  f"{(time.perf_counter() - t_start) / 60:.1f} min", flush=True)
        if epoch == config["epochs"] - 1:
            break  # the final report below carries this validation
        save_and_report(m)
        if agree(bool(config["patience"]) and best["stale"] >= config["patience"]):
            stopped = f"early stop: no better val_ndcg10 for {config['patience']} epochs"
            break
        if agree(out_of_time()):
            stopped = f"time limit: {config['max_minutes']} minutes"
            break
    if stopped and rank == 0:
        print(f"[recflm] {stopped}, at step {step}", flush=True)
    if mid_epoch or "val_loss" not in m:
        m = validate(epoch)  # stopped mid-epoch (or nothing left to run): validate what was trained
    m = {**m, "step": step}
    m.update(resumed_at=resumed_at, world_size=world, stopped=stopped or "done",
             train_minutes=round((time.perf_counter() - t_start) / 60, 2))
    if world > 1:  # the Ray node each rank ran on (rank 0 reports them)
        import ray
        import torch.distributed as dist

        nodes = [None] * world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        m["worker_nodes"] = nodes
    save_and_report(m, final=True)


# ----------------------------------------------------------------------------- driver
def inference_settings(pcfg: PrepareConfig) -> dict:
    """How evaluation and serving ask the trained model for next items (the bundle manifest's
    ``inference``): the sequential style and how many history items the prompt or prefix holds."""
    from .augment import dense_rating

    dense = pcfg.prompts.sequential_style != "prompt"
    rated = dense_rating(pcfg.prompts)
    return {"sequential": "dense" if dense else "prompt",
            "history": pcfg.prompts.dense_max_len - 1 if dense else pcfg.prompts.max_history,
            # dense bundles rank a fixed candidate list by the same next-item scores
            "direct": "sequential" if dense else "prompt",
            # dense rating: the (item, rating) pairs of the history in the decoder prefix, then the item
            "rating": "dense" if rated else "prompt",
            **({"rating_history": pcfg.prompts.rating_window - 1} if rated else {})}


def _val_ranking(data, cfg: PrepareConfig, n_users: int, seed: int, users_share: float = 1.0) -> list[dict]:
    """Validation users' inputs (``sequential_input`` with the first seen template of the run's
    style), their next item (``truth``), their training items (``exclude``) and 99 fixed negatives
    (``candidates[1:]``, ``cand_index``). Users are a seeded sample, not the first ``n_users``."""
    from .augment import labelled_users, sample_negatives
    from .prompts import load_templates, sequential_input, sequential_template

    inf = inference_settings(cfg)
    seqs = data.sequences_pandas(columns=["user", "ids", "index", "n_train"])
    seqs = seqs[(seqs["ids"].map(len) > seqs["n_train"]) & (seqs["n_train"] >= 1)]  # 0: held out whole
    seqs = seqs[~seqs["user"].isin(data.holdout_users)]  # held-out users stay out of selection too
    seqs = seqs[labelled_users(seqs["user"], cfg.seed, users_share)]  # a fine-tune on a share: its users only
    if len(seqs) > n_users:
        seqs = seqs.sample(n=n_users, random_state=seed)
    temp = sequential_template(load_templates(cfg.prompts.templates_dir or None), inf["sequential"] == "dense")
    ids = data.id_texts
    rng = np.random.default_rng(seed)
    out = []
    for user, seq, index, n_train in seqs.itertuples(index=False):
        src, prefix = sequential_input(temp, user, list(seq[:n_train]), inf["history"])
        neg = sample_negatives(rng, len(ids), set(int(i) for i in index), 99)
        cand = [int(index[n_train])] + neg
        out.append({"source": src, "prefix": prefix, "candidates": [ids[j] for j in cand], "cand_index": cand,
                    "truth": int(index[n_train]), "exclude": [int(i) for i in index[:n_train]]})
    return out


def inherited_prompts(cfg: TrainConfig) -> dict:
    """A fine-tune's prompt settings: its bundle's (e.g. the dense style), then its own overrides."""
    inherited = {}
    if cfg.init_bundle and Path(cfg.init_bundle, "manifest.json").is_file():
        inherited = json.loads(Path(cfg.init_bundle, "manifest.json").read_text()).get("train_config", {}).get(
            "prompts", {})
    return {**inherited, **cfg.prompts}


def prepare_config(cfg: TrainConfig, data) -> PrepareConfig:
    """The dataset's prepare config with this run's ``augment.*`` / ``prompts.*`` overrides."""
    from .config import AugmentConfig, PromptConfig

    pcfg = from_dict(PrepareConfig, data.manifest["config"])
    pcfg.augment = from_dict(AugmentConfig, {**to_dict(pcfg.augment), **cfg.augment}, prefix="augment.")
    pcfg.prompts = from_dict(PromptConfig, {**to_dict(pcfg.prompts), **inherited_prompts(cfg)}, prefix="prompts.")
    return pcfg


@dataclass
class TrainSetup:
    """What the driver builds before ``fit``: the run's place, its tokenizer, data and loop config."""

    cfg: TrainConfig
    name: str
    storage: str
    run_dir: Path
    datasets: dict
    loop_cfg: dict
    clock: object = None  # the epoch clock actor (kept alive by holding this)


def family_counts(data_dir: str, pcfg: PrepareConfig, families: list, log=print, users_share: float = 1.0) -> dict:
    """Training examples per task family in one epoch (one pass over the example stream, no shuffle)."""
    from .augment import example_dataset

    counts = (example_dataset(data_dir, pcfg, split="train", epoch=0, families=families, log=log,
                              users_share=users_share)
              .map_batches(_family_counts, batch_format="pandas", batch_size=None).to_pandas())
    return {f: int(n) for f, n in counts.groupby("family")["count"].sum().items()}


# what may change when a run of the same name is continued: its length, budget and bookkeeping
RESUMABLE_CHANGES = {"out", "epochs", "max_steps", "max_minutes", "patience", "max_failures", "fail_at_step",
                     "log_every", "checkpoint_every", "storage_path"}


def _check_resumable(saved: Path, cfg: TrainConfig) -> None:
    """A run of this name exists: continuing it with another recipe would mix two trainings in one run."""
    if not saved.is_file():
        return
    try:
        old = json.loads(saved.read_text())
    except json.JSONDecodeError:
        return
    new = json.loads(json.dumps(to_dict(cfg)))
    diff = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
    if diff:
        raise ConfigError(f"run {saved.parent.name!r} in {saved.parent.parent} was started with another config "
                          f"(it differs in {', '.join(diff)}): the same name resumes a run; pick another name= "
                          f"or delete {saved.parent}")


class RunStore:
    """A run's own small files (config.json, tokenizer.json) beside its checkpoints on a remote storage: any
    URI pyarrow's file systems know (``s3://``, ``gs://``, ``file://``, ...). The driver works on a copy in a
    temp dir; what a resume on another machine needs is read back from here. A local storage needs none:
    the run directory is the storage itself."""

    def __init__(self, storage: str, name: str):
        import pyarrow.fs as pafs

        self.fs, root = pafs.FileSystem.from_uri(storage)
        self.base = f"{root.rstrip('/')}/{name}"
        self.fs.create_dir(self.base, recursive=True)

    def read(self, fname: str) -> bytes | None:
        import pyarrow.fs as pafs

        path = f"{self.base}/{fname}"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def write(self, fname: str, data: bytes) -> None:
        with self.fs.open_output_stream(f"{self.base}/{fname}") as f:
            f.write(data)


def setup(cfg: TrainConfig, log=print, counts: dict | None = None) -> TrainSetup:
    """Tokenizer (trained for pretrain, the bundle's for finetune), the lazy example streams and the
    per-worker config. Needs a connected Ray; runs in ``run`` and in each Tune trial's driver.
    ``counts``: examples per family, when the caller knows them (a sweep counts once for all trials)."""
    from .augment import NEXT, NEXT_SOURCE, SELF_SUPERVISED, SPAN_SOURCE, example_dataset, make_epoch_clock
    from .bundle import load_bundle
    from .dataset import PreparedData
    from .prompts import template_words
    from .tokenizer import train_tokenizer

    data = PreparedData.open(cfg.data)
    name = cfg.name or Path(cfg.out).name
    remote = "://" in cfg.storage_path
    storage = cfg.storage_path if remote else str(Path(cfg.storage_path).resolve())
    run_dir = Path(tempfile.mkdtemp()) / name if remote else Path(storage) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    store = RunStore(storage, name) if remote else None
    if store:  # the fresh working copy gets the run's stored files: for the resume check and a resume here
        for fname in ("config.json", "tokenizer.json"):
            saved = store.read(fname)
            if saved is not None:
                (run_dir / fname).write_bytes(saved)
    from .augment import SEQUENTIAL_STYLES, dense_rating
    from .prompts import rating_tokens

    cfg.prompts = inherited_prompts(cfg)  # recorded in config.json and the manifest: a fine-tune of it inherits them
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"objective={cfg.objective!r}: expected one of {', '.join(OBJECTIVES)}")
    if not 0 < cfg.users_share <= 1:
        raise ConfigError(f"users_share={cfg.users_share}: expected a share of the users in (0, 1]")
    if cfg.objective == "self-supervised":  # every window of the training sequences is masked, not the latest only
        cfg.families = self_supervised_families(cfg.families, log)
        cfg.prompts = {**cfg.prompts, "span_windows": True}
    _check_resumable(run_dir / "config.json", cfg)
    pcfg = prepare_config(cfg, data)
    style = pcfg.prompts.sequential_style
    if style not in SEQUENTIAL_STYLES:
        raise ConfigError(f"prompts.sequential_style={style!r}: expected one of {', '.join(SEQUENTIAL_STYLES)}")
    if style != "prompt" and cfg.item_token_mode != "token" and not cfg.init_bundle:
        raise ConfigError(f"prompts.sequential_style={style!r} needs one token per item: set item_token_mode=token")
    nxt = NEXT in cfg.families  # the dense causal next-item objective: one token per item too
    if nxt and cfg.item_token_mode != "token" and not cfg.init_bundle:
        raise ConfigError(f"the {NEXT!r} family (dense next-item targets) needs one token per item: "
                          "set item_token_mode=token")
    try:
        rated = "rating" in cfg.families and dense_rating(pcfg.prompts)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if rated and cfg.item_token_mode != "token" and not cfg.init_bundle:
        raise ConfigError("prompts.rating_style='dense' needs one token per item: set item_token_mode=token")
    tok_path = run_dir / "tokenizer.json"
    fresh_tokens: list = []  # a fine-tune on another catalog: the item tokens that start from fresh vectors
    relation = "same"
    if cfg.init_bundle:
        from .bundle import BundleError, check_catalog_mode

        base = load_bundle(cfg.init_bundle)
        try:
            relation = check_catalog_mode(base.catalog, cfg.data, cfg.catalog)
        except BundleError as e:
            raise ConfigError(str(e)) from None
        btok = base.tokenizer
        if relation != "same":
            fresh_tokens = _fit_catalog(btok, base.catalog, data.id_texts, relation, log)
        if rated:  # a bundle of a domain without ratings (e.g. Toys), fine-tuned to rate in the dense style
            added = _add_tokens(btok, [t for t in rating_tokens(pcfg.rating_min, pcfg.rating_max)
                                       if btok.hf.token_to_id(t) is None])
            if added:
                log(f"finetune: {len(added)} rating tokens new to the bundle, from fresh vectors")
            fresh_tokens += added
        btok.save(tok_path)
    elif not tok_path.exists():
        texts = example_dataset(cfg.data, pcfg, split="train", epoch=0, families=cfg.families,
                                log=lambda *a: None).limit(30_000).to_pandas()
        # every family's template words too, whatever this run trains: a later fine-tune's prompts are made of
        # learnt pieces (and the byte fallback reads any other text without <unk>)
        corpus = list(texts["source"]) + list(texts["target"]) + data.id_texts + 2 * (template_words(
            pcfg.prompts.templates_dir or None) + [SPAN_SOURCE.format(user="", history=""), NEXT_SOURCE])
        items = data.id_texts if cfg.item_token_mode == "token" else None
        # one token per rating value of the scale, beside the item tokens (a self-supervised pretrain too, where
        # the data has ratings: a later fine-tune of the dense rating style reads them)
        if rated or (cfg.objective == "self-supervised" and items and "rating" in data.families):
            items = (items or []) + rating_tokens(pcfg.rating_min, pcfg.rating_max)
        train_tokenizer(corpus, cfg.vocab_size, item_tokens=items).save(tok_path)
        log(f"pretrain: tokenizer trained on {len(corpus)} texts -> {tok_path}")
    if store:  # where a resume (on any machine) finds it, beside the checkpoints
        store.write("tokenizer.json", tok_path.read_bytes())

    if style != "prompt" or rated or nxt:
        from .tokenizer import RecTokenizer

        what = (f"prompts.sequential_style={style!r}" if style != "prompt" else
                "prompts.rating_style='dense'" if rated else f"the {NEXT!r} family")
        try:  # every catalog ID must be one token (not so for collaborative IDs or a sub-word bundle)
            RecTokenizer.load(tok_path).item_token_ids(data.id_texts)
            if rated:
                RecTokenizer.load(tok_path).item_token_ids(rating_tokens(pcfg.rating_min, pcfg.rating_max))
        except ValueError as e:
            raise ConfigError(f"{what}: {e}") from None
    # one lazy stream that every epoch iterates again: its tasks read the epoch from a clock actor the
    # loop sets, so each pass re-draws its examples (see augment.make_epoch_clock); blocks in random
    # order, and the loop's local shuffle buffer (seeded per epoch) mixes the task families of a batch
    counts = counts or family_counts(cfg.data, pcfg, cfg.families, log, users_share=cfg.users_share)
    keep = mixing_weights(counts, cfg)
    per_epoch = sum(n * keep.get(f, 1.0) for f, n in counts.items())
    log("pretrain: examples per epoch " + ", ".join(f"{f} {counts[f] * keep[f]:.0f}/{counts[f]}" for f in counts))
    clock_name = f"recflm-epoch-{name}-{uuid.uuid4().hex[:8]}"
    clock = make_epoch_clock(clock_name)
    train_ds = example_dataset(cfg.data, pcfg, split="train", epoch=clock_name, families=cfg.families,
                               log=lambda *a: None, keep=keep, users_share=cfg.users_share)
    train_ds = train_ds.randomize_block_order()  # unseeded: a new block order every pass
    workers = max(1, cfg.workers)
    steps_per_epoch = max(1, math.ceil(per_epoch / (cfg.batch_size * workers * cfg.grad_accum)))
    if cfg.epoch_steps:
        steps_per_epoch = min(steps_per_epoch, cfg.epoch_steps)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    self_supervised = cfg.objective == "self-supervised"  # validated by its families' loss of the valid items
    val_ds = example_dataset(cfg.data, pcfg, split="valid", families=cfg.families if self_supervised else
                             [f for f in cfg.families if f not in SELF_SUPERVISED],
                             log=lambda *a: None, users_share=cfg.users_share).limit(cfg.val_examples).materialize()
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    if store:
        store.write("config.json", (run_dir / "config.json").read_bytes())
    log(f"pretrain: run {name!r}: {per_epoch:.0f} examples/epoch, {total} steps, {cfg.workers} worker(s), "
        f"storage {storage}")
    from .prompts import is_dense, is_dense_rating, load_templates

    temps = load_templates(pcfg.prompts.templates_dir or None)
    dense_ids = [t.id for t in temps["sequential"] if is_dense(t)] + [NEXT]  # next rows: dense, by their template
    # the tokenizer travels as text: workers on other nodes cannot read the driver's files
    loop_cfg = {**to_dict(cfg), "tokenizer": tok_path.read_text(), "total_steps": total, "run_dir": str(run_dir),
                "dense_templates": dense_ids, "dense_max_len": pcfg.prompts.dense_max_len,
                "dense_rating_templates": [t.id for t in temps["rating"] if is_dense_rating(t)],
                "rating_window": pcfg.prompts.rating_window,
                "epoch_clock": clock_name,
                # no next-item validation of a model that learns no prompt: the best epoch is the lowest val loss
                "val_rank": [] if self_supervised else _val_ranking(data, pcfg, cfg.val_users, cfg.seed,
                                                                     cfg.users_share),
                "catalog_ids": data.id_texts,
                "item_feature_table": _item_feature_table(cfg, data, tok_path, relation),
                "init_bundle": str(Path(cfg.init_bundle).resolve()) if cfg.init_bundle else "",
                "fresh_tokens": fresh_tokens}
    return TrainSetup(cfg, name, storage, run_dir, {"train": train_ds, "val": val_ds}, loop_cfg, clock)


ITEM_FEATURE_SLOTS = 32  # attribute values kept per item (Toys items have 2 to 31)


def _item_feature_table(cfg: TrainConfig, data, tok_path, relation: str = "same") -> dict:
    """``item_features``: each item's token and its attribute values as ids 1..n_attrs (the values of the
    catalog's ``attributes`` lists, in order of first appearance; ``values``: the value of each id), for
    ``RecT5.set_item_features``; {} when off. A fine-tune of a bundle with item features, on its catalog or one
    that extends it (``relation``): the data's items by the bundle's values (new items borrow the vectors of the
    values the bundle knows; values it never saw are dropped); another domain's items (replace) get none."""
    from .tokenizer import RecTokenizer

    if cfg.init_bundle:
        bcfg = json.loads(Path(cfg.init_bundle, "config.json").read_text())
        known = bcfg.get("item_feature_values") or []
        if not known or relation not in ("same", "extends"):
            return {}
        index = {v: i + 1 for i, v in enumerate(known)}
        ids = [[index[str(v)] for v in a if str(v) in index][:ITEM_FEATURE_SLOTS] for a in data.catalog["attributes"]]
        return {"n_attrs": len(known), "slots": int(bcfg["item_feature_slots"]), "values": known,
                "tokens": RecTokenizer.load(tok_path).item_token_ids(data.id_texts), "attrs": ids}
    if not cfg.item_features:
        return {}
    if cfg.item_token_mode != "token":
        raise ConfigError("item_features=true needs one token per item: set item_token_mode=token")
    attrs = [list(a) for a in data.catalog["attributes"]]
    if not any(attrs):
        raise ConfigError(f"item_features=true: the catalog of {cfg.data} has no item attributes (prepare "
                          "MovieLens with its genres, or give an item table: --items FILE --item-columns "
                          "item=COL,attrs=COL)")
    vocab: dict = {}
    ids = [[vocab.setdefault(str(v), len(vocab) + 1) for v in a[:ITEM_FEATURE_SLOTS]] for a in attrs]
    tokens = RecTokenizer.load(tok_path).item_token_ids(data.id_texts)
    return {"n_attrs": len(vocab), "slots": max(len(a) for a in ids), "values": list(vocab), "tokens": tokens,
            "attrs": ids}


def _fit_catalog(tok, old_catalog, id_texts: list, relation: str, log=print) -> list[int]:
    """A bundle's tokenizer for a dataset whose catalog ``extends`` or replaces (``other``) the bundle's: with
    one token per item, the data's item IDs that are not tokens yet are added. Returns the token ids that start
    from fresh vectors: the new items' (extend), or every item of the data's (replace: an ID text of the old
    catalog names another item now). Sub-word IDs (pieces) need no new token."""
    old = [str(t) for t in old_catalog["id_text"]]
    one_token = bool(old) and all(tok.hf.token_to_id(t) is not None and t in tok.added for t in old[:50])
    if not one_token:
        log(f"finetune: catalog {relation}: sub-word item IDs, no new tokens")
        return []
    missing = [str(t) for t in id_texts if str(t) not in tok.added]
    added = _add_tokens(tok, missing)
    fresh = added if relation == "extends" else [int(tok.hf.token_to_id(str(t))) for t in id_texts]
    log(f"finetune: catalog {'extended' if relation == 'extends' else 'replaced'}: {len(missing)} new item tokens, "
        f"{len(fresh)} items from fresh vectors")
    return fresh


def _add_tokens(tok, texts: list) -> list[int]:
    """Add ``texts`` to a bundle's tokenizer as whole tokens (item IDs, rating values); their new token ids."""
    from tokenizers import AddedToken

    if not texts:
        return []
    tok.hf.add_tokens([AddedToken(str(t), single_word=True, normalized=False) for t in texts])
    tok.__init__(tok.hf)  # vocab size and added tokens
    return [int(tok.hf.token_to_id(str(t))) for t in texts]


def make_trainer(s: TrainSetup, callbacks: list | None = None):
    """The run's ``TorchTrainer``; ``callbacks`` (e.g. Tune's ``TuneReportCallback``) see every report."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = s.cfg
    return TorchTrainer(
        train_loop, train_loop_config=s.loop_cfg,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu, placement_strategy=cfg.placement_strategy,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.gpu else {})}),
        run_config=RunConfig(name=s.name, storage_path=s.storage, callbacks=list(callbacks or []),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=s.datasets, dataset_config=DataConfig(datasets_to_split=["train"]))


def export_bundle(cfg: TrainConfig, checkpoint, run_dir: str | Path, out: str | Path | None = None,
                  extra: dict | None = None, log=print) -> Path:
    """Write the bundle of a run's checkpoint (a ``ray.train.Checkpoint``) to ``out`` (default
    ``cfg.out``); ``extra`` is merged into its manifest. Also writes the run's ``metrics.json``."""
    from .bundle import save_bundle
    from .dataset import PreparedData
    from .model import RecT5
    from .tokenizer import RecTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    data = PreparedData.open(cfg.data)
    run_dir = Path(run_dir)
    with checkpoint.as_directory() as d:
        use_best = cfg.select_best and Path(d, BEST_WEIGHTS).exists()
        model = RecT5.from_pretrained(d, use_safetensors=True)
        if use_best:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(os.path.join(d, BEST_WEIGHTS)))
        history = json.loads(Path(d, "history.json").read_text())
    last = history[-1] if history else {}
    if use_best:  # the manifest describes the exported weights: the best epoch's validation
        best_m = next((m for m in reversed(history) if m.get("epoch") == last.get("best_epoch")
                       and "val_ndcg10" in m), last)
        last = {**last, **best_m, "last": last}
        log(f"pretrain: exporting the best epoch ({last.get('best_epoch')}, val_ndcg10 "
            f"{last.get('best_val_ndcg10', float('nan')):.4f}) rather than the last step")
    (run_dir / "metrics.json").write_text(json.dumps(history, indent=2))
    manifest = {"data": {"path": str(Path(cfg.data).resolve()), "sources": data.manifest.get("sources"),
                         "indexing": data.manifest.get("indexing")},
                "train_config": to_dict(cfg), "run": {"name": run_dir.name,
                        "storage_path": cfg.storage_path if "://" in cfg.storage_path else str(run_dir.parent)},
                "metrics": last, "exported": "best" if use_best else "last",
                "inference": inference_settings(prepare_config(cfg, data)),
                "init_bundle": cfg.init_bundle or None, "objective": cfg.objective, "families": list(cfg.families),
                **(extra or {})}
    templates = (Path(cfg.init_bundle) / "templates" if cfg.init_bundle
                 else prepare_config(cfg, data).prompts.templates_dir or None)
    tok = RecTokenizer.load(run_dir / "tokenizer.json")
    bundle = save_bundle(out or cfg.out, model, tok, data.catalog, manifest, templates_dir=templates)
    log(f"pretrain: bundle written to {bundle}")
    return bundle


def run(cfg: TrainConfig, log=print) -> Path:
    """Train (or resume) a run and write its bundle; returns the bundle path."""
    from .runtime import ensure_ray

    ensure_ray(quiet=False)  # the workers' progress lines reach the console
    s = setup(cfg, log)
    result = make_trainer(s).fit()
    if result.error:
        raise result.error
    return export_bundle(cfg, result.checkpoint, s.run_dir, log=log)


# ----------------------------------------------------------------------------- the CLI stages (pretrain, finetune)
HELP = {"pretrain": "pretrain the model on all task families with Ray Train (DDP)",
        "finetune": "fine-tune a bundle on chosen task families with Ray Train"}


def add_arguments(p, name: str) -> None:
    p.description = (HELP[name] + ". The result is a model bundle; rerunning with the same --name resumes the run "
                     "from its last checkpoint.")
    p.add_argument("--data", help="prepared dataset directory (config key: data)")
    p.add_argument("--out", "-o", help="bundle directory to write (config key: out)")
    p.add_argument("--name", help="run name; the same name resumes (config key: name)")
    p.add_argument("--preset", choices=["tiny", "seq", "mini", "small", "base"], help="model size (config key: preset)")
    p.add_argument("--workers", type=int, help="Ray Train workers (config key: workers)")
    p.add_argument("--gpu", action="store_true", help="train on GPUs (NCCL, bf16 autocast)")
    p.add_argument("--storage-path", help="checkpoint storage: a path or URI such as s3://bucket/runs")
    if name == "pretrain":
        p.add_argument("--objective", choices=list(OBJECTIVES),
                       help="supervised: the task families' prompts (default); self-supervised: label-free "
                            "objectives over the raw training sequences only, for a later finetune: masked-item "
                            "spans (default), or families=[next] / [span,next] for dense causal next-item targets "
                            "(item_token_mode=token) (config key: objective)")
    if name == "finetune":
        p.add_argument("--bundle", required=True, help="the bundle to start from")
        p.add_argument("--users-share", type=float,
                       help="train on this seeded share of the users only, e.g. 0.1 (config key: users_share)")
        p.add_argument("--catalog", choices=["keep", "extend", "replace"],
                       help="--data's catalog vs the bundle's: keep (the same, default), extend (the bundle's items "
                            "plus new ones: prepare --update), replace (another domain) (config key: catalog)")
        p.add_argument("--tasks", help="comma-separated task families to train, e.g. sequential,direct")


def command(args) -> int:
    cfg = flags_into(load_config(TrainConfig, args.config, args.overrides), args,
                     ("data", "out", "name", "preset", "workers", "storage_path", "objective", "users_share",
                      "catalog"))
    more = {"gpu": True} if args.gpu else {}
    if args.command == "finetune":
        more["init_bundle"] = args.bundle
        if args.tasks:
            more["families"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    run(replace(cfg, **more))
    return 0
