"""The commands in the README and the docs run as written: every `qdistill ...` and `python -m qdistill.bench.benchmark`
line in a ```bash fence names a stage, config and keys that exist (so a rename cannot leave a doc behind), every
`python -m qdistill.X` module exists, every `make X` target exists, and the README's quickstart runs end to end
(at test size: the same lines with size overrides appended)."""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO
from qdistill.bench.benchmark import BenchmarkConfig
from qdistill.cli import SUBCOMMANDS, main as qdistill
from qdistill.configs import load_config

# docs/notebook.md is the history: its commands are quoted as they were run then, in that day's names.
DOCS = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted(p for p in (REPO / "docs").glob("*.md")
                                                          if p.name != "notebook.md")]
INLINE = re.compile(r"`((?:qdistill|python -m qdistill\.)[^`]*)`")


def bash_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, command) of every command in the file's ```bash fences, continuation lines joined."""
    lines, fence, pending, start = [], False, "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        if raw.strip().startswith("```"):
            fence = raw.strip() == "```bash" if not fence else False
            continue
        if not fence:
            continue
        line = raw.rstrip()
        if not pending:
            start = n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip() and not line.lstrip().startswith("#"):
            lines.append((start, line.strip()))
    return lines


def inline_commands(path: Path) -> list[tuple[int, str]]:
    """(line number, command) of every inline code span that is a whole `qdistill ...` or `python -m qdistill.X`
    command (outside fences). `...` stands for more keys and `[...]` for optional ones: both are dropped."""
    found, fence = [], False
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        if raw.strip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            for m in INLINE.finditer(raw):
                command = re.sub(r"\[[^\]]*\]", "", m.group(1)).replace("...", "").replace("…", "")
                found.append((n, command.strip()))
    return found


PLACEHOLDER = re.compile(r"^[\w.]+=[A-Z][A-Z_0-9]*$")  # key=VALUE with a metavariable (K, RUN, NAME) for its value


def words(command: str, env: dict[str, str]) -> list[str] | None:
    """The command's words with shell variables substituted and metavariable overrides dropped; None for a template
    (`qdistill <stage> ...`, `python -m qdistill.bench.NAME`)."""
    for key, value in env.items():
        command = command.replace(f"${key}", value)
    if "<" in command or re.search(r"qdistill\.\w+\.[A-Z]+\b", command):
        return None
    return [w for w in shlex.split(command, comments=True) if not PLACEHOLDER.match(w)]


def qdistill_args(argv: list[str]) -> list[str] | None:
    """The arguments after `qdistill` however it is launched (plain, `python -m`, torchrun, deepspeed)."""
    for i, w in enumerate(argv):
        if w in ("qdistill", ".venv/bin/qdistill") and (i == 0 or argv[i - 1] in ("-m", "--module")):
            return argv[i + 1:]
    return None


def config_of(args: list[str]):
    """(config class, --config value, overrides) of one stage's argument list."""
    config, overrides, shorthand = None, [], {"--run": "run", "--out": "out", "--format": "format"}
    i = 0
    while i < len(args):
        if args[i] == "--config":
            config, i = args[i + 1], i + 2
        elif args[i] in shorthand:
            overrides.append(f"{shorthand[args[i]]}={args[i + 1]}")
            i += 2
        elif "=" in args[i] and not args[i].startswith("-"):
            overrides.append(args[i])
            i += 1
        elif args[i] in ("--help", "-h"):
            i += 1
        else:
            raise AssertionError(f"unexpected argument {args[i]!r}")
    return config, overrides


