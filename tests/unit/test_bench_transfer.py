"""jobs.bench_transfer's runs (no training here): one budget for scratch and fine-tune, the shares, the stages."""
import pytest

import json

from jobs.bench_transfer import configs, format_table, parse_args, reused_scratch, source_objective, summary_line


def test_runs_share_one_budget_and_differ_only_in_their_start(tmp_path):
    args = parse_args(["--bundled", "--out", str(tmp_path), "--shares", "0.1,1", "--finetune-steps", "250",
                       "--pretrain-steps", "400", "lr=0.002"])
    assert args.share_list == [0.1, 1.0]
    pcfg, ss, run = configs(args, stamp=7)
    assert ss.objective == "self-supervised" and ss.max_steps == 400 and ss.max_minutes == 0 and ss.out == str(tmp_path / "ss_bundle")
    scratch, e1 = run("scratch", 0.1)
    pre, e2 = run("pretrained", 0.1)
    assert scratch.users_share == pre.users_share == 0.1 and scratch.max_steps == pre.max_steps == 250
    assert scratch.patience == pre.patience == 0  # both arms spend the whole budget
    assert scratch.init_bundle == "" and pre.init_bundle == ss.out and scratch.lr == pre.lr == ss.lr == 0.002
    assert scratch.objective == pre.objective == "supervised" and scratch.name != pre.name
    # evaluation: every user's test item, whatever share trained
    assert e1.max_users == 0 and e1.split == "test" and e1.bundle == scratch.out and e2.bundle == pre.out
    assert e1.families == ["sequential"] and e1.cold_ks == []  # what the table reports, nothing else
    assert pcfg.out == scratch.data == ss.data
    assert ss.families == ["span"] and scratch.families == pre.families == ["sequential", "rating"]  # the recipe's
    assert source_objective(args) == ["span"]


def test_the_pretrain_objective_is_chosen_and_recorded(tmp_path):
    args = parse_args(["--bundled", "--out", str(tmp_path), "--objective-families", "span, next,span"])
    _, ss, run = configs(args, stamp=3)
    assert ss.families == ["span", "next"] and ss.objective == "self-supervised" and ss.item_token_mode == "token"
    assert run("pretrained", 1.0)[0].families == ["sequential", "rating"] and source_objective(args) == ["span", "next"]
    # a source bundle: its manifest says what it was pretrained on, which --objective-families may not contradict
    from recflm.config import ConfigError

    b = tmp_path / "b"
    b.mkdir()
    (b / "manifest.json").write_text(json.dumps({"objective": "self-supervised", "families": ["next"]}))
    assert source_objective(parse_args(["--bundled", "--source-bundle", str(b)])) == ["next"]
    assert source_objective(parse_args(["--bundled", "--source-bundle", str(b), "--objective-families", "next"])) \
        == ["next"]
    with pytest.raises(ConfigError, match="pretrained on next"):
        source_objective(parse_args(["--bundled", "--source-bundle", str(b), "--objective-families", "span"]))
    (b / "manifest.json").write_text(json.dumps({"objective": "supervised", "families": ["sequential"]}))
    with pytest.raises(ConfigError, match="not a self-supervised one"):
        source_objective(parse_args(["--bundled", "--source-bundle", str(b)]))


@pytest.mark.parametrize("argv, message", [(["--shares", "0,0.5"], "--shares"), (["--shares", "a"], "--shares"),
                                           (["--finetune-steps", "0"], "must be > 0"),
                                           (["--objective-families", "span,sequential"],
                                            "sequential is not a self-supervised family"),
                                           (["--objective-families", ","], "empty")])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--bundled", *argv])
    assert message in capsys.readouterr().err


def test_table_and_summary():
    rows = [{"share": 0.1, "users": 610, "scratch": {"ndcg10": 0.02, "hr10": 0.04, "epochs": 5},
             "pretrained": {"ndcg10": 0.03, "hr10": 0.05, "epochs": 4}}]
    table = format_table(rows)
    assert "+50%" in table and "5/4" in table
    assert summary_line(rows, 12.34) == "SUMMARY bench_transfer ndcg10 scratch/pretrained p=0.1:0.0200/0.0300 minutes=12.3"
    assert "objective span+next" in format_table(rows, ["span", "next"]).splitlines()[0]
    assert summary_line(rows, 1, ["next"]).endswith("p=0.1:0.0200/0.0300 objective=next minutes=1.0")


