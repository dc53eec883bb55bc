"""The config reference (``docs/config.md``): every key with its type, its value in the default
config and in the built-in defaults, and one line.

    python -m etegrec.config_reference > docs/config.md

A test keeps the file equal to what this prints, and every key of :class:`etegrec.config.Config`
must have its line here.
"""
from __future__ import annotations

import dataclasses
import typing

from etegrec.config import Config, load_config, named_configs
from etegrec.config_rules import _type_name

__all__ = ["KEY_DOCS", "render"]

KEY_DOCS = {
    "data.dataset": "dataset name; ml-100k and amazon-beauty, amazon-sports, amazon-instruments are fetched on "
                    "first use, a --data-path file names it after itself",
    "data.data_path": "interaction file or prepared split to read instead of the named dataset",
    "data.format": "force the reader (inter, movielens, movielens-dat, movielens-csv, amazon2023, amazon2014, "
                   "s3rec, lcrec, prepared); detected otherwise",
    "data.min_count": "k of the iterative k-core filter on users and items",
    "data.max_his_len": "history length the models see (the most recent items)",
    "data.max_users": "keep only the first N users of the file (smoke runs); null keeps all",
    "embed.hidden": "SASRec width, also the width of the item embeddings the tokenizer reads",
    "embed.n_layers": "SASRec transformer blocks",
    "embed.n_heads": "SASRec attention heads",
    "embed.dropout": "SASRec dropout",
    "embed.tied_output": "score items against the input table (true) or a separate output table",
    "embed.repeat_bias": "a learned logit offset for items already in the history",
    "embed.shuffle_ties": "reorder same-timestamp training items at random every epoch",
    "embed.window_stride": "new targets per training window; null = data.max_his_len (no overlap)",
    "embed.loss": "full: softmax over every item at every scored position; sampled: over the target and "
                  "embed.negatives items drawn uniformly per step (a step's cost no longer grows with the catalogue; "
                  "for catalogues past about 1e5 items, docs/benchmarks.md)",
    "embed.negatives": "items drawn per step for embed.loss sampled, shared by every target of the batch",
    "embed.lr": "SASRec learning rate (Adam)",
    "embed.weight_decay": "SASRec weight decay",
    "embed.batch_size": "SASRec windows per batch",
    "embed.epochs": "SASRec epochs at most",
    "embed.patience": "evaluations without a better validation NDCG@10 before SASRec stops",
    "embed.eval_step": "SASRec epochs between evaluations",
    "tokenizer.hidden_dims": "RQ-VAE encoder MLP widths (the decoder mirrors them)",
    "tokenizer.e_dim": "RQ-VAE code dimension",
    "tokenizer.num_layers": "residual quantizer layers (RQ codes per item)",
    "tokenizer.codebook_size": "codes per layer (also the suffix token's range)",
    "tokenizer.beta": "commitment loss weight",
    "tokenizer.dropout": "RQ-VAE MLP dropout",
    "tokenizer.kmeans_init": "initialise each codebook by k-means on its layer's residuals",
    "tokenizer.standardize": "z-score the item embeddings (each dimension) before the tokenizer reads them",
    "tokenizer.attributes": "item attributes the tokenizer reads beside each embedding: a file in S3-Rec's "
                            "item2attributes.json format, or 'dataset' for the named dataset's (amazon-beauty, "
                            "amazon-sports); null: the embeddings alone",
    "tokenizer.attribute_dims": "width of the attribute block: the items' TF-IDF attributes on their first N "
                                "principal directions, scaled to weigh as much as the embedding",
    "rqvae.lr": "tokenizer pretraining learning rate (AdamW)",
    "rqvae.weight_decay": "tokenizer pretraining weight decay",
    "rqvae.batch_size": "items per pretraining batch",
    "rqvae.epochs": "pretraining epochs at most",
    "rqvae.eval_step": "epochs between collision-rate evaluations",
    "rqvae.patience": "evaluations without a lower collision rate before pretraining stops",
    "rqvae.restart_dead_every": "move unused codes onto item residuals every N epochs; 0 = never",
    "recommender.num_layers": "T5 encoder blocks",
    "recommender.num_decoder_layers": "T5 decoder blocks",
    "recommender.d_model": "T5 width (also the code embedding width)",
    "recommender.d_ff": "T5 feed-forward width",
    "recommender.num_heads": "T5 attention heads",
    "recommender.d_kv": "T5 key/value width per head",
    "recommender.dropout": "T5 dropout",
    "recommender.feed_forward_proj": "T5 feed-forward activation: relu (paper), gelu, gated-gelu, gated-silu, ...",
    "recommender.gradient_checkpointing": "recompute T5 activations in the backward pass: far less memory, same gradients",
    "recommender.encoder_input": "codes: an encoder token per code (paper); items: a token per item (its codes summed)",
    "recommender.code_init": "random (T5's init); tokenizer: each RQ level's code embeddings start as the pretrained "
                             "codebook's vectors, rescaled to T5's unit scale (needs d_model = tokenizer.e_dim)",
    "recommender.item_embedding": "none: items are their codes only (paper); zero / embed: add a learned vector per "
                                   "history item to its encoder token (items input), starting at zero / from the "
                                   "SASRec stage's embeddings",
    "recommender.item_dropout": "in training, the share of history items (drawn afresh each batch) read without their "
                                 "item vector, codes kept: against memorising the training windows by item identity",
    "recommender.item_output": "a learned output vector per item (zero at start): each code's score adds the "
                               "log-mean-exp of its items' scores (the decoder state dotted with their vectors)",
    "recommender.tie_item_vectors": "one vector per item for both sides: the output vectors (item_output) are the "
                                    "history item vectors (item_embedding), as SASRec's tied output table",
    "recommender.item_state": "which decoder state the item output vectors score at each code: each: the state "
                              "after the code's prefix; first: the state before any code, at every code, so that "
                              "the codes split one ranking of the whole catalogue (SASRec's softmax when the code "
                              "logits are zero)",
    "recommender.repeat_bias": "learn a logit offset for the codes that continue a history item",
    "recommender.repeat_item_bias": "learn an offset for the output score of each history item, inside each code's "
                                    "log-mean-exp (item_output; by id, so item_embedding): a repeat is pushed down "
                                    "alone, not with the items that share its codes",
    "recommender.renormalize": "each code's softmax over the codes that lead to an item, in the joint loss and the "
                               "beam search",
    "joint.epochs": "joint epochs (tokenizer and recommender epochs together) at most",
    "joint.cycle": "C: each cycle is one tokenizer epoch, then C - 1 recommender epochs",
    "joint.train_tokenizer": "false: no tokenizer epochs, the pretrained codes stay fixed (TIGER-style)",
    "joint.id_trains_rec": "true: tokenizer epochs train the recommender as well, on the codes in use; false: it is "
                           "frozen in them (paper)",
    "joint.id_until_epoch": "tokenizer epochs only before this epoch: from it on the codes stay fixed and every "
                            "joint epoch trains the recommender; the tokenizer's cosine schedule spans only its "
                            "epochs before it; null: the whole joint phase",
    "joint.finetune_epochs": "recommender-only epochs on fixed codes after the joint phase",
    "joint.second_pass": "true: the alternating epochs only choose the codes; a fresh recommender then trains on the "
                         "codes of their best checkpoint, fixed, for joint.epochs epochs (phase 'second') and the "
                         "fine-tuning, and is the run's model (needs joint.train_tokenizer)",
    "joint.targets": "last: one target per history (paper); all: a target after every item of a window",
    "joint.window_stride": "with targets all: new targets per window; null = data.max_his_len",
    "joint.shuffle_ties": "reorder same-timestamp training items at random every epoch",
    "joint.batch_size": "samples per batch (windows with targets: all)",
    "joint.sample_fraction": "share of the training samples drawn per epoch, fresh each epoch",
    "joint.lr_rec": "recommender learning rate (AdamW; its repeat bias learns at 0.05)",
    "joint.lr_id": "tokenizer learning rate in joint training (AdamW)",
    "joint.lr_item_embedding": "learning rate of the history item vectors (recommender.item_embedding; same schedule "
                               "and weight decay); null: joint.lr_rec; 0 keeps them where they started",
    "joint.weight_decay": "AdamW weight decay of both models",
    "joint.lr_warmup_epochs": "epochs of linear learning-rate warm-up, then cosine decay, per optimiser",
    "joint.max_grad_norm": "gradient clipping norm; 0 = none",
    "joint.mixed_precision": "fp32, or bf16 autocast of the recommender's training forward (CPUs with AVX512-BF16, GPUs)",
    "joint.ema_decay": "0: off; else each step's weight 1 - d in an exponential moving average of the recommender's "
                       "weights, which validation, the best checkpoint and the test score (training goes on from "
                       "the live weights)",
    "losses.id_vq_weight": "tokenizer epochs: weight of the RQ-VAE loss",
    "losses.id_code_weight": "tokenizer epochs: weight of the code loss",
    "losses.id_kl_weight": "tokenizer epochs: weight of the sequence-item alignment (symmetric KL)",
    "losses.id_dec_cl_weight": "tokenizer epochs: weight of the preference-semantic alignment (InfoNCE)",
    "losses.id_usage_weight": "tokenizer epochs: weight of the code-usage deficit, per level log K minus the entropy "
                               "of the batch's mean code distribution (keeps a strong sequence-item alignment from "
                               "collapsing a codebook); off before align_from_epoch like the alignment",
    "losses.id_vq_items": "tokenizer epochs: the items the RQ-VAE loss reads; targets (paper): the batch's targets, "
                          "each item as often as it is a target, so the codebook moves toward popular items; "
                          "catalogue: as many items drawn uniformly from the catalogue, the diet it was pretrained on",
    "losses.rec_code_weight": "recommender and fine-tuning epochs: weight of the code loss",
    "losses.rec_kl_weight": "recommender epochs: weight of the sequence-item alignment",
    "losses.rec_dec_cl_weight": "recommender epochs: weight of the preference-semantic alignment",
    "losses.rec_item_weight": "wherever the recommender trains: weight of a cross-entropy over every item of the "
                               "first code position's item scores (needs recommender.item_output)",
    "losses.align_from_epoch": "the first epoch (0-based) with the alignment losses on; the epochs before train "
                               "without them",
    "losses.cl_temperature": "InfoNCE temperature",
    "losses.cl_negatives": "the preference-semantic alignment's negatives: batch (the other targets of the batch, "
                           "both ways; paper) or catalogue (every item's reconstruction, the target's against all "
                           "others)",
    "codes.use_forge": "rebalance the last RQ code with FORGE when codes are (re)computed",
    "codes.forge_policy": "FORGE policy: round_robin or nearest_free",
    "codes.shuffled": "a control for what the codes say: the tokenizer reads item i's embedding from another item "
                      "(a fixed permutation seeded by run.seed), so the codes keep their number, balance and prefix "
                      "tree but not their meaning; the recommender's own item vectors are not permuted",
    "codes.file": "train on these codes, fixed: a file in item_codes.tsv's format (a finished run's, or your own: a "
                  "header line, then per line a raw item id and its codes, tab-separated) naming every item of the "
                  "dataset once; needs joint.train_tokenizer=false, losses.rec_kl_weight=0, losses.rec_dec_cl_weight=0 "
                  "and recommender.code_init=random, since the tokenizer's codes are not these",
    "codes.margin": "sticky codes: at a refresh an item keeps its code at each level unless the nearest is closer "
                    "by more than this relative margin (squared distances); 0 = always the nearest (paper)",
    "evaluation.every_epochs": "joint epochs between validations",
    "evaluation.patience": "validations without a better NDCG@10 before the joint phase stops",
    "evaluation.valid_users": "validation users that model selection scores by beam search, a fixed subsample (the "
                              "same for every seed and run); 0 = every user. Test always scores every user",
    "evaluation.probe_users": "validation users the learning probes run on at every validation; 0 = no probes",
    "evaluation.beam_size": "beams of the beam search (evaluation and a loaded run's recommend)",
    "evaluation.top_k": "items returned per history (at most beam_size)",
    "evaluation.constrained": "keep every beam on a prefix of a real item (the trie)",
    "evaluation.batch_size": "histories per beam-search batch",
    "run.seed": "random seed",
    "run.name": "W&B run name (the spec's ckpt_name); null = the run directory's unique name",
    "run.log_every": "emit step_end every N steps; 0 = never",
    "run.num_threads": "torch threads; 0 = torch's default (every core)",
    "run.deterministic": "torch's deterministic kernels (`torch.use_deterministic_algorithms`): the same command, seed "
                         "and thread count repeat every loss and metric on the same machine; false: torch's "
                         "nondeterministic ones, whose multi-thread gradient sums land in any order",
}


