"""Recording runs of other trainers with :class:`gradlight.GradientFlowRecorder`.

* :mod:`gradlight.integrations.huggingface`: a ``transformers.TrainerCallback``.
* :mod:`gradlight.integrations.ultralytics`: a ``DetectionTrainer`` that records any ``YOLO(...).train(...)``.

Each module imports its trainer's package only when it is imported itself; the packages stay optional.
"""