def test_cross_domain_fine_tunes_another_sources_bundle_with_the_catalog_replaced(tmp_path):
    import pandas as pd

    src = tmp_path / "ml_ss"
    (tmp_path / "out" / "data").mkdir(parents=True)
    src.mkdir()
    pd.DataFrame({"item": ["m1", "m2"], "index": [0, 1], "id_text": ["1", "2"]}).to_parquet(src / "items.parquet")
    pd.DataFrame({"item": ["t1", "t2", "t3"], "index": [0, 1, 2], "id_text": ["1", "2", "3"]}).to_parquet(
        tmp_path / "out" / "data" / "items.parquet")
    args = parse_args(["--bundled", "--out", str(tmp_path / "out"), "--source-bundle", str(src)])
    _, _, run = configs(args, stamp=1)
    pre, _ = run("pretrained", 0.1)
    scratch, _ = run("scratch", 0.1)
    assert pre.init_bundle == str(src) and pre.catalog == "replace"
    assert scratch.init_bundle == "" and scratch.catalog == "keep"


def test_scratch_arm_reused_only_from_the_same_run(tmp_path):
    data = tmp_path / "data"
    earlier = {"finetune_steps": 300, "rows": [
        {"share": s, "scratch": {"ndcg10": 0.01 * (i + 1), "hr10": 0.1, "epochs": 3, "config": {"data": str(data)}}}
        for i, s in enumerate((0.1, 1.0))]}
    f = tmp_path / "bench_transfer.json"
    f.write_text(json.dumps(earlier))
    rows = reused_scratch(str(f), str(data), [0.1, 1.0], 300)
    assert rows[1.0]["ndcg10"] == 0.02 and rows[0.1]["epochs"] == 3
    with pytest.raises(ValueError, match="300 fine-tune steps"):
        reused_scratch(str(f), str(data), [0.1], 250)
    with pytest.raises(ValueError, match=r"share\(s\) \[0.3\]"):
        reused_scratch(str(f), str(data), [0.1, 0.3], 300)
    with pytest.raises(ValueError, match="not the same prepared data"):
        reused_scratch(str(f), str(tmp_path / "other"), [0.1], 300)
    # another dir with the same data, prepared the same way: the same run
    files = [{"source": "toys", "type": "table", "file": "/d/t.csv.gz", "bytes": 10, "sha256_first_mib": "ab"}]
    for d, out in ((data, "a"), (tmp_path / "other", "b")):
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps({"sources": files, "config": {"out": out, "k_core": 5}}))
    assert reused_scratch(str(f), str(tmp_path / "other"), [0.1], 300)[0.1]["ndcg10"] == 0.01
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"sources": files, "config": {"out": "b", "k_core": 3}}))
    with pytest.raises(ValueError, match="not the same prepared data"):
        reused_scratch(str(f), str(tmp_path / "other"), [0.1], 300)
    with pytest.raises(FileNotFoundError, match="--scratch-from"):
        reused_scratch(str(tmp_path / "missing.json"), str(data), [0.1], 300)


def test_matched_scratch_arm_has_the_pretrained_arms_steps_in_all(tmp_path):
    args = parse_args(["--bundled", "--out", str(tmp_path), "--shares", "1", "--finetune-steps", "400",
                       "--pretrain-steps", "600", "--matched-scratch"])
    _, ss, run = configs(args, stamp=5)
    matched, e = run("matched", 1.0)
    scratch, _ = run("scratch", 1.0)
    assert matched.max_steps == ss.max_steps + scratch.max_steps == 1000 and matched.init_bundle == ""
    assert matched.out == str(tmp_path / "matched_1") and e.bundle == matched.out and matched.name != scratch.name
    assert not parse_args(["--bundled"]).matched_scratch  # off by default
    rows = [{"share": 1.0, "users": 610, "scratch": {"ndcg10": 0.02, "hr10": 0.04, "epochs": 7},
             "pretrained": {"ndcg10": 0.04, "hr10": 0.08, "epochs": 7},
             "matched": {"ndcg10": 0.05, "hr10": 0.09, "epochs": 17}},
            {"share": 0.3, "users": 610, "scratch": {"ndcg10": 0.02, "hr10": 0.04, "epochs": 20},
             "pretrained": {"ndcg10": 0.03, "hr10": 0.05, "epochs": 20}}]
    table = format_table(rows).splitlines()
    assert "matched NDCG@10" in table[1] and "epochs s/p/m" in table[1]
    assert "+100%" in table[3] and "-20%" in table[3] and "0.0500" in table[3] and "7/7/17" in table[3]
    assert "20/20/—" in table[4] and "-20%" not in table[4]
    assert summary_line(rows, 2) == ("SUMMARY bench_transfer ndcg10 scratch/pretrained/matched "
                                     "p=1:0.0200/0.0400/0.0500 p=0.3:0.0200/0.0300/- minutes=2.0")
