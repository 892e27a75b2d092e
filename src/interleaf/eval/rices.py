"""RICES (Yang et al., 2022; OpenFlamingo): demonstrations chosen by the similarity of their
image embeddings to the query's, the most similar placed last (closest to the query).

Embeddings come from the model's own vision encoder (patch features, mean-pooled,
L2-normalised) or from any ``encode(images) -> (N, D)`` given, e.g. a CLIP image tower.

Ranking is a chunked top-k (:func:`top_k_similar`): a block of ``query_chunk`` queries meets a
block of ``support_chunk`` support embeddings at a time, ``torch.topk`` keeps the k best of the
block, and a running merge keeps the k best seen so far. Memory is bounded by the block
(``query_chunk x support_chunk`` float32) and the result (queries x k), not by queries x support.
Equal similarities are ordered by support index, lowest first: the order of a stable descending
argsort of the full matrix, whatever the chunk sizes.

The cache is keyed by image content: one embedding per distinct image (the sha256 of its bytes;
a path's file is read), under a directory named by the encoder. So two paths holding the same
bytes share an entry, a file whose bytes change gets a new one, and a support set that grows or
is reordered encodes only the images not seen before. See :class:`EmbeddingStore`.
"""

from __future__ import annotations

import hashlib
import os
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from interleaf.data.schema import DataError, decode_image
from interleaf.eval.task import Example

FORMAT = "interleaf-rices-1"
_DIGEST = 32  # bytes of a sha256
_FIX_ROWS = 128  # rows of a block whose ties are resolved at once (bounds that memory)


def top_k_similar(
    queries: Tensor,
    support: Tensor,
    k: int,
    *,
    exclude: Tensor | None = None,
    query_chunk: int = 1024,
    support_chunk: int = 16384,
) -> Tensor:
    """(Q, k) support indices per query, by dot product, most similar first.

    ``queries`` (Q, D) and ``support`` (S, D) are embeddings (unit-norm: cosine similarity);
    ``exclude`` is an optional (P, 2) tensor of (query row, support row) pairs never returned.
    Ties go to the lower support index. Memory: one ``query_chunk x support_chunk`` block of
    similarities (allocated once), the matmul's packed copy of one support chunk
    (``support_chunk x D``), and the (Q, k) result; measured in tests/eval/test_rices_scale.py
    and benchmarks/bench_rices.py.
    """
    if queries.ndim != 2 or support.ndim != 2 or queries.shape[1] != support.shape[1]:
        raise ValueError(
            f"RICES: embeddings must be (Q, D) and (S, D), got {tuple(queries.shape)} and {tuple(support.shape)}"
        )
    if query_chunk < 1 or support_chunk < 1:
        raise ValueError(f"RICES: chunk sizes must be >= 1, got {query_chunk} and {support_chunk}")
    n_q, n_s = len(queries), len(support)
    exclude = torch.zeros(0, 2, dtype=torch.long) if exclude is None else exclude.long().reshape(-1, 2).unique(dim=0)
    if len(exclude) and not (exclude.min() >= 0 and exclude[:, 0].max() < n_q and exclude[:, 1].max() < n_s):
        raise ValueError(f"RICES: exclude holds pairs outside {n_q} queries x {n_s} support rows")
    most_excluded = int(torch.bincount(exclude[:, 0], minlength=1).max()) if len(exclude) else 0
    if k < 0 or k > n_s - most_excluded:
        raise ValueError(f"RICES: k={k} but the support set offers {n_s - most_excluded} candidates per query")
    for part in (*queries.split(1024), *support.split(1024)):  # isfinite makes copies: a few rows at a time
        if not bool(part.isfinite().all()):
            raise ValueError("RICES: the embeddings hold NaN or infinite values")
    out = torch.empty(n_q, k, dtype=torch.long)
    if k == 0:
        return out
    support = support.to(queries.dtype)
    buffer = torch.empty(min(query_chunk, n_q) * min(support_chunk, n_s), dtype=queries.dtype)  # the one block
    for q0 in range(0, n_q, query_chunk):
        q1 = min(q0 + query_chunk, n_q)
        pairs = exclude[(exclude[:, 0] >= q0) & (exclude[:, 0] < q1)]
        best: tuple[Tensor, Tensor] | None = None
        for s0 in range(0, n_s, support_chunk):
            s1 = min(s0 + support_chunk, n_s)
            sims = buffer[: (q1 - q0) * (s1 - s0)].view(q1 - q0, s1 - s0)
            torch.mm(queries[q0:q1], support[s0:s1].T, out=sims)  # (q, s)
            here = pairs[(pairs[:, 1] >= s0) & (pairs[:, 1] < s1)]
            sims[here[:, 0] - q0, here[:, 1] - s0] = -torch.inf
            values, indices = _block_top_k(sims, min(k, s1 - s0))
            block = (values, indices + s0)
            best = block if best is None else _merge(best, block, k)
        out[q0:q1] = best[1]
    return out


