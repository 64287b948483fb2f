import pytest

from fededge.config import ConfigError, FederationConfig
from fededge.federation.report import round_rows, union_seconds, write_plot
from fededge.federation.server import RoundRecord


def test_union_counts_overlapping_intervals_once_and_clips():
    intervals = [(1.0, 3.0), (2.0, 4.0), (6.0, 7.0), (-5.0, 0.5), (9.5, 20.0)]
    assert union_seconds(intervals, 0.0, 10.0) == pytest.approx(0.5 + 3.0 + 1.0 + 0.5)
    assert union_seconds([], 0.0, 10.0) == 0.0


def _report(acc, sent, received):
    return {"accuracy": acc, "bytes": {"sent_bytes": sent, "received_bytes": received}}


def test_round_rows_turn_cumulative_counters_into_per_round_bytes(tmp_path):
    metrics = {0: {"a": _report(0.5, 100, 1000), "b": _report(0.7, 200, 1000)},
               1: {"a": _report(0.8, 400, 3000), "b": _report(0.9, 260, 1500)}}
    history = [RoundRecord(1, ["a", "b"], ["a", "b"], 1, 2.5)]
    rows = round_rows(metrics, history)
    assert [r.round for r in rows] == [0, 1]
    assert (rows[0].bytes_up, rows[0].bytes_down) == (300, 2000)
    assert (rows[1].bytes_up, rows[1].bytes_down) == (360, 2500)
    assert rows[1].mean_accuracy == pytest.approx(0.85)
    assert (rows[1].min_accuracy, rows[1].max_accuracy, rows[1].seconds) == (0.8, 0.9, 2.5)
    write_plot(rows, tmp_path / "p.png", title="t")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("field,value", [("rounds", 0), ("quorum", 1.5), ("temperature", 0),
                                         ("logit_dtype", "int3"), ("lr", -1.0)])
def test_config_names_the_bad_setting(field, value):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        FederationConfig(**{field: value})


def test_config_round_trips_and_rejects_unknown_keys():
    config = FederationConfig(rounds=7, input_shape=(13,))
    assert FederationConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown federation settings \\['colour'\\]"):
        FederationConfig.from_dict({**config.to_dict(), "colour": "red"})