def render() -> str:
    """The markdown of ``docs/config.md``."""
    default, built_in = load_config("ml-100k"), Config()
    lines = ["# Config reference", "",
             "Every key, with its type and two values. **default**: what the default command uses (the packaged",
             "`ml-100k` config), and what a config file of yours keeps for every key it does not name, unless its",
             "`base:` names another config (`base: tiny`, or a YAML file). **built-in**: the `Config` dataclasses,",
             f"on which the packaged configs ({', '.join(named_configs())}, in `etegrec/configs/`) are layered.",
             "`--print-config` shows the resolved values of a command. Generated by",
             "`python -m etegrec.config_reference > docs/config.md`.", ""]
    for section in dataclasses.fields(default):
        values, builtins = getattr(default, section.name), getattr(built_in, section.name)
        hints = typing.get_type_hints(type(values))
        lines += [f"## {section.name}", "", "| key | type | default | built-in | meaning |", "|---|---|---|---|---|"]
        for f in dataclasses.fields(values):
            key = f"{section.name}.{f.name}"
            kind = _type_name(hints[f.name]).replace(" | ", " or ")  # a pipe would split the table cell
            lines.append(f"| `{key}` | {kind} | `{_shown(getattr(values, f.name))}` | "
                         f"`{_shown(getattr(builtins, f.name))}` | {KEY_DOCS[key]} |")
        lines.append("")
    return "\n".join(lines)


def _shown(value: object) -> object:
    """A value as YAML spells it: null, true, false."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else value


if __name__ == "__main__":
    print(render(), end="")
