"""The rules a config value must follow beyond its type: sizes, ranges, choices; and how a YAML
value is checked against its annotation. Pure; :mod:`etegrec.config` applies them."""
from __future__ import annotations

import math
import typing
from typing import Any

__all__ = ["CL_NEGATIVES", "EMBED_LOSSES", "ENCODER_INPUTS", "FORGE_POLICIES", "JOINT_TARGETS", "MIXED_PRECISION", "SEED_RANGE",
           "ConfigError", "check_config"]


class ConfigError(ValueError):
    """A config key, value or file that cannot be used."""


ENCODER_INPUTS = ("codes", "items")  # as etegrec.models.ENCODER_INPUTS (config imports no model code)
JOINT_TARGETS = ("last", "all")
CODE_INITS = ("random", "tokenizer")
ITEM_EMBEDDINGS = ("none", "zero", "embed")
ITEM_STATES = ("each", "first")  # as etegrec.models.ITEM_STATES (a test keeps them equal)
CL_NEGATIVES = ("batch", "catalogue")
VQ_ITEMS = ("targets", "catalogue")
EMBED_LOSSES = ("full", "sampled")
FORGE_POLICIES = ("round_robin", "nearest_free")  # as etegrec.forge.POLICIES (a test keeps them equal)
MIXED_PRECISION = ("fp32", "bf16")  # not "no": YAML reads that as False
SEED_RANGE = (0, 2**32 - 1)  # what numpy's and Python's generators are seeded with
_CHOICES = {"joint.mixed_precision": MIXED_PRECISION, "recommender.encoder_input": ENCODER_INPUTS,
            "codes.forge_policy": FORGE_POLICIES, "losses.cl_negatives": CL_NEGATIVES, "losses.id_vq_items": VQ_ITEMS,
            "joint.targets": JOINT_TARGETS,
            "recommender.code_init": CODE_INITS, "recommender.item_embedding": ITEM_EMBEDDINGS,
            "recommender.item_state": ITEM_STATES, "embed.loss": EMBED_LOSSES}
_POSITIVE = {
    "min_count", "max_his_len", "max_users", "hidden", "n_layers", "n_heads", "batch_size", "epochs", "patience",
    "eval_step", "e_dim", "num_layers", "codebook_size", "num_decoder_layers", "d_model", "d_ff", "num_heads",
    "d_kv", "cycle", "sample_fraction", "cl_temperature", "beam_size", "top_k", "window_stride", "every_epochs",
    "negatives", "id_until_epoch", "attribute_dims",
}
_NON_NEGATIVE = {
    "lr", "lr_rec", "lr_id", "lr_item_embedding", "weight_decay", "dropout", "item_dropout", "beta", "align_from_epoch", "lr_warmup_epochs", "max_grad_norm",
    "finetune_epochs", "probe_users", "valid_users", "log_every", "num_threads", "restart_dead_every", "id_vq_weight", "id_code_weight", "id_kl_weight",
    "id_dec_cl_weight", "id_usage_weight", "rec_code_weight", "rec_kl_weight", "rec_dec_cl_weight", "rec_item_weight", "margin",
}


