"""Train the bench classifier whose penultimate features define the bench Fréchet distance (FD).

    python scripts/train_classifier.py --config classifier.yaml [key=value ...]

Writes the weights, their config and the test split's feature statistics to `out`, and prints the test
accuracy and the train-vs-test FD (the floor any generator is measured against).
"""
import sys

from qdistill.bench.train_classifier import main

sys.exit(main())
