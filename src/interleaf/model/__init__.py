"""Model components; :class:`Flamingo` assembles them."""

from interleaf.model.flamingo import Flamingo, FlamingoOutput, Media
from interleaf.model.resampler import PerceiverResampler
from interleaf.model.xattn import GatedCrossAttentionBlock, MediaKV

__all__ = ["Flamingo", "FlamingoOutput", "GatedCrossAttentionBlock", "Media", "MediaKV", "PerceiverResampler"]