def check_config(config: Any) -> None:
    """Check a :class:`~etegrec.config.Config`'s sizes, ranges and combinations that the types alone do
    not catch.

    Raises:
        ConfigError: the first key that breaks a rule, with its value.
    """
    for key in config.keys():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if name in _POSITIVE and value is not None and value <= 0:
            raise ConfigError(f"config key {key!r} must be positive, got {value!r}")
        if name in _NON_NEGATIVE and value is not None and value < 0:
            raise ConfigError(f"config key {key!r} must not be negative, got {value!r}")
        if name == "hidden_dims" and (not value or any(v <= 0 for v in value)):
            raise ConfigError(f"config key {key!r} must be a non-empty list of positive sizes, got {value!r}")
    low, high = SEED_RANGE
    if not low <= config.run.seed <= high:
        raise ConfigError(f"config key 'run.seed' (--seed) must lie in [{low}, {high}], got {config.run.seed!r}; "
                          "choose a seed in that range")
    if not 0 < config.joint.sample_fraction <= 1:
        raise ConfigError(f"config key 'joint.sample_fraction' must be in (0, 1], got {config.joint.sample_fraction!r}")
    stride = config.embed.window_stride
    if stride is not None and stride > config.data.max_his_len:
        raise ConfigError(f"config key 'embed.window_stride' ({stride}) must not exceed data.max_his_len "
                          f"({config.data.max_his_len})")
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in choices:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(choices)}, got {value!r}")
    _check_feed_forward(config.recommender.feed_forward_proj)
    if config.joint.targets == "all" and config.recommender.encoder_input != "items":
        raise ConfigError("config key 'joint.targets' is 'all', which needs recommender.encoder_input=items "
                          f"(got {config.recommender.encoder_input!r}): a target after every item needs one "
                          "encoder token per item")
    if config.recommender.item_embedding != "none" and config.recommender.encoder_input != "items":
        raise ConfigError(f"config key 'recommender.item_embedding' is {config.recommender.item_embedding!r}, which "
                          f"needs recommender.encoder_input=items (got {config.recommender.encoder_input!r}): the "
                          "item vectors are added to one encoder token per item")
    item_dropout = config.recommender.item_dropout
    if item_dropout >= 1 or (item_dropout > 0 and config.recommender.item_embedding == "none"):
        raise ConfigError(f"config key 'recommender.item_dropout' is {item_dropout!r}, which must lie in [0, 1) and "
                          "needs recommender.item_embedding (zero or embed): it leaves out history item vectors")
    if config.joint.lr_item_embedding is not None and config.recommender.item_embedding == "none":
        raise ConfigError(f"config key 'joint.lr_item_embedding' is {config.joint.lr_item_embedding!r}, which needs "
                          "recommender.item_embedding (zero or embed): it is the history item vectors' learning rate")
    if not 0 <= config.joint.ema_decay < 1:
        raise ConfigError(f"config key 'joint.ema_decay' is {config.joint.ema_decay!r}, which must lie in [0, 1): the "
                          "weight of the running average at each step (0: no average)")
    if config.losses.rec_item_weight > 0 and not config.recommender.item_output:
        raise ConfigError(f"config key 'losses.rec_item_weight' is {config.losses.rec_item_weight!r}, which needs "
                          "recommender.item_output=true: the item-level loss scores the item output vectors")
    if config.recommender.repeat_item_bias and (not config.recommender.item_output
                                                or config.recommender.item_embedding == "none"):
        raise ConfigError("config key 'recommender.repeat_item_bias' is true, which needs recommender.item_output=true "
                          f"and recommender.item_embedding zero or embed (got {config.recommender.item_output!r} and "
                          f"{config.recommender.item_embedding!r}): it offsets the output scores of the history's items, "
                          "which it reads by id")
    if config.recommender.item_state != "each" and not config.recommender.item_output:
        raise ConfigError(f"config key 'recommender.item_state' is {config.recommender.item_state!r}, which needs "
                          "recommender.item_output=true: it says which decoder state the item output vectors score")
    if config.recommender.tie_item_vectors and (not config.recommender.item_output
                                                or config.recommender.item_embedding == "none"):
        raise ConfigError("config key 'recommender.tie_item_vectors' is true, which needs recommender.item_output=true "
                          f"and recommender.item_embedding zero or embed (got {config.recommender.item_output!r} and "
                          f"{config.recommender.item_embedding!r}): it makes the one table serve as both")
    if config.recommender.code_init == "tokenizer" and config.recommender.d_model != config.tokenizer.e_dim:
        raise ConfigError(f"config key 'recommender.code_init' is 'tokenizer', which needs recommender.d_model "
                          f"({config.recommender.d_model}) equal to tokenizer.e_dim ({config.tokenizer.e_dim}): "
                          "the code embeddings start as the codebooks' vectors")
    if config.joint.second_pass and not config.joint.train_tokenizer:
        raise ConfigError("config key 'joint.second_pass' is true, which needs joint.train_tokenizer=true: the second "
                          "pass trains a fresh recommender on the codes the tokenizer epochs chose")
    if config.codes.file is not None:
        _check_code_file(config)
    joint_stride = config.joint.window_stride
    if joint_stride is not None and joint_stride > config.data.max_his_len:
        raise ConfigError(f"config key 'joint.window_stride' ({joint_stride}) must not exceed data.max_his_len "
                          f"({config.data.max_his_len})")
    if config.evaluation.top_k > config.evaluation.beam_size:
        raise ConfigError(f"config key 'evaluation.top_k' ({config.evaluation.top_k}) must not exceed "
                          f"evaluation.beam_size ({config.evaluation.beam_size})")


def _check_code_file(config: Any) -> None:
    """``codes.file`` replaces the tokenizer's codes: nothing may read the tokenizer as if it had made them."""
    clashes = {"joint.train_tokenizer": (config.joint.train_tokenizer, False),
               "losses.rec_kl_weight": (config.losses.rec_kl_weight, 0),
               "losses.rec_dec_cl_weight": (config.losses.rec_dec_cl_weight, 0),
               "recommender.code_init": (config.recommender.code_init, "random"),
               "codes.shuffled": (config.codes.shuffled, False)}
    wrong = [f"{key}={str(need).lower()} (got {value!r})" for key, (value, need) in clashes.items() if value != need]
    if wrong:
        raise ConfigError(f"config key 'codes.file' is {config.codes.file!r}, which needs {', '.join(wrong)}: the "
                          "codes come from the file and stay fixed, so the tokenizer must neither train, align nor "
                          "seed the code embeddings")


def _check_feed_forward(value: str) -> None:
    """T5's ``feed_forward_proj``: an activation of ``transformers.activations`` (``relu``), or ``gated-`` one."""
    from transformers.activations import ACT2FN  # here, not at import: config is read by light tools too

    parts = value.split("-")
    if not (len(parts) == 1 or (len(parts) == 2 and parts[0] == "gated")) or parts[-1] not in ACT2FN:
        raise ConfigError(f"config key 'recommender.feed_forward_proj' must be an activation such as relu, gelu, "
                          f"gated-gelu or gated-silu, got {value!r}")


def _coerce(value: Any, hint: Any, key: str, origin: str) -> Any:
    """Check ``value`` against the annotation ``hint`` (int, float, str, bool, list[int], X | None)."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    origin_type = typing.get_origin(hint) or hint
    if origin_type is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    ok = (isinstance(value, bool) if origin_type is bool
          else isinstance(value, (int, float)) and not isinstance(value, bool) if origin_type is float
          else isinstance(value, int) and not isinstance(value, bool) if origin_type is int
          else isinstance(value, origin_type))
    if not ok:
        raise ConfigError(f"{origin}: config key {key!r} expects {_type_name(hint)}, got {value!r}")
    if origin_type is float:
        try:
            number = float(value)
        except OverflowError:  # an int beyond any float
            number = math.inf
        if not math.isfinite(number):  # a NaN or infinite rate or weight would only show up later, as a NaN loss
            raise ConfigError(f"{origin}: config key {key!r} must be a finite number, got {value!r}; "
                              "give a finite value")
        return number
    if origin_type is list:
        item = typing.get_args(hint)[0]
        return [_coerce(v, item, key, origin) for v in value]
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint)).replace("typing.", "")
