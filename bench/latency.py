"""UNet forward latency and sampling wall time: FP32 (NCHW and channels_last) vs `simulated` vs `integer`
exports (and with --compile, torch.compile; with --onnx, ONNX Runtime on FP32 and QDQ graphs), and bytes on disk
of FP32, W8 and W4 exports.

    python -m qdistill.bench.latency --threads 2 --out runs/bench_latency.json          # the bench teacher
    python -m qdistill.bench.unet_shapes ddpm-cifar10 runs/ddpm-cifar10-shape            # 35.7M, random weights
    python -m qdistill.bench.latency --model runs/ddpm-cifar10-shape --batches 1 4 16 --no-simulated

The exports are built here from the model (RTN ranges calibrated on 8 DDIM trajectories: latency does not
depend on the quality of the ranges). Each timing is the median of `--repeats` rounds; within a round the
models run back to back, so load changes on the machine hit all of them alike. "FP32 channels_last" is the FP
model in integer mode's memory layout, which is faster than NCHW on some shapes: the fair FP32 baseline is the
faster of the two.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from qdistill.data.model_folder import load_denoiser, load_scheduler, resolve
from qdistill.data.trajectories import latent_shape, record_trajectories, uniform_steps
from qdistill.evaluation.sampling import sample_batch
from qdistill.export import EXPORT_FILE, OnnxDenoiser, export_model, export_onnx, load_exported
from qdistill.export.onnx_qdq import export_fp_onnx
from qdistill.quantizers import QuantConfig, fit_ranges_, quantize_
from qdistill.quantizers.integer_layers import IntegerLayer, channels_last_inputs
from qdistill.files import atomic_write_text


def timed(fn, warmup: int = 2, iters: int = 5) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
    return (time.perf_counter() - t0) / iters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="assets/teacher")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--bits", nargs="+", default=["W8A8", "W4A8"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sampling-batch", type=int, default=64)
    p.add_argument("--sampling-steps", type=int, default=50)
    p.add_argument("--out", default="runs/bench_latency.json")
    p.add_argument("--no-simulated", action="store_true", help="skip the simulated exports (slow, not a deployment)")
    p.add_argument("--compile", action="store_true",
                   help="also FP32 and the integer exports through torch.compile (compile time reported)")
    p.add_argument("--onnx", action="store_true",
                   help="also ONNX Runtime: FP32 (the diffusers model's graph) and the exports' QDQ graphs (one group)")
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler's top operators of each model's forward at the largest batch")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # the integer mode's note on attention is expected here
    fp = load_denoiser(args.model).eval()
    scheduler = load_scheduler(args.model, "ddim")
    _, records = record_trajectories(fp, scheduler, range(8), 50, 8, keep_steps=uniform_steps(50, 5))
    calib = [{"sample": r.sample, "timestep": r.timestep} for r in records]
    unet_dir, _ = resolve(args.model)
    sizes = {"fp32_unet_file_bytes": sum(f.stat().st_size for f in unet_dir.glob("*.safetensors"))}
    fp_nhwc = copy.deepcopy(fp).to(memory_format=torch.channels_last)  # FP32 in integer mode's layout
    fp_nhwc.register_forward_pre_hook(channels_last_inputs, with_kwargs=True)
    models = {"FP32": fp, "FP32 channels_last": fp_nhwc}
    tmp = Path(tempfile.mkdtemp(prefix="qdistill-latency-"))
    for bits in args.bits:
        wb, ab = int(bits[1]), int(bits[3])
        q = fit_ranges_(quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=wb, act_bits=ab)), calib)
        size = export_model(q, tmp / bits, recipe="rtn")
        sizes[bits] = {"export_file_bytes": (tmp / bits / EXPORT_FILE).stat().st_size, **size}
        if not args.no_simulated:
            models[f"{bits} simulated"] = load_exported(tmp / bits, "simulated")
        models[f"{bits} integer"] = load_exported(tmp / bits, "integer")
        if args.compile:
            models[f"{bits} integer compiled"] = load_exported(tmp / bits, "integer", compile=True)
    if args.compile:
        models["FP32 compiled"] = torch.compile(copy.deepcopy(fp))
    if args.onnx:  # ONNX Runtime's CPU provider, same threads
        export_fp_onnx(copy.deepcopy(fp), tmp / "fp-onnx")
        models["FP32 ORT"] = OnnxDenoiser(tmp / "fp-onnx", threads=args.threads)
        for bits in args.bits:
            export_onnx(tmp / bits, 1)
            models[f"{bits} ORT QDQ"] = OnnxDenoiser(tmp / bits / "onnx", threads=args.threads)
    print(f"[latency] {args.threads} threads; models: {', '.join(models)}")

    forward, compile_seconds = {}, {}
    for batch in args.batches:
        x = torch.randn(batch, *latent_shape(fp), generator=torch.Generator().manual_seed(0))
        t = torch.full((batch,), 500.0)
        rounds = {name: [] for name in models}
        for name, m in models.items():  # the first call of a compiled model compiles (per batch size)
            if "compiled" in name:
                t0 = time.perf_counter()
                with torch.no_grad():
                    m(x, t)
                compile_seconds.setdefault(name, {})[batch] = round(time.perf_counter() - t0, 1)
                print(f"[latency] {name}: first call at batch {batch} (compilation) {time.perf_counter() - t0:.1f} s")
        for _ in range(args.repeats):
            for name, m in models.items():
                rounds[name].append(timed(lambda: m(x, t)))
        forward[batch] = {name: statistics.median(v) * 1000 for name, v in rounds.items()}
        line = ", ".join(f"{n} {ms:.1f} ms" for n, ms in forward[batch].items())
        print(f"[latency] UNet forward, batch {batch}: {line}")

    # The quantized layers alone, on their real inputs at the largest batch: FP32 layer vs IntegerLayer
    # (activation quantization and zero-point correction included).
    layers = {}
    batch = max(args.batches)
    x = torch.randn(batch, *latent_shape(fp), generator=torch.Generator().manual_seed(0))
    t = torch.full((batch,), 500.0)
    for bits in args.bits:
        integer = models[f"{bits} integer"]
        inputs = {}
        hooks = [m.register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0]))
                 for n, m in integer.named_modules() if isinstance(m, IntegerLayer)]
        with torch.no_grad():
            integer(x, t)
        for h in hooks:
            h.remove()
        fp_ms = int_ms = 0.0
        for name, x_in in inputs.items():
            fp_layer, int_layer = fp.get_submodule(name), integer.get_submodule(name)
            x_fp = x_in.contiguous()  # the FP model's layers see NCHW tensors
            fp_ms += statistics.median(timed(lambda: fp_layer(x_fp)) for _ in range(args.repeats)) * 1000
            int_ms += statistics.median(timed(lambda: int_layer(x_in)) for _ in range(args.repeats)) * 1000
        layers[bits] = {"layers": len(inputs), "fp32_ms": fp_ms, "integer_ms": int_ms, "speedup": fp_ms / int_ms}
        print(f"[latency] {len(inputs)} quantized layers alone, batch {batch}: FP32 {fp_ms:.1f} ms, "
              f"{bits} integer {int_ms:.1f} ms ({fp_ms / int_ms:.2f}×)")

    if args.profile:  # where each model's forward spends its time (self CPU time per operator)
        from torch.profiler import ProfilerActivity, profile
        for name, m in models.items():
            if isinstance(m, OnnxDenoiser):
                continue  # ORT's own kernels: torch.profiler does not see them
            with torch.no_grad():
                m(x, t)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(args.repeats):
                        m(x, t)
            print(f"[latency] profile of {name}, batch {batch}, {args.repeats} forwards:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))

    sampling = {}
    seeds = list(range(args.sampling_batch))
    for name, m in models.items() if args.sampling_steps else ():  # --sampling-steps 0: no sampling
        t0 = time.perf_counter()  # compiled models: compiles again at this batch size unless timed at it above
        sample_batch(m, scheduler, seeds, args.sampling_steps)
        sampling[name] = time.perf_counter() - t0
        print(f"[latency] DDIM {args.sampling_steps} steps, batch {args.sampling_batch}: {name} {sampling[name]:.2f} s")
    result = {"threads": args.threads, "cpu": torch.backends.cpu.get_cpu_capability(),
              "forward_ms": forward, "compile_seconds": compile_seconds, "layers_alone": layers, "sampling_seconds": sampling, "sizes": sizes,
              "speedup_vs_fp32": {b: {n: forward[b]["FP32"] / ms for n, ms in v.items()} for b, v in forward.items()},
              "speedup_vs_best_fp32": {b: {n: min(ms for k, ms in v.items() if k.startswith("FP32")) / ms
                                           for n, ms in v.items()} for b, v in forward.items()}}
    atomic_write_text(args.out, json.dumps(result, indent=2))
    for b in args.batches:
        for key, label in (("speedup_vs_fp32", "FP32 (NCHW)"), ("speedup_vs_best_fp32", "the fastest FP32")):
            print(f"[latency] batch {b} speed-up vs {label}: " +
                  ", ".join(f"{n} {s:.2f}×" for n, s in result[key][b].items() if not n.startswith("FP32")))
    print(f"[latency] sizes: FP32 unet {sizes['fp32_unet_file_bytes'] / 1024:.0f} KiB; " +
          ", ".join(f"{b} export {sizes[b]['export_file_bytes'] / 1024:.0f} KiB" for b in args.bits))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
