"""The embedded default dataset: a small synthetic VisA-format dataset generated on the fly.

Three objects, one per VisA domain: ``pcb_synth`` (complex structure), ``capsules_synth``
(multiple instances) and ``cashew_synth`` (single instance), each with several named defect
types and pixel-exact class-id masks. See docs/synth.md.

    >>> from spotdiff.data.synth import generate
    >>> root = generate("data/synth", seed=0, scale=0.2)   # doctest: +SKIP
"""

from ._base import RenderedSample, SynthObject, render_sample
from .dataset import MARKER, OBJECTS, SPLITS, SYNTH_VERSION, VISA_FRAME, generate, image_counts, split_assignment

__all__ = [
    "MARKER",
    "OBJECTS",
    "SPLITS",
    "SYNTH_VERSION",
    "VISA_FRAME",
    "RenderedSample",
    "SynthObject",
    "generate",
    "image_counts",
    "render_sample",
    "split_assignment",
]
