"""Typed configuration (dpo_ray.config): YAML presets, --set overrides, type checks, validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from dpo_ray.config import (
    TINY_MODEL_PRESET,
    Config,
    ConfigError,
    build_config,
    config_from_dict,
    merge_overrides,
    validate_config,
)

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted(p for p in (REPO / "configs").rglob("*") if p.suffix in (".yaml", ".yml"))


# ---------------------------------------------------------------------------- defaults and YAML


def test_defaults_validate():
    cfg = Config()
    validate_config(cfg)  # does not raise
    built = build_config(None, ["model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct"])  # a named model: the bare defaults
    assert built == Config(model=dataclasses.replace(cfg.model, name_or_path="Qwen/Qwen2.5-0.5B-Instruct"))
    assert built.dpo.beta == 0.1 and built.dpo.loss_type == "sigmoid"


def test_default_learning_rate_suits_pretrained_models():
    named = build_config(None, ["model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct"])
    assert Config().train.learning_rate == named.train.learning_rate == 1e-6  # TRL's DPOConfig default
    assert named.sweep.lr_min < 1e-6 < named.sweep.lr_max <= 1e-5  # the sweep searches around it


def test_the_tiny_model_default_carries_its_own_learning_rate(tmp_path):
    tiny = build_config()  # no preset, no model named: the tiny random-init model
    assert tiny.train.learning_rate == TINY_MODEL_PRESET["train"]["learning_rate"] == 1e-3
    assert (tiny.sweep.lr_min, tiny.sweep.lr_max) == (1e-4, 3e-3)
    assert build_config(REPO / "configs" / "default.yaml") == tiny  # the embedded default, written out
    # it leaves the learning rate to the defaults, so naming a pretrained model there gets the pretrained default
    named = build_config(REPO / "configs" / "default.yaml", ["model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct"])
    assert named.train.learning_rate == 1e-6
    assert build_config(None, ["train.learning_rate=5e-4"]).train.learning_rate == 5e-4  # the user's value wins
    path = tmp_path / "tiny.yaml"
    path.write_text("train:\n  batch_size: 8\n")
    assert build_config(path).train.learning_rate == 1e-3  # a preset for the tiny model gets it too
    path.write_text("model:\n  name_or_path: /models/llama\n")
    assert build_config(path).train.learning_rate == 1e-6


def test_yaml_round_trip_gives_the_same_config(tmp_path):
    cfg = build_config(None, ["dpo.beta=0.3", "model.lora.enabled=true", "data.column_map.q=prompt"])
    path = tmp_path / "dump.yaml"
    path.write_text(cfg.to_yaml())
    assert build_config(path) == cfg


def test_yaml_preset_is_loaded_and_overrides_win(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text(
        "# python -m dpo_ray.cli train --config preset.yaml\n"
        "dpo:\n  beta: 0.25\n  loss_type: ipo\n"
        "train:\n  batch_size: 8\n  learning_rate: 0.0005\n"
        "scaling:\n  num_workers: 4\n"
    )
    cfg = build_config(path)
    assert (cfg.dpo.beta, cfg.dpo.loss_type, cfg.train.batch_size, cfg.scaling.num_workers) == (0.25, "ipo", 8, 4)
    assert cfg.train.learning_rate == 0.0005
    assert cfg.train.micro_batch_size == Config().train.micro_batch_size  # untouched keys keep defaults

    cfg = build_config(path, ["dpo.beta=0.05", "train.batch_size=16"])
    assert cfg.dpo.beta == 0.05 and cfg.train.batch_size == 16
    assert cfg.dpo.loss_type == "ipo"


def test_yaml_file_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_config(tmp_path / "missing.yaml")
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config(not_mapping)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  batchsize: 8\n")
    with pytest.raises(ConfigError, match=r"'train\.batchsize'"):
        build_config(unknown)


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here yet\n")
    assert build_config(path) == build_config()


# ---------------------------------------------------------------------------- --set overrides


def test_overrides_are_typed_and_repeatable():
    cfg = build_config(
        None,
        [
            "train.batch_size=32",
            "train.learning_rate=0.002",
            "dpo.beta=0.2",
            "dpo.beta=0.4",  # repeated: the last one wins
            "model.lora.enabled=true",
            "dpo.reference=adapter",
            "model.lora.target_modules=[q_proj, v_proj]",
            "sweep.beta_grid=[0.1, 1]",
            "data.column_map.question=prompt",
            "data.column_map.good=chosen",
        ],
    )
    assert cfg.train.batch_size == 32 and isinstance(cfg.train.batch_size, int)
    assert cfg.train.learning_rate == 0.002
    assert cfg.dpo.beta == 0.4
    assert cfg.model.lora.enabled is True
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.sweep.beta_grid == [0.1, 1.0] and all(isinstance(v, float) for v in cfg.sweep.beta_grid)
    assert cfg.data.column_map == {"question": "prompt", "good": "chosen"}


def test_int_override_of_float_field_widens_to_float():
    cfg = build_config(None, ["dpo.beta=1"])
    assert cfg.dpo.beta == 1.0 and isinstance(cfg.dpo.beta, float)


def test_bool_override_accepts_yaml_booleans():
    assert build_config(None, ["train.prefix_sharing=false"]).train.prefix_sharing is False
    assert build_config(None, ["train.prefix_sharing=True"]).train.prefix_sharing is True


def test_choice_override_keeps_yaml_words_like_no_as_text(tmp_path):
    # "no" is a choice of train.mixed_precision; YAML alone would turn the bare word into False
    assert build_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    preset = tmp_path / "bare_no.yaml"
    preset.write_text("train:\n  mixed_precision: no\n")
    with pytest.raises(ConfigError, match=r"'train\.mixed_precision'.*got False.*quote it"):
        build_config(preset)


def test_dict_override_as_inline_mapping():
    cfg = build_config(None, ["data.column_map={question: prompt, good: chosen, bad: rejected}"])
    assert cfg.data.column_map == {"question": "prompt", "good": "chosen", "bad": "rejected"}


def test_float_override_in_exponent_notation_1e_minus_3():
    # PyYAML (YAML 1.1) reads "1e-3" as a string (it wants "1.0e-3"); a float field should take it.
    cfg = build_config(None, ["train.learning_rate=1e-3"])
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert build_config(None, ["train.learning_rate=5e-7"]).train.learning_rate == pytest.approx(5e-7)


def test_float_in_exponent_notation_in_a_yaml_preset(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("train:\n  learning_rate: 5e-7\n")
    assert build_config(path).train.learning_rate == pytest.approx(5e-7)


def test_string_field_keeps_digits_as_a_string():
    cfg = build_config(None, ["run_name=123", "data.split=2024"])
    assert cfg.run_name == "123"
    assert cfg.data.split == "2024"


@pytest.mark.parametrize("text", ["1.10", "007", "1_000"])
def test_string_field_keeps_the_text_exactly(text):
    # config._coerce_override promises "a string field keeps the text even if it looks like a number",
    # but it stringifies the YAML-parsed number: "1.10" -> "1.1", "007" -> "7", "1_000" -> "1000".
    assert build_config(None, [f"run_name={text}"]).run_name == text


def test_override_values_with_equals_signs_keep_the_rest():
    cfg = build_config(None, ["model.name_or_path=org/model=v2"])
    assert cfg.model.name_or_path == "org/model=v2"


def test_empty_override_value_is_an_empty_string():
    assert build_config(None, ["data.eval="]).data.eval == ""


def test_unknown_key_error_names_the_key():
    with pytest.raises(ConfigError, match=r"'dpo\.bta'") as err:
        build_config(None, ["dpo.bta=0.1"])
    assert "beta" in str(err.value)  # lists the known keys of that section
    with pytest.raises(ConfigError, match=r"'trian'"):
        build_config(None, ["trian.batch_size=8"])


def test_key_below_a_value_is_rejected():
    with pytest.raises(ConfigError, match=r"dpo\.beta"):
        build_config(None, ["dpo.beta.x=1"])


def test_malformed_override_is_rejected():
    with pytest.raises(ConfigError, match="section.key=value"):
        build_config(None, ["dpo.beta"])
    with pytest.raises(ConfigError, match="empty key"):
        build_config(None, ["=3"])


@pytest.mark.parametrize(
    "override, key, type_name",
    [
        ("train.batch_size=abc", "train.batch_size", "int"),
        ("train.batch_size=2.5", "train.batch_size", "int"),
        ("dpo.beta=high", "dpo.beta", "float"),
        ("train.prefix_sharing=maybe", "train.prefix_sharing", "bool"),
        ("model.lora.target_modules=q_proj", "model.lora.target_modules", "list"),
        ("data.column_map=prompt", "data.column_map", "dict"),
    ],
)
def test_wrong_type_error_names_key_and_expected_type(override, key, type_name):
    with pytest.raises(ConfigError) as err:
        build_config(None, [override])
    message = str(err.value)
    assert f"'{key}'" in message
    assert type_name in message


def test_merge_overrides_does_not_mutate_its_input():
    base = {"dpo": {"beta": 0.1}}
    merged = merge_overrides(base, ["dpo.beta=0.2", "train.epochs=3"])
    assert base == {"dpo": {"beta": 0.1}}
    assert merged == {"dpo": {"beta": 0.2}, "train": {"epochs": 3}}


def test_config_from_dict_validates():
    with pytest.raises(ConfigError, match=r"'dpo\.beta'"):
        config_from_dict({"dpo": {"beta": -1.0}})


# ---------------------------------------------------------------------------- validation rules


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["dpo.beta=0"], "dpo.beta"),
        (["dpo.beta=-0.1"], "dpo.beta"),
        (["train.learning_rate=0"], "train.learning_rate"),
        (["train.learning_rate=-0.001"], "train.learning_rate"),
        (["dpo.loss_type=kto"], "dpo.loss_type"),
        (["dpo.label_smoothing=0.5"], "dpo.label_smoothing"),
        (["dpo.label_smoothing=-0.1"], "dpo.label_smoothing"),
        (["dpo.rpo_alpha=-1"], "dpo.rpo_alpha"),
        (["data.max_length=4"], "data.max_length"),
        (["data.max_prompt_length=1100"], "data.max_prompt_length"),
        (["dpo.reference=adapter"], "dpo.reference"),
        (["dpo.reference=teacher"], "dpo.reference"),
        (["train.batch_size=15", "scaling.num_workers=2"], "train.batch_size"),
        (["train.batch_size=0"], "train.batch_size"),
        (["train.optimizer=sgd"], "train.optimizer"),
        (["model.tiny.architecture=gpt2"], "model.tiny.architecture"),
        (["data.eval_fraction=0"], "data.eval_fraction"),
        (["sweep.beta_min=0.6"], "sweep.beta_min"),
        (["sweep.extra={dpo.bta: [0.1]}"], "dpo.bta"),
    ],
)
def test_validation_rejects_bad_value_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        build_config(None, overrides)
    assert f"'{key}'" in str(err.value)
    assert "\n" not in str(err.value)  # one line


@pytest.mark.parametrize(
    "overrides",
    [
        ["dpo.label_smoothing=0.49", "dpo.loss_type=robust"],
        ["dpo.reference=adapter", "model.lora.enabled=true"],
        ["train.batch_size=6", "scaling.num_workers=3"],
        ["train.batch_size=5", "scaling.num_workers=0"],  # 0 workers: the driver trains alone
        ["data.max_length=8"],
        ["data.eval_fraction=0", "data.eval=held_out.jsonl"],
        ["dpo.loss_type=hinge"],
    ],
)
def test_validation_accepts_edge_values(overrides):
    build_config(None, overrides)  # does not raise


def test_batch_size_error_mentions_the_worker_count():
    with pytest.raises(ConfigError, match="num_workers=4"):
        build_config(None, ["train.batch_size=10", "scaling.num_workers=4"])


def test_max_prompt_length_defaults_to_half_of_max_length():
    assert build_config(None, ["data.max_length=300"]).max_prompt_length() == 150
    assert build_config(None, ["data.max_prompt_length=64"]).max_prompt_length() == 64


def test_relative_paths_resolve_against_output_dir(tmp_path):
    cfg = build_config(None, [f"output_dir={tmp_path}/runs/a"])
    assert cfg.resolved_storage_path() == str(tmp_path / "runs" / "a" / "ray_results")
    assert cfg.resolved_cache_dir() == tmp_path / "runs" / "cache"
    cfg = build_config(None, ["storage_path=s3://bucket/dpo"])
    assert cfg.resolved_storage_path() == "s3://bucket/dpo"


# ---------------------------------------------------------------------------- presets under configs/


@pytest.mark.skipif(not PRESETS, reason="no presets under configs/ yet")
@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_loads_and_starts_with_a_command_comment(preset):
    cfg = build_config(preset)
    assert isinstance(cfg, Config)
    first = preset.read_text().splitlines()[0]
    assert first.startswith("#"), f"{preset.name}: first line should be a comment with the command that uses it"
    command = first.lstrip("#").strip()
    assert command, f"{preset.name}: the first comment line is empty"
    assert any(word in command for word in ("dpo-ray", "dpo_ray", "python", "ray ")), (
        f"{preset.name}: the first line should hold a command, got {first!r}"
    )
    assert isinstance(yaml.safe_load(preset.read_text()) or {}, dict)


# ---------------------------------------------------------------------------- TRL semantics (issue 13)


def test_loss_type_choices_are_the_loss_module_enum():
    from dpo_ray.losses import LossType

    for member in LossType:
        assert build_config(None, [f"dpo.loss_type={member.value}"]).dpo.loss_type == member.value
    with pytest.raises(ConfigError) as err:
        build_config(None, ["dpo.loss_type=kto_pair"])
    message = str(err.value)
    assert "'dpo.loss_type'" in message
    assert all(member.value in message for member in LossType)  # the error lists every choice


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_label_smoothing_is_refused_for_losses_that_ignore_it(loss_type):
    with pytest.raises(ConfigError) as err:
        build_config(None, [f"dpo.loss_type={loss_type}", "dpo.label_smoothing=0.1"])
    message = str(err.value)
    assert message.startswith("config key 'dpo.label_smoothing'")
    assert f"dpo.loss_type={loss_type}" in message
    assert "sigmoid, robust use label smoothing" in message
    assert "\n" not in message
    assert build_config(None, [f"dpo.loss_type={loss_type}", "dpo.label_smoothing=0"]).dpo.label_smoothing == 0.0


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
def test_label_smoothing_is_accepted_for_cdpo_and_robust(loss_type):
    cfg = build_config(None, [f"dpo.loss_type={loss_type}", "dpo.label_smoothing=0.1"])
    assert (cfg.dpo.loss_type, cfg.dpo.label_smoothing) == (loss_type, 0.1)


def test_attn_implementation_defaults_to_auto():
    assert Config().model.attn_implementation == "auto"
    assert build_config().model.attn_implementation == "auto"


@pytest.mark.parametrize(
    "value", ["auto", "eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3"]
)
def test_attn_implementation_accepts_transformers_values(value):
    assert build_config(None, [f"model.attn_implementation={value}"]).model.attn_implementation == value


@pytest.mark.parametrize("value", ["flash_attention", "SDPA", "no_such_attention", ""])
def test_attn_implementation_rejects_other_values_naming_the_key(value):
    with pytest.raises(ConfigError) as err:
        build_config(None, [f"model.attn_implementation={value}"])
    message = str(err.value)
    assert message.startswith("config key 'model.attn_implementation'")
    assert "flash_attention_2" in message and repr(value) in message


def test_disable_dropout_defaults_on_and_can_be_turned_off():
    assert Config().train.disable_dropout is True
    assert build_config().train.disable_dropout is True
    assert build_config(None, ["train.disable_dropout=false"]).train.disable_dropout is False
    with pytest.raises(ConfigError, match=r"'train\.disable_dropout' expects bool"):
        build_config(None, ["train.disable_dropout=sometimes"])


def test_lora_with_fsdp_is_refused_naming_train_strategy():
    gpu_fsdp = ["train.strategy=fsdp", "scaling.use_gpu=true"]
    with pytest.raises(ConfigError) as err:
        build_config(None, gpu_fsdp + ["model.lora.enabled=true"])
    message = str(err.value)
    assert message.startswith("config key 'train.strategy'")
    assert "model.lora.enabled=true" in message and "adapter" in message and "FSDP-safe" in message
    assert "use train.strategy=ddp for LoRA" in message
    # LoRA on DDP, and FSDP without LoRA, stay accepted
    assert build_config(None, ["model.lora.enabled=true", "scaling.use_gpu=true"]).model.lora.enabled is True
    assert build_config(None, gpu_fsdp).train.strategy == "fsdp"


def test_fsdp_without_gpus_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="train.strategy.*scaling.use_gpu"):
        build_config(None, ["train.strategy=fsdp"])
    assert build_config(None, ["train.strategy=fsdp", "scaling.use_gpu=true"]).train.strategy == "fsdp"


# ---------------------------------------------------------------------------- one toolkit: Literal, setter, parser


def test_every_literal_field_refuses_a_value_outside_its_choices_listing_them():
    import dataclasses
    import typing

    from dpo_ray.config import _field_type

    def literal_keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(tp):
                yield from literal_keys(tp, key + ".")
            elif typing.get_origin(tp) is typing.Literal:
                yield key, typing.get_args(tp)

    keys = dict(literal_keys(Config))
    assert {"dpo.loss_type", "model.attn_implementation", "train.strategy", "data.format"} <= set(keys)
    for key, choices in keys.items():
        assert _field_type(Config, key.split(".")) is not str  # a choice, not free text
        with pytest.raises(ConfigError, match=rf"'{key}': must be one of {', '.join(choices)}; got 'nope'"):
            build_config(None, [f"{key}=nope"])


def test_parse_override_and_set_dotted_are_the_one_way_to_set_a_key():
    from dpo_ray.config import parse_override, set_dotted

    assert parse_override("dpo.beta=0.3") == ("dpo.beta", 0.3)
    assert parse_override("output_dir=007") == ("output_dir", "007")  # string fields keep the text
    tree = {"dpo": {"beta": 0.1}}
    set_dotted(tree, "dpo.beta", 0.2)
    set_dotted(tree, "train.learning_rate", 1e-4)
    assert tree == {"dpo": {"beta": 0.2}, "train": {"learning_rate": 1e-4}}


def test_derive_config_copies_validates_and_names_an_unknown_key():
    from dpo_ray.config import derive_config

    base = Config()
    derived = derive_config(base, {"dpo.beta": 0.4, "train.learning_rate": 2e-4})
    assert (derived.dpo.beta, derived.train.learning_rate, base.dpo.beta) == (0.4, 2e-4, Config().dpo.beta)
    with pytest.raises(ConfigError, match=r"'dpo\.betta'"):
        derive_config(base, {"dpo.betta": 0.4})
    with pytest.raises(ConfigError, match=r"'dpo\.beta'"):
        derive_config(base, {"dpo.beta": -1.0})


def test_build_settings_types_any_settings_dataclass_like_the_config():
    from dpo_ray.config import TinyModelSettings, build_settings

    tiny = build_settings(TinyModelSettings, ["hidden_size=64", "architecture=qwen2"])
    assert (tiny.hidden_size, tiny.architecture, tiny.num_layers) == (64, "qwen2", TinyModelSettings().num_layers)
    with pytest.raises(ConfigError, match="'hidden_sise'"):
        build_settings(TinyModelSettings, ["hidden_sise=64"])
    with pytest.raises(ConfigError, match="'architecture': must be one of llama, qwen2"):
        build_settings(TinyModelSettings, ["architecture=gpt2"])


def test_ray_include_dashboard_is_auto_true_or_false_and_names_the_key_otherwise(tmp_path):
    assert Config().ray.include_dashboard == "auto"  # off for a local train/sft/demo run, on for a sweep
    assert build_config(None, ["ray.include_dashboard=true"]).ray.include_dashboard is True
    assert build_config(None, ["ray.include_dashboard=false"]).ray.include_dashboard is False
    assert build_config(None, ["ray.include_dashboard=auto"]).ray.include_dashboard == "auto"
    preset = tmp_path / "p.yaml"
    preset.write_text("ray:\n  include_dashboard: no\n")  # YAML 1.1's no is a boolean, and means false here too
    assert build_config(preset).ray.include_dashboard is False
    with pytest.raises(ConfigError, match=r"'ray\.include_dashboard' expects bool or one of auto, got str 'sometimes'"):
        build_config(None, ["ray.include_dashboard=sometimes"])