def check(argv: list[str], makefile: str) -> str | None:
    """None when the command names what exists; else what is wrong."""
    args = qdistill_args(argv)
    if args is not None:
        if not args or args[0] in ("configs", "--help", "-h"):
            return None
        if args[0] not in SUBCOMMANDS:
            return f"no qdistill subcommand {args[0]!r}"
        config, overrides = config_of(args[1:])
        load_config(SUBCOMMANDS[args[0]][0], config, overrides)
        return None
    if "-m" in argv and argv[argv.index("-m") + 1].startswith("qdistill."):
        module = argv[argv.index("-m") + 1]
        if importlib.util.find_spec(module) is None:
            return f"no module {module}"
        if module == "qdistill.bench.benchmark":
            config, overrides = config_of(argv[argv.index("-m") + 2:])
            load_config(BenchmarkConfig, config, overrides)
        return None
    if argv[0] == "make":
        missing = [t for t in argv[1:] if "=" not in t and not re.search(rf"^{re.escape(t)}:", makefile, re.M)]
        return f"no make target {missing}" if missing else None
    return None  # pip, git, shell built-ins: not ours to check


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_documented_command_names_what_exists(path):
    makefile = (REPO / "Makefile").read_text()
    env, problems, checked = {}, [], 0
    for n, line in bash_lines(path) + inline_commands(path):
        argv = words(line, env)
        if argv is None:
            continue
        assignment = re.fullmatch(r"([A-Z_]+)=(\S+)", line)
        if assignment:
            env[assignment.group(1)] = assignment.group(2)
            continue
        try:
            why = check(argv, makefile)
        except Exception as e:  # a ConfigError names the key
            why = str(e)
        checked += 1
        if why:
            problems.append(f"{path.name}:{n}: {line}\n    {why}")
    assert not problems, "\n".join(problems)
    assert path.name != "README.md" or checked >= 6


def test_the_readme_quickstart_runs_end_to_end(tmp_path, monkeypatch, demo_pipeline_dir):
    """The README's four stage lines, as written, with test-size overrides appended (and its model swapped for a
    tiny one): every config name and key in them works, and each stage reads what the one before wrote."""
    readme = REPO / "README.md"
    quickstart = [(n, line) for n, line in bash_lines(readme) if qdistill_args(shlex.split(line, comments=True))]
    stages = []
    for _, line in quickstart:
        args = qdistill_args(shlex.split(line, comments=True))
        if args and args[0] in ("calibrate", "train", "export", "eval") and args[0] not in [s[0] for s in stages]:
            stages.append(args)
    assert [s[0] for s in stages] == ["calibrate", "train", "export", "eval"]
    small = {"calibrate": ["num_samples=4", "steps=6", "batch_size=2", "every=2"],
             "train": ["distill.iterations=2", "distill.batch_size=4", "distill.init_rows=8", "distill.eval_every=0",
                       "sampling.num_samples=2", "sampling.steps=4", "threads=1"],
             "export": [],
             "eval": ["num_samples=4", "steps=4", "batch_size=4", "fidelity_samples=2", "mode=simulated",
                      f"cache_dir={tmp_path / 'cache'}"]}
    monkeypatch.chdir(tmp_path)
    for args in stages:
        argv = [a.replace("$MODEL", str(demo_pipeline_dir)) for a in args]
        assert qdistill([*argv, *small[args[0]]]) == 0, argv
    assert (tmp_path / "runs" / "w4a4" / "eval" / "metrics.json").is_file()


def test_the_checker_catches_what_a_rename_leaves_behind(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("Run `qdistill train --config dilatequant recipe=qdiffusion` and\n\n```bash\nqdistill calibrate "
                   "--config calibrate \\\n  num_steps=5\npython -m qdistill.bench.nope\nmake nothing-here\n```\n")
    makefile = (REPO / "Makefile").read_text()
    lines = [line for _, line in bash_lines(doc)]
    assert [" ".join(line.split()) for line in lines] == ["qdistill calibrate --config calibrate num_steps=5", "python -m qdistill.bench.nope",
                     "make nothing-here"]
    with pytest.raises(Exception, match="'num_steps' was renamed 'steps'"):
        check(words(lines[0], {}), makefile)
    assert check(words(lines[1], {}), makefile) == "no module qdistill.bench.nope"
    assert check(words(lines[2], {}), makefile).startswith("no make target")
    (_, inline), = inline_commands(doc)
    with pytest.raises(Exception, match="'recipe' was renamed 'method'"):
        check(words(inline, {}), makefile)
