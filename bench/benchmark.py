"""benchmark: FP and every recipe at W8A8, W4A8 and W4A4 on the bench model, with the same calibration data,
seeds and sampler, each judged by `qdistill eval` on its export.

    python -m qdistill.bench.benchmark --config bench/benchmark             # the full table (several hours on 2 cores)
    python -m qdistill.bench.benchmark --config bench/benchmark quick=true  # W4A8 only, short (about 10 minutes)

Recipes (docs/design.md §3; each an installed config, run by the same `qdistill` stages users run):
  rtn              qdistill quantize --config rtn (MSE ranges, one activation scale)
  qdiffusion       qdistill train --config qdiffusion (AdaRound + activation step sizes)
  ptqd             the qdiffusion model, qdistill export --config ptqd (PTQD's noise correction; eval samples
                   with it)
  dilatequant      qdistill train --config dilatequant (Weight Dilation + TPQ + BKD)
  dilatequant+ptqd the dilatequant model, qdistill export --config dilatequant+ptqd
  + low rank, + weight groups  rtn and dilatequant with `quant.low_rank` / `quant.weight_group_size` (low_rank,
                   weight_group_size > 0), alone and together, and dilatequant with everything combined
  dilatequant + end to end  the dilatequant model resumed with `distill.e2e_iterations` (e2e_iterations > 0; on each
                   of `e2e_inputs`, alone and with the sensitive layers kept)
plus DDPM rows for qdiffusion and ptqd (so PTQD's variance calibration shows) and two W4A4 dilatequant+ptqd rows
with step-aware mixed precision by PTQD's noise rule: A4/A8 (one weight copy) and W4A4/W8A8 (a second, 8-bit
weight copy from the FP model).

Every row: FD in the bench classifier's features and ΔFD vs FP (`qdistill eval`, FP sampled once, cached),
PSNR vs FP on the same seeds, calibration wall time and peak memory of the stage that made the model (the
process tree's RSS), exported size, bit-operations relative to FP. Rows land in OUT/results.json as they
finish; a rerun skips finished rows and reuses trained models (train resumes from its checkpoint), so the
benchmark can be stopped and resumed. The table goes to OUT/benchmark.md and, with update=FILE, between the
`<!-- benchmark:begin -->` / `<!-- benchmark:end -->` markers of FILE.

The calibration data: `qdistill calibrate`'s trajectories (`trajectories=`, recorded with the `calibrate` config
if missing) for the trained recipes; rtn records the same trajectories itself (same seeds, sampler and
every-5th-step selection: `calibration.num_samples` = the trajectories' count).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from qdistill.analysis.sensitivity import sensitivity_table
from qdistill.cli import run_command
from qdistill.configs import CONFIG_DIR
from qdistill.configs.schema import EvalConfig
from qdistill.cost import FP_BITS, layer_macs
from qdistill.data.model_folder import load_denoiser, load_scheduler, resolve
from qdistill.denoisers import example_inputs
from qdistill.evaluation.classifier_fd import classifier_quality
from qdistill.evaluation.fidelity import from_uint8
from qdistill.evaluation.sampling import sample_across_ranks
from qdistill.export import load_exported
from qdistill.errors import ConfigError, QdistillError
from qdistill.files import atomic_write_text, shipped
from qdistill.quantizers.mixed_precision import bit_operations
from qdistill.trainer.run_state import CHECKPOINT

logger = logging.getLogger(__name__)
QDISTILL = [sys.executable, "-m", "qdistill"]
EVAL_SEED = EvalConfig.seed  # `qdistill eval`'s first seed, which every row samples from
BITS = ("W8A8", "W4A8", "W4A4")
RECIPES = ("rtn", "qdiffusion", "ptqd", "dilatequant", "dilatequant+ptqd")
MARK_BEGIN, MARK_END = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"


@dataclass
class BenchmarkConfig:
    """`python -m qdistill.bench.benchmark`: FP and every recipe side by side on the bench model (same calibration data, seeds and
    sampler), each stage run as `qdistill ...` and each row judged by `qdistill eval` on its export. Unset sizes
    take the full table's defaults (200 iterations, 2000 samples, 50 steps) or, with quick=true, 30, 256, 25."""

    quick: bool = False  # W4A8 only, short training, 256 samples, 25 steps (about 10 minutes on 2 cores)
    out: str | None = None  # results folder; default runs/benchmark (quick: runs/benchmark-quick)
    model: str = "assets/teacher"
    trajectories: str = "runs/trajectories"  # recorded with the `calibrate` config if missing
    classifier: str = "assets/classifier"
    configs: str | None = None  # folder of the recipe configs; default the installed ones
    bits: list[Literal["W8A8", "W4A8", "W4A4"]] | None = None  # default all three (quick: W4A8)
    recipes: list[Literal["rtn", "qdiffusion", "ptqd", "dilatequant", "dilatequant+ptqd"]] = field(
        default_factory=lambda: ["rtn", "qdiffusion", "ptqd", "dilatequant", "dilatequant+ptqd"])
    iterations: int | None = None  # training iterations per block
    num_samples: int | None = None  # samples per row
    steps: int | None = None  # sampler steps
    fidelity_samples: int = 16
    nc_samples: int = 64  # FP trajectories for PTQD's statistics
    mode: Literal["integer", "simulated"] = "integer"
    extra_rows: bool = True  # the DDPM and mixed-precision rows
    with_keep_sensitive: bool = True  # rtn and dilatequant with quant.keep_sensitive=auto, at every bits
    noise_floor: bool = True  # the FP model's FD on a second, disjoint seed set
    e2e_iterations: int = 0  # > 0: dilatequant rows with this many end-to-end iterations after the blocks
    e2e_inputs: list[Literal["fp", "quantized"]] = field(default_factory=lambda: ["fp", "quantized"])
    low_rank: int = 0  # > 0: rtn and dilatequant rows with a low-rank float branch of this rank (quant.low_rank)
    weight_group_size: int = 0  # > 0: rows with group-wise 4-bit weights (quant.weight_group_size)
    sensitivity_top: int = 3  # each trained model's most sensitive units (`qdistill sensitivity`); 0: none
    sensitivity_rows: int = 64  # calibration rows that sensitivity measures on
    update: str | None = None  # also write the table into this Markdown file's marked section

    def __post_init__(self):
        for key in ("iterations", "num_samples", "steps", "fidelity_samples", "nc_samples", "sensitivity_rows"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if self.sensitivity_top < 0:
            raise ValueError(f"sensitivity_top must be >= 0 (0: none), got {self.sensitivity_top}")
        for key in ("low_rank", "weight_group_size"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0 (0: no such rows), got {getattr(self, key)}")
        if self.e2e_iterations < 0:
            raise ValueError(f"e2e_iterations must be >= 0 (0: no end-to-end rows), got {self.e2e_iterations}")


@dataclass(frozen=True)
class Row:
    recipe: str  # one of RECIPES, or "fp"
    bits: str  # W8A8 / W4A8 / W4A4, or "FP32"
    scheduler: str = "ddim"
    mixed_precision: bool = False
    mixed_weights: bool = False  # mixed precision switches weights too (a second, 8-bit weight copy)
    keep_sensitive: bool = False  # quant.keep_sensitive=auto: the most sensitive layers at higher precision
    e2e: str = ""  # end-to-end distillation after the blocks, on "fp" or "quantized" inputs; "": none
    low_rank: int = 0  # quant.low_rank: a float branch of this rank beside every quantized layer
    group_size: int = 0  # quant.weight_group_size: group-wise 4-bit weights

    @property
    def outliers(self) -> str:
        return (f"-lr{self.low_rank}" if self.low_rank else "") + (f"-g{self.group_size}" if self.group_size else "")

    @property
    def name(self) -> str:
        suffix = "-mpw" if self.mixed_weights else "-mp" if self.mixed_precision else ""
        suffix += ("-keep" if self.keep_sensitive else "") + self.outliers + (f"-e2e{self.e2e}" if self.e2e else "")
        return f"{self.recipe}-{self.bits}-{self.scheduler}{suffix}".replace("+", "_")

    @property
    def model(self) -> str:
        """The trained model's folder name under OUT/models."""
        return (f"{self.base}-{self.bits}" + ("-keep" if self.keep_sensitive else "") + self.outliers
                + (f"-e2e{self.e2e}" if self.e2e else ""))

    @property
    def quant_overrides(self) -> list[str]:
        """The `quant.*` keys that make this row's model besides its bits."""
        return ((["quant.keep_sensitive=auto"] if self.keep_sensitive else [])
                + ([f"quant.low_rank={self.low_rank}"] if self.low_rank else [])
                + ([f"quant.weight_group_size={self.group_size}"] if self.group_size else []))

    @property
    def base(self) -> str:
        """The trained model the row exports: ptqd rows reuse their recipe's model."""
        return {"ptqd": "qdiffusion", "dilatequant+ptqd": "dilatequant"}.get(self.recipe, self.recipe)

    @property
    def ptqd(self) -> bool:
        return self.recipe.endswith("ptqd")


def rows_for(bits: list[str], recipes: list[str], extra_rows: bool, keep_sensitive: bool = False,
             e2e_inputs: tuple[str, ...] = (), low_rank: int = 0, group_size: int = 0) -> list[Row]:
    rows = [Row("fp", "FP32")]
    # outlier handling: the low-rank branch and group-wise weights alone, then both
    outliers = [o for o, on in (((low_rank, 0), low_rank), ((0, group_size), group_size),
                                ((low_rank, group_size), low_rank and group_size)) if on]
    for b in bits:
        rows += [Row(r, b) for r in recipes]
        if keep_sensitive:
            rows += [Row(r, b, keep_sensitive=True) for r in recipes if r in ("rtn", "dilatequant")]
        if "dilatequant" in recipes:  # end to end after the blocks: alone, and with the sensitive layers kept
            rows += [Row("dilatequant", b, keep_sensitive=keep, e2e=inputs) for inputs in e2e_inputs
                     for keep in ((False, True) if keep_sensitive else (False,))]
        grouped = int(b[1]) <= 4  # group-wise weights apply to 4-bit weights: elsewhere a row would be a copy
        here = [o for o in outliers if grouped or not o[1]]
        rows += [Row(r, b, low_rank=lr, group_size=g) for lr, g in here for r in recipes if r in ("rtn", "dilatequant")]
        if here and "dilatequant" in recipes and (keep_sensitive or e2e_inputs):  # everything combined
            rows.append(Row("dilatequant", b, keep_sensitive=keep_sensitive, e2e=e2e_inputs[0] if e2e_inputs else "",
                            low_rank=low_rank, group_size=group_size if grouped else 0))
    if extra_rows:
        ddpm_bits = "W4A8" if "W4A8" in bits else bits[0]
        rows += [Row("fp", "FP32", "ddpm")]
        rows += [Row(r, ddpm_bits, "ddpm") for r in ("qdiffusion", "ptqd") if r in recipes]
        if "W4A4" in bits and "dilatequant+ptqd" in recipes:
            rows.append(Row("dilatequant+ptqd", "W4A4", mixed_precision=True))
            rows.append(Row("dilatequant+ptqd", "W4A4", mixed_precision=True, mixed_weights=True))
    return rows


def run(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run a stage (`qdistill ...` in a process of its own, so its memory is its own); (wall seconds, peak RSS in
    MB of its whole process tree). Output goes to `log`; a failure raises with the log's tail."""
    import psutil

    log.parent.mkdir(parents=True, exist_ok=True)
    logger.info(f"$ qdistill {' '.join(cmd[len(QDISTILL):])}")
    t0, peak = time.time(), 0.0
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.2)
    seconds = time.time() - t0
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"qdistill {cmd[len(QDISTILL)]} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return seconds, peak


def train_model(row: Row, args, out: Path) -> dict:
    """The quantized model of the row's (recipe, bits, keep_sensitive): made once, timed; reused by later rows and
    reruns. With `sensitivity_top`, its most sensitive units are measured (`qdistill sensitivity`) and logged."""
    recipe, bits = row.base, row.bits
    run_dir = out / "models" / row.model
    record = run_dir / "benchmark_stage.json"
    if record.is_file():
        return json.loads(record.read_text())
    if row.e2e:
        return train_end_to_end(row, args, out)
    wb, ab = bits[1], bits[3]
    common = [f"model={args.model}", f"out={run_dir}", f"quant.weight_bits={wb}", f"quant.act_bits={ab}"]
    common += row.quant_overrides
    if recipe == "rtn":
        cmd = [*QDISTILL, "quantize", "--config", str(args.configs / "rtn.yaml"), *common,
               *same_calibration(args.trajectories), f"sampling.num_samples={args.fidelity_samples}"]
    else:
        cmd = [*QDISTILL, "train", "--config", str(args.configs / f"{recipe}.yaml"), *common,
               f"trajectories={args.trajectories}", f"sampling.num_samples={args.fidelity_samples}"]
        if recipe == "dilatequant":
            cmd.append(f"distill.iterations={args.iterations}")
        else:  # AdaRound, then activation step sizes: the config's 4:1 split of the iterations, its rates
            rounding = max(1, args.iterations * 4 // 5)
            cmd += [f"qdiffusion.rounding_iterations={rounding}",
                    f"qdiffusion.act_iterations={max(1, args.iterations - rounding)}"]
    seconds, peak = run(cmd, run_dir / "stage.log")
    stage = {"run": str(run_dir), "calibration_seconds": round(seconds, 1), "peak_rss_mb": round(peak, 1)}
    selection = run_dir / "layer_selection.json"
    if selection.is_file():
        stage["kept_layers"] = json.loads(selection.read_text())["layers"]
    if args.sensitivity_top:
        sens = run_dir / "sensitivity"
        run([*QDISTILL, "sensitivity", f"model={args.model}", f"trajectories={args.trajectories}",
             f"quantized={run_dir}", f"out={sens}", f"rows={args.sensitivity_rows}", f"top={args.sensitivity_top}"],
            run_dir / "sensitivity.log")

        report = json.loads((sens / "sensitivity.json").read_text())
        stage["most_sensitive"] = [{k: u[k] for k in ("name", "bits", "share", "saving")}
                                   for u in report["units"][:args.sensitivity_top]]
        logger.info(f"{row.model}: the {args.sensitivity_top} most sensitive units\n"
                    f"{sensitivity_table(report, args.sensitivity_top)}")
    atomic_write_text(record, json.dumps(stage, indent=2))
    return stage


def train_end_to_end(row: Row, args, out: Path) -> dict:
    """The row's block-trained model (trained first if need be) given `args.e2e_iterations` of end-to-end
    distillation: its checkpoint copied into a folder of its own and resumed with the phase added. Calibration time
    is the blocks' plus the phase's; peak memory the larger of the two."""
    base = train_model(dataclasses.replace(row, e2e=""), args, out)
    run_dir = out / "models" / row.model
    shutil.rmtree(run_dir, ignore_errors=True)  # a run cut off before its record: start the phase over
    shutil.copytree(Path(base["run"]) / CHECKPOINT, run_dir / CHECKPOINT)
    cmd = [*QDISTILL, "train", "--config", str(args.configs / "dilatequant.yaml"), f"model={args.model}",
           f"out={run_dir}", f"quant.weight_bits={row.bits[1]}", f"quant.act_bits={row.bits[3]}",
           f"trajectories={args.trajectories}", f"sampling.num_samples={args.fidelity_samples}",
           f"distill.iterations={args.iterations}", f"distill.e2e_iterations={args.e2e_iterations}",
           f"distill.e2e_inputs={row.e2e}", *row.quant_overrides]
    seconds, peak = run(cmd, run_dir / "stage.log")
    e2e = json.loads((run_dir / "metrics.json").read_text())["e2e"]
    stage = {**base, "run": str(run_dir), "calibration_seconds": round(base["calibration_seconds"] + seconds, 1),
             "peak_rss_mb": round(max(base["peak_rss_mb"], peak), 1), "e2e_seconds": round(seconds, 1),
             "e2e": {k: e2e[k] for k in ("init_mse", "final_mse", "best_mse", "kept")}}
    atomic_write_text(run_dir / "benchmark_stage.json", json.dumps(stage, indent=2))
    return stage


def fp_noise_floor(args, out: Path) -> dict:
    """The FP model's FD on a second seed set, disjoint from the rows' (seeds after theirs): how far FD moves
    between two sample sets of one model. Cached in OUT/fp_floor.json."""
    record = out / "fp_floor.json"
    if record.is_file():
        return json.loads(record.read_text())
    classifier = shipped(args.classifier)
    if not (classifier / "config.json").is_file():
        return {}
    fp = load_denoiser(args.model).eval()
    seed = EVAL_SEED + args.num_samples
    images = sample_across_ranks(fp, load_scheduler(args.model, "ddim"), list(range(seed, seed + args.num_samples)),
                                 args.steps, 64, 0.0, 0, 1, desc="FP samples, second seed set")
    floor = {"seeds": [seed, seed + args.num_samples], "fd": classifier_quality(from_uint8(images), classifier)["fd"]}
    atomic_write_text(record, json.dumps(floor, indent=2))
    return floor


def same_calibration(trajectories: str) -> list[str]:
    """quantize.py overrides that record exactly the trajectories' rows: seeds, sampler, steps, selection."""
    m = json.loads((Path(trajectories) / "manifest.json").read_text())
    scheduler = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm"}.get(m["scheduler"]["class"])
    if m["selection"]["mode"] != "uniform" or scheduler is None or m["conditioning"] not in ("none", "class"):
        # `qdistill quantize` labels seed s with class s mod classes, as calibration does
        raise ConfigError(f"{trajectories}: rtn re-records the trajectories and supports uniform selection of "
                         f"unconditional or class-conditional DDIM/DDPM trajectories only (these: {m['selection']['mode']}, "
                         f"{m['scheduler']['class']}, conditioning {m['conditioning']})")
    return [f"calibration.num_samples={m['seeds']['count']}", f"calibration.seed={m['seeds']['start']}",
            f"calibration.steps={m['num_steps']}", f"calibration.every={m['selection']['every']}",
            f"calibration.scheduler={scheduler}", f"calibration.eta={m['eta']}",
            f"calibration.batch_size={m['seeds']['batch_size']}"]


def relative_bops(export: Path, scheduler_name: str, steps: int, model: str) -> float:
    """Bit-operations of a sampling run of the export relative to the FP model's (per-step bits included)."""
    q = load_exported(export, "simulated")
    scheduler = load_scheduler(model, scheduler_name)
    scheduler.set_timesteps(steps)
    macs = layer_macs(q, example_inputs(q, 1))  # the MACs of one sample (inputs' values do not matter)
    fp = sum(macs.values()) * FP_BITS * FP_BITS
    return sum(bit_operations(q, macs, float(t)) for t in scheduler.timesteps) / (fp * len(scheduler.timesteps))


def evaluate_row(row: Row, args, out: Path) -> dict:
    row_dir = out / "rows" / row.name
    stage = train_model(row, args, out)
    export = row_dir / "export"
    cmd = [*QDISTILL, "export", f"run={stage['run']}", f"out={export}"]
    if row.ptqd:  # the recipe's export config: configs/ptqd.yaml, configs/dilatequant+ptqd.yaml
        cmd += ["--config", str(args.configs / f"{row.recipe}.yaml")]
    if row.ptqd or row.mixed_precision:  # measured on this row's sampler
        cmd += [f"measure.num_samples={args.nc_samples}", f"measure.steps={args.steps}", f"measure.scheduler={row.scheduler}"]
    if row.mixed_precision:
        cmd += ["mixed_precision.enabled=true"] + (["mixed_precision.weight_bits=8"] if row.mixed_weights else [])
    run(cmd, row_dir / "export.log")
    eval_cmd = [*QDISTILL, "eval", f"model={export}", f"out={row_dir / 'eval'}", f"scheduler={row.scheduler}",
                f"steps={args.steps}", f"num_samples={args.num_samples}", f"fidelity_samples={args.fidelity_samples}",
                f"classifier={args.classifier}", f"cache_dir={out / 'fp_cache'}", f"reference={args.model}",
                f"mode={args.mode}", f"ptqd={str(row.ptqd).lower()}"]
    run(eval_cmd, row_dir / "eval.log")
    m = json.loads((row_dir / "eval" / "metrics.json").read_text())
    meta = json.loads((export / "quant_config.json").read_text())
    return {"fd": m.get("fd"), "delta_fd": m.get("delta_fd"), "fd_fp": m.get("fd_fp"), "psnr_db": m.get("psnr_db"),
            "fd_vs_fp_samples": m.get("fd_vs_fp_samples"), "kept_layers": stage.get("kept_layers"),
            "most_sensitive": stage.get("most_sensitive"),
            "e2e": stage.get("e2e"), "e2e_seconds": stage.get("e2e_seconds"),
            "calibration_seconds": stage["calibration_seconds"], "peak_rss_mb": stage["peak_rss_mb"],
            "export_bytes": meta["size"]["file_bytes"],
            "relative_bops": relative_bops(export, row.scheduler, args.steps, args.model),
            "step_bits": meta.get("step_bits", {}).get("act_bits"),
            "step_weight_bits": meta.get("step_bits", {}).get("weight_bits")}


def fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def table(rows: list[Row], results: dict, args, floor: dict | None = None) -> str:

    lines = [f"Bench model `{args.model}`; {args.num_samples} samples per row on seeds {EVAL_SEED}…, {args.steps} "
             f"steps, quantized models sampled on `{args.mode}` kernels; {args.iterations} training iterations per "
             f"block; PTQD statistics from {args.nc_samples} FP trajectories. FD to FP: the FD between each row's "
             "samples and the FP model's on the same seeds (paired; 0 for FP).", "",
             "| recipe | bits | sampler | FD | ΔFD vs FP | FD to FP | PSNR vs FP (dB) | calibration (s) | "
             "peak memory (MB) | export (KiB) | BOPs vs FP |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    fp_size = sum(f.stat().st_size for f in resolve(args.model)[0].glob("*.safetensors"))
    fd_fp = {}
    for row in rows:
        r = results.get(row.name)
        if row.recipe == "fp":  # every eval scores the FP model on the same seeds and sampler (cached)
            fd_fp[row.scheduler] = next((x["fd_fp"] for x in results.values()
                                         if x["row"]["scheduler"] == row.scheduler and x.get("fd_fp") is not None), None)
            r = {"fd": fd_fp[row.scheduler], "delta_fd": 0.0 if fd_fp[row.scheduler] is not None else None,
                 "fd_vs_fp_samples": 0.0, "export_bytes": fp_size, "relative_bops": 1.0} \
                if any(x["row"]["scheduler"] == row.scheduler for x in results.values()) else None
        recipe = row.recipe + (" + mixed precision W4A4/W8A8" if row.mixed_weights else
                               " + mixed precision A4/A8" if row.mixed_precision else "")
        recipe += " + keep sensitive" if row.keep_sensitive else ""
        recipe += f" + low rank {row.low_rank}" if row.low_rank else ""
        recipe += f" + weight groups of {row.group_size}" if row.group_size else ""
        recipe += f" + end to end ({row.e2e} inputs)" if row.e2e else ""
        if r is None:
            lines.append(f"| {recipe} | {row.bits} | {row.scheduler} | not run yet | | | | | | | |")
            continue
        delta = None
        if r.get("delta_fd") is not None and r.get("fd_fp"):
            delta = f"{r['delta_fd']:+.2f} ({100 * r['delta_fd'] / r['fd_fp']:+.1f} %)"
        elif r.get("delta_fd") is not None:
            delta = f"{r['delta_fd']:+.2f}"
        lines.append(f"| {recipe} | {row.bits} | {row.scheduler} | {fmt(r.get('fd'), '.2f')} | {delta or '—'} | "
                     f"{fmt(r.get('fd_vs_fp_samples'), '.2f')} | {fmt(r.get('psnr_db'), '.2f')} | "
                     f"{fmt(r.get('calibration_seconds'), '.0f')} | {fmt(r.get('peak_rss_mb'), '.0f')} | "
                     f"{r['export_bytes'] / 1024:.0f} | {r['relative_bops']:.4f} |")
    if floor and fd_fp.get("ddim"):
        a, b = fd_fp["ddim"], floor["fd"]
        lines += ["", f"Noise floor: the FP model's FD is {a:.2f} on the rows' seeds and {b:.2f} on seeds "
                      f"{floor['seeds'][0]}…{floor['seeds'][1] - 1} ({100 * (b - a) / a:+.1f} %): a ΔFD smaller than "
                      "that does not separate two models."]
    notes = []
    for row in rows:
        r = results.get(row.name) or {}
        if r.get("kept_layers"):
            notes.append(f"- {row.name} keeps " + ", ".join(f"`{c['name']}` at {c['to']}" for c in r["kept_layers"]))
        if r.get("e2e"):
            e = r["e2e"]
            notes.append(f"- {row.name}: end to end, held-out calibration MSE vs FP {e['init_mse']:.3e} -> "
                         f"{e['best_mse']:.3e} (kept: {e['kept']}), {r['e2e_seconds']:.0f} s of the calibration time")
        if r.get("most_sensitive") and not row.ptqd and not row.mixed_precision:
            notes.append(f"- {row.name}, most sensitive (share of the summed error alone, saving in FP): " + ", ".join(
                f"`{u['name']}` {100 * u['share']:.0f} % / {100 * u['saving']:.0f} %" for u in r["most_sensitive"]))
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def benchmark(cfg: BenchmarkConfig) -> dict:
    """Run (or resume) the table; returns {"settings", "rows", "table"} and writes OUT/results.json and
    OUT/benchmark.md."""
    quick = cfg.quick
    args = dataclasses.replace(cfg, bits=cfg.bits or (["W4A8"] if quick else list(BITS)),
                               iterations=cfg.iterations or (30 if quick else 200),
                               num_samples=cfg.num_samples or (256 if quick else 2000),
                               steps=cfg.steps or (25 if quick else 50))
    args.configs = Path(cfg.configs) if cfg.configs else CONFIG_DIR
    out = Path(cfg.out or ("runs/benchmark-quick" if quick else "runs/benchmark"))
    if args.update and not Path(args.update).is_file():
        raise ConfigError(f"config key 'update': file not found: {args.update}")
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("update", "out")}

    results_file = out / "results.json"
    saved = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if saved.get("settings", settings) != settings:
        raise QdistillError(f"{results_file} was made with other settings ({saved['settings']}); use another out=")
    results = saved.get("rows", {})
    if not (Path(args.trajectories) / "manifest.json").is_file():
        run([*QDISTILL, "calibrate", "--config", str(args.configs / "calibrate.yaml"),
             f"model={args.model}", f"out={args.trajectories}"], out / "calibrate.log")
    rows = rows_for(args.bits, args.recipes, args.extra_rows, args.with_keep_sensitive,
                    tuple(args.e2e_inputs) if args.e2e_iterations else (), args.low_rank, args.weight_group_size)
    t_start = time.time()
    for i, row in enumerate(rows):
        if row.name in results or row.recipe == "fp":
            continue
        logger.info(f"row {i + 1}/{len(rows)}: {row.name} ({time.time() - t_start:.0f}s so far)")
        results[row.name] = {"row": asdict(row), **evaluate_row(row, args, out)}
        saved = {"settings": settings, "rows": results}
        atomic_write_text(results_file, json.dumps(saved, indent=2))  # after every row: a rerun resumes here
    floor = fp_noise_floor(args, out) if args.noise_floor else None
    text = table(rows, results, args, floor)
    (out / "benchmark.md").write_text(text)
    if args.update:
        doc = Path(args.update).read_text()
        if MARK_BEGIN not in doc or MARK_END not in doc:
            raise ConfigError(f"config key 'update': {args.update} has no {MARK_BEGIN} … {MARK_END} section")
        head, rest = doc.split(MARK_BEGIN, 1)
        Path(args.update).write_text(head + MARK_BEGIN + "\n" + text + MARK_END + rest.split(MARK_END, 1)[1])
    for line in text.splitlines():
        logger.info(line)
    return {"settings": settings, "rows": results, "table": text}


def main(argv=None) -> int:
    return run_command("qdistill.bench.benchmark", BenchmarkConfig, benchmark,
                       "FP and every recipe side by side on the bench model", argv)


if __name__ == "__main__":
    sys.exit(main())
