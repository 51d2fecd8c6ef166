"""One typed configuration for dpo-ray.

The dataclasses below are the single source of truth for YAML presets, ``--set section.key=value``
overrides on the command line, Ray Tune's param space and the Ray Train worker's
``train_loop_config``. A config is validated when it is built (:func:`build_config`), so a bad value
fails with one line naming the key before Ray starts anything.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dpo_ray.losses import LossType

# Repository root: the bundled data and presets live here when running from a checkout or a
# `ray job submit --working-dir .` upload.
REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_HH_DATA = "data/hh_rlhf_harmless_1800.jsonl.gz"
AUTO = "auto"  # a setting left to be sized at run time (from the cluster, the vocabulary)

# The dataclass defaults suit pretrained models. A config that builds the tiny random-init model (an empty
# model.name_or_path) gets these values under whatever it sets itself: a random-init model needs steps a
# thousand times larger than a pretrained one (at 1e-6 it barely moves in a hundred steps). configs/default.yaml
# leaves these keys out, so they follow the model there too (tests/test_config.py checks both cases).
TINY_MODEL_PRESET: dict[str, Any] = {
    "train": {"learning_rate": 1e-3},
    "sweep": {"lr_min": 1e-4, "lr_max": 3e-3},  # below 1e-4 the tiny model barely moves; above 3e-3 it gets noisy
}


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


# Choices are Literal types: the builder checks them when a config is made (a typo fails before Ray starts, not
# in every worker), and the error lists them.
# model.attn_implementation: "auto" (transformers picks: from_pretrained gets None) or one of transformers' own.
AttnImplementation = Literal["auto", "eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3"]
# dpo.loss_type: the names of losses.LossType, read from the enum that holds their behaviour (one list, not two).
LossTypeName = Literal[tuple(member.value for member in LossType)]  # type: ignore[valid-type]


@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = 16  # peft's common default rank; small enough for a laptop, enough capacity for DPO
    alpha: int = 32  # 2 * r, the usual peft scaling
    dropout: float = 0.0  # DPO compares two forward passes; dropout noise would bias the margin
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    save_adapter: bool = True  # keep the adapter beside the merged model for reuse


@dataclass
class TinyModelSettings:
    """Shape of the random-init model built when ``model.name_or_path`` is empty."""

    architecture: Literal["llama", "qwen2"] = "llama"
    vocab_size: int = 2048  # a local byte-level BPE vocabulary; small so the lm_head stays cheap
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2  # grouped-query attention as in Llama-3 / Qwen2
    intermediate_size: int = 352
    max_position_embeddings: int = 1024
    tokenizer_texts: int = 1800  # rows of training data the tokenizer is trained on


@dataclass
class ModelSettings:
    name_or_path: str = ""  # hub id or local HF directory; empty builds the tiny model
    trust_remote_code: bool = False  # never run a repository's code unless the user opts in
    # weights; auto = float32 (bf16 compute comes from train.mixed_precision)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # auto = what transformers picks for the model: sdpa where the family supports it, else eager (e.g. Gemma 2,
    # which soft-caps attention logits)
    attn_implementation: AttnImplementation = "auto"
    gradient_checkpointing: bool = False  # trades ~30% compute for activation memory
    tiny: TinyModelSettings = field(default_factory=TinyModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class DataSettings:
    train: str = BUNDLED_HH_DATA  # file, directory, or hub dataset id (with data.split)
    eval: str = ""  # optional explicit held-out file; empty holds out data.eval_fraction of train
    format: Literal["auto", "explicit", "implicit", "conversational"] = "auto"
    split: str = "train"  # split name when data.train is a hub dataset id or HF dataset directory
    eval_split: str = ""  # split of a hub dataset for evaluation (empty: hold out a fraction)
    column_map: dict[str, str] = field(default_factory=dict)  # e.g. {question: prompt, good: chosen}
    # held-out share of the prompts (all pairs of a prompt on one side) when no eval file is given
    eval_fraction: float = 0.1
    split_seed: int = 1234  # the held-out split depends on this seed only, not on workers
    max_length: int = 1024  # TRL's default; HH prompts are long (at 512, 3% of the bundled rows exceed it)
    max_prompt_length: int = 0  # 0 = max_length // 2; prompts are cut from the start down to this
    max_invalid_fraction: float = 0.01  # stop before training when more rows than this are unusable
    cache_dir: str = ""  # tokenized data + reference log-probs; empty = <output_dir>/../cache
    limit: int = 0  # read only the first N usable train rows (0 = all); for quick runs


@dataclass
class DPOSettings:
    beta: float = 0.1  # the paper's default KL strength
    loss_type: LossTypeName = "sigmoid"  # TRL's names; ipo averages per token, as TRL
    label_smoothing: float = 0.0  # label-flip rate in [0, 0.5) assumed by sigmoid (cDPO) and robust; 0 for the others
    rpo_alpha: float = 0.0  # weight of the NLL term on chosen responses (RPO); 0 disables it
    reference: Literal["precomputed", "model", "adapter"] = "precomputed"  # adapter: LoRA only
    # pi_ref when it is not the starting policy (TRL's ref_model): a hub id or local directory with the policy's
    # tokenizer, e.g. the fixed SFT model while a later round of iterative DPO starts from the last round's policy.
    # Empty: pi_ref is the starting policy (model.name_or_path), the paper's setting.
    ref_model: str = ""


@dataclass
class TrainSettings:
    # TRL's DPOConfig default, for pretrained models (DPO recipes use 5e-7..1e-6; 1e-3 would wreck a pretrained
    # model in a few steps). The tiny random-init model gets its own from TINY_MODEL_PRESET.
    learning_rate: float = 1e-6
    batch_size: int = 16  # pairs per optimizer step across all workers
    micro_batch_size: int = 8  # pairs per forward pass per worker; gradient accumulation covers the rest
    # padded tokens per forward pass (pairs x the longest pair's prompt + chosen + rejected), on top of
    # micro_batch_size: bounds a step's activation memory whatever the lengths (a longer pair goes alone). 0: no
    # budget; auto: 512 on CPU, where it costs little speed (epochs.CPU_MICRO_BATCH_TOKENS says what was
    # measured), none on GPU. The reference pass scores under the same budget
    micro_batch_tokens: int | Literal["auto"] = AUTO
    max_steps: int = 0  # 0 = run data.epochs over the data
    epochs: int = 1
    seed: int = 42
    optimizer: Literal["adamw", "rmsprop"] = "adamw"  # the paper's recipe: rmsprop, lr 1e-6
    # AdamW through torch's fused kernel, as transformers' (so TRL's) default optim adamw_torch_fused: no
    # temporaries the size of a parameter, where torch's default AdamW makes two per tensor on CPU (466 MB at the
    # step of Qwen2.5's tied 151,936 x 384 head) and the whole model's on GPU. false: that default (adamw_torch)
    fused_optimizer: bool = True
    weight_decay: float = 0.0  # DPO recipes train without weight decay
    warmup_steps: int = 0  # the paper uses 150 at batch 64
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"  # after warmup
    max_grad_norm: float = 1.0  # clip; 0 disables
    eval_every: int = 0  # steps between evaluations; 0 = only at the end
    checkpoint_every: int = 0  # steps between checkpoints; 0 = with each evaluation
    keep_checkpoints: int = 2  # best k by eval accuracy are kept
    log_every: int = 5  # steps between progress lines
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"  # auto = bf16 autocast on GPU, none on CPU
    strategy: Literal["ddp", "fsdp"] = "ddp"
    prefix_sharing: bool = True  # [prompt|chosen|rejected] in one row: the prompt runs once
    shuffle: bool = True  # seeded new order every epoch; false: the data's own order (to replay another run's)
    length_bucketing: bool = True  # batch pairs of similar length: little padding (only when shuffling)
    response_only_logits: bool = True  # output head on response positions only, chunked: no [T x V] fp32 logits
    # response positions per chunk of the response-only head; auto: as many as 2**24 fp32 logits hold (64 MiB), so
    # the head's peak memory does not grow with the vocabulary (losses.resolve_chunk_rows)
    logits_chunk_size: int | Literal["auto"] = AUTO
    skip_nonfinite: bool = False  # skip a batch whose loss or gradient is not finite instead of failing
    # as TRL's DPOConfig.disable_dropout: dropout would make the policy's chosen and rejected passes, and the
    # policy against the reference, see different random masks, so the margin would be noisy and biased
    disable_dropout: bool = True


@dataclass
class ScalingSettings:
    # two CPU workers exercise DDP even on a laptop. 0 = Ray Train's local mode: the loop runs in the driver, so a
    # run is one training process with no worker group, controller or its helper actors (the leanest local run;
    # checkpoints and resume as usual, dpo_ray.checkpointing.LocalModeCheckpoints); one process, no DDP
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # only when use_gpu
    max_failures: int = 2  # worker-group restarts from the latest checkpoint before giving up
    allow_autoscale: bool = False  # wait for an autoscaler instead of failing when resources are missing


@dataclass
class SweepSettings:
    num_samples: int = 4
    # auto: as many trials at once as the cluster can give their workers (sized once, logged, before trials start)
    max_concurrent_trials: int | Literal["auto"] = AUTO
    # Ray Train workers per trial; auto: scaling.num_workers, lowered when one trial with that many cannot fit in
    # the cluster. A number is used as it is (a count the cluster cannot hold is an error).
    workers_per_trial: int | Literal["auto"] = AUTO
    beta_search: Literal["loguniform", "grid"] = "loguniform"
    beta_min: float = 0.02
    beta_max: float = 0.5
    beta_grid: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.3, 0.5])
    lr_min: float = 1e-7  # log-uniform over two decades around TRL's 1e-6, for pretrained models
    lr_max: float = 1e-5  # (the tiny model's range is in TINY_MODEL_PRESET)
    extra: dict[str, list] = field(default_factory=dict)  # other config keys to grid over
    asha: bool = True  # stop weak trials early on eval accuracy
    asha_grace_period: int = 1  # evaluations before a trial can be stopped
    seed: int = 0
    # a worker-group trial's own function needs only a sliver of a CPU (one that trains in its own process holds
    # its worker's CPUs instead)
    trial_cpus: float = 0.25
    # A one-worker DDP trial trains in its Tune trial's own process: no Ray Train controller, worker and dataset
    # actor to start per trial, and no dashboard for the sweep (benchmarks/RESULTS.md has the sweep's cost with
    # it). false: a Ray Train worker group, as trials with more workers always get.
    train_in_trial: bool = True


@dataclass
class TaskSettings:
    """The verifiable task of self-generated pairs (``dpo-ray iterate``, ``make-pairs``, the demo)."""

    # package.module:function called as f(prompt, answer) -> bool or number; the embedded 2-digit-addition checker
    # by default. Answers scoring task.pass_score or more are verified correct (chosen); the others are rejected.
    verifier: str = "dpo_ray.task:check_prompt_answer"
    pass_score: float = 1.0  # a bool True scores 1.0, so the default accepts exactly what the checker accepts
    # JSONL of {"prompt": ..., "solution": optional} for the rounds' train and held-out prompts; empty: the embedded
    # arithmetic task's splits. A solution is the teacher's chosen answer when the student has no verified one.
    prompts: str = ""
    heldout_prompts: str = ""


HOSTING_SECTIONS = ("ray",)  # settings of the Ray instance a run starts, not of the run: toggling them reuses results


@dataclass
class RaySettings:
    """The local Ray instance a run starts for itself (no RAY_ADDRESS, no live ``ray start`` head on this machine).

    A run that joins a cluster (RAY_ADDRESS, ``ray job submit``, a ``ray start`` head) uses that cluster as it was
    started; these keys do not apply there.
    """

    # auto: off for train, sft, demo and make-pairs, on for sweep. Ray's State API (list_placement_groups, get_actor)
    # is served by the dashboard's head modules (about ten processes, several hundred MB); a sweep needs it to free
    # the placement groups of trials ASHA stopped (dpo_ray.ray_compat; Ray Train's PlacementGroupCleaner), while a
    # fresh local instance of a single run has no earlier job whose groups could have leaked. true/false force it.
    include_dashboard: bool | Literal["auto"] = AUTO
    # idle worker processes the instance keeps for later tasks (the raylet's num_workers_soft_limit). Each keeps
    # what its tasks imported (a tokenizing worker: about 0.5 GB). auto: 0 for train and sft, whose tasks end with
    # the data stage; Ray's default (one per CPU) for demo, iterate and sweep, which run stage after stage
    idle_workers: int | Literal["auto"] = AUTO


@dataclass
class Config:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    dpo: DPOSettings = field(default_factory=DPOSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    sweep: SweepSettings = field(default_factory=SweepSettings)
    ray: RaySettings = field(default_factory=RaySettings)
    task: TaskSettings = field(default_factory=TaskSettings)
    output_dir: str = "outputs/default"
    run_name: str = "dpo"  # the same name resumes from the latest checkpoint
    storage_path: str = ""  # Ray Train storage (local, s3://, gs://); empty = <output_dir>/ray_results

    # ---------------------------------------------------------------- derived values
    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir).expanduser().resolve()

    def resolved_storage_path(self) -> str:
        if self.storage_path:
            if "://" in self.storage_path:
                return self.storage_path
            return str(Path(self.storage_path).expanduser().resolve())
        return str(self.resolved_output_dir() / "ray_results")

    def resolved_cache_dir(self) -> Path:
        if self.data.cache_dir:
            return Path(self.data.cache_dir).expanduser().resolve()
        return self.resolved_output_dir().parent / "cache"

    def resolve_reference_path(self, model_path: str) -> str:
        """The model pi_ref is read from: ``dpo.ref_model``, else the starting policy at ``model_path``."""
        return self.dpo.ref_model or model_path

    def max_prompt_length(self) -> int:
        return self.data.max_prompt_length or self.data.max_length // 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_result_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the sections that change how a run is hosted, not what it computes (``ray``):
        what a resumed sweep or a reused demo stage must match."""
        return {k: v for k, v in self.to_dict().items() if k not in HOSTING_SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# -------------------------------------------------------------------- building from dicts


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(choice) for choice in typing.get_args(tp))
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    args = ", ".join(_type_name(a) for a in typing.get_args(tp))
    return f"{origin.__name__}[{args}]"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``tp``; ints widen to floats, nothing else converts."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value in choices:
            return value
        hint = " (YAML reads a bare yes/no/on/off as a boolean: quote it)" if isinstance(value, bool) else ""
        raise ConfigError(f"config key '{key}': must be one of {', '.join(choices)}; got {value!r}{hint}")
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, key): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string; it is a float here
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _from_dict(tp, value, key)
    if tp is list or tp is dict:
        if isinstance(value, tp):
            return value
        raise bad
    raise ConfigError(f"config key '{key}' has an unsupported type {tp!r}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{key}' (known keys here: {known})")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def parse_override(text: str, root: type | None = None) -> tuple[str, Any]:
    """``a.b=value`` -> ``("a.b", value)``; the value is parsed as YAML, except for string fields (raw text).

    ``root`` is the settings dataclass the key is looked up in (default :class:`Config`), so an unknown key
    fails here, naming it.
    """
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    if _is_text_field(_field_type(root or Config, key.split("."))):
        return key, raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"config key '{key}': cannot parse {raw!r}: {exc}") from None
    return key, value


