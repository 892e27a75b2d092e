"""interleaf: Flamingo-style vision-language models over any Hugging Face LM and vision encoder."""

from interleaf.config import FlamingoConfig
from interleaf.model.flamingo import Flamingo
from interleaf.processing import Processor

__all__ = ["Flamingo", "FlamingoConfig", "Processor"]
__version__ = "0.1.0"
