"""Choose the low-rank branch's rank and the weight group size on calibration data, before any training.

    python -m qdistill.bench.outliers [--bits W4A4 W4A8 W8A8] [--ranks 0 2 4 8] [--groups 0 8 16] [--seeds 0 1]

For every (bits, rank, group size) the bench teacher is quantized as the dilatequant recipe starts (Weight
Dilation, per-timestep activation tables, MSE ranges; `quant.low_rank`, `quant.weight_group_size`), its activation
tables calibrated on the first half of the calibration shards, and its noise-prediction MSE against FP measured on
rows of the other half (other trajectories, so held out; not the benchmark's seeds). Per row: that MSE relative to
the plain model's, bit-operations relative to FP (the branch's float MACs at 32 × 32 bits) and the export's bytes.
Each setting runs once per seed (the seed draws the activation-range subsample): the spread of the plain model's
MSE over seeds is the noise floor printed with the table.

    python -m qdistill.bench.outliers --cost-only --shape ddpm-cifar10 [--ranks 0 8 16 32]

gives only the bit-operations of the branch on a realistic-width UNet built from random weights
(qdistill.bench.unet_shapes; random weights have no outliers, so no error is measured there).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from qdistill.data.calibration_set import load_shard_list
from qdistill.data.model_folder import load_denoiser, model_hash
from qdistill.export import export_model
from qdistill.quantizers import QuantConfig, fit_ranges_, quantize_
from qdistill.cost import FP_BITS, layer_macs, rule_bit_operations
from qdistill.data.calibration_set import strided_batches
from qdistill.quantizers.layer_precision import assign_layer_bits
from qdistill.quantizers.mixed_precision import bit_operations


@torch.no_grad()
def held_out_mse(fp_outputs: list[torch.Tensor], model, batches) -> float:
    errors = [(model(**kw).sample - ref).pow(2).mean().item() for kw, ref in zip(batches, fp_outputs)]
    return sum(errors) / len(errors)


@torch.no_grad()
def branch_cost(shape: str, ranks: list[int], bits: list[str]) -> str:
    """Bit-operations relative to FP of a realistic-width UNet per bits and rank (the branch at 32 × 32 bits)."""
    import diffusers

    from qdistill.model_shapes import SHAPES
    from qdistill.quantizers.low_rank import branch_macs, layer_rank

    cls, config = SHAPES[shape]
    model = getattr(diffusers, cls)(**config).eval()
    c, s = model.config.in_channels, model.config.sample_size
    kw = {"sample": torch.zeros(1, c, s, s), "timestep": torch.tensor([500.0])}
    if "cross_attention_dim" in config:
        kw["encoder_hidden_states"] = torch.zeros(1, 77, config["cross_attention_dim"])
    if config.get("addition_embed_type") == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, 1280), "time_ids": torch.zeros(1, 6)}
    macs = layer_macs(model, kw)
    fp_bops = sum(macs.values()) * FP_BITS * FP_BITS
    lines = [f"{shape} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), BOPs vs FP:", "",
             "| bits | " + " | ".join(f"rank {r}" if r else "no branch" for r in ranks) + " |",
             "|---|" + "---|" * len(ranks)]
    for b in bits:
        config_bits = QuantConfig(weight_bits=int(b[1]), act_bits=int(b[3]))
        layer_bits = assign_layer_bits(model, config_bits)
        base = rule_bit_operations(macs, layer_bits)
        cells = []
        for r in ranks:
            extra = sum(branch_macs(n, m.weight, layer_rank(r, m.weight, getattr(m, "groups", 1)))
                        for name, n in macs.items() if layer_bits[name] is not None
                        for m in [model.get_submodule(name)])
            cells.append(f"{(base + extra * FP_BITS * FP_BITS) / fp_bops:.4f}")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/teacher")
    parser.add_argument("--trajectories", default="runs/trajectories")
    parser.add_argument("--bits", nargs="+", default=["W4A4", "W4A8", "W8A8"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[0, 2, 4, 8])
    parser.add_argument("--groups", nargs="+", type=int, default=[0, 8, 16])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--init-rows", type=int, default=256)
    parser.add_argument("--rows", type=int, default=512, help="held-out rows the MSE is measured on")
    parser.add_argument("--out", default="runs/bench-outliers.json")
    parser.add_argument("--cost-only", action="store_true", help="only the branch's bit-operations on --shape")
    parser.add_argument("--shape", default="ddpm-cifar10", help="a qdistill.bench.unet_shapes model, for --cost-only")
    args = parser.parse_args(argv)
    if args.cost_only:
        print(branch_cost(args.shape, args.ranks, args.bits))
        return 0

    fp = load_denoiser(args.model).eval()
    shards = load_shard_list(args.trajectories, model_hash(args.model))
    if len(shards) < 2:
        raise SystemExit(f"{args.trajectories}: needs at least 2 shards (one half calibrates, the other is held out)")
    half = len(shards) // 2
    held = list(strided_batches(shards[half:], args.rows, 64, "cpu"))
    with torch.no_grad():
        fp_outputs = [fp(**kw).sample for kw in held]
    macs = layer_macs(fp, held[0])
    t = float(held[0]["timestep"].reshape(-1)[0])
    fp_bops = sum(macs.values()) * FP_BITS * FP_BITS
    results = []
    for bits in args.bits:
        wb, ab = int(bits[1]), int(bits[3])
        for rank in args.ranks:
            for group in args.groups:
                if group and wb > 4:
                    continue  # group-wise applies to weights of 4 bits or fewer
                config = QuantConfig(weight_bits=wb, act_bits=ab, low_rank=rank, weight_group_size=group)
                mses, t0 = [], time.time()
                for seed in args.seeds:
                    torch.manual_seed(seed)
                    q = quantize_(copy.deepcopy(fp), config)
                    fit_ranges_(q, strided_batches(shards[:half], args.init_rows, 64, "cpu"))
                    mses.append(held_out_mse(fp_outputs, q.eval(), held))
                with tempfile.TemporaryDirectory() as d:
                    size = export_model(q, Path(d) / "e", recipe="bench-outliers")
                row = {"bits": bits, "low_rank": rank, "group_size": group, "mse": mses,
                       "mse_mean": statistics.fmean(mses), "relative_bops": bit_operations(q, macs, t) / fp_bops,
                       "export_bytes": size["file_bytes"], "seconds": round(time.time() - t0, 1)}
                results.append(row)
                print(f"{bits} rank {rank} group {group}: MSE {row['mse_mean']:.4e} ({', '.join(f'{m:.4e}' for m in mses)}), "
                      f"BOPs {row['relative_bops']:.4f}, {size['file_bytes'] / 1024:.0f} KiB", flush=True)

    lines = ["| bits | low rank | group size | held-out MSE (mean over seeds) | vs plain | BOPs vs FP | export (KiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        plain = next(p for p in results if p["bits"] == r["bits"] and p["low_rank"] == 0 and p["group_size"] == 0)
        lines.append(f"| {r['bits']} | {r['low_rank'] or '—'} | {r['group_size'] or '—'} | {r['mse_mean']:.4e} | "
                     f"{100 * (r['mse_mean'] / plain['mse_mean'] - 1):+.1f} % | {r['relative_bops']:.4f} | "
                     f"{r['export_bytes'] / 1024:.0f} |")
    for bits in args.bits:
        plain = next(p for p in results if p["bits"] == bits and p["low_rank"] == 0 and p["group_size"] == 0)
        spread = (max(plain["mse"]) - min(plain["mse"])) / plain["mse_mean"]
        lines.append(f"\nNoise floor {bits}: the plain model's MSE moves by {100 * spread:.1f} % between seeds "
                     f"{args.seeds} (the activation-range subsample).")
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": results, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
