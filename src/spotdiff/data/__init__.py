"""Datasets (VisA raw layout, MVTec-AD, synthetic VisA-format), splits and image I/O."""
