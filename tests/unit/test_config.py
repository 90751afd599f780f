import pytest

from recflm.config import ConfigError, PrepareConfig, load_config, to_dict


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("k_core: 10\naugment:\n  crop: 0.5\nsources:\n  - {type: amazon, path: x.json}\n")
    cfg = load_config(PrepareConfig, f, ["augment.mask=0.3", "indexing=random"])
    assert cfg.k_core == 10 and cfg.augment.crop == 0.5 and cfg.augment.mask == 0.3
    assert cfg.indexing == "random" and cfg.augment.reorder == PrepareConfig().augment.reorder
    assert cfg.sources == [{"type": "amazon", "path": "x.json"}]


@pytest.mark.parametrize("override, message", [
    (["k_cor=3"], "unknown config key k_cor"),
    (["augment.crpo=0.1"], "unknown config key augment.crpo"),
    (["k_core=abc"], "k_core: expected an integer"),
    (["augment=3"], "augment: expected a mapping"),
    (["noequals"], "not of the form key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PrepareConfig, None, override)


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PrepareConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(PrepareConfig, bad)


def test_a_run_of_the_same_name_resumes_only_with_the_same_recipe(tmp_path):
    import json

    from recflm.train import TrainConfig, _check_resumable

    saved = tmp_path / "demo" / "config.json"
    saved.parent.mkdir()
    first = TrainConfig(data="d", preset="seq", lr=1e-3, max_minutes=4)
    _check_resumable(saved, first)  # a new run: nothing to compare with
    saved.write_text(json.dumps(to_dict(first)))
    _check_resumable(saved, TrainConfig(data="d", preset="seq", lr=1e-3, max_minutes=8, epochs=5))  # longer: fine
    with pytest.raises(ConfigError, match=r"run 'demo' .* differs in lr, preset\): .* pick another name="):
        _check_resumable(saved, TrainConfig(data="d", preset="tiny", lr=3e-3))
