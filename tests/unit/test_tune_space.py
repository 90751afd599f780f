"""recflm tune's search space without Ray running: every bad entry names its key and the problem, and the
YAML distributions map onto Tune's domains (both ends of randint included, log-uniform)."""
import pytest

from recflm.config import ConfigError, to_dict
from recflm.train import TrainConfig
from recflm.tune import parse_space


@pytest.mark.parametrize("spec, message", [
    ({"lr": {"logunifrom": [1e-4, 1e-3]}}, "space lr: {'logunifrom'"),
    ({"lr": {"loguniform": [0, 1e-3]}}, "space lr: loguniform needs lo > 0"),
    ({"warmup": {"uniform": [0.2, 0.1]}}, "space warmup: uniform needs lo < hi"),
    ({"epochs": {"randint": [1, 2.5]}}, "space epochs: 2.5 is not an integer"),
    ({"batch_size": {"choice": []}}, "space batch_size: choice takes [v1, v2, ...]"),
    ({"lrate": 0.1}, "space lrate: unknown config key lrate"),
    ({"augment.crops": {"uniform": [0, 0.3]}}, "space augment.crops: unknown config key augment.crops"),
    ({"families": {"choice": [["sequential", "sequentail"]]}}, "space families: unknown task family 'sequentail'"),
    ({"family_weights.rating": {"uniform": [0.5, 1.5]}}, "space family_weights.rating: family_weights['rating'] = 1.5"),
    ({"workers": 2}, "space workers: set by the sweep itself"),
    ({"batch_size": {"choice": ["big"]}}, "space batch_size: batch_size: expected an integer"),
])
def test_bad_space_entries_name_the_key_and_the_problem(spec, message):
    with pytest.raises(ConfigError) as e:
        parse_space(spec, to_dict(TrainConfig()))
    assert message in str(e.value)


def test_space_maps_to_tune_domains():
    space = parse_space({"epochs": {"randint": [1, 3]}, "lr": {"loguniform": [1e-4, 1e-2]}, "seed": 7,
                         "families": {"choice": [["sequential"], ["sequential", "direct"]]}}, to_dict(TrainConfig()))
    assert set(space["epochs"].sample(size=300)) == {1, 2, 3}  # both ends included
    lr = space["lr"].sample(size=300)
    assert min(lr) >= 1e-4 and max(lr) <= 1e-2 and sum(x < 1e-3 for x in lr) > 100  # log-uniform: half below 1e-3
    assert space["seed"] == 7 and space["families"].categories == [["sequential"], ["sequential", "direct"]]
    with pytest.raises(ConfigError, match="Optuna only chooses among plain values"):
        parse_space({"families": {"choice": [["sequential"], ["direct"]]}}, to_dict(TrainConfig()), search="optuna")
