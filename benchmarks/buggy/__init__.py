"""Published benchmarks of buggy training programs, re-implemented in PyTorch (issue 24).

Modules:

* :mod:`benchmarks.buggy.data`: the data sets, generated offline the way the original programs build or
  load them (synthetic stand-ins where the original downloads MNIST / CIFAR-10 / a CSV);
* :mod:`benchmarks.buggy.programs`: the programs as data: each buggy program with its fault class, the
  finding kinds that count as detecting it, and its correct twin;
* :mod:`benchmarks.buggy.runner`: one plain PyTorch training loop with an observer attached (gradlight's
  :class:`~gradlight.GradientFlowRecorder`, a competitor library, or nothing);
* :mod:`benchmarks.buggy.published`: the detection figures the papers published, with their sources.

``python -m benchmarks.buggy_programs`` is the command line; ``python -m benchmarks.competitors`` runs a
subset with each competing library.
"""