def _block_top_k(sims: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of each row of ``sims``, ties to the lower column, in that order.

    ``torch.topk`` picks arbitrarily among values equal to the k-th. Taking k + 1 shows where
    such a tie straddles the cut (the (k+1)-th equals the k-th); only those rows are refilled,
    ``_FIX_ROWS`` at a time, with the lowest columns holding the k-th value.
    """
    values, indices = sims.topk(min(k + 1, sims.shape[1]), dim=1)
    if values.shape[1] > k:
        straddling = (values[:, k] == values[:, k - 1]).nonzero().squeeze(1)
        values, indices = values[:, :k], indices[:, :k].clone()
        for rows in straddling.split(_FIX_ROWS):
            indices[rows] = _lowest_tied(sims[rows], values[rows], indices[rows])
    return _order(values, indices)


def _lowest_tied(sims: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    """``indices`` (R, k) of the top ``values`` of ``sims`` (R, n), with the slots holding the
    k-th value refilled by the lowest columns that hold it."""
    k = values.shape[1]
    kth = values[:, -1:]
    above = (values > kth).sum(1)  # the first `above` slots hold larger values: kept
    tie = sims == kth
    place = tie.cumsum(1, dtype=torch.int32)  # 1-based rank of each tied column in its row
    r, col = (tie & (place <= (k - above)[:, None])).nonzero(as_tuple=True)
    fixed = indices.clone()
    fixed[r, above[r] + place[r, col].long() - 1] = col
    return fixed


def _order(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Each row sorted by value, descending, then by index, ascending."""
    by_index = indices.argsort(dim=1)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_value = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, by_value), indices.gather(1, by_value)


def _merge(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor], k: int) -> tuple[Tensor, Tensor]:
    values, indices = _order(torch.cat([a[0], b[0]], dim=1), torch.cat([a[1], b[1]], dim=1))
    return values[:, :k], indices[:, :k]


