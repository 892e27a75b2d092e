"""interleaf: Flamingo-style vision-language models over any Hugging Face LM and vision encoder."""

from interleaf.config import FlamingoConfig
from interleaf.model.flamingo import Flamingo

__all__ = ["Flamingo", "FlamingoConfig", "Processor"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Processor":
        from interleaf.processing import Processor

        return Processor
    raise AttributeError(f"module 'interleaf' has no attribute {name!r}")
