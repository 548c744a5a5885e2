"""The bench tooling: the benchmark harness (benchmark.py), the scripts that trained the shipped bench models in
assets/ (train_teacher.py, train_classifier.py), scoring and grids (score.py, grid.py, quality.py), latency, load
time, memory-plan and GPU checks. Each runs as `python -m qdistill.bench.NAME` and imports the package as a user
would; nothing in the package imports it (tests/test_import_layers.py). docs/bench.md; BENCHMARKS.md."""
