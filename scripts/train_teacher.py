"""Train the bench teacher: an unconditional DDPM on Fashion-MNIST (32×32, EMA weights).

    python scripts/train_teacher.py --config configs/teacher.yaml [key=value ...]

Resumable: run the same command again and it continues from OUT/checkpoint.pt. Logs to OUT/tb.
The finished pipeline (EMA weights) is written with save_pretrained to `export`.
"""
import argparse
import sys

from qdistill.configs import ConfigError, load_config
from qdistill.data.fashion_mnist import DatasetMissingError
from qdistill.trainer.teacher import TeacherConfig, train_teacher


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(TeacherConfig, args.config, args.overrides)
        path = train_teacher(cfg)
    except (ConfigError, DatasetMissingError, ValueError, OSError) as e:
        print(f"qdistill: error: {e}", file=sys.stderr)
        return 2
    print(f"[teacher] saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
