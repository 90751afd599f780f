"""Ablations of the dense recipe: the model trained in one process (no Ray, no augmentation), validation
NDCG@10 after every epoch, so that one lever at a time can be compared in minutes (the README's ablation
table). Not a benchmark of the platform: ``jobs/bench_quality.py`` is.

    python -m jobs.ablate_recipe --data runs/toys/data --tokenizer runs/toys/train/RUN/tokenizer.json --epochs 3
    python -m jobs.ablate_recipe ... --user 1            # a user ID in the dense source (the recipe has none)
    python -m jobs.ablate_recipe ... --preset tiny --lr 3e-3 --dropout 0.1
    python -m jobs.ablate_recipe ... --input_scale 1      # inputs at the embeddings' own scale (seq: 50)

``--tokenizer``: the tokenizer of a recipe run on the same data (one token per item); ``--emb_std``
re-draws the embeddings with that std (the ``seq`` preset already uses 0.02).
"""
import argparse
import time

import numpy as np
import pandas as pd
import torch
from recflm.metrics import ranking_metrics, ranks_of_truth  # noqa: E402
from recflm.model import build_model  # noqa: E402
from recflm.tokenizer import RecTokenizer, pad_labels  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--epochs", type=int, default=3); ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--emb_std", type=float, default=0); ap.add_argument("--dropout", type=float, default=0.3)
ap.add_argument("--L", type=int, default=20); ap.add_argument("--bs", type=int, default=128)
ap.add_argument("--preset", default="seq"); ap.add_argument("--user", type=int, default=0)
ap.add_argument("--wd", type=float, default=0.0); ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--val", type=int, default=3000); ap.add_argument("--minutes", type=float, default=100)
ap.add_argument("--clip", type=float, default=1.0); ap.add_argument("--eps", type=float, default=1e-6)
ap.add_argument("--act", default="relu"); ap.add_argument("--input_scale", default="")
ap.add_argument("--data", required=True); ap.add_argument("--tokenizer", required=True)
a = ap.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(0)
tok = RecTokenizer.load(a.tokenizer)
cat = pd.read_parquet(f"{a.data}/items.parquet").sort_values("index")
item_tok = torch.tensor(tok.item_token_ids(list(cat["id_text"])))
seqs = pd.read_parquet(f"{a.data}/sequences.parquet", columns=["user", "index", "n_train"])
from recflm.model import PRESETS  # noqa: E402

scale = {} if not a.input_scale else {
    "input_scale": PRESETS[a.preset]["d_model"] ** 0.5 if a.input_scale == "sqrt" else float(a.input_scale)}
model = build_model(a.preset, tok.vocab_size, tok.pad_id, tok.eos_id, dropout_rate=a.dropout, feed_forward_proj=a.act,
                    **scale)
if a.emb_std:
    with torch.no_grad(): model.shared.weight.normal_(0, a.emb_std)
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.wd, eps=a.eps)


def src(u):
    return f"Predict the items user_{u} will interact with, one after another." if a.user else \
        "Predict the items this user will interact with, one after another."



rows = []
for u, ix, n in seqs.itertuples(index=False):
    ix = list(ix)[:n]
    for end in range(n, 1, -a.L):
        rows.append((u, ix[max(0, end - a.L):end]))
rng = np.random.default_rng(0)
val = seqs[seqs["index"].map(len) > seqs["n_train"]].sample(n=a.val, random_state=1)
def evaluate():
    model.eval(); lists = []
    with torch.no_grad():
        for i in range(0, len(val), 256):
            ch = val.iloc[i:i + 256]
            enc = tok.encode_batch([src(u) for u in ch["user"]], 64)
            pref = [item_tok[list(ix)[:n][-(a.L - 1):]].tolist() for ix, n in zip(ch["index"], ch["n_train"])]
            lp = model.next_token_logprobs(enc["input_ids"], enc["attention_mask"], pref, enc["whole_word_ids"])[:, item_tok]
            for r, (ix, n) in enumerate(zip(ch["index"], ch["n_train"])):
                lp[r, list(ix)[:n]] = -1e9
            lists += lp.topk(10).indices.tolist()
    model.train()
    m = ranking_metrics(ranks_of_truth(lists, [int(list(ix)[n]) for ix, n in zip(val["index"], val["n_train"])]), ks_hr=(10,), ks_ndcg=(10,))
    return m["NDCG@10"]
t0 = time.time()
for ep in range(a.epochs):
    perm = rng.permutation(len(rows)); tl = []
    for s in range(0, len(rows), a.bs):
        b = [rows[j] for j in perm[s:s + a.bs]]
        enc = tok.encode_batch([src(u) for u, _ in b], 64)
        labels = pad_labels([item_tok[w].tolist() for _, w in b])
        loss, row = model(**enc, labels=labels, token_losses=True)
        loss = loss.mean(); loss.backward()
        if a.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step(); opt.zero_grad()
        tl.append(loss.item())
    print(f"epoch {ep} loss {np.mean(tl):.3f} val NDCG@10 {evaluate():.4f} {time.time() - t0:.0f}s", flush=True)
    if time.time() - t0 > a.minutes * 60: break
