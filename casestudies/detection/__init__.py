"""Case study: vanishing gradients in ablated Ultralytics YOLO detectors, trained in Lightning."""

from casestudies.detection import offline as _offline  # first: sets the environment before ultralytics loads

_offline.configure_offline()