def _is_text_field(tp: Any) -> bool:
    """A ``str`` field or a choice of strings: its override is the raw text (YAML would read ``no`` as false)."""
    if typing.get_origin(tp) is Literal:
        return all(isinstance(choice, str) for choice in typing.get_args(tp))
    return tp is str


def _field_type(cls: type, path: list[str]) -> Any:
    """Annotated type at ``path`` inside dataclass ``cls`` (raises ConfigError for unknown keys)."""
    tp: Any = cls
    for depth, name in enumerate(path):
        key = ".".join(path[: depth + 1])
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if name not in hints:
                known = ", ".join(sorted(hints))
                raise ConfigError(f"unknown config key '{key}' (known keys here: {known})")
            tp = hints[name]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        else:
            raise ConfigError(f"config key '{key}' does not exist: '{'.'.join(path[:depth])}' is a value")
    return tp


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """``tree["a"]["b"] = value`` for ``key="a.b"``, making the sections on the way."""
    node = tree
    *parents, leaf = key.split(".")
    for name in parents:
        child = node.get(name)
        if not isinstance(child, dict):
            child = {}
            node[name] = child
        node = child
    node[leaf] = value


def merge_overrides(base: dict[str, Any], overrides: list[str], root: type | None = None) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) onto a copy of a settings dict."""
    tree = json.loads(json.dumps(base))
    for text in overrides:
        set_dotted(tree, *parse_override(text, root))
    return tree


def build_settings(cls: type, overrides: list[str], base: dict[str, Any] | None = None) -> Any:
    """A dataclass ``cls`` from ``key=value`` overrides over ``base`` (types checked as for the Config)."""
    return _from_dict(cls, merge_overrides(base or {}, overrides, root=cls))


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a (possibly partial) nested dict.

    Keys the dict leaves out take the dataclass defaults (pretrained-model values), or :data:`TINY_MODEL_PRESET`'s
    where the config builds the tiny model.
    """
    cfg = _from_dict(Config, apply_tiny_model_preset(data or {}))
    validate_config(cfg)
    return cfg