class EmbeddingStore:
    """Embeddings on disk keyed by image content, for one encoder.

    ``<cache_dir>/rices-<hash of the encoder name>/`` holds shards: safetensors files with
    ``digests`` (n, 32) uint8 (sha256 of each image's bytes) and ``embeddings`` (n, D) float32,
    the encoder's name in their metadata. A shard is written to a temporary file, synced, then
    renamed into place, so a crash leaves whole shards only (and at worst a stray ``.tmp``,
    ignored); there is no separate index to fall out of step: the index (digest -> shard row)
    is the union of the shards' digests. Runs may share a directory; a digest stored twice is
    harmless. An unreadable shard is skipped with a warning (its images are encoded again).
    """

    def __init__(self, cache_dir: str | Path, name: str):
        self.name = name
        self.directory = Path(cache_dir) / f"rices-{hashlib.sha256(name.encode()).hexdigest()[:16]}"

    def shards(self) -> list[Path]:
        return sorted(self.directory.glob("*.safetensors"))

    def get(self, digests: Iterable[bytes]) -> dict[bytes, Tensor]:
        """The stored embedding of each of ``digests`` that has one."""
        wanted, found = set(digests), {}
        for path in self.shards():
            if not wanted:
                break
            try:
                with safe_open(path, framework="pt") as f:
                    if (f.metadata() or {}).get("encoder") != self.name:
                        raise ValueError(f"made by encoder {(f.metadata() or {}).get('encoder')!r}")
                    raw = f.get_tensor("digests").numpy().tobytes()
                    keys = [raw[i : i + _DIGEST] for i in range(0, len(raw), _DIGEST)]
                    rows = [i for i, key in enumerate(keys) if key in wanted]
                    if rows:
                        embeddings = f.get_tensor("embeddings")[rows]
            except (OSError, SafetensorError, ValueError, KeyError, RuntimeError) as e:
                warnings.warn(f"RICES cache: skipping unreadable shard {path}: {e}", stacklevel=2)
                continue
            for row, i in enumerate(rows):
                found[keys[i]] = embeddings[row]
                wanted.discard(keys[i])
        return found

    def put(self, digests: Sequence[bytes], embeddings: Tensor) -> Path:
        """Store one shard of ``embeddings`` (n, D) under ``digests``; returns its path."""
        if len(digests) != len(embeddings):
            raise ValueError(f"RICES cache: {len(digests)} digests for {len(embeddings)} embeddings")
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = save(
            {
                "digests": torch.frombuffer(bytearray(b"".join(digests)), dtype=torch.uint8).reshape(-1, _DIGEST),
                "embeddings": embeddings.detach().to("cpu", torch.float32).contiguous(),
            },
            metadata={"format": FORMAT, "encoder": self.name},
        )
        path = self.directory / f"{hashlib.sha256(b''.join(digests)).hexdigest()[:24]}.safetensors"
        tmp = self.directory / f".{path.name}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


