"""recflm prepare refuses bad input before any work (no Ray started): a missing or unreadable file, a
missing column, a bad column map or config, each with one message naming the file and the problem."""
import pytest

from recflm.cli import main


@pytest.mark.parametrize("args, message", [
    (["--movielens", "/nonexistent/ml"], "/nonexistent/ml: a MovieLens source must be a directory"),
    (["--amazon", "/nonexistent.json"], "/nonexistent.json: no such file"),
    (["--table", "TABLE", "--columns", "user=UserId,item=NoSuchColumn,ts=Time"], "missing column(s) NoSuchColumn"),
    (["--table", "TABLE"], "one --columns map per --table"),
    (["sources=[{type: excel, path: x.xlsx}]"], "unknown source type 'excel'"),
    (["k_core=-1"], "k_core must be >= 0"),
])
def test_bad_input_stops_before_work_with_a_clear_message(tmp_path, capsys, args, message):
    table = tmp_path / "reviews.csv"
    table.write_text("UserId,ProductId,Score,Time\nu1,p1,5,1300000000\n")
    rc = main(["prepare", "--out", str(tmp_path / "o"), *[str(table) if a == "TABLE" else a for a in args]])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not (tmp_path / "o").exists()  # nothing was done


def test_unreadable_and_empty_files(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert main(["prepare", "--out", str(tmp_path / "o"), "--table", str(empty), "--columns", "user=a,item=b,ts=c"]) == 2
    assert f"{empty}: file is empty" in capsys.readouterr().err
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    assert main(["prepare", "--out", str(tmp_path / "o"), "--table", str(bad), "--columns", "user=a,item=b,ts=c"]) == 2
    assert f"{bad}: cannot read as Parquet" in capsys.readouterr().err
