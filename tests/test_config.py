from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from raymine.config import Config, ConfigError, config_hash, describe, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_build():
    cfg = load_config()
    assert cfg.teachers == ("minilm", "bm25")
    assert cfg.teacher("bm25").kind == "bm25"
    assert cfg.mine.method == "percpos" and cfg.mine.perc == 0.95


def test_overrides_typed_and_nested():
    cfg = load_config(overrides=["mine.method=marginpos", "mine.margin=0.1", "search.num_shards=3",
                                 "teachers=minilm", "teacher_defs.minilm.batch_size=8",
                                 "train.lora_targets=q_proj,v_proj"])
    assert cfg.mine.method == "marginpos" and cfg.mine.margin == pytest.approx(0.1)
    assert cfg.search.num_shards == 3
    assert cfg.teachers == ("minilm",)
    assert cfg.teacher("minilm").batch_size == 8
    assert cfg.train.lora_targets == ("q_proj", "v_proj")


def test_new_teacher_by_override():
    cfg = load_config(overrides=["teacher_defs.e5.model=intfloat/e5-small-v2", "teacher_defs.e5.query_prompt=query: ",
                                 "teachers=e5"])
    assert cfg.teacher("e5").model == "intfloat/e5-small-v2"
    assert cfg.teacher("e5").query_prompt == "query: "
    assert cfg.teacher("e5").pooling == "mean"


