"""Quality of a model on the bench: FD of N DDIM samples to the Fashion-MNIST test split (bench classifier
features), the classifier's label distribution over them, and a sample grid. The model is a diffusers
folder (the FP teacher) or a quantized folder written by qdistill train / qdistill quantize (sampled
with its source model's scheduler).

    python -m qdistill.bench.score --model assets/teacher --num-samples 1000 --steps 50 --floor-draws 5 \
        --out assets/teacher_record.json --grid assets/teacher_samples.png
    python -m qdistill.bench.score --model runs/dilatequant-w4a4/quantized --out runs/dilatequant-w4a4/bench.json
    python -m qdistill.bench.score --model assets/dit-teacher --num-samples 1000 --out assets/dit_teacher_record.json \
        --grid assets/dit_teacher_samples.png      # class-conditional: each seed samples label seed % 10
"""
import argparse
import json
import sys
import time
from pathlib import Path

from qdistill.data.model_folder import ModelFolderError, load_denoiser, load_scheduler
from qdistill.bench.quality import fd_floor, sample_images
from qdistill.evaluation.classifier_fd import classifier_quality
from qdistill.evaluation.fidelity import save_grid
from qdistill.errors import CheckpointError
from qdistill.export import load_quantized
from qdistill.export.quantized import META_FILE
from qdistill.files import atomic_write_text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/teacher")
    parser.add_argument("--classifier", default="assets/classifier")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=100_000)
    parser.add_argument("--out", default=None, help="write the record as JSON here")
    parser.add_argument("--grid", default=None, help="write a grid of the first 64 samples here")
    parser.add_argument("--floor-draws", type=int, default=0,
                        help="also score real images: the train split, and this many sets of num-samples train images")
    args = parser.parse_args(argv)
    try:
        meta = Path(args.model) / META_FILE
        if meta.is_file():  # a quantized model: its own class, sampled with its source model's scheduler
            unet = load_quantized(args.model).eval()
            scheduler = load_scheduler(json.loads(meta.read_text())["source_model"], "ddim")
        else:
            unet = load_denoiser(args.model).eval()
            scheduler = load_scheduler(args.model, "ddim")
    except (ModelFolderError, CheckpointError, KeyError, OSError) as e:
        print(f"qdistill: error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    images = sample_images(unet, scheduler, range(args.seed, args.seed + args.num_samples), args.steps)
    record = {"model": args.model, "num_samples": args.num_samples, "sampler": f"DDIM {args.steps} steps eta=0",
              "seeds": [args.seed, args.seed + args.num_samples], "sampling_seconds": round(time.time() - t0, 1),
              **classifier_quality(images, args.classifier)}
    if args.floor_draws:
        record["floor"] = fd_floor(args.classifier, args.num_samples, args.floor_draws)
    print(json.dumps(record, indent=2))
    if args.out:
        atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    if args.grid:
        save_grid([images[:64]], args.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
