"""Shared fixtures: tiny backbones written to disk once per session, never a hub."""

import os
import signal
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("INTERLEAF_CACHE", tempfile.mkdtemp(prefix="interleaf-cache-"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
import transformers

from interleaf import Flamingo, FlamingoConfig
from interleaf.config import CrossAttentionConfig, LMConfig, ResamplerConfig, VisionConfig
from interleaf.data.stream import Loader
from interleaf.tiny import LM_FAMILIES, build_lm, build_tokenizer, build_vision

transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def backbones(tmp_path_factory):
    """Directory factory: ``backbones("lm", family)`` / ``backbones("vision", kind)``."""
    root = tmp_path_factory.mktemp("backbones")
    built = {}

    def get(what: str, name: str):
        key = (what, name)
        if key not in built:
            target = root / f"{what}-{name}"
            if what == "lm":
                build_lm(target, name, tokenizer=build_tokenizer())
            elif what == "vision":
                build_vision(target, name)
            else:
                raise ValueError(what)
            built[key] = str(target)
        return built[key]

    return get


def tiny_config(backbones, family: str = "llama", vision_kind: str = "clip", **overrides) -> FlamingoConfig:
    parts = dict(
        lm=LMConfig(source=backbones("lm", family)),
        vision=VisionConfig(source=backbones("vision", vision_kind)),
        resampler=ResamplerConfig(depth=2, num_latents=4, heads=2, head_dim=8, max_media=4),
        cross_attention=CrossAttentionConfig(heads=2, head_dim=8, interval=2),
    )
    parts.update(overrides)
    return FlamingoConfig(**parts)


def open_gates(model, attn: float = 1.0, ff: float = 0.5, seed: int = 0) -> None:
    """Non-zero gates (and random alphas) so the images matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            block.attn_gate.copy_(attn + 0.1 * torch.randn(block.attn_gate.shape, generator=g))
            block.ff_gate.copy_(ff + 0.1 * torch.randn(block.ff_gate.shape, generator=g))


@pytest.fixture(scope="session")
def families():
    return LM_FAMILIES


@pytest.fixture
def make_model(backbones):
    def make(family: str = "llama", vision_kind: str = "clip", gates: bool = True, **overrides):
        torch.manual_seed(0)
        model = Flamingo.from_config(tiny_config(backbones, family, vision_kind, **overrides))
        if gates:
            open_gates(model)
        return model

    return make


def encode(model, texts, *, padding_side: str = "left", images_per_sample: int | None = None, seed: int = 0):
    """Tokenize ``texts`` (with literal <image> tokens) and draw random pixel values."""
    tok = model.tokenizer
    tok.padding_side = padding_side
    batch = tok(texts, return_tensors="pt", padding=True)
    counts = (batch.input_ids == model.ids.image).sum(-1)
    n = images_per_sample or max(int(counts.max()), 1)
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(texts), n, 3, 32, 32, generator=g)
    return batch.input_ids, batch.attention_mask, pixels


TEXTS = [
    "<image>a photo of a red circle<|endofchunk|><image>two green squares",
    "what is this? <image> a cat",
    "text only, no image here",
]


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """``interleaf demo`` at a few percent of its size: every stage runs, quickly."""
    from interleaf.demo import DemoOptions, run

    out = tmp_path_factory.mktemp("demo")
    opts = DemoOptions(out=out, scale=0.03, eval_queries=6, shots=(0, 2), demos=("random",), progress=False)
    return opts, run(opts)


def tiny_recipe(backbones, shards: str, out_dir, *, data: dict | None = None, optim: dict | None = None, **train):
    """A training recipe over the tiny backbones and one shard source; keyword arguments
    override the data, optimiser and run settings."""
    from interleaf.data.collate import CollateConfig
    from interleaf.train.config import DataConfig, OptimConfig, Recipe, SourceConfig, TrainConfig

    data = {"batch_size": 4, "collate": CollateConfig(max_tokens=96, max_images=3), **(data or {})}
    optim = {"lr": 3e-3, "warmup_steps": 2, "schedule": "cosine", "accumulation": 2, **(optim or {})}
    return Recipe(
        model=tiny_config(backbones),
        data=DataConfig(sources={"world": SourceConfig(shards=shards)}, **data),
        optim=OptimConfig(**optim),
        train=TrainConfig(**{"out_dir": str(out_dir), "progress": False, "log_every": 1, **train}),
    )


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    """40 tiny-world training documents in webdataset shards of 20."""
    from interleaf.data.shards import write_shards
    from interleaf.data.tinyworld import iter_train_documents

    out = tmp_path_factory.mktemp("world-shards")
    write_shards(iter_train_documents(seed=0, n=40), out, max_samples=20)
    return str(out)


class SignalAfter(Loader):
    """A loader that raises SIGTERM as it hands out batch ``at`` (as a kill mid-run would)."""

    def __init__(self, loader: Loader, at: int):
        super().__init__(loader.dataset, num_workers=loader.num_workers)
        self.at = at

    def __iter__(self):
        for batch in super().__iter__():
            if self.batches == self.at:
                signal.raise_signal(signal.SIGTERM)
            yield batch
