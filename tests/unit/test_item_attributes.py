"""Item attributes from an item table (``--items FILE --item-columns item=...,attrs=...``) and MovieLens genres:
checked before any work, read into the catalog's ``attributes`` lists (no Ray needed for these)."""
import pytest

from recflm.cli import main
from recflm.config import SourceConfig
from recflm.readers import SourceError, plan_source, read_item_meta


def _files(tmp_path):
    inter = tmp_path / "inter.csv"
    inter.write_text("user,item,ts\nu1,i1,1300000000\nu1,i2,1300086400\n")
    items = tmp_path / "items.csv"
    items.write_text("item,attributes,name\ni1,a1|a2,Ball\ni2,a2,\ni3,,Kite\n")
    return inter, items


def _source(inter, items, cols):
    return SourceConfig(type="table", path=str(inter), columns={"user": "user", "item": "item", "ts": "ts"},
                        items=str(items), item_columns=cols)


def test_item_table_gives_attribute_lists_and_titles(tmp_path):
    inter, items = _files(tmp_path)
    meta = read_item_meta(plan_source(_source(inter, items, {"item": "item", "attrs": "attributes", "title": "name"}),
                                      "toys")).set_index("item")
    assert meta.loc["toys:i1", "attributes"] == ["a1", "a2"]
    assert meta.loc["toys:i2", "attributes"] == ["a2"]
    assert meta.loc["toys:i3", "attributes"] == []  # an empty field: no attributes
    assert meta.loc["toys:i1", "title"] == "Ball" and meta.loc["toys:i3", "title"] == "Kite"


def test_movielens_genres_are_attributes():
    from recflm.readers import bundled_source

    meta = read_item_meta(plan_source(bundled_source(), "ml")).set_index("item")
    assert meta.loc["ml:1", "attributes"] == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert all("(no genres listed)" not in a for a in meta["attributes"])


@pytest.mark.parametrize("cols, message", [
    ({"item": "item", "attrs": "nope"}, "missing column(s) nope"),
    ({"attrs": "attributes"}, "must name the 'item' column"),
    ({"item": "item"}, "names no 'attrs' or 'title' column"),
    ({"item": "item", "color": "attributes"}, "unknown item-column key(s) ['color']"),
])
def test_bad_item_columns_stop_with_a_clear_message(tmp_path, cols, message):
    inter, items = _files(tmp_path)
    with pytest.raises(SourceError, match=None) as e:
        plan_source(_source(inter, items, cols), "toys")
    assert message in str(e.value)


def test_prepare_items_flags_are_checked_before_work(tmp_path, capsys):
    inter, items = _files(tmp_path)
    base = ["prepare", "--out", str(tmp_path / "o"), "--table", str(inter), "--columns", "user=user,item=item,ts=ts"]
    assert main(base + ["--items", str(items), "--item-columns", "item=item,attrs=missing_col"]) == 2
    assert "missing column(s) missing_col" in capsys.readouterr().err
    assert main(base + ["--items", str(items)]) == 2
    assert "--items and --item-columns go together" in capsys.readouterr().err
    assert main(base + ["--items", str(tmp_path / "none.csv"), "--item-columns", "item=item,attrs=a"]) == 2
    assert "none.csv: no such file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing was done
