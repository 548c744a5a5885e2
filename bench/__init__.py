"""The bench: the project's own reference model and metric, apart from the product. A DDPM `UNet2DModel`
trained on Fashion-MNIST (bench/teacher, shipped, with its record) and a small classifier whose penultimate
features define the bench Fréchet distance (bench/classifier, shipped), with the code that trained them
(train_teacher.py, train_classifier.py) and the bench FD (quality.py). DESIGN.md §6; docs/bench.md."""
