"""Benchmark: top-20 recommendation at beam 20, recflm's constrained beam search against Hugging
Face ``generate`` with ``prefix_allowed_tokens_fn`` (a Python callback per beam and step).

Both decode the same sequential prompts of the bundled data with the same model, batch size and
torch threads, one after the other in one run, and both return only catalog items; the table shows
users/s, ms per user, whether their top-20 lists agree, and the speed ratio.

    python -m jobs.bench_decode --bundle runs/demo/bundle        # a trained bundle
    python -m jobs.bench_decode                                  # an untrained mini model
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", help="bundle to decode with (default: an untrained model of --preset)")
    ap.add_argument("--data", help="prepared dataset (default: the bundle's, else the bundled data)")
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from recflm.bundle import load_bundle
    from recflm.evaluate import EvalConfig, build_rows
    from recflm.generate import CatalogTrie, ConstrainedBeamSearch, hf_reference
    from recflm.model import build_model, count_parameters
    from recflm.prepare import run as run_prepare
    from recflm.config import PrepareConfig
    from recflm.dataset import PreparedData
    from recflm.prompts import TEMPLATES_DIR
    from recflm.runtime import ensure_ray
    from recflm.tokenizer import train_tokenizer

    torch.set_num_threads(args.threads)
    ensure_ray()
    if args.bundle:
        b = load_bundle(args.bundle)
        model, tok, data_dir, templates = b.model, b.tokenizer, args.data or b.manifest["data"]["path"], b.templates_dir
        ids = list(b.catalog["id_text"])
    else:
        data_dir = args.data
        if not data_dir:
            data_dir = str(Path(tempfile.mkdtemp(prefix="recflm_bench_decode_")) / "data")
            run_prepare(PrepareConfig(out=data_dir), log=lambda *a: None)
        ids = PreparedData.open(data_dir).id_texts
        templates = TEMPLATES_DIR
    rows, _ = build_rows(data_dir, str(templates), EvalConfig(max_users=args.users, text_examples=1), log=lambda *a: None)
    rows = rows[rows["task"] == "sequential/seen"]
    if not args.bundle:
        tok = train_tokenizer(list(rows["source"]) + ids, 4000)
        torch.manual_seed(0)
        model = build_model(args.preset, tok.vocab_size, tok.pad_id, tok.eos_id).eval()
    trie = CatalogTrie.from_catalog(tok, ids)
    search = ConstrainedBeamSearch(model, trie)
    sources = list(rows["source"])
    batches = [sources[i:i + args.batch_size] for i in range(0, len(sources), args.batch_size)]
    search.search(tok.encode_batch(batches[0][:2]), beams=args.beams)  # warm-up

    results, lists = {}, {}
    for name, fn in (("recflm constrained beam", lambda enc: search.search(enc, beams=args.beams)[0]),
                     ("HF generate + prefix fn", lambda enc: hf_reference(model, enc, trie, args.beams, args.beams)[0])):
        t0 = time.perf_counter()
        out = [fn(tok.encode_batch(b)) for b in batches]
        dt = time.perf_counter() - t0
        results[name] = len(sources) / dt
        lists[name] = torch.cat(out)
    (a, ra), (b_, rb) = results.items()
    agree = float((lists[a] == lists[b_]).all(1).float().mean())
    invalid = int(((lists[a] < 0) | (lists[a] >= len(ids))).sum())
    print(f"\nbench_decode: {args.preset if not args.bundle else args.bundle} "
          f"({count_parameters(model) / 1e6:.1f}M parameters), {len(sources)} users, top-{args.beams} at beam "
          f"{args.beams}, batch {args.batch_size}, {args.threads} threads, catalog {len(ids)} items, ID depth {trie.depth}")
    print(f"{'method':<26} {'users/s':>9} {'ms/user':>9}")
    for name, ups in results.items():
        print(f"{name:<26} {ups:>9.2f} {1000 / ups:>9.1f}")
    print(f"top-{args.beams} lists identical for {agree:.0%} of users; invalid items from recflm: {invalid}")
    print(f"SUMMARY bench_decode speedup {ra / rb:.2f}x ({ra:.1f} vs {rb:.1f} users/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
