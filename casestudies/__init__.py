"""Case studies that use gradlight on real models."""