@pytest.mark.parametrize(
    "override, message",
    [
        ("mine.methd=naive", "unknown config key 'mine.methd'"),
        ("nosuch=1", "unknown config key 'nosuch'"),
        ("mine.num_negatives=four", "mine.num_negatives: expected an integer"),
        ("mine.method=best", "mine.method: 'best' is not one of"),
        ("search.use_ceiling=maybe", "search.use_ceiling: expected true/false"),
        ("mine.perc=high", "mine.perc: expected a number"),
        ("teachers=nobody", "not defined in teacher_defs"),
        ("mine.method", "is not key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(overrides=[override])


def test_yaml_unknown_key_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("mine:\n  nmber: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*mine.nmber"):
        load_config(p)


def test_config_is_frozen_and_hash_tracks_changes():
    a, b = load_config(), load_config(overrides=["mine.perc=0.9"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.mine.perc = 0.5  # type: ignore[misc]
    assert config_hash(a.mine) != config_hash(b.mine)
    assert config_hash(a.search) == config_hash(b.search)


def test_every_field_has_help():
    rows = describe(Config)
    assert rows and all(help_ for _, _, help_ in rows), [k for k, _, h in rows if not h]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    for t in cfg.teachers:
        assert t in cfg.teacher_defs


# ------------------------------------------------------------------------------------------------
# Domains: checked at load time, naming the key (issue 14)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, ok",
    [  # expectations written out here, independently of config.DOMAINS
        ("mine.perc=95", False), ("mine.perc=0", False), ("mine.perc=0.0001", True), ("mine.perc=1", True),
        ("mine.perc=1.0001", False), ("mine.perc=.nan", False), ("mine.margin=-0.01", False), ("mine.margin=0", True),
        ("mine.num_negatives=0", False), ("mine.num_negatives=-3", False), ("mine.num_negatives=1", True),
        ("mine.shift=-1", False), ("mine.sample_temperature=0", False), ("mine.sample_temperature=0.01", True),
        ("mine.hide_positive_fraction=1", True), ("mine.hide_positive_fraction=1.01", False),
        ("mine.hide_positive_fraction=0.5", True),
        ("search.num_shards=0", False), ("search.num_shards=1", True), ("search.nprobe=0", False),
        ("search.depth=-1", False), ("search.depth=0", True), ("search.index_factory=", False),
        ("embed.num_actors=0", False), ("embed.rows_per_block=1", True), ("embed.rows_per_block=0", False),
        ("train.lr=0", False), ("train.lr=1e-5", True), ("train.lr=.inf", False), ("train.temperature=0", False),
        ("train.temperature=-0.05", False), ("train.batch_size=0", False), ("train.num_workers=0", False),
        ("train.lora_dropout=1", False), ("train.grad_accum=0", False), ("train.num_hard_negatives=0", True),
        ("teacher_defs.minilm.batch_size=0", False), ("teacher_defs.minilm.device=gpu", False),
        ("teacher_defs.minilm.device=cuda:1", True), ("teacher_defs.bm25.bm25_b=1.5", False),
        ("teacher_defs.bm25.bm25_method=okapi", False), ("evaluate.batch_size=0", False),
        ("ingest.max_queries=-1", False),
    ],
)
def test_domains_at_load_time(override, ok):
    key = override.split("=")[0]
    if ok:
        load_config(overrides=[override])
    else:
        with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + ": .* must be"):
            load_config(overrides=[override])


def test_cross_key_rules():
    with pytest.raises(ConfigError, match=r"mine.sample_top_k: 3 must be >= mine.num_negatives \(4\)"):
        load_config(overrides=["mine.sampling=sampled", "mine.sample_top_k=3"])
    load_config(overrides=["mine.sampling=top", "mine.sample_top_k=3"])  # unused by 'top'
    # training draws min(num_hard_negatives, the row's negatives) per epoch: more than mined is not an error
    assert load_config(overrides=["train.num_hard_negatives=5"]).train.num_hard_negatives == 5


def test_direct_construction_is_checked_too():
    from raymine.config import MineConfig

    with pytest.raises(ConfigError, match=r"^mine.num_negatives: -3 must be >= 1"):
        Config(mine=MineConfig(num_negatives=-3))


def test_every_numeric_field_has_a_domain():
    """A field added without a domain fails here: add it to config.DOMAINS (``ANY`` if truly unbounded)."""
    import typing

    from raymine.config import DOMAINS

    sections = {f.type if isinstance(f.type, type) else typing.get_type_hints(Config)[f.name]
                for f in dataclasses.fields(Config)}
    classes = [c for c in sections if dataclasses.is_dataclass(c)]
    from raymine.config import TeacherConfig

    classes.append(TeacherConfig)
    missing = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (int, float) and f.name not in DOMAINS.get(cls.__name__, {}):
                missing.append(f"{cls.__name__}.{f.name}")
        unknown = set(DOMAINS.get(cls.__name__, {})) - {f.name for f in dataclasses.fields(cls)}
        assert not unknown, f"DOMAINS names fields {cls.__name__} does not have: {unknown}"
    assert not missing, f"numeric fields without a domain in config.DOMAINS: {missing}"


def _numeric_keys() -> list[str]:
    return [k for k, default, _ in describe(Config) if default not in ("true", "false")
            and default.lstrip("-").replace(".", "", 1).replace("e-", "", 1).isdigit()]


NUMERIC_KEYS = _numeric_keys()


def test_property_random_configs_load_or_fail_with_config_error():
    """Random values for random numeric keys: load_config returns a Config or raises ConfigError, nothing else;
    and a Config that loads has every value inside the domains written in test_domains_at_load_time."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    values = st.one_of(
        st.integers(min_value=-5, max_value=10_000),
        st.floats(allow_nan=True, allow_infinity=True, width=32).map(lambda x: repr(float(x))),
        st.sampled_from(["", "x", "1e-5", "-0.0", ".nan", "[1, 2]", "true"]),
    )
    overrides = st.lists(st.tuples(st.sampled_from(NUMERIC_KEYS), values), min_size=1, max_size=6)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
    @given(overrides)
    def check(items):
        try:
            cfg = load_config(overrides=[f"{k}={v}" for k, v in items])
        except ConfigError:
            return
        m, t = cfg.mine, cfg.train
        assert 0 < m.perc <= 1 and m.margin >= 0 and m.num_negatives >= 1 and m.sample_temperature > 0
        assert cfg.search.num_shards >= 1 and cfg.search.nprobe >= 1 and t.lr > 0 and t.temperature > 0
        assert m.sampling == "top" or m.sample_top_k >= m.num_negatives
        assert t.num_hard_negatives >= 0 and t.batch_size >= 1 and t.num_workers >= 1

    assert len(NUMERIC_KEYS) > 40
    check()
