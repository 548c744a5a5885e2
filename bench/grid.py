"""The README's sample grid: the FP teacher and each given export sampled from the same seeds with the same
sampler, side by side (FP | first export | second export ...). Exports made with noise correction are sampled
with it, as `qdistill eval` samples them.

    python -m qdistill.bench.grid --exports runs/grid-w4a8/export runs/grid-w4a4/export --out docs/grid.png
"""
import argparse
import sys

from qdistill.data.model_folder import load_denoiser, load_scheduler
from qdistill.evaluation.fidelity import save_grid
from qdistill.evaluation.fidelity import from_uint8
from qdistill.evaluation.sampling import sample_across_ranks
from qdistill.export import load_exported, load_noise_correction, read_export_meta
from qdistill.quantizers.corrected_scheduler import NoiseCorrectedScheduler
from qdistill.quantizers.quantize import bits_tag


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp", default="assets/teacher", help="the FP model folder")
    parser.add_argument("--exports", nargs="+", required=True, help="export folders, one column each")
    parser.add_argument("--out", default="docs/grid.png")
    parser.add_argument("--seed", type=int, default=100000)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--mode", default="integer", choices=["simulated", "integer"])
    args = parser.parse_args(argv)

    seeds = range(args.seed, args.seed + args.num_samples)
    scheduler = load_scheduler(args.fp, "ddim")
    columns = [sample_across_ranks(load_denoiser(args.fp).eval(), scheduler, seeds, args.steps, 16, desc="FP")]
    names = ["FP"]
    for path in args.exports:
        meta = read_export_meta(path)
        correction = load_noise_correction(path)
        base = load_scheduler(args.fp, "ddim") if correction is None else \
            NoiseCorrectedScheduler(load_scheduler(args.fp, "ddim"), correction)
        columns.append(sample_across_ranks(load_exported(path, args.mode), base, seeds, args.steps, 16, desc=path))
        names.append(bits_tag(meta["quant_config"]["weight_bits"], meta["quant_config"]["act_bits"]))
    grid = save_grid([from_uint8(c) for c in columns], args.out, nrow=4)
    print(f"wrote {grid}: {' | '.join(names)}, seeds {args.seed}..{args.seed + args.num_samples - 1}, "
          f"DDIM {args.steps} steps, {args.mode} kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
