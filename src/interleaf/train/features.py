"""Frozen-feature cache: the vision encoder is frozen, so its features for an image never change;
compute them once, read them afterwards.

    cache = FeatureCache.for_model("feats/", model)   # refuses a cache made by another encoder
    precompute(model, processor, documents, cache)     # optional: fill it in one pass
    with feature_cache(model, cache):                  # or use_feature_cache / remove_feature_cache
        train(recipe, model=model)

The seam is explicit: ``Flamingo.feature_cache`` (None by default), which
``encode_images`` asks for the features of a batch's real images instead of calling
``model.vision``. :func:`use_feature_cache` sets it to a :class:`CachedFeatures`; no module is
swapped, so names, ``model.parameters()`` and checkpoints are unchanged.

An image's key comes from the data pipeline: the collator hashes each image's encoded bytes
with a fingerprint of the processor's transform (:func:`interleaf.images.source_key`), in the
data workers, and hands the keys over with the batch (``image_keys``); the training step then
neither hashes pixels nor copies them to the host. The entry key adds the numeric context
(device type, autocast dtype). Batches without keys (prompts straight from the processor) fall
back to a hash of each image's pixel tensor (bytes, dtype, shape). The cache's manifest holds a
fingerprint of the encoder (tower class and config, ``vision.layer/post_layernorm/drop_cls``, a
hash of every weight), so a hit returns the bytes that the same encoder computed on the same
input. Entries (one image's (F, P, D) features) are one safetensors file each under
``<dir>/<2 hex>/<key>.safetensors``, written atomically (temp file + rename), so ranks and runs
may share a directory; a bounded in-memory LRU sits in front. A miss is computed with the other
misses of its batch, and a hit returns exactly those bytes. Against features computed in a batch
of another shape they agree to rounding only: matmul kernels block by batch shape (on some CPUs,
e.g. MKL's AVX2 path on AMD, and on GPUs), so the last bits may differ (measured: 5e-7 on
features of size ~4); losses agree to ~1e-7 relative.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from interleaf.data.collate import CollateConfig, Collator
from interleaf.data.schema import Document
from interleaf.model.vision import VisionEncoder

FORMAT = 2  # 2: an entry is one image's (F, P, D) features, keyed by the pipeline's image key
MANIFEST = "manifest.json"
_SUFFIX = ".safetensors"
# The tower config keys that name or describe a file, not the computation.
_CONFIG_NOISE = {"transformers_version", "architectures", "dtype", "torch_dtype"}


# -- fingerprints and keys ------------------------------------------------------------------


def _bytes(t: Tensor) -> memoryview:
    """The raw bytes of ``t`` (any dtype, bfloat16 included), without a copy when on CPU."""
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _encoder_of(obj: nn.Module) -> VisionEncoder:
    """The :class:`VisionEncoder` of a Flamingo, or itself."""
    if isinstance(obj, VisionEncoder):
        return obj
    vision = getattr(obj, "vision", None)
    if isinstance(vision, VisionEncoder):
        return vision
    raise TypeError(f"expected a Flamingo or a VisionEncoder, got {type(obj).__name__}")


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def vision_fingerprint(model: nn.Module) -> str:
    """A hex digest of what the vision encoder of ``model`` (a Flamingo or a VisionEncoder)
    computes: its tower's class and config, the feature options, and every weight's name, dtype,
    shape and bytes. Computed once per encoder and remembered while its weights are unchanged."""
    encoder = _encoder_of(model)
    tensors = sorted([*encoder.tower.named_parameters(), *encoder.tower.named_buffers()], key=lambda kv: kv[0])
    state = tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) for _, t in tensors)
    memo = _FINGERPRINTS.get(encoder)
    if memo is not None and memo[0] == state:
        return memo[1]
    tower = encoder.tower
    config = getattr(tower, "config", None)
    config = {} if config is None else config.to_dict()
    config = {k: v for k, v in config.items() if not k.startswith("_") and k not in _CONFIG_NOISE}
    options = {k: v for k, v in dataclasses.asdict(encoder.cfg).items() if k != "source"}
    h = hashlib.blake2b(digest_size=16)
    head = {"tower": f"{type(tower).__module__}.{type(tower).__qualname__}", "config": config, "options": options}
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    for name, t in tensors:
        h.update(f"\n{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_bytes(t))
    digest = h.hexdigest()
    _FINGERPRINTS[encoder] = (state, digest)
    return digest


def numeric_context(device: torch.device) -> str:
    """What besides the input decides the features' bits: the device type and autocast dtype."""
    autocast = torch.is_autocast_enabled(device.type)
    return f"{device.type}|autocast={torch.get_autocast_dtype(device.type) if autocast else None}"


