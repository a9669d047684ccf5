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
