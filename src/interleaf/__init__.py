"""interleaf: Flamingo-style vision-language models over any Hugging Face LM and vision encoder."""

from interleaf.config import FlamingoConfig
from interleaf.model.flamingo import Flamingo
from interleaf.processing import Processor

# Registers the IDEFICS and OpenFlamingo converters with interleaf.hub, so that the loaders above
# accept upstream directories and hub ids (the converters sit above the model in the import layers).
from interleaf import convert  # noqa: F401  isort: skip

__all__ = ["Flamingo", "FlamingoConfig", "Processor"]
__version__ = "0.1.0"