def image_key(pixels: Tensor, context: str = "") -> str:
    """The cache key of one image as the encoder receives it: a hash of its bytes, dtype, shape
    and ``context`` (see :func:`numeric_context`)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{pixels.dtype}|{tuple(pixels.shape)}|{context}|".encode())
    h.update(_bytes(pixels))
    return h.hexdigest()


# -- the store --------------------------------------------------------------------------------


class FeatureCache:
    """Per-image features on disk under ``directory``, for the encoder of fingerprint
    ``fingerprint`` (see :func:`vision_fingerprint`), with an in-memory LRU of ``memory_bytes``.

    ``hits`` / ``misses`` count the lookups (``memory_hits`` the hits served from memory).
    Raises ValueError if ``directory`` holds a cache of another encoder or another format, or
    files that are not a feature cache.
    """

    def __init__(self, directory: str | Path, fingerprint: str, *, memory_bytes: int = 1 << 30):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.memory_bytes = memory_bytes
        self.hits = self.misses = self.memory_hits = 0
        self._memory: OrderedDict[str, Tensor] = OrderedDict()
        self._held = 0
        self._open()

    @classmethod
    def for_model(cls, directory: str | Path, model: nn.Module, **kwargs: Any) -> FeatureCache:
        """The cache in ``directory`` for the vision encoder of ``model``."""
        return cls(directory, vision_fingerprint(model), **kwargs)

    def _open(self) -> None:
        manifest = self.directory / MANIFEST
        if manifest.exists():
            try:
                data = json.loads(manifest.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"feature cache {self.directory}: unreadable {MANIFEST} ({e})") from None
            if data.get("format") != FORMAT:
                raise ValueError(
                    f"feature cache {self.directory} has format {data.get('format')!r}, this interleaf reads "
                    f"format {FORMAT}; use another directory or delete it"
                )
            if data.get("fingerprint") != self.fingerprint:
                raise ValueError(
                    f"feature cache {self.directory} was made by another vision encoder (fingerprint "
                    f"{str(data.get('fingerprint'))[:12]}, this model's is {self.fingerprint[:12]}); "
                    "use another directory or delete it"
                )
            return
        if self.directory.exists() and any(not p.name.startswith(".") for p in self.directory.iterdir()):
            raise ValueError(
                f"feature cache {self.directory}: the directory holds files but no {MANIFEST}; "
                "it is not a feature cache (use an empty or new directory)"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(manifest, lambda tmp: tmp.write_text(json.dumps(self.manifest(), indent=2) + "\n"))

    def manifest(self) -> dict[str, Any]:
        return {"format": FORMAT, "fingerprint": self.fingerprint, "layout": "<2 hex>/<key>.safetensors"}

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}{_SUFFIX}"

    def get(self, key: str) -> Tensor | None:
        """The features stored under ``key`` (on CPU; never modify them), or None; counted."""
        features = self._memory.get(key)
        if features is not None:
            self._memory.move_to_end(key)
            self.hits += 1
            self.memory_hits += 1
            return features
        features = self._read(key)
        if features is None:
            self.misses += 1
            return None
        self.hits += 1
        self._remember(key, features)
        return features

    def put(self, key: str, features: Tensor) -> None:
        """Store ``features`` (one image's) under ``key``; a key already stored is kept."""
        features = features.detach().to("cpu", copy=True).contiguous()
        path = self.path(key)
        if key not in self._memory and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, lambda tmp: save_file({"features": features}, str(tmp), metadata={"key": key}))
        self._remember(key, features)

    def __contains__(self, key: str) -> bool:
        return key in self._memory or self.path(key).exists()

    def __len__(self) -> int:
        """The number of entries on disk."""
        return sum(1 for _ in self.directory.glob(f"??/*{_SUFFIX}"))

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "memory_hits": self.memory_hits}

    def _read(self, key: str) -> Tensor | None:
        path = self.path(key)
        try:
            return load_file(str(path))["features"]
        except FileNotFoundError:
            return None
        except (OSError, SafetensorError, KeyError) as e:
            warnings.warn(f"feature cache {self.directory}: unreadable {path.name} ({e}); recomputing", stacklevel=3)
            return None

    def _remember(self, key: str, features: Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.memory_bytes:
            return
        if key in self._memory:
            self._memory.move_to_end(key)
            return
        self._memory[key] = features
        self._held += size
        while self._held > self.memory_bytes:
            _, old = self._memory.popitem(last=False)
            self._held -= old.numel() * old.element_size()


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -- the seam ---------------------------------------------------------------------------------


def _dropout_modules(encoder: VisionEncoder) -> tuple[nn.Dropout, ...]:
    return tuple(m for m in encoder.tower.modules() if isinstance(m, nn.Dropout))


def _active_dropout(encoder: VisionEncoder, modules: Iterable[nn.Dropout]) -> dict[str, float]:
    """The dropout rates > 0 of the tower's config and of its ``nn.Dropout`` modules."""
    config = getattr(encoder.tower, "config", None)
    rates = {k: v for k, v in vars(config).items() if "dropout" in k and isinstance(v, float)} if config else {}
    rates |= {f"{type(m).__name__}#{i}": m.p for i, m in enumerate(modules)}
    return {k: v for k, v in rates.items() if v > 0}


def check_cacheable(encoder: VisionEncoder, *, params: Iterable[Tensor] | None = None, dropouts=None) -> None:
    """Raise ValueError unless ``encoder`` is a pure function of its input: no parameter trains,
    and no dropout is active. ``params`` / ``dropouts``: the encoder's parameters and dropout
    modules, collected once by the caller (what :class:`CachedFeatures` does at each forward)."""
    params = encoder.parameters() if params is None else params
    if any(p.requires_grad for p in params):
        trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
        raise ValueError(
            f"the vision encoder is trainable ({len(trainable)} parameters, e.g. {trainable[0]}): its features "
            "change as it trains and cannot be cached; freeze it (trainable.vision=false) or drop the feature cache"
        )
    if encoder.tower.training:
        active = _active_dropout(encoder, _dropout_modules(encoder) if dropouts is None else dropouts)
        if active:
            raise ValueError(
                f"the vision encoder is in training mode with dropout {active}: its features are random and "
                "cannot be cached; put model.vision in eval mode or drop the feature cache"
            )


class CachedFeatures:
    """What ``Flamingo.feature_cache`` holds: the vision features of the real images of a batch,
    looked up in ``cache`` and computed by ``encoder`` (``model.vision``, never replaced) for the
    misses only, in one batch, then stored.

    An image's entry key is its key from the data pipeline (the batch's ``image_keys``:
    :func:`interleaf.images.source_key`, a hash of its encoded bytes and of the processor's
    transform, computed in the data workers) and the numeric context. A batch without
    ``image_keys`` (prompts from the processor) is keyed by its pixels instead
    (:func:`image_key`), which costs a hash of every image and, on a GPU, a copy to the host.
    The encoder's parameters and dropout modules are collected once; each forward checks that
    none has started to train (a loop over a tuple, not a walk of the modules).
    """

    def __init__(self, encoder: VisionEncoder, cache: FeatureCache):
        if not isinstance(encoder, VisionEncoder):
            raise TypeError(f"a feature cache serves a VisionEncoder, got {type(encoder).__name__}")
        self.encoder, self.cache = encoder, cache
        self._params = tuple(encoder.parameters())
        self._dropouts = _dropout_modules(encoder)
        check_cacheable(encoder, params=self._params, dropouts=self._dropouts)

    def keys(self, pixels: Tensor, image_keys: list[str] | None) -> list[str]:
        """Each image's entry key (see the class)."""
        context = numeric_context(pixels.device)
        if image_keys is None:
            return [image_key(image, context) for image in pixels.detach().cpu()]
        return [hashlib.blake2b(f"{k}|{context}".encode(), digest_size=20).hexdigest() for k in image_keys]

    def __call__(self, pixels: Tensor, image_keys: list[str] | None = None) -> Tensor:
        """(n, F, C, H, W) pixels of n real images (``image_keys``: their n keys, or None) ->
        (n, F, P, D) features."""
        check_cacheable(self.encoder, params=self._params, dropouts=self._dropouts)
        if pixels.requires_grad:  # gradients with respect to the pixels: nothing to cache
            return self._encode(pixels)
        if image_keys is not None and len(image_keys) != len(pixels):
            raise ValueError(f"image_keys name {len(image_keys)} images for {len(pixels)} real images")
        keys = self.keys(pixels, image_keys)
        found = [self.cache.get(key) for key in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if len(missing) == len(keys):
            features = self._encode(pixels)
            for key, f in zip(keys, features):
                self.cache.put(key, f)
            return features
        hits = [i for i, f in enumerate(found) if f is not None]
        first = found[hits[0]]
        out = torch.empty((len(keys), *first.shape), dtype=first.dtype, device=pixels.device)
        out[hits] = torch.stack([found[i] for i in hits]).to(pixels.device)
        if missing:
            computed = self._encode(pixels[missing])
            for i, f in zip(missing, computed):
                self.cache.put(keys[i], f)
            out[missing] = computed
        return out

    def _encode(self, pixels: Tensor) -> Tensor:
        n, frames = pixels.shape[:2]
        return self.encoder(pixels.flatten(0, 1)).unflatten(0, (n, frames))


def use_feature_cache(model: nn.Module, cache: FeatureCache) -> CachedFeatures:
    """Serve the vision features of ``model`` (a Flamingo) from ``cache``: sets
    ``model.feature_cache``; ``model.vision`` and every parameter name stay as they are. Raises
    ValueError if the cache belongs to another encoder or the encoder is not frozen. A model that
    already uses a cache switches to ``cache``. Undo with :func:`remove_feature_cache`."""
    if not hasattr(model, "feature_cache"):
        raise TypeError(f"expected a Flamingo (with a feature_cache seam), got {type(model).__name__}")
    fingerprint = vision_fingerprint(model)
    if fingerprint != cache.fingerprint:
        raise ValueError(
            f"feature cache {cache.directory} is for another vision encoder (fingerprint "
            f"{cache.fingerprint[:12]}, this model's is {fingerprint[:12]})"
        )
    model.feature_cache = CachedFeatures(model.vision, cache)
    return model.feature_cache


def remove_feature_cache(model: nn.Module) -> VisionEncoder:
    """Compute the vision features again (no-op without a cache); return ``model.vision``."""
    if getattr(model, "feature_cache", None) is not None:
        model.feature_cache = None
    return model.vision


@contextmanager
def feature_cache(model: nn.Module, cache: FeatureCache) -> Iterator[CachedFeatures]:
    """``with feature_cache(model, cache) as cached:`` the model reads features from ``cache``
    inside the block; after it (also on error) the model uses whatever it used before."""
    previous = getattr(model, "feature_cache", None)
    cached = use_feature_cache(model, cache)
    try:
        yield cached
    finally:
        model.feature_cache = previous


# -- filling a cache --------------------------------------------------------------------------


def _batches(processor, data: Iterable[Any], batch_size: int, collate) -> Iterator[Mapping[str, Tensor]]:
    """Batches (dicts with input_ids and pixel_values) from batches, Documents or prompts."""

    def encode(group: list[Any]) -> Mapping[str, Tensor]:
        if processor is None:
            raise ValueError("precompute: documents and prompts need a processor")
        if all(isinstance(x, Document) for x in group):
            return Collator(processor, collate or CollateConfig())(group)
        return processor(group)

    group: list[Any] = []
    for item in data:
        if isinstance(item, Mapping) and "pixel_values" in item:
            yield item
        else:
            group.append(item)
            if len(group) == batch_size:
                yield encode(group)
                group = []
    if group:
        yield encode(group)


def precompute(
    model: nn.Module,
    processor,
    data: Iterable[Any],
    cache: FeatureCache,
    *,
    batch_size: int = 8,
    collate=None,
    precision: str = "fp32",
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Fill ``cache`` with the features of every real image in ``data``: a loader or iterable of
    batches (``input_ids``, ``pixel_values``), of :class:`~interleaf.data.schema.Document` (collated
    with ``collate``, a CollateConfig), or of prompts for ``processor``. ``precision`` must be the
    training run's (``train.precision``; the autocast dtype is part of each key). Stops after
    ``limit`` batches (a training loader never ends). Returns the counts of this pass."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    device = next(model.parameters()).device
    before = cache.stats()
    batches = images = 0
    bar = tqdm(total=limit, disable=not progress, desc="features", unit="batch")
    with feature_cache(model, cache), torch.no_grad():
        for batch in _batches(processor, data, batch_size, collate):
            if limit is not None and batches >= limit:
                break
            input_ids = batch["input_ids"].to(device)
            pixel_values = batch["pixel_values"]
            pixel_values = None if pixel_values is None else pixel_values.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                model.encode_images(input_ids, pixel_values, image_keys=batch.get("image_keys"))
            batches += 1
            images += int((input_ids == model.ids.image).sum())
            bar.update(1)
            bar.set_postfix(hits=cache.hits - before["hits"], misses=cache.misses - before["misses"])
    bar.close()
    after = cache.stats()
    return {"batches": batches, "images": images, **{k: after[k] - before[k] for k in after}}
