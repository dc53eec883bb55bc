"""The command-line options every stage shares (SPEC §5) and the way errors reach the user."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from etegrec.config import Config, ConfigError, load_config, run_config
from etegrec.data import DATASETS, FORMATS, DataError, data_home, dataset_name_of
from etegrec.forge import CodeOverflowError
from etegrec.hooks import SubscriberError

from .atomic import DiskFullError
from .item_codes import read_item_codes
from .loop import NonFiniteLossError
from .options import RunOptions, check_trackers
from .pipeline import run_stage
from .run import launch_rank
from .rundir import check_writable, default_run_dir, hold_run_dir
from ..stage import Stage

__all__ = ["StageArgs", "common_parser", "next_commands", "parse_stage_args", "run_main", "stage_main", "tracker_list"]

# errors that name what is wrong and the remedy: one sentence, no traceback, exit status 2
USER_ERRORS = (ConfigError, DataError, SubscriberError, CodeOverflowError, FileNotFoundError)


class PrintedConfig(Exception):
    """``--print-config``: the resolved config's YAML goes to stdout, exit status 0, nothing else runs."""


class RunFinished(Exception):
    """``--resume`` of a run that already ended: said in one line, exit status 0, nothing touched."""


@dataclass(frozen=True)
class StageArgs:
    """The command line, resolved: the config and how the stage runs."""

    config: Config
    options: RunOptions


def tracker_list(text: str) -> tuple[str, ...]:
    """``--log-with``'s value: comma-separated Accelerate tracker names, or ``none``."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["none"]:
        return ()
    try:
        return check_trackers(names)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def named_config_help(prog: str) -> str:
    """The ``--help`` epilog: every packaged config with the first line of its file, and two examples."""
    from etegrec.config import CONFIG_DIR, named_configs

    lines = ["named configs (--config NAME):"]
    for name in named_configs():
        first = (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()[0]
        lines.append(f"  {name:<10} {first.lstrip('# ').strip()}")
    lines += ["", "examples:", f"  {prog} --config tiny                        # a smoke run of seconds",
              f"  {prog} --seed 2025 --set joint.epochs=12   # another seed, a longer joint phase",
              f"  {prog} --print-config --set joint.cycle=2  # show the resolved config and stop"]
    return "\n".join(lines)


def common_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=named_config_help(prog),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="packaged config (ml-100k, amazon, paper, tiny) or a YAML file (default ml-100k; "
                                         "amazon for --dataset amazon-*; with --resume, the run's own config.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set rqvae.lr=1e-3 (repeatable)")
    parser.add_argument("--dataset", help="dataset name (default: the config's, ml-100k); amazon-beauty, "
                                          "amazon-sports, amazon-instruments are fetched on first use too")
    parser.add_argument("--data-path", help="interaction file or prepared split to use (the dataset is named "
                                            "after the file unless --dataset is given)")
    parser.add_argument("--format", choices=FORMATS, help="force the reader of --data-path (detected otherwise)")
    parser.add_argument("--output-dir", help="run directory (default runs/<stage>-<dataset>-<time>)")
    parser.add_argument("--wandb-mode", choices=("online", "offline", "disabled"),
                        help="W&B mode (default: offline unless an API key is configured)")
    parser.add_argument("--log-with", type=tracker_list, default=("wandb",), metavar="NAMES",
                        help="Accelerate trackers, comma-separated: wandb (default), tensorboard (under "
                             "<run dir>/tensorboard), ...; none for no tracker. --wandb-mode disabled drops wandb")
    parser.add_argument("--subscriber", dest="subscribers", action="append", default=[],
                        metavar="MODULE:CALLABLE", help="attach a subscriber of yours (repeatable)")
    parser.add_argument("--seed", type=int, help="random seed (default: the config's run.seed)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML, with --config and every --set applied) and exit")
    parser.add_argument("--rebuild", action="store_true",
                        help="train the cached earlier stages (embeddings, tokenizer) again instead of reusing them")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir from its last checkpoint (checkpoints/last.pt)")
    return parser


def parse_stage_args(parser: argparse.ArgumentParser, argv: list[str] | None = None, *,
                     stage: str | None = None) -> StageArgs:
    """Parse and resolve a stage's command line; everything that can be checked before any data is
    read is checked here (``stage``: make the default run directory ``runs/<stage>-...``)."""
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.dataset or args.data_path:  # a file of the user's is named after itself, not after the default
        overrides.append(f"data.dataset={args.dataset or dataset_name_of(args.data_path)}")
    if args.data_path:
        overrides.append(f"data.data_path={os.path.abspath(args.data_path)}")  # a resume may start elsewhere
    if args.format:
        overrides.append(f"data.format={args.format}")
    if args.seed is not None:
        overrides.append(f"run.seed={args.seed}")
    # Everything below is checked before any data is read or any stage trains.
    resumed = None if args.config else _resumed_config(args)
    # a named dataset brings the config sized for it (amazon-* -> amazon), a --config still wins
    default = DATASETS[args.dataset].config if args.dataset in DATASETS else "ml-100k"
    config = run_config(resumed, overrides) if resumed else load_config(args.config or default, overrides)
    if args.print_config:
        raise PrintedConfig(yaml.safe_dump(config.to_dict(), sort_keys=False))
    options = RunOptions.resolve(config, output_dir=args.output_dir, wandb_mode=args.wandb_mode,
                                 log_with=args.log_with, subscribers=args.subscribers, resume=args.resume,
                                 rebuild=args.rebuild)
    if options.resume and (options.output_dir / "metrics.json").exists() and not options.lengthened:
        raise RunFinished(f"the run in {args.output_dir!r} is finished (it has its metrics.json); nothing to "
                          "resume, nothing was changed")
    if launch_rank() == 0:  # the paths the main process will write into
        check_writable(data_home(), "$ETEGREC_HOME")
        if args.output_dir:
            hold_run_dir(check_writable(args.output_dir, "--output-dir"))
        else:
            check_writable("runs", "--output-dir (default runs/)")
    if options.output_dir is None and stage:  # made here, exclusively (by the main process): the Ctrl-C hint names it
        options = replace(options, output_dir=default_run_dir(stage, config, create=launch_rank() == 0))
    return StageArgs(config=config, options=options)


def _resumed_config(args: argparse.Namespace) -> str | None:
    """``--resume`` without ``--config``: the run's own ``config.yaml``, so that it need not be repeated."""
    saved = Path(args.output_dir or ".") / "config.yaml"
    return str(saved) if args.resume and args.output_dir and saved.is_file() else None


