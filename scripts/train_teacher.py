"""Train the bench teacher: an unconditional DDPM on Fashion-MNIST (32×32, EMA weights).

    python scripts/train_teacher.py --config teacher.yaml [key=value ...]

Resumable: run the same command again and it continues from OUT/checkpoint.pt. Logs to OUT/tb.
The finished pipeline (EMA weights) is written with save_pretrained to `export`.
"""
import sys

from qdistill.bench.train_teacher import main

sys.exit(main())