class Rices:
    """Ranks support examples by image similarity to each query.

    ``encode`` maps a list of PIL images to (N, D) embeddings (normalised here); ``name`` names
    the encoder in the cache key; ``cache_dir`` persists embeddings (see :class:`EmbeddingStore`),
    written every ``shard_size`` new images so an interrupted run keeps its progress.
    """

    def __init__(
        self,
        encode: Callable[[list], torch.Tensor],
        *,
        name: str,
        cache_dir: str | Path | None = None,
        batch_size: int = 32,
        shard_size: int = 4096,
        query_chunk: int = 1024,
        support_chunk: int = 16384,
    ):
        sizes = {
            "batch_size": batch_size,
            "shard_size": shard_size,
            "query_chunk": query_chunk,
            "support_chunk": support_chunk,
        }
        for key, value in sizes.items():
            if value < 1:
                raise ValueError(f"RICES: {key} must be >= 1, got {value}")
        self.encode, self.name, self.batch_size, self.shard_size = encode, name, batch_size, shard_size
        self.query_chunk, self.support_chunk = query_chunk, support_chunk
        self.store = EmbeddingStore(cache_dir, name) if cache_dir is not None else None

    @classmethod
    def from_model(cls, model, processor, **kwargs) -> Rices:
        """Embeddings from the Flamingo's own (frozen) vision encoder."""

        @torch.no_grad()
        def encode(images: list) -> torch.Tensor:
            device = next(model.parameters()).device
            pixels = processor.preprocess_images(images).to(device, model.dtype)
            return model.vision(pixels).float().mean(dim=1).cpu()

        name = f"vision-{model.config.vision.source or 'model'}-{str(model.dtype).removeprefix('torch.')}"
        return cls(encode, name=f"{name}-{weights_fingerprint(model.vision)}", **kwargs)

    def embed(self, examples: Sequence[Example]) -> torch.Tensor:
        """(N, D) unit-norm embeddings; each distinct image content is encoded at most once,
        and not at all when the cache holds it."""
        digests = [_digest(ex) for ex in examples]
        first: dict[bytes, Example] = {}  # each distinct content, with its first example
        for digest, ex in zip(digests, examples):
            first.setdefault(digest, ex)
        table = self.store.get(first) if self.store is not None else {}
        missing = [d for d in first if d not in table]
        for start in range(0, len(missing), self.shard_size):
            shard = missing[start : start + self.shard_size]
            embeddings = self._encode([first[d] for d in shard])
            if self.store is not None:
                self.store.put(shard, embeddings)
            table.update(zip(shard, embeddings))
        if not digests:
            return torch.zeros(0, 0)
        dims = {t.shape[-1] for t in table.values()}
        if len(dims) > 1:
            raise ValueError(
                f"RICES: cache {self.store.directory} holds embeddings of another size than encoder {self.name!r} "
                f"gives ({sorted(dims)}); delete it or name the encoder differently"
            )
        return torch.stack([table[d] for d in digests])

    def _encode(self, examples: Sequence[Example]) -> Tensor:
        chunks = []
        for start in range(0, len(examples), self.batch_size):
            batch = examples[start : start + self.batch_size]
            images = [_load(ex) for ex in batch]
            out = self.encode(images)
            if out.ndim != 2 or len(out) != len(batch):
                raise ValueError(f"RICES: encoder {self.name!r} gave shape {tuple(out.shape)} for {len(batch)} images")
            bad = (~out.isfinite().all(dim=1)).nonzero()
            if len(bad):
                raise ValueError(f"RICES: encoder {self.name!r} gave NaN/inf for example {batch[int(bad[0])].id!r}")
            chunks.append(torch.nn.functional.normalize(out.detach().float().cpu(), dim=-1))
        return torch.cat(chunks)

    def rank(self, queries: Sequence[Example], support: Sequence[Example], *, k: int) -> list[list[int]]:
        """For each query, the indices of its ``k`` most similar support examples, most similar
        first; the query's own image, if it is in the support set (same id), is never among them."""
        if k < 0 or k > len(support):
            raise ValueError(f"RICES: k={k} demonstrations asked for, the support set has {len(support)}")
        rows: dict[str, list[int]] = {}
        for j, ex in enumerate(support):
            rows.setdefault(ex.id, []).append(j)
        pairs = [(i, j) for i, q in enumerate(queries) for j in rows.get(q.id, ())]
        for q in queries:
            if k > len(support) - len(rows.get(q.id, ())):
                raise ValueError(
                    f"RICES: query {q.id!r} is in the support set, which leaves {len(support) - len(rows[q.id])} "
                    f"demonstrations for k={k}"
                )
        if k == 0 or not queries:
            return [[] for _ in queries]
        embeddings = self.embed([*queries, *support])  # one pass: a query also in the support is encoded once
        top = top_k_similar(
            embeddings[: len(queries)],
            embeddings[len(queries) :],
            k,
            exclude=torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
            query_chunk=self.query_chunk,
            support_chunk=self.support_chunk,
        )
        return top.tolist()


def _raw(ex: Example) -> bytes:
    if ex.image is None:
        raise ValueError(f"RICES: example {ex.id!r} has no image")
    try:
        return ex.image.raw()
    except DataError as e:
        raise ValueError(f"RICES: example {ex.id!r}: {e}") from None


def _load(ex: Example):
    try:
        return decode_image(_raw(ex))
    except DataError as e:
        raise ValueError(f"RICES: example {ex.id!r}: {e}") from None


def _digest(ex: Example) -> bytes:
    return hashlib.sha256(_raw(ex)).digest()


def weights_fingerprint(module: torch.nn.Module, sample: int = 4096) -> str:
    """A short digest of a module's weights (names, shapes, dtypes, and the first and last
    ``sample`` values of each): two encoders with the same source but other weights, or
    another dtype, never share cached embeddings."""
    digest = hashlib.sha256()
    for name, param in module.state_dict().items():
        flat = param.detach().reshape(-1)
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        for part in (flat[:sample], flat[-sample:]):
            digest.update(part.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]
