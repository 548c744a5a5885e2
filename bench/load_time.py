"""Loading a saved quantized model and its export, as the loaders are now against as they were before c6b2d4d
(when both initialised the model's weights at random and re-ran quantize_'s Weight Dilation and 80-candidate
weight-range search, all of it then replaced by the loaded state), side by side in one process.

    python -m qdistill.bench.load_time --quantized RUN/quantized [--out runs/load-time] [--repeats 3]

The quantized folder is any `train` or `quantize` result; `python -m qdistill.bench.plan_check` leaves one of
the 35.7M-parameter DDPM-CIFAR10 shape in runs/plan-check/run/quantized. The export is written once to OUT/export.
"Before" runs the same loaders with diffusers' random init and quantize_'s init_weights put back: the old code
path (its search as fast as today's, which c6b2d4d made 15-20x faster on small layers: a conservative before).
Median of `--repeats` runs each; writes OUT/load_time.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path


@contextlib.contextmanager
def loaders_as_before():
    """The loaders as they were: the model built with its random init, then quantize_ with Weight Dilation and
    the weight-range search."""
    from diffusers.models import modeling_utils

    from qdistill.export import packed, quantized

    saved = packed.quantize_, quantized.quantize_, modeling_utils.no_init_weights

    def old_quantize_(model, config=None, *, init_weights=True):
        return saved[0](model, config)

    packed.quantize_ = quantized.quantize_ = old_quantize_
    modeling_utils.no_init_weights = contextlib.nullcontext
    try:
        yield
    finally:
        packed.quantize_, quantized.quantize_, modeling_utils.no_init_weights = saved


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantized", required=True)
    parser.add_argument("--out", default="runs/load-time")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    from qdistill.export import export_model, load_exported, load_quantized

    torch.set_num_threads(2)
    out = Path(args.out)
    export = out / "export"
    model = load_quantized(args.quantized)
    params = sum(p.numel() for p in model.parameters())
    if not (export / "quant_config.json").is_file():
        export_model(model, export, recipe="load-time benchmark")
    result = {"quantized": args.quantized, "parameters": params, "repeats": args.repeats}
    for name, load in (("load_quantized", lambda: load_quantized(args.quantized)),
                       ("load_exported", lambda: load_exported(export, "simulated"))):
        now = timed(load, args.repeats)
        with loaders_as_before():
            before = timed(load, args.repeats)
        result[name] = {"now_s": round(now, 3), "before_s": round(before, 3), "ratio": round(now / before, 3)}
    # the two loads give the same model either way: the state replaces what the search computed
    with loaders_as_before():
        old = load_quantized(args.quantized).state_dict()
    new = load_quantized(args.quantized).state_dict()
    result["same_state"] = all(torch.equal(old[k], new[k]) for k in new)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load_time.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
