"""Valid-only generation: constrained beam search over the item catalog, and free-text decoding.

``CatalogTrie`` holds the token sequences of every catalog ID (each ending in ``</s>``) as a
prefix trie in CSR form (``indptr``, edge ``tokens``, edge ``children``), so the allowed next
tokens of any set of beams are gathered with tensor ops. ``ConstrainedBeamSearch`` runs batched
beam search on a ``RecT5``: the encoder runs once per batch (with the whole-word embedding), the
first decoder step runs once per user, later steps run with a self-attention key/value cache while
a user's beams share one cross-attention key/value set (``_BeamDecoder``), every step is masked to
the trie's continuations, and a user's already seen items can be excluded at the terminal ``</s>``
edge. Every returned item is in the catalog by construction.

The search follows Hugging Face's beam search exactly (top ``2 x beams`` candidates per step,
finished hypotheses taken from the first ``beams`` ranks, running beams refilled with unfinished
ones, scores = summed log-probabilities, i.e. ``length_penalty=0``), so its top-k equals
``generate(num_beams=k, prefix_allowed_tokens_fn=trie.allowed, length_penalty=0)``; a test checks it.
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch

from .prompts import RATING_TOKEN_PREFIX

NEG = float("-inf")


class CatalogTrie:
    def __init__(self, sequences: list[list[int]], pad_id: int, eos_id: int):
        """``sequences[i]``: token ids of item ``i`` ending in ``eos_id``."""
        self.pad_id, self.eos_id, self.n_items = pad_id, eos_id, len(sequences)
        children: list[dict] = [{}]
        leaf_item: list[int] = [-1]
        for i, seq in enumerate(sequences):
            if not seq or seq[-1] != eos_id:
                raise ValueError(f"item {i}: token sequence must end with </s> ({eos_id})")
            node = 0
            for t in seq:
                nxt = children[node].get(t)
                if nxt is None:
                    nxt = len(children)
                    children[node][t] = nxt
                    children.append({})
                    leaf_item.append(-1)
                node = nxt
            if leaf_item[node] != -1:
                raise ValueError(f"items {leaf_item[node]} and {i} have the same token sequence")
            leaf_item[node] = i
        counts = [len(c) for c in children]
        self.indptr = torch.tensor(np.concatenate([[0], np.cumsum(counts)]), dtype=torch.long)
        self.tokens = torch.tensor([t for c in children for t in sorted(c)], dtype=torch.long)
        self.children = torch.tensor([c[t] for c in children for t in sorted(c)], dtype=torch.long)
        self.leaf_item = torch.tensor(leaf_item, dtype=torch.long)
        # edge keys (parent node * span + token) are sorted in CSR order: child look-up by searchsorted
        self.vocab_span = int(self.tokens.max()) + 1 if len(self.tokens) else 1
        parents = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        self.edge_keys = parents * self.vocab_span + self.tokens
        self.depth = max(len(s) for s in sequences)
        self._py = children

    @classmethod
    def from_catalog(cls, tokenizer, id_texts: list[str]) -> "CatalogTrie":
        return cls([tokenizer.encode_ids(t) for t in id_texts], tokenizer.pad_id, tokenizer.eos_id)

    def allowed(self, prefix: list[int]) -> list[int]:
        """Allowed next tokens after a decoder prefix (which starts with the pad start token)."""
        node = 0
        for t in prefix[1:]:
            if t == self.pad_id and node == 0:
                continue
            node = self._py[node].get(int(t), -1) if node >= 0 else -1
            if node < 0:
                return [self.pad_id]  # finished or invalid: only padding
        return sorted(self._py[node]) or [self.pad_id]

    def edges(self, nodes: torch.Tensor):
        """Flattened (row, token, child) of all edges leaving ``nodes`` (one row per node)."""
        start, stop = self.indptr[nodes], self.indptr[nodes + 1]
        count = stop - start
        rows = torch.repeat_interleave(torch.arange(len(nodes)), count)
        offs = torch.arange(int(count.sum())) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
        e = start[rows] + offs
        return rows, self.tokens[e], self.children[e]


class _BeamDecoder:
    """Incremental T5 decoder for beam search in which a user's beams share one cross-attention
    key/value set: the encoder output is projected once per user (not once per beam, as a
    per-row cache needs), and the K beam queries of a user attend to it in one batched product.
    It runs the model's own modules (layer norms, projections, feed-forward, relative position
    bias), so its log-probabilities equal the model's forward pass up to float rounding."""

    def __init__(self, model):
        cfg, dec = model.config, model.decoder
        self.blocks, self.final_norm, self.embed = dec.block, dec.final_layer_norm, dec.embed_tokens
        self.lm_head = model.lm_head
        self.H, self.dk = cfg.num_heads, cfg.d_kv
        self.out_scale = cfg.d_model ** -0.5 if getattr(cfg, "scale_decoder_outputs", cfg.tie_word_embeddings) else 1.0
        self.rel = dec.block[0].layer[0].SelfAttention

    def start(self, hidden: torch.Tensor, mask: torch.Tensor):
        """Cross-attention keys/values of every layer for B users: (B, H, L, dk) each."""
        B, L, _ = hidden.shape
        self.B, self.cross, self.self_kv, self.t = B, [], [None] * len(self.blocks), 0
        for block in self.blocks:
            att = block.layer[1].EncDecAttention
            k = att.k(hidden).view(B, L, self.H, self.dk).transpose(1, 2)
            v = att.v(hidden).view(B, L, self.H, self.dk).transpose(1, 2)
            self.cross.append((k, v))
        self.cross_mask = torch.zeros((B, 1, 1, L), dtype=hidden.dtype, device=hidden.device)
        self.cross_mask.masked_fill_(mask[:, None, None, :] == 0, torch.finfo(hidden.dtype).min)

    def reorder(self, index: torch.Tensor):
        """Select self-attention cache rows (beam reordering; also the 1 -> K beam expansion)."""
        self.self_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.self_kv]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (N, V) of the next token after ``tokens`` (N,), N = B x beams per user."""
        N, B, H, dk = len(tokens), self.B, self.H, self.dk
        n = N // B
        x = self.embed(tokens)  # (N, d)
        bias = self.rel.compute_bias(1, self.t + 1, device=x.device, past_seen_tokens=self.t)  # (1, H, 1, t+1)
        for i, block in enumerate(self.blocks):
            sa, ca, ff = block.layer[0], block.layer[1], block.layer[2]
            att, h = sa.SelfAttention, sa.layer_norm(x)
            q = att.q(h).view(N, H, 1, dk)
            k = att.k(h).view(N, H, 1, dk)
            v = att.v(h).view(N, H, 1, dk)
            if self.self_kv[i] is not None:
                k = torch.cat([self.self_kv[i][0], k], 2)
                v = torch.cat([self.self_kv[i][1], v], 2)
            self.self_kv[i] = (k, v)
            w = torch.softmax(q @ k.transpose(2, 3) + bias, -1)
            x = x + att.o((w @ v).reshape(N, H * dk))
            att, h = ca.EncDecAttention, ca.layer_norm(x)
            q = att.q(h).view(B, n, H, dk).transpose(1, 2)  # a user's beams are its queries
            ck, cv = self.cross[i]
            o = torch.nn.functional.scaled_dot_product_attention(q, ck, cv, attn_mask=self.cross_mask, scale=1.0)
            x = x + att.o(o.transpose(1, 2).reshape(N, H * dk))
            x = ff(x)
        self.t += 1
        logits = self.lm_head(self.final_norm(x) * self.out_scale)
        return torch.log_softmax(logits.float(), -1)


class ConstrainedBeamSearch:
    def __init__(self, model, trie: CatalogTrie):
        self.model, self.trie = model, trie

    @property
    def item_tokens(self) -> torch.Tensor:
        """The one token of each item (``n_items``,), for catalogs whose IDs are single tokens."""
        if getattr(self, "_item_tokens", None) is None:
            trie = self.trie
            if trie.depth != 2:
                raise ValueError("a decoder prefix (the dense sequential style) needs one token per item "
                                 "(item_token_mode=token)")
            rows, toks, kids = trie.edges(torch.zeros(1, dtype=torch.long))
            tokens = torch.full((trie.n_items,), -1, dtype=torch.long)
            # each first-level edge leads to a node whose only edge (</s>) ends one item
            _, _, leaves = trie.edges(kids)
            tokens[trie.leaf_item[leaves]] = toks
            self._item_tokens = tokens
        return self._item_tokens

    @torch.no_grad()
    def item_scores(self, enc: dict, prefix: list) -> torch.Tensor:
        """Log-probability (B, n_items) of every catalog item as the next one after each row's decoder
        ``prefix`` (the item tokens of its history): the full-catalog ranking of the dense style."""
        device = next(self.model.parameters()).device
        enc = {n: v.to(device) for n, v in enc.items()}
        logp = self.model.next_token_logprobs(enc["input_ids"], enc["attention_mask"], prefix,
                                              enc.get("whole_word_ids"))
        return logp[:, self.item_tokens.to(device)].float().cpu()

    @torch.no_grad()
    def search(self, enc: dict, beams: int = 20, k: int | None = None, exclude: list | None = None,
               prefix: list | None = None):
        """Top-``k`` items per input row: (items (B, k) long, -1 where fewer exist; scores (B, k)).

        ``enc``: input_ids, attention_mask, whole_word_ids (from ``RecTokenizer.encode_batch``).
        ``exclude``: per row, an iterable of item indices never to return (e.g. already seen).
        ``prefix``: per row, decoder tokens to continue from (the dense style: the history's item
        tokens); the next item is then one token, so the top-k of the masked catalog scores is exact."""
        k = k or beams
        if k > beams:
            raise ValueError(f"k={k} is larger than the beam width {beams}")
        if prefix is not None:
            s = self.item_scores(enc, prefix)
            for b, items in enumerate(exclude or []):
                idx = [int(i) for i in items if 0 <= int(i) < self.trie.n_items]
                if idx:
                    s[b, idx] = NEG
            top, items = s.topk(min(k, s.shape[1]), dim=1)
            items = torch.where(torch.isfinite(top), items, torch.full_like(items, -1))
            return items, top
        model, trie = self.model, self.trie
        dec = _BeamDecoder(model)  # per search: it holds this batch's caches
        device = next(model.parameters()).device
        enc = {n: v.to(device) for n, v in enc.items()}
        B, K, V = enc["input_ids"].shape[0], beams, model.config.vocab_size
        hidden = model.encode(enc["input_ids"], enc["attention_mask"], enc.get("whole_word_ids")).last_hidden_state
        banned = None
        if exclude is not None:
            banned = torch.zeros((B, trie.n_items + 1), dtype=torch.bool)  # column n_items: "not a leaf"
            for b, items in enumerate(exclude):
                idx = [int(i) for i in items if 0 <= int(i) < trie.n_items]
                if idx:
                    banned[b, idx] = True
        scores = torch.full((B, K), NEG)
        scores[:, 0] = 0.0
        nodes = torch.zeros((B, K), dtype=torch.long)
        fin_scores = torch.full((B, K), NEG)
        fin_items = torch.full((B, K), -1, dtype=torch.long)
        # step 0 runs once per user, not once per beam (all beams start alike); cross-attention
        # keys/values are computed once per user and shared by its beams for every step
        dec.start(hidden, enc["attention_mask"])
        logp = dec.step(torch.full((B,), trie.pad_id, dtype=torch.long, device=device)).cpu()
        n = 1  # beams per user the decoder runs: only live ones (score > -inf), which come first
        for step in range(trie.depth):
            if step:
                logp = dec.step(last.to(device)).cpu()
            allowed = torch.full((B * n, V), NEG)
            rows, toks, kids = trie.edges(nodes[:, :n].reshape(-1).clamp(min=0))  # -1: a dead beam (score -inf)
            ok = torch.ones(len(rows), dtype=torch.bool)
            if banned is not None:
                leaf = trie.leaf_item[kids]
                ok = ~banned[rows // n, torch.where(leaf >= 0, leaf, trie.n_items)]
            allowed[rows[ok], toks[ok]] = 0.0
            cand = (scores[:, :n].reshape(-1, 1) + logp + allowed).reshape(B, n * V)
            top, idx = cand.topk(2 * K, dim=1)  # sorted, best first
            beam, tok = idx // V, idx % V
            child_node = self._child(nodes, beam, tok)
            is_eos = (tok == trie.eos_id) & torch.isfinite(top)
            # finished: eos candidates among the first K ranks (Hugging Face's rule)
            rank = torch.arange(2 * K).expand(B, -1)
            f_new = torch.where(is_eos & (rank < K), top, torch.full_like(top, NEG))
            f_items = torch.where(is_eos, trie.leaf_item[child_node], torch.full_like(tok, -1))
            all_s = torch.cat([fin_scores, f_new], 1)
            all_i = torch.cat([fin_items, f_items], 1)
            fin_scores, pick = all_s.topk(K, dim=1)
            fin_items = all_i.gather(1, pick)
            # running: the best K candidates that are not eos
            r_scores = torch.where(is_eos, torch.full_like(top, NEG), top)
            scores, pick = r_scores.topk(K, dim=1)
            # done when no running beam can still beat the K-th finished one (scores only fall)
            if bool((fin_scores[:, -1] >= scores[:, 0]).all()):
                break
            src_beam = beam.gather(1, pick)
            nodes = child_node.gather(1, pick)
            n_next = int(torch.isfinite(scores).sum(1).max())
            last = tok.gather(1, pick)[:, :n_next].reshape(-1)
            dec.reorder((torch.arange(B).unsqueeze(1) * n + src_beam[:, :n_next]).reshape(-1).to(device))
            n = n_next
        fin_items = torch.where(torch.isfinite(fin_scores), fin_items, torch.full_like(fin_items, -1))
        return fin_items[:, :k], fin_scores[:, :k]

    def _child(self, nodes, beam, tok):
        """Trie child reached from beam ``beam`` by token ``tok`` (-1 where no such edge)."""
        trie = self.trie
        key = nodes.gather(1, beam) * trie.vocab_span + tok
        pos = torch.searchsorted(trie.edge_keys, key.reshape(-1)).clamp(max=len(trie.edge_keys) - 1).reshape(key.shape)
        return torch.where(trie.edge_keys[pos] == key, trie.children[pos], torch.full_like(key, -1))


def hf_reference(model, enc: dict, trie: CatalogTrie, beams: int, k: int):
    """The same search with Hugging Face ``generate`` and a Python ``prefix_allowed_tokens_fn``
    (the reference for tests and the benchmark): (items (B, k), scores (B, k))."""
    out = model.generate(**enc, num_beams=beams, num_return_sequences=k, length_penalty=0.0,
                         max_new_tokens=trie.depth, prefix_allowed_tokens_fn=lambda b, ids: trie.allowed(ids.tolist()),
                         output_scores=True, return_dict_in_generate=True, early_stopping=False, do_sample=False)
    seqs, scores = out.sequences.cpu(), out.sequences_scores.cpu()
    B = enc["input_ids"].shape[0]
    items = torch.full((B, k), -1, dtype=torch.long)
    for r in range(B * k):
        node = 0
        for t in seqs[r, 1:].tolist():
            node = trie._py[node].get(t, -1)
            if node < 0:
                break
            if t == trie.eos_id:
                items[r // k, r % k] = int(trie.leaf_item[node])
                break
    return items, scores.reshape(B, k)


_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*$")


def parse_rating(text: str, lo: float, hi: float) -> float | None:
    """A rating output as a number in [lo, hi], or None (counted as unparseable, never dropped)."""
    m = _NUMBER.match(text or "")
    if not m:
        return None
    v = float(m.group(1))
    return v if lo <= v <= hi and math.isfinite(v) else None


@torch.no_grad()
def generate_text(model, tokenizer, sources: list[str], max_new_tokens: int = 32, beams: int = 1,
                  max_source_len: int = 256) -> list[str]:
    """Free text (explanation, review summary, rating) with its own decoding settings. The dense rating
    style's rating tokens are never written: no text target holds them."""
    enc = tokenizer.encode_batch(sources, max_source_len)
    dev = next(model.parameters()).device
    enc = {n: v.to(dev) for n, v in enc.items()}
    banned = [i for t, i in tokenizer.hf.get_vocab().items() if t.startswith(RATING_TOKEN_PREFIX)]
    out = model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=beams, do_sample=False,
                         no_repeat_ngram_size=3 if max_new_tokens > 8 else 0, suppress_tokens=banned or None)
    return [tokenizer.decode(row) for row in out.cpu()]


