"""``python -m etegrec``: the stages of the pipeline and the commands that run them."""
from __future__ import annotations

STAGES = [
    ("data", "python -m etegrec.data [DATASET] [--data-path PATH]", "prepare a dataset and print its statistics"),
    ("item embeddings", "python -m etegrec.training.embed", "SASRec on the training split: embeddings.npy"),
    ("tokenizer", "python -m etegrec.training.rqvae", "pretrain the RQ-VAE item tokenizer (builds the embeddings)"),
    ("joint", "python -m etegrec.training.joint", "ETEGRec joint training, the main job (builds what it needs)"),
]


def main() -> None:
    print("etegrec: the stages, each building (and caching) what the ones before it produce\n")
    for name, command, what in STAGES:
        print(f"  {name:<16} {command}\n  {'':<16} {what}")
    print("\nEvery training stage takes --config, --set KEY=VALUE, --print-config, --seed, --output-dir, --resume, ...:")
    print("see python -m etegrec.training.joint --help")


if __name__ == "__main__":
    main()