def apply_tiny_model_preset(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` over :data:`TINY_MODEL_PRESET` when it builds the tiny model (empty model.name_or_path), else as is."""
    model = data.get("model")
    name = model.get("name_or_path", "") if isinstance(model, dict) else ""
    if name or not isinstance(model, (dict, type(None))):
        return data  # a named model, or a malformed section that _from_dict will name
    tree = json.loads(json.dumps(TINY_MODEL_PRESET))
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(tree.get(section), dict):
            tree[section] = {**tree[section], **values}
        else:
            tree[section] = values
    return tree


def derive_config(cfg: Config, values: dict[str, Any]) -> Config:
    """A validated copy of ``cfg`` with dotted-key ``values`` (``{"train.learning_rate": 1e-3}``)."""
    tree = cfg.to_dict()
    for key, value in values.items():
        _field_type(Config, key.split("."))
        set_dotted(tree, key, value)
    return config_from_dict(tree)


def build_config(yaml_path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML preset (optional), apply ``--set`` overrides, validate, return the Config.

    Without a preset the defaults apply: the dataclasses' (pretrained-model values), under
    :data:`TINY_MODEL_PRESET` when the config builds the tiny model (see :func:`config_from_dict`).
    """
    data: dict[str, Any] = {}
    if yaml_path:
        path = Path(yaml_path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded
    data = merge_overrides(data, overrides or [])
    return config_from_dict(data)


# -------------------------------------------------------------------- validation


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def validate_config(cfg: Config) -> None:
    """Reject values that cannot train; each error names the key (one line, before Ray starts).

    Choices (``Literal`` fields) and types were checked when the config was built; these are the ranges and the
    combinations.
    """
    for check in (_validate_dpo, _validate_train, _validate_scaling, _validate_data, _validate_model_and_run,
                  _validate_sweep):
        check(cfg)


def _validate_dpo(cfg: Config) -> None:
    _require(cfg.dpo.beta > 0, "dpo.beta", f"must be > 0; got {cfg.dpo.beta}")
    _require(0.0 <= cfg.dpo.label_smoothing < 0.5, "dpo.label_smoothing", "must be in [0, 0.5)")
    loss_type = LossType(cfg.dpo.loss_type)
    _require(
        cfg.dpo.label_smoothing == 0 or loss_type.uses_label_smoothing,
        "dpo.label_smoothing",
        f"{cfg.dpo.label_smoothing} has no effect on dpo.loss_type={loss_type.value}; only "
        f"{', '.join(m.value for m in LossType if m.uses_label_smoothing)} use label smoothing (set it to 0)",
    )
    _require(cfg.dpo.rpo_alpha >= 0, "dpo.rpo_alpha", "must be >= 0")
    _require(
        cfg.dpo.reference != "adapter" or cfg.model.lora.enabled,
        "dpo.reference",
        "'adapter' needs model.lora.enabled=true (the base model with the adapter off is the reference)",
    )
    _require(
        not cfg.dpo.ref_model or cfg.dpo.reference != "adapter",
        "dpo.ref_model",
        "cannot be used with dpo.reference=adapter (the reference is the base model with the adapter off)",
    )


def _validate_train(cfg: Config) -> None:
    _require(cfg.train.learning_rate > 0, "train.learning_rate", f"must be > 0; got {cfg.train.learning_rate}")
    _require(cfg.train.batch_size >= 1, "train.batch_size", "must be >= 1")
    _require(cfg.train.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    _require(cfg.train.micro_batch_tokens == AUTO or cfg.train.micro_batch_tokens >= 0, "train.micro_batch_tokens",
             "must be >= 0 (0: no token budget) or auto")
    _require(cfg.train.max_steps >= 0, "train.max_steps", "must be >= 0")
    _require(cfg.train.epochs >= 1, "train.epochs", "must be >= 1")
    _require(  # Ray Train's prepare_model refuses FSDP on CPU workers; better now than after the workers start
        cfg.train.strategy == "ddp" or cfg.scaling.use_gpu,
        "train.strategy",
        "fsdp shards a model over GPUs and needs scaling.use_gpu=true; CPU workers use ddp",
    )
    _require(
        not (cfg.model.lora.enabled and cfg.train.strategy == "fsdp"),
        "train.strategy",
        "fsdp with model.lora.enabled=true is not supported: the adapter-off reference and the adapter saving "
        "are not FSDP-safe here; use train.strategy=ddp for LoRA",
    )
    _require(cfg.train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _require(cfg.train.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0")
    _require(cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    _require(cfg.train.log_every >= 1, "train.log_every", "must be >= 1")
    _require(cfg.train.logits_chunk_size == AUTO or cfg.train.logits_chunk_size >= 1, "train.logits_chunk_size",
             "must be auto or >= 1")


def _validate_scaling(cfg: Config) -> None:
    _require(cfg.ray.idle_workers == AUTO or cfg.ray.idle_workers >= 0, "ray.idle_workers", "must be >= 0 or auto")
    _require(cfg.scaling.num_workers >= 0, "scaling.num_workers",
             "must be >= 0 (0: the loop runs in the driver, Ray Train's local mode)")
    _require(cfg.scaling.cpus_per_worker > 0, "scaling.cpus_per_worker", "must be > 0")
    _require(cfg.scaling.max_failures >= 0, "scaling.max_failures", "must be >= 0")
    workers = max(cfg.scaling.num_workers, 1)
    _require(
        cfg.train.batch_size % workers == 0,
        "train.batch_size",
        f"{cfg.train.batch_size} pairs must split evenly over scaling.num_workers={workers}",
    )


def _validate_data(cfg: Config) -> None:
    _require(cfg.data.max_length >= 8, "data.max_length",
             f"{cfg.data.max_length} is too small for any prompt and response (>= 8)")
    _require(
        0 <= cfg.data.max_prompt_length < cfg.data.max_length,
        "data.max_prompt_length",
        "must be >= 0 and below data.max_length",
    )
    _require(0.0 < cfg.data.eval_fraction < 1.0 or bool(cfg.data.eval) or bool(cfg.data.eval_split),
             "data.eval_fraction", "must be in (0, 1) when no data.eval file is given")
    _require(0.0 <= cfg.data.max_invalid_fraction <= 1.0, "data.max_invalid_fraction", "must be in [0, 1]")
    _require(bool(cfg.data.train), "data.train", "must name a file, directory or dataset id")


def _validate_model_and_run(cfg: Config) -> None:
    _require(cfg.model.lora.r >= 1, "model.lora.r", "must be >= 1")
    _require(bool(cfg.run_name), "run_name", "must not be empty")


def _validate_sweep(cfg: Config) -> None:
    _require(cfg.sweep.num_samples >= 1, "sweep.num_samples", "must be >= 1")
    concurrent, workers = cfg.sweep.max_concurrent_trials, cfg.sweep.workers_per_trial
    _require(concurrent == AUTO or concurrent >= 1, "sweep.max_concurrent_trials",
             f"must be auto or >= 1; got {concurrent}")
    # Ray 2.60 refuses ray.train calls inside a Tune trial, so a trial cannot train in Ray Train's local mode (0)
    _require(workers == AUTO or workers >= 1, "sweep.workers_per_trial", f"must be auto or >= 1; got {workers}")
    _require(0 < cfg.sweep.beta_min <= cfg.sweep.beta_max, "sweep.beta_min", "needs 0 < beta_min <= beta_max")
    _require(0 < cfg.sweep.lr_min <= cfg.sweep.lr_max, "sweep.lr_min", "needs 0 < lr_min <= lr_max")
    for key in cfg.sweep.extra:
        _field_type(Config, key.split("."))


def resolve_data_path(path: str) -> str:
    """A relative local path is looked up in the working directory, then in the repository root."""
    if not path or "://" in path:
        return path
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return str(p.resolve()) if p.exists() else str(p)
    candidate = REPO_ROOT / p
    return str(candidate) if candidate.exists() else path
