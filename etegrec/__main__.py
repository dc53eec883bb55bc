"""``python -m etegrec``: every command of the package, the stages of the pipeline first."""
from __future__ import annotations

__all__ = ["COMMANDS", "main"]

DATA = ("data", "python -m etegrec.data [DATASET] [--data-path PATH]", "prepare a dataset and print its statistics")

# what to do with a run once it exists (a finished run prints the first two for its own directory)
COMMANDS = [
    ("report", "python -m etegrec.report RUN_DIR [RUN_DIR ...] [--output report.html]",
     "one HTML page of a run's curves and metrics, from its files alone (several runs overlaid)"),
    ("recommend", "python -m etegrec.recommend RUN_DIR --history ID,ID,...",
     "top-10 items of a finished joint run for a history of raw item ids (or --input FILE.jsonl)"),
    ("config keys", "python -m etegrec.config_reference",
     "every config key with its type, default and meaning (the markdown of docs/config.md)"),
]


def main() -> None:
    from etegrec.training import stages  # the registered stages, read when listed

    print("etegrec: the stages, each building (and caching) what the ones before it produce\n")
    for name, command, what in [DATA, *((s.label, f"python -m {s.command}", s.summary) for s in stages.STAGES)]:
        print(f"  {name:<16} {command}\n  {'':<16} {what}")
    print("\nEvery training stage takes --config, --set KEY=VALUE, --print-config, --seed, --output-dir, --resume, ...:")
    print("see any stage's --help\n")
    print("using a run, and the config reference:\n")
    for name, command, what in COMMANDS:
        print(f"  {name:<16} {command}\n  {'':<16} {what}")


if __name__ == "__main__":
    main()
