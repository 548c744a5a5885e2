"""The `qdistill` command: one subcommand per stage, each `--config NAME_OR_PATH key=value ...`.

    qdistill configs                                   # the installed configs (bench tooling's apart)
    qdistill calibrate --config calibrate              # a bare name is an installed config
    qdistill train --config dilatequant distill.iterations=100
    torchrun --nproc_per_node=2 -m qdistill train --config dilatequant
    deepspeed --num_gpus 2 --module qdistill train --config dilatequant

Errors in what the user gave (qdistill.errors.QdistillError: a config key, a folder, a damaged file) print as
one line and exit with 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import re
import sys
import types
import typing

from .configs import BENCH_CONFIGS, installed_configs, load_config, resolve_config
from .configs.schema import (EvalConfig, ExportConfig, QuantizeRunConfig, SensitivityConfig, TrainConfig,
                             TrajectoryConfig)
from .errors import QdistillError
from .stages import STAGES

# subcommand: (config class, what it does)
SUBCOMMANDS = {
    "calibrate": (TrajectoryConfig, "record FP sampler trajectories as sharded calibration data"),
    "quantize": (QuantizeRunConfig, "post-training quantization (RTN), judged against the FP model"),
    "train": (TrainConfig, "block-wise distillation on DeepSpeed (dilatequant or qdiffusion recipe)"),
    "export": (ExportConfig, "pack a trained model's integer weights (optionally PTQD, mixed precision)"),
    "eval": (EvalConfig, "judge an export: FD, PSNR/SSIM and noise MSE vs FP, FID/CLIP with local weights"),
    "sensitivity": (SensitivityConfig, "per-layer sensitivity: the error of each quantized layer alone, and without it"),
}
# subcommands that moved to the bench tooling: the command that replaces each
MOVED = {"benchmark": "python -m qdistill.bench.benchmark --config bench/benchmark KEY=VALUE ..."}


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list[{_type_name(args[0])}]" if args else "list"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _comments(cls) -> dict[str, str]:
    """The `# ...` comment after each field in the dataclass's source: the key's documentation."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^\n#]*#\s*([^\n]*)$", source, re.M)}


def config_keys(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, comment) of every key of a config dataclass, sections flattened."""
    rows = []
    hints, comments = typing.get_type_hints(cls), _comments(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += config_keys(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else repr(default) \
            if default == "" else str(default)
        rows.append((prefix + f.name, _type_name(tp), shown, comments.get(f.name, "")))
    return rows


def keys_help(cls) -> str:
    rows = config_keys(cls)
    width = max(len(k) for k, *_ in rows)
    type_width = min(28, max(len(t) for _, t, *_ in rows))
    lines = [(cls.__doc__ or "").strip(), "", "config keys (KEY=VALUE after the options; dotted for sections):"]
    for key, tp, default, comment in rows:
        lines.append(f"  {key:<{width}}  {tp:<{type_width}}  = {default}" + (f"   # {comment}" if comment else ""))
    return "\n".join(lines)


def top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdistill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("configs", help="list the installed configs")
    for name, (_, summary) in SUBCOMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def stage_parser(prog: str, cls, summary: str, shorthands: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=f"{summary}.\n\n{keys_help(cls)}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, metavar="NAME_OR_PATH",
                   help="a YAML file, or the name of an installed config (`qdistill configs`)")
    for key in shorthands:
        p.add_argument(f"--{key}", default=None, help=f"shorthand for {key}={key.upper()}")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (see the keys above)")
    return p


def run_command(prog: str, cls, stage, summary: str, argv: typing.Sequence[str],
                shorthands: tuple[str, ...] = ()) -> int:
    """Parse `--config NAME key=value ...` for config class `cls` and run `stage` on it: the body of every
    `qdistill` subcommand and of the bench tools that take a config."""
    setup_logging()
    args = stage_parser(prog, cls, summary, shorthands).parse_intermixed_args(argv)  # overrides before or after
    overrides = list(args.overrides) + [f"{k}={getattr(args, k)}" for k in shorthands if getattr(args, k) is not None]
    try:
        stage(load_config(cls, args.config, overrides))
    except QdistillError as e:
        print(f"{prog.split()[0]}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


def list_configs() -> None:
    """The installed configs with the first line of each, the bench tooling's apart."""
    for title, names in (("configs", [n for n in installed_configs() if n not in BENCH_CONFIGS]),
                         ("bench tooling (python -m qdistill.bench.NAME --config bench/...)", BENCH_CONFIGS)):
        print(f"{title}:")
        for name in names:
            first = resolve_config(name).read_text().splitlines()[:1]
            print(f"  {name:<22} {first[0].lstrip('# ') if first and first[0].startswith('#') else ''}")


def setup_logging() -> None:
    """Stage logs as `[stage] message` on stdout (library code logs through `logging`)."""
    class StageFormatter(logging.Formatter):
        def format(self, record):
            return f"[{record.name.rsplit('.', 1)[-1]}] {record.getMessage()}"

    class StdoutHandler(logging.StreamHandler):
        """Writes to whatever sys.stdout is at the time (so a redirected or captured stdout gets the lines)."""

        @property
        def stream(self):
            return sys.stdout

        @stream.setter
        def stream(self, value):
            pass

    logger = logging.getLogger("qdistill")
    if not any(isinstance(h, StdoutHandler) for h in logger.handlers) and not getattr(logger, "_qdistill_cli", False):
        handler = StdoutHandler()
        handler.setFormatter(StageFormatter())
        logger.addHandler(handler)
        logger._qdistill_cli = True
    logger.setLevel(logging.INFO)


def main(argv: typing.Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher's; LOCAL_RANK is set too
    if argv and argv[0] in MOVED:
        print(f"qdistill: error: `qdistill {argv[0]}` is bench tooling now: {MOVED[argv[0]]}", file=sys.stderr)
        return 2
    command = top_parser().parse_args(argv[:1]).command if argv and not argv[0].startswith("-") \
        else top_parser().parse_args(argv).command
    if command == "configs":
        list_configs()
        return 0
    cls, summary = SUBCOMMANDS[command]
    return run_command(f"qdistill {command}", cls, STAGES[command], summary, argv[1:],
                       ("run", "out", "format") if command == "export" else ())
