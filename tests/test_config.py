"""Typed params: every bad setting fails with the key path and the reason, overrides and files apply."""

from __future__ import annotations

import logging

import pytest
import yaml

from fluxfill.cli import main
from fluxfill.config import ConfigError, Params, load_params, validate


def test_defaults_match_params_yaml():
    assert load_params("params.yaml") == Params()


def test_unknown_key_names_the_key_path():
    with pytest.raises(ConfigError) as e:
        validate({"train": {"max_stepz": 5}}, "p.yaml")
    msg = str(e.value)
    assert msg.startswith("p.yaml: 1 invalid setting(s):")
    assert "train.max_stepz: unknown key" in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"trian: unknown key"):
        validate({"trian": {"max_steps": 5}})


def test_wrong_type_names_key_reason_and_value():
    with pytest.raises(ConfigError) as e:
        validate({"train": {"max_steps": "many"}})
    assert "train.max_steps: Input should be a valid integer" in str(e.value)
    assert "(got 'many')" in str(e.value)


def test_out_of_range_values_all_reported():
    with pytest.raises(ConfigError) as e:
        validate({"fusion": {"init": 1.5}, "data": {"val_fraction": -0.1}, "train": {"lora": {"rank": 0}}})
    msg = str(e.value)
    assert "3 invalid setting(s)" in msg
    assert "fusion.init: Input should be less than 1 (got 1.5)" in msg
    assert "data.val_fraction: Input should be greater than or equal to 0 (got -0.1)" in msg
    assert "train.lora.rank: Input should be greater than or equal to 1 (got 0)" in msg


def test_panel_size_must_be_a_multiple_of_16():
    with pytest.raises(ConfigError) as e:
        validate({"data": {"panel_size": 500}})
    msg = str(e.value)
    assert "data.panel_size:" in msg
    assert "panel_size 500 is not a positive multiple of 16" in msg
    assert "try 496" in msg


def test_set_overrides_are_parsed_as_yaml(tmp_path):
    p = load_params(
        None,
        ["train.max_steps=5", "data.panel_size=256", "train.lora.rank=4", "fusion.mode=none",
         "eval.max_samples=null", "train.lora.target_modules=[x_embedder]"],
    )
    assert (p.train.max_steps, p.data.panel_size, p.train.lora.rank) == (5, 256, 4)
    assert p.fusion.mode == "none" and p.eval.max_samples is None
    assert p.train.lora.target_modules == ["x_embedder"]
    assert p.train.batch_size == Params().train.batch_size  # untouched keys keep their value


@pytest.mark.parametrize(
    "item, reason",
    [
        ("train.max_steps", "is not of the form section.key=value"),
        ("max_steps=5", "the key must name a section and a key"),
        ("train.max_steps=[1", "the value is not valid YAML"),
        ("train.max_steps.x=1", "'max_steps' is a value, not a section"),
    ],
)
def test_malformed_overrides(item, reason):
    with pytest.raises(ConfigError, match=reason):
        load_params(None, [item])


def test_params_file_and_overrides_on_top(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text(yaml.safe_dump({"train": {"max_steps": 7, "learning_rate": 0.01}, "data": {"seed": 3}}))
    p = load_params(f, ["train.max_steps=9"])
    assert (p.train.max_steps, p.train.learning_rate, p.data.seed) == (9, 0.01, 3)


def test_params_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml: params file not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: the top level must be a mapping"):
        load_params(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("data:\n  panel_size: 100\n")
    with pytest.raises(ConfigError, match=r"wrong\.yaml: 1 invalid setting"):
        load_params(wrong)


def test_cli_bad_override_exits_2_with_the_message(tmp_path, capsys, monkeypatch):
    f = tmp_path / "params.yaml"
    f.write_text("data:\n  output: " + str(tmp_path / "out") + "\n")
    code = main(["prepare", "--params", str(f), "--set", "data.panel_size=500"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"fluxfill prepare: {f} with the overrides data.panel_size: 1 invalid setting(s):")
    assert "data.panel_size: Value error, panel_size 500 is not a positive multiple of 16" in err
    assert not (tmp_path / "out").exists()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").unlink()  # no params file: the overrides alone are named
    with pytest.raises(ConfigError, match=r"^the overrides data.panel_size, train.max_steps: 2 invalid setting\(s\):"):
        load_params(overrides=["data.panel_size=500", "train.max_steps=six"])


@pytest.mark.parametrize("flag, level", [([], logging.ERROR), (["-v"], logging.NOTSET), (["--verb"], logging.NOTSET)])
def test_cli_quiets_library_loggers_unless_verbose_as_argparse_reads_the_flag(flag, level, tmp_path, capsys):
    from fluxfill.cli import CHATTY, QUIET

    f = tmp_path / "params.yaml"
    f.write_text("data:\n  panel_size: 500\n")  # refused before anything runs
    before = {name: logging.getLogger(name).level for name in [*QUIET, *CHATTY]}
    try:
        assert main([*flag, "prepare", "--params", str(f)]) == 2
        assert logging.getLogger("torchao").level == level  # NOTSET: the root's level (DEBUG with -v)
        assert logging.getLogger("accelerate").level == (logging.WARNING if level == logging.ERROR else level)
        assert logging.getLogger("httpx").level == logging.WARNING  # request chatter stays out, -v or not
    finally:
        for name, old in before.items():
            logging.getLogger(name).setLevel(old)
