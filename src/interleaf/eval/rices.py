"""RICES (Yang et al., 2022; OpenFlamingo): demonstrations chosen by the similarity of their
image embeddings to the query's, the most similar placed last (closest to the query).

Embeddings come from the model's own vision encoder (patch features, mean-pooled,
L2-normalised) or from any ``encode(images) -> (N, D)`` given, e.g. a CLIP image tower; they
are cached on disk, keyed by the images' bytes and the encoder's name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from interleaf.eval.task import Example


class Rices:
    def __init__(
        self,
        encode: Callable[[list], torch.Tensor],
        *,
        name: str,
        cache_dir: str | Path | None = None,
        batch_size: int = 32,
    ):
        self.encode, self.name, self.batch_size = encode, name, batch_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    @classmethod
    def from_model(cls, model, processor, **kwargs) -> Rices:
        """Embeddings from the Flamingo's own (frozen) vision encoder."""

        @torch.no_grad()
        def encode(images: list) -> torch.Tensor:
            device = next(model.parameters()).device
            pixels = processor.preprocess_images(images).to(device, model.dtype)
            return model.vision(pixels).float().mean(dim=1).cpu()

        return cls(encode, name=f"vision-{model.config.vision.source or 'model'}", **kwargs)

    def embed(self, examples: Sequence[Example]) -> torch.Tensor:
        """(N, D) unit-norm embeddings, cached on disk when a cache directory is set."""
        key = hashlib.sha256(self.name.encode())
        for ex in examples:
            key.update(hashlib.sha256(ex.image.data or (ex.image.path or "").encode()).digest())
        cache = self.cache_dir / f"rices-{key.hexdigest()[:20]}.pt" if self.cache_dir else None
        if cache is not None and cache.exists():
            return torch.load(cache)
        chunks = []
        for start in range(0, len(examples), self.batch_size):
            images = [ex.image.load() for ex in examples[start : start + self.batch_size]]
            chunks.append(torch.nn.functional.normalize(self.encode(images), dim=-1))
        embeddings = torch.cat(chunks)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(embeddings, cache)
        return embeddings

    def rank(self, queries: Sequence[Example], support: Sequence[Example]) -> list[list[int]]:
        """For each query, the support indices from most to least similar (the query's own
        image, if it is in the support set, excluded by id)."""
        sims = self.embed(queries) @ self.embed(support).T
        ids = [s.id for s in support]
        order = sims.argsort(dim=-1, descending=True).tolist()
        return [[j for j in row if ids[j] != q.id] for q, row in zip(queries, order)]