def stage_main(stage: Stage, argv: list[str] | None = None) -> int:
    """A stage's command (``python -m <stage.command>``): parse and resolve the common options, then
    train it after what it needs (:func:`~etegrec.training.run.pipeline.run_stage`)."""
    prog = f"python -m {stage.command}"
    parser = common_parser(prog, stage.summary)

    argv = sys.argv[1:] if argv is None else list(argv)
    where: dict[str, str] = {}

    def body():
        args = parse_stage_args(parser, argv, stage=stage.name)
        where["run_dir"] = str(args.options.output_dir)
        run_stage(stage, args.config, args.options)
        if launch_rank() == 0:
            print(next_commands(stage, args.options.output_dir))

    def resume_hint() -> str:
        if "run_dir" not in where:
            return ""
        rest = [*_without_output_dir(argv), "--output-dir", where["run_dir"]]
        if (Path(where["run_dir"]) / "checkpoints" / "last.pt").exists():
            return f"; continue with: {prog} {shlex.join([*rest, '--resume'])}"
        # (a cached earlier stage that was stopped resumes by itself when the command runs again)
        return f"; no checkpoint in {where['run_dir']} to resume from yet: start again with: {prog} {shlex.join(rest)}"
    return run_main(body, on_interrupt=resume_hint)


def next_commands(stage: Stage, run_dir: Path) -> str:
    """What a finished run prints last: the commands that look at it, with its directory in them (the
    report for every stage; for a stage that ``recommends`` also a recommendation for a history of its
    first three items)."""
    where = shlex.quote(str(run_dir))
    lines = ["", "next: its curves and metrics, one HTML page",
             f"  python -m etegrec.report {where} --output {shlex.quote(str(Path(run_dir) / 'report.html'))}"]
    if stage.recommends:
        ids = [item for item in read_item_codes(Path(run_dir) / "item_codes.tsv")[0] if "," not in item][:3]
        lines += ["next: the top 10 items for a history of raw item ids, oldest first",
                  f"  python -m etegrec.recommend {where} --history {shlex.quote(','.join(ids))}"]
    return "\n".join(lines)


def _without_output_dir(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--output-dir":
            skip = True
        elif not arg.startswith("--output-dir=") and arg != "--resume":
            out.append(arg)
    return out


def run_main(body: Callable[[], object], on_interrupt: Callable[[], str] = lambda: "") -> int:
    """Run a stage's command-line body: user errors print one line (exit 2), a non-finite loss one line
    (exit 1), Ctrl-C exits with 130 and says how to resume (``on_interrupt``), a full disk exits with 2
    and says the same."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        body()
    except PrintedConfig as exc:
        print(str(exc), end="")
        return 0
    except RunFinished as exc:
        print(str(exc), file=sys.stderr)
        return 0
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DiskFullError as exc:
        print(f"error: {exc}{on_interrupt()}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted{on_interrupt()}", file=sys.stderr)
        return 130
    return 0
