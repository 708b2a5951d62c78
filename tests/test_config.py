"""OmniSparseConfig: defaults of METHOD.md, validation naming the field, serialisation."""

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omnicompile import OmniSparseConfig

METHOD_DEFAULTS = dict(
    mode="sparse",
    tau=0.99,
    block_size=64,
    min_seq_len=32768,
    max_head_dim=128,
    estimator="composite",
    granularity=16,
    n_sink=1,
    n_local=2,
    query_selection=True,
    lazy_threshold=None,
    min_blocks=0,
    max_blocks=None,
    budget_scope="head",
    obs_window=64,
    recent_window=256,
    head_mass_eps=0.05,
    tau_decode=0.95,
)


def test_defaults_follow_method():
    cfg = OmniSparseConfig()
    for name, value in METHOD_DEFAULTS.items():
        assert getattr(cfg, name) == value, name
    assert cfg.effective_lazy_threshold == cfg.tau
    assert OmniSparseConfig(lazy_threshold=0.5).effective_lazy_threshold == 0.5


@pytest.mark.parametrize(
    "field, value",
    [
        ("tau", 0.0),
        ("tau", 1.5),
        ("tau", "high"),
        ("block_size", 48),
        ("block_size", 8),
        ("granularity", 24),
        ("granularity", 0),
        ("estimator", "mean"),
        ("mode", "fast"),
        ("budget_scope", "layer"),
        ("n_local", 0),
        ("n_sink", -1),
        ("min_blocks", -1),
        ("max_blocks", -1),
        ("lazy_threshold", 2.0),
        ("head_mass_eps", -0.1),
        ("tau_decode", 0.0),
        ("min_seq_len", 1.5),
        ("query_selection", 1),
        ("visual_spans", ((5, 2),)),
        ("lowering", "xla"),
        ("dense_fallback_density", 0.0),
        ("antidiagonal_stride", 5),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        OmniSparseConfig(**{field: value})


def test_max_below_min_blocks():
    with pytest.raises(ValueError, match="max_blocks"):
        OmniSparseConfig(min_blocks=4, max_blocks=2)


def test_unknown_keys_are_errors():
    with pytest.raises(ValueError, match="taux"):
        OmniSparseConfig.from_dict({"taux": 0.9})
    with pytest.raises(ValueError, match="taux"):
        OmniSparseConfig().replace(taux=0.9)


def test_round_trip():
    cfg = OmniSparseConfig(
        tau=0.9, block_size=32, granularity=8, visual_spans=((10, 20), (30, 40)), max_blocks=7
    )
    assert OmniSparseConfig.from_json(cfg.to_json()) == cfg
    assert OmniSparseConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(tau=0.8).tau == 0.8 and cfg.replace(tau=0.8).block_size == 32


_FLOAT_FIELDS = [f.name for f in dataclasses.fields(OmniSparseConfig) if "float" in str(f.type)]


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(_FLOAT_FIELDS),
    value=st.sampled_from([math.nan, math.inf, -math.inf]) | st.floats(allow_nan=True, allow_infinity=True),
)
def test_float_fields_reject_nan_and_inf(name, value):
    """NaN passes a plain range check (every comparison is False): each float field rejects it and inf."""
    if math.isfinite(value):
        try:
            OmniSparseConfig(**{name: value})
        except ValueError as error:
            assert name in str(error)
        return
    with pytest.raises(ValueError, match=f"OmniSparseConfig.{name}: .* not a finite number"):
        OmniSparseConfig(**{name: value})


def test_float_fields_are_the_method_thresholds():
    assert set(_FLOAT_FIELDS) == {
        "tau",
        "lazy_threshold",
        "head_mass_eps",
        "tau_decode",
        "dense_fallback_density",
    }


def test_stage_params_take_their_fields_from_the_config():
    """`estimation_params` / `selection_params` copy the config fields of their names (the lazy
    threshold in force for the selection)."""
    from omnicompile.method import estimation_params, selection_params

    config = OmniSparseConfig(
        estimator="pooled", block_size=32, granularity=8, row_probe=False, query_chunk=3
    )
    config = config.replace(tau=0.8, n_sink=2, n_local=3, query_selection=False, min_blocks=1, max_blocks=5)
    config = config.replace(budget_scope="kv_group", dense_last_blocks=2, dense_fallback_density=0.7)
    for params in (estimation_params(config), selection_params(config)):
        for field in dataclasses.fields(params):
            want = (
                config.effective_lazy_threshold
                if field.name == "lazy_threshold"
                else getattr(config, field.name)
            )
            assert getattr(params, field.name) == want, field.name
    assert selection_params(config.replace(lazy_threshold=0.5)).lazy_threshold == 0.5