@torch.no_grad()
def score_candidates(model, tokenizer, sources: list[str], candidates: list[list[str]],
                     max_source_len: int = 256) -> list[np.ndarray]:
    """Sequence log-probability of each candidate target given its source (teacher-forced), for
    ranking a fixed candidate list (the 1-of-100 direct protocol).

    The encoder runs once per source and its cross-attention keys/values are shared by all of that
    source's candidates (``_BeamDecoder``), which step through their target tokens together."""
    if len({len(c) for c in candidates}) > 1:  # the decoder wants as many candidates per source
        return [score_candidates(model, tokenizer, [s], [c], max_source_len)[0] for s, c in zip(sources, candidates)]
    dev = next(model.parameters()).device
    enc = tokenizer.encode_batch(sources, max_source_len)
    enc = {n: v.to(dev) for n, v in enc.items()}
    B, n = len(sources), len(candidates[0])
    if n == 0:
        return [np.zeros(0) for _ in sources]
    hidden = model.encode(enc["input_ids"], enc["attention_mask"], enc["whole_word_ids"]).last_hidden_state
    labels = tokenizer.encode_targets([c for cands in candidates for c in cands], 32).to(dev)  # (B n, T)
    dec = _BeamDecoder(model)
    dec.start(hidden, enc["attention_mask"])
    logp = dec.step(torch.full((B,), tokenizer.pad_id, dtype=torch.long, device=dev))  # the start token, once per source
    dec.reorder(torch.arange(B, device=dev).repeat_interleave(n))
    logp = logp.repeat_interleave(n, 0)
    total = torch.zeros(B * n, device=dev)
    for t in range(labels.shape[1]):
        if t:
            logp = dec.step(labels[:, t - 1].clamp(min=0))
        lab = labels[:, t]
        total += torch.where(lab != -100, logp.gather(1, lab.clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
    return list(total.reshape(B, n).float().cpu().numpy())


def rating_values(lo: float, hi: float) -> list[str]:
    """Every rating text the data stage renders on the scale [lo, hi] (one decimal, see prompts.format_rating)."""
    from .prompts import format_rating, rating_grid

    return [format_rating(v) for v in rating_grid(lo, hi)]


@torch.no_grad()
def predict_ratings_dense(model, tokenizer, sources: list[str], prefixes: list[list[str]], lo: float, hi: float,
                          max_source_len: int = 256) -> list[str]:
    """Dense rating style: the expected rating over the scale's rating tokens after each decoder prefix
    (the history's (item, rating) pairs, then the item asked about; ``prompts.rating_input``), as text."""
    from .prompts import rating_grid, rating_tokens

    if not sources:
        return []
    enc = tokenizer.encode_batch(sources, max_source_len)
    dev = next(model.parameters()).device
    enc = {k: v.to(dev) for k, v in enc.items()}
    logp = model.next_token_logprobs(enc["input_ids"], enc["attention_mask"],
                                     [tokenizer.item_token_ids(p) for p in prefixes], enc.get("whole_word_ids"))
    sel = torch.as_tensor(tokenizer.item_token_ids(rating_tokens(lo, hi)), device=logp.device)
    p = torch.softmax(logp[:, sel], -1).cpu().double().numpy()
    return [f"{float(v):.2f}" for v in p @ np.array(rating_grid(lo, hi))]


@torch.no_grad()
def predict_ratings(model, tokenizer, sources: list[str], lo: float, hi: float, max_source_len: int = 256) -> list[str]:
    """Rating answers as the model's *expected* rating: every rating text of the scale is scored
    (teacher-forced sequence log-probability, ``score_candidates``), the scores are normalised over the
    scale and the mean is returned as text (two decimals). The mean, not the most likely text, is what
    minimises squared error; the output is always a number on the scale."""
    if not sources:
        return []
    values = rating_values(lo, hi)
    scores = score_candidates(model, tokenizer, sources, [values] * len(sources), max_source_len)
    grid = np.array([float(v) for v in values])
    out = []
    for s in scores:
        p = np.exp(s - s.max())
        out.append(f"{float((p / p.sum()) @ grid):.2f}")
    return out

