"""Case study: vanishing gradients in ablated Ultralytics YOLO detectors, trained in Lightning.

Importing this package (or any module in it) changes no global state. Ultralytics opens network connections
unless it is configured first: entry points (``python -m casestudies.detection``, the grid) call
:func:`casestudies.detection.offline.configure_offline` before anything imports ``ultralytics``; do the same
in a notebook or script::

    from casestudies.detection.offline import configure_offline

    configure_offline()
    from casestudies.detection.module import DetectorModule
"""
