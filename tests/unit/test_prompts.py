import pytest

from recflm.prompts import FAMILIES, TemplateError, load_templates, usable


def test_shipped_templates():
    t = load_templates()
    assert set(t) == set(FAMILIES)
    for fam, temps in t.items():
        assert len(temps) >= 5 and any(x.held_out for x in temps)
        for x in temps:
            x.fields  # parses


def test_usable_needs_all_fields_and_filters_held_out():
    t = load_templates()["review"]
    ex = {"user": "u", "item": "1", "text": "good", "summary": None, "rating": "4.0"}
    names = {x.id for x in usable(t, ex, held_out=False)}
    assert names == {"review-3", "review-5"}
    assert {x.id for x in usable(t, ex, held_out=True)} == {"review-6"}


def test_template_dir_errors(tmp_path):
    with pytest.raises(TemplateError, match="missing"):
        load_templates(tmp_path)
    for fam in FAMILIES:
        (tmp_path / f"{fam}.yaml").write_text("templates:\n  - {id: a, source: 's {user}', target: '{item}'}\n")
    with pytest.raises(TemplateError, match="needs at least 5"):
        load_templates(tmp_path)
