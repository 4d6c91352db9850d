"""The diagnosis zoo: real architectures, healthy and broken on purpose, to score gradlight's diagnosis.

Modules:

* :mod:`zoo.tasks`: synthetic data sets with a learnable signal and the loss of each model family;
* :mod:`zoo.models`: config-built architectures from torchvision, timm, Hugging Face transformers,
  Lightning's demos, recurrent nets and Ultralytics (no downloads);
* :mod:`zoo.faults`: ways to break a model at a known layer and step (hooks, inits, activations);
* :mod:`zoo.catalog`: the runs as data (:class:`~zoo.catalog.ZooRun`) with their expectation;
* :mod:`zoo.scoring`: the verdict of one run's findings against its expectation;
* :mod:`zoo.runner`: trains one run with the monitor in a Lightning ``Trainer`` and checks that a healthy
  run trains and a broken run is broken the way its expectation says.

``benchmarks/diagnosis_zoo.py`` is the command line.
"""
