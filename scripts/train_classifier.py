"""Train the bench classifier whose penultimate features define the bench Fréchet distance (FD).

    python scripts/train_classifier.py --config configs/classifier.yaml [key=value ...]

Writes the weights, their config and the test split's feature statistics to `out`, and prints the test
accuracy and the train-vs-test FD (the floor any generator is measured against).
"""
import argparse
import json
import sys

from qdistill.configs import ConfigError, load_config
from qdistill.data.fashion_mnist import DatasetMissingError
from qdistill.trainer.classifier import ClassifierConfig, train_classifier


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(ClassifierConfig, args.config, args.overrides)
        result = train_classifier(cfg)
    except (ConfigError, DatasetMissingError) as e:
        print(f"qdistill: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
