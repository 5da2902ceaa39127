"""The optional packages the video and audio tests need, checked before any work.

The SDK itself needs grpcio and protobuf only, so the media builders (`frames`, `video`,
`audio`) import NumPy, Pillow, imageio-ffmpeg and soundfile at their top and are imported only
once `check` has passed: `ringserve niah --modality text` never loads them.
"""

from __future__ import annotations

import importlib

EXTRA = "pip install 'ringserve-client[niah]'"

# modality -> (import name, pip name) of what building its haystack needs
NEEDS = {
    "video": (("numpy", "numpy"), ("PIL", "pillow"), ("imageio_ffmpeg", "imageio-ffmpeg")),
    "audio": (("numpy", "numpy"), ("imageio_ffmpeg", "imageio-ffmpeg"),
              ("soundfile", "soundfile")),
}


class MissingDependency(RuntimeError):
    """A package the media haystacks need is not installed; the message says how to get it."""


def missing(modality: str) -> list[str]:
    """pip names of the packages `modality`'s haystack needs that cannot be imported."""
    absent = []
    for module, pip in NEEDS.get(modality, ()):
        try:
            importlib.import_module(module)
        except ImportError:
            absent.append(pip)
    return absent


def check(modality: str) -> None:
    """Raises MissingDependency naming what to install when `modality` cannot be built here."""
    absent = missing(modality)
    if absent:
        raise MissingDependency(
            f"--modality {modality} builds its haystack with {', '.join(absent)}, not installed: "
            f"{EXTRA} (or pip install {' '.join(absent)})")
