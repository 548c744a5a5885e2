"""Export a quantized run (scripts/train.py or scripts/quantize.py) as a PTQ-ready folder with packed
integer weights, and report its size.

    python scripts/export.py --run runs/dilatequant-w4a4 --out runs/dilatequant-w4a4/export

RUN/quantized (the run's quantized model) is read; OUT is written atomically (see export/folder.py for
its layout). Load it back with `qdistill.export.load_exported(OUT, mode="simulated" | "integer")`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qdistill.data.model_folder import ModelFolderError, load_scheduler
from qdistill.export import ExportError, export_model
from qdistill.trainer.checkpoint import META_FILE, CheckpointError, load_quantized


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run folder (holding quantized/) or a quantized folder")
    parser.add_argument("--out", required=True, help="the export folder to write")
    args = parser.parse_args(argv)
    run = Path(args.run)
    qdir = run / "quantized" if (run / "quantized" / META_FILE).is_file() else run
    try:
        if not (qdir / META_FILE).is_file():
            raise CheckpointError(f"{run} holds no quantized model ({run / 'quantized' / META_FILE} not found)")
        meta = json.loads((qdir / META_FILE).read_text())
        model = load_quantized(qdir)
        scheduler_config = None
        if meta.get("source_model"):
            try:
                scheduler_config = dict(load_scheduler(meta["source_model"]).config)
            except ModelFolderError as e:
                print(f"[export] note: no scheduler copied ({e})", file=sys.stderr)
        size = export_model(model, args.out, recipe=meta.get("recipe", "unknown"),
                            source_model=meta.get("source_model"), source_model_hash=meta.get("source_model_hash"),
                            scheduler_config=scheduler_config, extra={"run": str(run)})
    except (CheckpointError, ExportError, OSError, ValueError) as e:
        print(f"qdistill: error: {e}", file=sys.stderr)
        return 2
    cfg = meta["quant_config"]
    print(f"[export] {meta.get('recipe')} W{cfg['weight_bits']}A{cfg['act_bits']} → {args.out}")
    print(f"[export] quantized layers: {size['quantized_layers_packed_bytes'] / 1024:.1f} KiB packed vs "
          f"{size['quantized_layers_fp32_bytes'] / 1024:.1f} KiB FP32 ({size['quantized_layers_ratio']:.3f}×); "
          f"file {size['file_bytes'] / 1024:.1f} KiB vs FP32 model {size['fp32_model_bytes'] / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
