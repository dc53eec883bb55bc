"""Configuration: one dataclass per component, loaded from packaged named configs or YAML files.

A config file has one section per component (``data``, ``embed``, ``tokenizer``, ``rqvae``,
``recommender``, ``joint``, ``losses``, ``codes``, ``evaluation``, ``run``: the joint stage's settings
are split by concern over ``joint``, ``losses``, ``codes`` and ``evaluation``); a section may list
only the keys it changes. A user's file is layered on the config its ``base:`` names (``base: tiny``),
on ``ml-100k``, the default, when it names none. ``--set section.key=value`` overrides one key; values
are parsed as YAML (``--set rqvae.lr=1e-3``). Unknown keys, wrong types and non-positive sizes are
errors naming the key; a key that has moved (:data:`MOVED_KEYS`) is an error naming its new place.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config_rules import ConfigError, _coerce, check_config

__all__ = [
    "CONFIG_DIR",
    "CodesConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EmbedConfig",
    "EvaluationConfig",
    "JointConfig",
    "LossesConfig",
    "MOVED_KEYS",
    "RQVAEConfig",
    "RecommenderConfig",
    "RunConfig",
    "TokenizerConfig",
    "current_keys",
    "load_config",
    "run_config",
]

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    dataset: str = "ml-100k"
    data_path: str | None = None
    format: str | None = None
    min_count: int = 5
    max_his_len: int = 20
    max_users: int | None = None  # keep only the first N users of the file (smoke runs)


@dataclass
class EmbedConfig:
    """SASRec that produces the collaborative item embeddings (and the project's SASRec baseline)."""

    hidden: int = 256
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.3
    tied_output: bool = False  # score items against the input table (True) or a separate one
    repeat_bias: bool = False  # a learned logit offset for the items already in the history
    shuffle_ties: bool = True  # reorder same-timestamp items at random every epoch
    window_stride: int | None = None  # new targets per training window; None = max_his_len (no overlap)
    loss: str = "full"  # "full": softmax over every item; "sampled": over the target and `negatives` drawn items
    negatives: int = 1024  # items drawn per step for loss "sampled", shared by the batch's targets
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 40
    patience: int = 6
    eval_step: int = 1


@dataclass
class TokenizerConfig:
    """The RQ-VAE item tokenizer."""

    hidden_dims: list[int] = field(default_factory=lambda: [512, 256])
    e_dim: int = 128
    num_layers: int = 3
    codebook_size: int = 256
    beta: float = 0.25
    dropout: float = 0.0
    kmeans_init: bool = True
    standardize: bool = True  # feed the tokenizer z-scored item embeddings (each dimension mean 0, std 1)
    attributes: str | None = None  # item attributes file appended to what it reads; "dataset": the named dataset's
    attribute_dims: int = 128  # width of the attribute block (principal directions of the items' attributes)


@dataclass
class RQVAEConfig:
    """Tokenizer pretraining."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 1024
    epochs: int = 1000
    eval_step: int = 50
    patience: int = 10
    restart_dead_every: int = 10  # move unused codes onto item residuals every N epochs; 0 = never


@dataclass
class RecommenderConfig:
    """The T5 generative recommender (paper: 6+6 layers, d_model 128, d_ff 512, 4 heads, d_kv 64)."""

    num_layers: int = 2
    num_decoder_layers: int = 2
    d_model: int = 128
    d_ff: int = 512
    num_heads: int = 4
    d_kv: int = 64
    dropout: float = 0.1
    feed_forward_proj: str = "relu"
    gradient_checkpointing: bool = False  # recompute T5 activations in backward: far less memory, same gradients
    encoder_input: str = "codes"  # "codes": a token per code (paper); "items": a token per item + recency
    code_init: str = "random"  # "tokenizer": code embeddings start as the pretrained codebooks' vectors
    item_embedding: str = "none"  # "zero" / "embed": a learned vector per history item ("items" input)
    item_dropout: float = 0.0  # in training, the share of history items read without their item vector (codes only)
    item_output: bool = False  # a learned output vector per item: its score joins the scores of the codes that lead to it
    tie_item_vectors: bool = False  # the output vectors are the history item vectors (one table, as SASRec's tied output)
    item_state: str = "each"  # the decoder state the output vectors score at each code: "each" position's, or the "first" one's
    repeat_bias: bool = False  # learn a logit offset for codes that continue a history item
    repeat_item_bias: bool = False  # learn an offset for the output score of each history item (item_output, by id)
    renormalize: bool = False  # each code's softmax over the codes that lead to an item, in the loss and the beam search


@dataclass
class JointConfig:
    """Joint training's schedule and optimisation: alternating tokenizer (id) and recommender (rec)
    epochs, then fine-tuning. Its losses, item codes and evaluation have sections of their own."""

    epochs: int = 12
    cycle: int = 2  # C: one id epoch then C - 1 rec epochs
    train_tokenizer: bool = True  # False: no id epochs, codes fixed by the pretrained tokenizer (TIGER-style)
    id_trains_rec: bool = False  # tokenizer epochs train the recommender too (paper: it is frozen in them)
    id_until_epoch: int | None = None  # tokenizer epochs only before this epoch, fixed codes from it on; None: all run
    finetune_epochs: int = 0
    second_pass: bool = False  # a fresh recommender trains on the codes the alternating epochs chose (fixed)
    targets: str = "last"  # "last": one target per history (paper); "all": a target after every item of a window
    window_stride: int | None = None  # with targets "all": new targets per window; None = data.max_his_len
    shuffle_ties: bool = False  # reorder same-timestamp training items at random every epoch
    batch_size: int = 256
    sample_fraction: float = 1.0  # share of the training samples drawn per epoch
    lr_rec: float = 5e-3
    lr_id: float = 1e-4
    lr_item_embedding: float | None = None  # the history item vectors' rate (recommender.item_embedding); None: lr_rec
    weight_decay: float = 0.05
    lr_warmup_epochs: float = 1.0  # linear warm-up of the learning rates, then cosine decay, per optimiser
    max_grad_norm: float = 1.0
    mixed_precision: str = "fp32"  # "bf16": the recommender's training forward under bfloat16 autocast
    ema_decay: float = 0.0  # > 0: validation, checkpoints and test score this moving average of the recommender's weights


@dataclass
class LossesConfig:
    """The joint stage's loss: each part's weight in tokenizer (id) and recommender (rec) epochs (the
    fine-tuning epochs use ``rec_code_weight``), when the alignment losses start, and the InfoNCE's setup."""

    id_vq_weight: float = 1.0
    id_code_weight: float = 1.0
    id_kl_weight: float = 1e-4
    id_dec_cl_weight: float = 3e-4
    id_usage_weight: float = 0.0  # how far the batch's soft code usage is from uniform (a guard for larger id_kl_weight)
    id_vq_items: str = "targets"  # which items the tokenizer's RQ-VAE loss reads: "targets" (paper) or "catalogue"
    rec_code_weight: float = 1.0
    rec_kl_weight: float = 1e-4
    rec_dec_cl_weight: float = 3e-4
    rec_item_weight: float = 0.0  # the item-level cross-entropy of the first code's item scores (recommender.item_output)
    align_from_epoch: int = 2  # the alignment losses (kl, dec_cl) are off in the epochs before this one
    cl_temperature: float = 0.07
    cl_negatives: str = "batch"  # the InfoNCE's negatives: "batch" (paper, both ways) or "catalogue" (every item)


@dataclass
class CodesConfig:
    """How the joint stage (re)assigns the item codes, at the start and after every tokenizer epoch."""

    use_forge: bool = True
    forge_policy: str = "round_robin"
    margin: float = 0.0  # sticky codes: keep an item's code at a refresh unless the nearest is this much closer
    shuffled: bool = False  # a control: the tokenizer reads the items' embeddings under a fixed permutation
    file: str | None = None  # every item's codes from a file in item_codes.tsv's format, fixed all through training


@dataclass
class EvaluationConfig:
    """The joint stage's validation (model selection, early stopping, probes) and its beam search,
    which a loaded run's ``recommend`` uses too."""

    every_epochs: int = 1
    patience: int = 5
    valid_users: int = 0  # validation users model selection scores (a fixed seeded subsample); 0 = every user
    probe_users: int = 200  # validation users the learning probes run on at every validation; 0 = no probes
    beam_size: int = 20
    top_k: int = 10
    constrained: bool = True
    batch_size: int = 256


# Keys of the joint section before it was split by concern (issue 26), and where each lives now: a
# user's file or --set naming one is told the new key; a run's own config.yaml is read with them moved.
MOVED_KEYS = {
    "joint.warm_epoch": "losses.align_from_epoch", "joint.warmup_epochs": "joint.lr_warmup_epochs",
    **{f"joint.{k}": f"losses.{k}" for k in ("id_vq_weight", "id_code_weight", "id_kl_weight", "id_dec_cl_weight",
                                             "rec_code_weight", "rec_kl_weight", "rec_dec_cl_weight",
                                             "cl_temperature", "cl_negatives")},
    "joint.use_forge": "codes.use_forge", "joint.forge_policy": "codes.forge_policy", "joint.code_margin": "codes.margin",
    "joint.eval_step": "evaluation.every_epochs", "joint.eval_batch_size": "evaluation.batch_size",
    **{f"joint.{k}": f"evaluation.{k}" for k in ("patience", "valid_users", "probe_users", "beam_size", "top_k",
                                                 "constrained")},
    "joint.renormalize": "recommender.renormalize",
}


@dataclass
class RunConfig:
    seed: int = 2024
    name: str | None = None  # the W&B run name (the spec's ckpt_name); None: the run directory's unique name
    log_every: int = 0  # emit step_end every N steps; 0 = never
    num_threads: int = 0  # torch threads; 0 = torch's default
    deterministic: bool = True  # torch's deterministic kernels: the same command and thread count repeat their numbers


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    rqvae: RQVAEConfig = field(default_factory=RQVAEConfig)
    recommender: RecommenderConfig = field(default_factory=RecommenderConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    losses: LossesConfig = field(default_factory=LossesConfig)
    codes: CodesConfig = field(default_factory=CodesConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def keys(self) -> list[str]:
        """Every settable ``section.key``."""
        return [f"{s.name}.{f.name}" for s in dataclasses.fields(self)
                for f in dataclasses.fields(getattr(self, s.name))]

    def set(self, key: str, value: Any, *, origin: str = "--set") -> None:
        """Set ``section.key`` to ``value`` after checking that the key exists and the type fits."""
        if key in MOVED_KEYS:
            raise ConfigError(f"{origin}: config key {key!r} moved to {MOVED_KEYS[key]!r}; use that name")
        section_name, _, name = key.partition(".")
        section = getattr(self, section_name, None) if section_name in _section_names() else None
        if section is None or name not in {f.name for f in dataclasses.fields(section)}:
            close = difflib.get_close_matches(key, self.keys(), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(f"{origin}: unknown config key {key!r}; {hint}valid keys: {', '.join(self.keys())}")
        hint = typing.get_type_hints(type(section))[name]
        setattr(section, name, _coerce(value, hint, key, origin))

    def validate(self) -> Config:
        """Check sizes, ranges and combinations that the types alone do not catch (:mod:`.config_rules`)."""
        check_config(self)
        return self


def _section_names() -> set[str]:
    return {f.name for f in dataclasses.fields(Config)}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML ({exc})") from None
    if not isinstance(content, dict):
        raise ConfigError(f"config file {str(path)!r} must map section names to keys, got a {type(content).__name__}")
    return content


def named_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str = "ml-100k", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a :class:`Config` from a packaged name (``ml-100k``, ``paper``, ``tiny``) or a YAML path.

    A packaged config is layered on the built-in defaults (the dataclasses). A YAML file of the
    user's is layered on the config its ``base:`` key names (a packaged name, or another YAML file,
    relative to this one), on ``ml-100k`` when it names none: a file changes only what it names.

    Args:
        name_or_path: a packaged config name or a YAML file.
        overrides: ``section.key=value`` strings, applied in order.

    Raises:
        ConfigError: missing file, unknown key or base, wrong type or invalid value.
    """
    return _overridden(_layered(name_or_path, Path.cwd(), ()), overrides)


def _overridden(config: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """``config`` with the ``section.key=value`` strings applied in order, validated."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        config.set(key.strip(), value)
    return config.validate()


def run_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A run's own ``config.yaml``, layered on the built-in defaults rather than on ``ml-100k``: it
    was complete when written, and a key added since takes the built-in default, which keeps what
    the run did (as ``--resume`` reads it); a key moved since is read under its new name
    (:func:`current_keys`); then ``overrides`` as for :func:`load_config`.

    Raises:
        ConfigError: missing or unreadable file, unknown key, wrong type or invalid value.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{str(path)!r} does not exist; pass a run directory that holds its config.yaml")
    content = current_keys(_read_yaml(path))
    content.pop("base", None)
    return _overridden(_apply(Config(), content, path), overrides)


def current_keys(content: dict[str, Any]) -> dict[str, Any]:
    """A run's config (sections of keys, as its ``config.yaml`` holds it) with every key of
    :data:`MOVED_KEYS` under its current name: a run written before a key moved still loads, resumes
    and compares with newer runs. The input is not changed."""
    out = {section: dict(values) if isinstance(values, dict) else values for section, values in content.items()}
    for old, new in MOVED_KEYS.items():
        (section, name), (new_section, new_name) = old.split("."), new.split(".")
        values, target = out.get(section), out.setdefault(new_section, {})
        if isinstance(values, dict) and name in values and isinstance(target, dict):  # else _apply names the section
            target.setdefault(new_name, values.pop(name))
    return out


def _layered(name_or_path: str, relative_to: Path, chain: tuple[Path, ...]) -> Config:
    """The config ``name_or_path`` names, its ``base:`` chain resolved (``chain``: the files that led here)."""
    packaged = CONFIG_DIR / f"{name_or_path}.yaml"
    if not Path(name_or_path).suffix and packaged.exists():
        return _apply(Config(), _read_yaml(packaged), packaged)
    path = (relative_to / name_or_path).resolve()
    if not path.exists():
        where = f" (the base: of {str(chain[-1])!r})" if chain else ""
        raise ConfigError(f"config {name_or_path!r}{where} is neither a packaged config ({', '.join(named_configs())}) "
                          "nor an existing YAML file")
    if path in chain:
        raise ConfigError(f"config file {str(path)!r} is its own base, through {' -> '.join(map(str, chain))}; "
                          "break the cycle of base: keys")
    content = _read_yaml(path)
    base = content.pop("base", "ml-100k")
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: must name a packaged config ({', '.join(named_configs())}) or a YAML "
                          f"file, got {base!r}")
    return _apply(_layered(base, path.parent, (*chain, path)), content, path)


def _apply(config: Config, content: dict[str, Any], path: Path) -> Config:
    """``config`` with the sections of a YAML file's ``content`` set on it."""
    for section, values in content.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping of keys to values")
        for key, value in values.items():
            config.set(f"{section}.{key}", value, origin=str(path))
    return config
