"""interleaf against its peers' own code, side by side in one process, on identical weights.

Peers: transformers' ``IdeficsForVisionText2Text`` and open-flamingo 2.0.1's model code
(installed without its dependencies; a stand-in ``open_clip`` module satisfies its package
import, and its vision encoder is a Hugging Face CLIP tower that returns open_clip's
``(pooled, patch tokens)``). Each peer model is built at random, saved in the peer's own
format (a ``save_pretrained`` directory; OpenFlamingo's ``checkpoint.pt`` over its LM and
vision tower) and converted by ``interleaf.convert.idefics`` / ``interleaf.convert.openflamingo``,
so both sides compute with the same weights, in the same process.

    OMP_NUM_THREADS=N .venv/bin/python benchmarks/compare.py [--workload NAME ...]
        [--dtype float32|bfloat16] [--repeats 5] [--size small medium] [--threads N]
        [--out benchmarks/results/compare.json]

Models, with the same shapes for both peers: the LM is a Llama (MLP 8/3 x hidden rounded up to a
multiple of 64, as LLaMA's; no grouped KV heads, as IDEFICS'), the vision tower has 4 heads and an
MLP twice its width, the resamplers 8 heads x 64 (OpenFlamingo's fixed choice, also of its
cross-attention; IDEFICS' cross-attention takes the LM's heads):

    small   LM 4 x 256, 8 heads, vocab 4,096; ViT 64 px, patch 8, 2 x 128; resampler 2 x 16 latents;
            cross-attention every layer
    medium  LM 8 x 512, 8 heads, vocab 32,000; ViT 224 px, patch 14, 4 x 256; resampler 64 latents,
            depth 2 (IDEFICS) or 6 (OpenFlamingo's default); cross-attention every 2 layers

Workloads (``--workload``, default all; ``--size`` picks the sizes of decode and fewshot-classify):

- ``train-small`` (batch 4 x 128 tokens x 2 images), ``train-medium`` (batch 2 x 512 tokens x 3
  images): one step = forward with labels + backward + AdamW step, in two modes: ``frozen`` (only
  the resampler and the gated cross-attention train, as in Flamingo) and ``full`` (everything the
  peer's code can train: OpenFlamingo encodes images under ``torch.no_grad()``, so with it the
  vision tower stays frozen on both sides). interleaf's step is timed twice: stepping after the
  backward (as the peers do) and with ``optim.in_backward`` (each weight stepped as soon as its
  gradient is complete, the gradient then freed: the same AdamW arithmetic, less memory).
- ``decode``: a 64-token prompt (random text tokens, 1 or 8 images written in each peer's format),
  batch 1 or 8, then 32 greedy tokens. IDEFICS decodes with transformers' ``generate``;
  OpenFlamingo's ``generate`` does not run on transformers 5 (its prefill fails:
  ``FlamingoLMMixin.forward() missing 1 required positional argument: 'attention_mask'``), so its
  cached-media path is driven by hand (``_encode_vision_x``, then its LM with the KV cache, one
  token per step: what its ``generate`` does, less the logits processors). interleaf decodes with
  ``model.generate`` (greedy, not stopping at EOS or end of chunk).
- ``fewshot-classify``: 8 demonstrations with images plus the query, then 10 or 1,000 class names,
  each scored by its mean log-probability: interleaf's ``rank_candidates`` (the prompt encoded
  once, its KV cache shared by the candidates) against OpenFlamingo's model run on every full
  prompt (``benchmarks/bench_eval.py``'s ``rank_by_recomputing``, with OpenFlamingo's forward).
- ``data``: documents/s through interleaf's pipeline (``benchmarks/bench_data.py``'s run) with 0, 1
  and 2 DataLoader workers; no peer (OpenFlamingo's pipeline needs open_clip and MMC4 shards).

Method. Within a workload the implementations run in turn (A, B, A, B, ...) after one warm-up call
each, and every figure is the median of ``--repeats`` calls. Prompts have no padding (no peer quirk
of left padding is involved). Peak memory is measured after the timing, in a separate call per
side (one process holds both sides, so their peaks overlap while alternating): the process's
high-water mark (Linux VmHWM, reset by writing 5 to /proc/self/clear_refs, after ``gc.collect`` and
``malloc_trim``) less the resident size just before the call. In training that is what one step
adds above weights and optimizer state (gradients freed before).

Agreement checks (float32; in bfloat16 the tolerances are loose and token equality is reported,
not required, since rounding reorders near-ties and one different token changes what follows):
the trainable parameter counts are equal; the first step's losses (identical weights) agree to
1e-4 relative; the greedy tokens are equal; the class scores agree to 1e-4. A failed check is
printed and the script exits with status 1.

Columns.
- ``peer s``, ``interleaf s``: median seconds per call (training: per step; decode: prompt + 32
  tokens, images included; fewshot: one query's class names).
- ``faster by``: peer seconds / interleaf seconds (> 1: interleaf is faster).
- ``trainable``: trainable parameters, peer / interleaf. ``first loss``: the first step's losses.
- ``GFLOP/step``: the estimated work of one training step, the same for both sides (below).
  ``GFLOP/s (% peak)``: that work over the median step time, and its share of the machine's
  measured matmul FLOP/s in the run's dtype (2048 x 2048 matmuls, the current thread count).
- ``peak MiB``: the memory figure above, per side.
- decode ``ms/step``: (seconds for 32 new tokens - seconds for 1) / 31, per side and for the
  ``bare LM``: the same Llama run by transformers without images (the prompt's ids as text, a
  greedy loop with its KV cache). One step makes one token for every sequence of the batch.
  ``floor ms/step``: the bytes of weights one step reads over the measured memory read bandwidth
  (a large tensor sum): every matrix of the LM and of the cross-attention blocks except the media
  key/value projections (applied once per call) and the input embeddings (one row per token); KV
  caches are left out, so it is a lower bound.
  ``tokens equal``: the greedy tokens of both sides (or the first step where they differ).
- fewshot ``max score gap``: the largest difference between the two sides' class scores.

FLOP estimate of a training step. Every weight matrix (linear or convolution) of interleaf's model
(the same weights as the peer's) costs 2 FLOPs per element per vector it multiplies in the
forward: the text tokens (B x T) for the LM, the lm_head and the cross-attention blocks' query,
output and feed-forward; the image latents (B x N x latents) for the blocks' media keys/values;
the patch tokens (+ class token) for the vision tower; the latents for the resampler, whose
keys/values also read the patch tokens. The backward repeats that forward cost once for every
matrix that the gradient passes through (the activation gradients: all but a frozen vision tower;
in frozen mode this also counts the LM layers below the first cross-attention block, which the
gradient need not reach) and once more for every trainable matrix (the weight gradients): 6 x
params x vectors for a trainable matrix, 4x for a frozen one the gradient crosses, 2x for a frozen
vision tower. The LM's self-attention scores add 4 x B x T^2 x hidden per layer forward (PaLM's
convention, causal mask ignored), 3x that with the backward. The attention scores of the vision
tower, the resampler and the cross-attention are left out. (On tiny models this estimate is within
~5% of the matmul FLOPs that torch.utils.flop_counter counts for a step, attention scores aside.)
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import gc
import json
import os
import random
import statistics
import string
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import bench_data  # benchmarks/ neighbours: on sys.path when this file runs as a script
import bench_eval
import torch
import transformers
from tokenizers import AddedToken
from torch import Tensor, nn
from transformers.models.idefics.processing_idefics import (
    image_attention_mask_for_packed_input_ids,
    incremental_to_binary_attention_mask,
)

from interleaf import Flamingo, Processor
from interleaf.config import TrainableConfig
from interleaf.convert.idefics import convert as convert_idefics
from interleaf.convert.openflamingo import convert as convert_openflamingo
from interleaf.data.shards import expand, write_shards
from interleaf.eval.ranking import rank_candidates
from interleaf.model.trainable import apply_trainable
from interleaf.tiny import CORPUS, build_lm, build_tokenizer, build_vision
from interleaf.train.optim import step_in_backward

sys.modules.setdefault("open_clip", types.ModuleType("open_clip"))  # imported by open_flamingo's factory only
from open_flamingo.src import flamingo as of_flamingo  # noqa: E402
from open_flamingo.src import flamingo_lm as of_lm  # noqa: E402
from open_flamingo.src.helpers import PerceiverResampler  # noqa: E402
from open_flamingo.src.utils import extend_instance  # noqa: E402

# open_flamingo passes `past_key_values` to the LM's forward, which transformers 5.24 renamed `cache`
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)

WORKLOADS = ("train-small", "train-medium", "decode", "fewshot-classify", "data")
IDEFICS_FAKE, IMAGE, END_OF_CHUNK = "<fake_token_around_image>", "<image>", "<|endofchunk|>"
BASE_SPECIAL_IDS = 3  # <unk> (also the pad), <s>, </s>: text tokens are drawn from the ids after these


@dataclass(frozen=True)
class Size:
    lm_hidden: int
    lm_layers: int
    lm_heads: int
    lm_intermediate: int
    vocab: int
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    latents: int
    idefics_resampler_depth: int
    openflamingo_resampler_depth: int
    interval: int  # a cross-attention block every `interval` decoder layers


@dataclass(frozen=True)
class Settings:
    """Every size and shape of a run; ``--tiny`` swaps in a shrunken copy."""

    sizes: dict[str, Size]
    train: dict[str, tuple[str, int, int, int]]  # workload: (size, batch, tokens, images)
    decode_prompt: int
    decode_new: int
    decode_images: tuple[int, ...]
    decode_batches: tuple[int, ...]
    shots: int
    classes: tuple[int, ...]
    docs: int
    doc_image_size: int
    doc_batch: int
    matmul_n: int
    bandwidth_mib: int
    repeats: int


SMALL = Size(
    lm_hidden=256,
    lm_layers=4,
    lm_heads=8,
    lm_intermediate=704,
    vocab=4096,
    image_size=64,
    patch_size=8,
    vision_hidden=128,
    vision_layers=2,
    latents=16,
    idefics_resampler_depth=2,
    openflamingo_resampler_depth=2,
    interval=1,
)
MEDIUM = Size(
    lm_hidden=512,
    lm_layers=8,
    lm_heads=8,
    lm_intermediate=1408,
    vocab=32000,
    image_size=224,
    patch_size=14,
    vision_hidden=256,
    vision_layers=4,
    latents=64,
    idefics_resampler_depth=2,
    openflamingo_resampler_depth=6,
    interval=2,
)
TINY_SMALL = Size(
    lm_hidden=64,
    lm_layers=2,
    lm_heads=4,
    lm_intermediate=192,
    vocab=512,
    image_size=32,
    patch_size=8,
    vision_hidden=32,
    vision_layers=2,
    latents=4,
    idefics_resampler_depth=1,
    openflamingo_resampler_depth=1,
    interval=1,
)

FULL = Settings(
    sizes={"small": SMALL, "medium": MEDIUM},
    train={"train-small": ("small", 4, 128, 2), "train-medium": ("medium", 2, 512, 3)},
    decode_prompt=64,
    decode_new=32,
    decode_images=(1, 8),
    decode_batches=(1, 8),
    shots=8,
    classes=(10, 1000),
    docs=600,
    doc_image_size=224,
    doc_batch=16,
    matmul_n=2048,
    bandwidth_mib=512,
    repeats=5,
)
TINY = Settings(
    sizes={"small": TINY_SMALL, "medium": dataclasses.replace(TINY_SMALL, openflamingo_resampler_depth=2, interval=2)},
    train={"train-small": ("small", 2, 16, 2), "train-medium": ("medium", 2, 16, 2)},
    decode_prompt=24,
    decode_new=4,
    decode_images=(1, 4),
    decode_batches=(1, 2),
    shots=8,
    classes=(10, 30),
    docs=16,
    doc_image_size=32,
    doc_batch=4,
    matmul_n=256,
    bandwidth_mib=16,
    repeats=2,
)


# -- the machine ---------------------------------------------------------------------------


def matmul_flops(dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n x n matmul in ``dtype`` with the current thread count (median of 5)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    seconds, _ = alternate({"matmul": lambda: a @ b}, 5)
    return 2 * n**3 / statistics.median(seconds["matmul"])


def read_bandwidth(mib: int) -> float:
    """Bytes/s read by summing a ``mib`` MiB float32 tensor (median of 5)."""
    x = torch.ones(mib * 2**20 // 4)
    seconds, _ = alternate({"sum": x.sum}, 5)
    return x.nbytes / statistics.median(seconds["sum"])


# -- timing and memory ---------------------------------------------------------------------


def alternate(fns: dict[str, Callable], repeats: int) -> tuple[dict[str, list[float]], dict[str, list]]:
    """Call each function ``repeats`` times, in turn (A, B, A, B, ...); their seconds and results."""
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name].append(fn())
            seconds[name].append(time.perf_counter() - start)
    return seconds, results


PROFILE_ROWS = 0  # --profile N: after the warm-up, one profiled call per side, its N costliest operators


def warm_up(fns: dict[str, Callable]) -> dict:
    """One untimed call of each function; its result (what the agreement checks compare). With
    ``--profile``, then one call of each under ``torch.profiler``: where its time goes."""
    results = {name: fn() for name, fn in fns.items()}
    for name, fn in fns.items() if PROFILE_ROWS else ():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\nprofile: {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=PROFILE_ROWS))
    return results


def medians(seconds: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in seconds.items()}


def peak_added_mib(fn: Callable) -> float:
    """The peak resident memory (MiB) that calling ``fn`` adds to the process (see the docstring)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so that the call's peak shows
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = bench_eval.memory_mib("VmRSS")
    fn()
    return bench_eval.memory_mib("VmHWM") - before


# -- agreement checks ----------------------------------------------------------------------


class Checks:
    """A run's agreement checks, with its dtype's tolerances (see the module docstring)."""

    def __init__(self, dtype: torch.dtype):
        self.strict = dtype == torch.float32
        self.loss_rtol = 1e-4 if self.strict else 2e-2
        self.score_atol = 1e-4 if self.strict else 5e-2
        self.done: list[dict] = []

    def record(self, where: str, what: str, ok: bool, detail: str) -> None:
        self.done.append({"where": where, "what": what, "ok": ok, "detail": detail})
        if not ok:
            print(f"AGREEMENT CHECK FAILED: {where}: {what}: {detail}", flush=True)

    def tokens(self, where: str, peer: Tensor, ours: Tensor) -> str:
        if peer.shape != ours.shape:
            self.record(where, "greedy tokens equal", False, f"shapes {tuple(peer.shape)} vs {tuple(ours.shape)}")
            return "no: shapes differ"
        differ = (peer != ours).any(0).nonzero()
        summary = "yes" if not len(differ) else f"no: from step {int(differ[0]) + 1}"
        if self.strict or not len(differ):
            self.record(where, "greedy tokens equal", not len(differ), summary)
        return summary

    @property
    def failed(self) -> list[dict]:
        return [c for c in self.done if not c["ok"]]


# -- the models ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Dirs:
    """One size's models on disk: the backbones, each peer's own format, and their conversions."""

    lm: Path
    vision: Path
    idefics: Path
    idefics_converted: Path
    openflamingo_checkpoint: Path
    openflamingo_converted: Path


def sized_tokenizer(size: int):
    """A byte-level BPE tokenizer with exactly ``size`` tokens (``<unk>`` as its pad), trained on
    the tiny corpus plus random words: interleaf's logits cover the tokenizer's vocabulary (it
    resizes the LM's rows to it), so an LM vocabulary of 32,000 needs a tokenizer that long."""
    rng = random.Random(0)

    def word() -> str:
        return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 10)))

    lines = [" ".join(word() for _ in range(20)) for _ in range(size // 8)]
    tokenizer = build_tokenizer(vocab_size=size, pad_token="<unk>", corpus=CORPUS + "\n".join(lines))
    if len(tokenizer) != size:
        raise RuntimeError(f"the BPE trainer stopped at {len(tokenizer)} tokens, short of {size}")
    return tokenizer


def build(root: Path, size: Size) -> Dirs:
    """Write one size's random backbones, both peers in their own formats, and the conversions."""
    names = ("lm", "vision", "idefics", "idefics-interleaf", "checkpoint.pt", "openflamingo-interleaf")
    dirs = Dirs(*(root / name for name in names))
    build_lm(
        dirs.lm,
        "llama",
        tokenizer=sized_tokenizer(size.vocab - 2),  # each peer adds 2 tokens: the LM's rows cover them
        hidden=size.lm_hidden,
        layers=size.lm_layers,
        heads=size.lm_heads,
        vocab_size=size.vocab,
        intermediate_size=size.lm_intermediate,
        num_key_value_heads=size.lm_heads,
        max_position_embeddings=1024,
    )
    build_vision(
        dirs.vision,
        "clip",
        hidden=size.vision_hidden,
        layers=size.vision_layers,
        image_size=size.image_size,
        patch_size=size.patch_size,
    )
    build_idefics(dirs, size)
    convert_idefics(dirs.idefics, dirs.idefics_converted)
    build_openflamingo(dirs, size)
    convert_openflamingo(
        dirs.openflamingo_checkpoint, dirs.openflamingo_converted, lm=str(dirs.lm), vision=str(dirs.vision)
    )
    return dirs


def build_idefics(dirs: Dirs, size: Size) -> None:
    """A random IDEFICS of ``size`` (the LM's tokenizer), saved as transformers writes it, its two
    tokens in ordinary rows (as ``interleaf.tiny.build_idefics(decoupled=False)``)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(dirs.lm)
    extra = [AddedToken(t, special=True, normalized=False) for t in (IDEFICS_FAKE, IMAGE)]
    tokenizer.add_tokens(extra, special_tokens=True)
    tokenizer.padding_side = "left"
    config = transformers.IdeficsConfig(
        vocab_size=len(tokenizer),
        additional_vocab_size=0,
        hidden_size=size.lm_hidden,
        intermediate_size=size.lm_intermediate,
        num_hidden_layers=size.lm_layers,
        num_attention_heads=size.lm_heads,
        cross_layer_interval=size.interval,
        use_resampler=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        vision_config=dict(
            embed_dim=size.vision_hidden,
            image_size=size.image_size,
            patch_size=size.patch_size,
            num_hidden_layers=size.vision_layers,
            num_attention_heads=4,
            intermediate_size=2 * size.vision_hidden,
        ),
        perceiver_config=dict(
            use_resampler=True,
            resampler_n_latents=size.latents,
            resampler_depth=size.idefics_resampler_depth,
            resampler_n_heads=8,
            resampler_head_dim=64,
        ),
    )
    torch.manual_seed(0)
    model = transformers.IdeficsForVisionText2Text(config)
    with torch.no_grad():  # non-zero gates, so that the images matter; random norm weights too
        for name, param in model.named_parameters():
            if "alpha" in name or ("norm" in name and name.endswith("weight")):
                param.copy_(torch.randn_like(param) * 0.5 + (0 if "alpha" in name else 1))
    model.save_pretrained(dirs.idefics)
    tokenizer.save_pretrained(dirs.idefics)
    transformers.IdeficsImageProcessorPil(image_size=size.image_size).save_pretrained(dirs.idefics)


class OpenClipStandIn(nn.Module):
    """``vision_encoder.visual`` with open_clip's output_tokens contract: (pooled, patch tokens)."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.tower(pixel_values=pixels).last_hidden_state
        return hidden[:, 0], hidden[:, 1:]


def openflamingo_model(dirs: Dirs, size: Size) -> of_flamingo.Flamingo:
    """OpenFlamingo over the size's LM and CLIP tower, as its factory assembles it."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(dirs.lm)  # has a pad token: no <PAD> is added
    tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_CHUNK, IMAGE]})
    lang = transformers.AutoModelForCausalLM.from_pretrained(dirs.lm)
    extend_instance(lang, of_lm.FlamingoLMMixin)
    lang.set_decoder_layers_attr_name("model.layers")
    lang.resize_token_embeddings(len(tokenizer))  # as the factory does; a no-op: the rows cover the new tokens
    tower = transformers.CLIPVisionModel.from_pretrained(dirs.vision)
    model = of_flamingo.Flamingo(
        types.SimpleNamespace(visual=OpenClipStandIn(tower)),
        lang,
        tokenizer.convert_tokens_to_ids(END_OF_CHUNK),
        tokenizer.convert_tokens_to_ids(IMAGE),
        vis_dim=size.vision_hidden,
        cross_attn_every_n_layers=size.interval,
    )
    model.perceiver = PerceiverResampler(
        dim=size.vision_hidden, depth=size.openflamingo_resampler_depth, num_latents=size.latents
    )
    return model


def build_openflamingo(dirs: Dirs, size: Size) -> None:
    """A random OpenFlamingo's ``checkpoint.pt``: what its training saves (the Perceiver, the
    cross-attention blocks, the LM's input embeddings), the LM and the tower staying in their dirs."""
    torch.manual_seed(1)
    model = openflamingo_model(dirs, size)
    with torch.no_grad():  # open gates, so that the images matter
        for name, param in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                param.copy_(torch.randn_like(param))
    saved = ("perceiver.", "lang_encoder.gated_cross_attn_layers.", "lang_encoder.model.embed_tokens.")
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith(saved)}, dirs.openflamingo_checkpoint)


# -- driving each side -----------------------------------------------------------------------


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def greedy_with_cache(lm: nn.Module, ids: Tensor, n: int) -> Tensor:
    """``n`` greedy tokens from a transformers causal LM: the prompt, then one token per step with
    its KV cache, logits of the last position only (what ``generate`` does, less its processors)."""
    mask = torch.ones_like(ids)
    out = lm(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
    while len(tokens) < n:
        mask = torch.cat([mask, torch.ones_like(tokens[-1])], dim=1)
        out = lm(input_ids=tokens[-1], attention_mask=mask, cache=out.cache, use_cache=True, logits_to_keep=1)
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)


class Peer:
    """A peer's model driven by its own code, beside ``ours``: interleaf's model of the same weights."""

    name: str
    vision_trains: bool  # whether the peer's code can train its vision encoder

    def __init__(self, model: nn.Module, ours: Flamingo, image_prompt: list[int], dtype: torch.dtype):
        self.model, self.ours, self.image_prompt, self.dtype = model, ours, image_prompt, dtype

    def set_trainable(self, full: bool) -> tuple[int, int]:
        """Train everything the peer's code can (``full``), or only the resampler and the
        cross-attention blocks, on both sides; the trainable parameter counts (peer, interleaf)."""
        self.model.requires_grad_(full)
        self.set_peer_trainable(full)
        vision = full and self.vision_trains
        apply_trainable(self.ours, TrainableConfig(new_token_embeddings=full, lm=full, vision=vision))
        return count_trainable(self.model), count_trainable(self.ours)

    def set_peer_trainable(self, full: bool) -> None:
        raise NotImplementedError

    def inputs(self, ids: Tensor, pixels: Tensor) -> dict:
        raise NotImplementedError

    def loss(self, inputs: dict, labels: Tensor) -> Tensor:
        return self.model(**inputs, labels=labels).loss

    def greedy(self, inputs: dict, n: int) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def ours_inputs(ids: Tensor, pixels: Tensor) -> dict:
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)

    def ours_loss(self, inputs: dict, labels: Tensor) -> Tensor:
        """As interleaf's training loop asks: the loss alone, no logits."""
        return self.ours(**inputs, labels=labels, return_logits=False).loss

    def ours_greedy(self, inputs: dict, n: int) -> Tensor:
        return self.ours.generate(**inputs, max_new_tokens=n, stop_at_eos=False, stop_at_end_of_chunk=False)


class Idefics(Peer):
    name = f"IDEFICS (transformers {transformers.__version__})"
    vision_trains = True

    tokenizer: transformers.PreTrainedTokenizerBase  # IdeficsProcessor's image attention mask reads it

    @classmethod
    def load(cls, dirs: Dirs, dtype: torch.dtype) -> Idefics:
        tokenizer = transformers.AutoTokenizer.from_pretrained(dirs.idefics)
        fake, image = tokenizer.convert_tokens_to_ids([IDEFICS_FAKE, IMAGE])
        model = transformers.IdeficsForVisionText2Text.from_pretrained(dirs.idefics, dtype=dtype)
        peer = cls(model, Flamingo.from_pretrained(dirs.idefics_converted, dtype=dtype), [fake, image, fake], dtype)
        peer.tokenizer = tokenizer
        return peer

    def set_peer_trainable(self, full: bool) -> None:
        if not full:
            self.model.model.perceiver_resampler.requires_grad_(True)
            self.model.model.gated_cross_attn_layers.requires_grad_(True)

    def inputs(self, ids: Tensor, pixels: Tensor) -> dict:
        """What ``IdeficsProcessor`` gives: which image each token sees, one-hot per image."""
        latest, _ = image_attention_mask_for_packed_input_ids(ids, self.tokenizer, "pt")
        visible = incremental_to_binary_attention_mask(latest, "pt", num_classes=pixels.shape[1])
        return dict(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels.to(self.dtype),
            image_attention_mask=visible,
        )

    def greedy(self, inputs: dict, n: int) -> Tensor:
        out = self.model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None)
        return out[:, inputs["input_ids"].shape[1] :]


class OpenFlamingo(Peer):
    name = "OpenFlamingo 2.0.1"
    vision_trains = False  # its _encode_vision_x runs the vision encoder under torch.no_grad()

    @classmethod
    def load(cls, dirs: Dirs, size: Size, dtype: torch.dtype) -> OpenFlamingo:
        model = openflamingo_model(dirs, size)
        state = torch.load(dirs.openflamingo_checkpoint, weights_only=True)
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        assert not unexpected, unexpected
        ours = Flamingo.from_pretrained(dirs.openflamingo_converted, dtype=dtype)
        return cls(model.to(dtype), ours, [model.media_token_id], dtype)

    def set_peer_trainable(self, full: bool) -> None:
        if full:
            self.model.vision_encoder.requires_grad_(False)
        else:  # as its factory
            self.model.perceiver.requires_grad_(True)
            self.model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)

    def inputs(self, ids: Tensor, pixels: Tensor) -> dict:
        return dict(vision_x=pixels[:, :, None].to(self.dtype), lang_x=ids, attention_mask=torch.ones_like(ids))

    @torch.no_grad()
    def greedy(self, inputs: dict, n: int) -> Tensor:
        """Its ``generate``, with the LM's decoding loop by hand (see the module docstring)."""
        lang = self.model.lang_encoder
        lang._use_cached_vision_x = True
        self.model._encode_vision_x(vision_x=inputs["vision_x"])
        try:
            return greedy_with_cache(lang, inputs["lang_x"], n)
        finally:
            lang.clear_conditioned_layers()
            lang._use_cached_vision_x = False

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor):
        """Its forward, called as interleaf's model is (by ``bench_eval.rank_by_recomputing``)."""
        return self.model(
            vision_x=pixel_values[:, :, None].to(self.dtype), lang_x=input_ids, attention_mask=attention_mask
        )


def load_peers(dirs: Dirs, size: Size, dtype: torch.dtype):
    """Each peer in turn, loaded fresh (training changes the weights)."""
    yield Idefics.load(dirs, dtype)
    gc.collect()
    yield OpenFlamingo.load(dirs, size, dtype)


def prompt_ids(batch: int, tokens: int, images: int, image_prompt: list[int], text_vocab: int, seed: int) -> Tensor:
    """(batch, tokens) ids without padding: <s>, then ``images`` images (``image_prompt`` each)
    spread evenly, random text tokens in between."""
    every = (tokens - 1) // images
    if every <= len(image_prompt):
        raise ValueError(f"{tokens} tokens cannot hold {images} images of {len(image_prompt)} tokens each with text")
    ids = torch.randint(BASE_SPECIAL_IDS, text_vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 1  # <s>
    for i in range(images):
        ids[:, 1 + i * every : 1 + i * every + len(image_prompt)] = torch.tensor(image_prompt)
    return ids


def random_pixels(batch: int, images: int, size: Size, seed: int) -> Tensor:
    shape = (batch, images, 3, size.image_size, size.image_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- work estimates ----------------------------------------------------------------------------


def is_media_kv(name: str) -> bool:
    """A cross-attention block's key/value projection of the image latents."""
    return ".xattn." in name and name.endswith(("k_proj", "v_proj"))


def train_flops(model: Flamingo, batch: int, tokens: int, images: int) -> float:
    """The estimated FLOPs of one training step of ``model`` (see the module docstring)."""
    media = batch * images
    latents = model.config.resampler.num_latents
    read = model.vision.num_tokens  # per image, what the resampler reads
    tower = read + int(model.config.vision.drop_cls)  # per image, what the tower computes

    def vectors(name: str) -> int:  # how many vectors the matrix ``name`` multiplies in the forward
        if name.startswith("vision."):
            return media * tower
        if name.startswith("resampler."):
            return media * (read + latents if name.endswith(("k_proj", "v_proj")) else latents)
        return media * latents if is_media_kv(name) else batch * tokens

    vision_trains = any(p.requires_grad for p in model.vision.parameters())
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            forward = 2 * module.weight.numel() * vectors(name)
            reached = vision_trains or not name.startswith("vision.")
            total += forward * (1 + reached + module.weight.requires_grad)
    lm = model.language_model.lm.config
    return total + 3 * 4 * batch * tokens**2 * lm.hidden_size * lm.num_hidden_layers


def matrix_bytes(module: nn.Module, skip: Callable[[str], bool] = lambda name: False) -> int:
    """Bytes of the linear layers' weights of ``module`` (input embeddings are not linear layers)."""
    return sum(m.weight.nbytes for n, m in module.named_modules() if isinstance(m, nn.Linear) and not skip(n))


# -- workloads -----------------------------------------------------------------------------------


@dataclass
class Run:
    settings: Settings
    dtype: torch.dtype
    repeats: int
    sizes: list[str]
    root: Path
    checks: Checks
    machine: dict
    built: dict[str, Dirs] = dataclasses.field(default_factory=dict)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def dirs(self, size: str) -> Dirs:
        if size not in self.built:
            self.built[size] = build(self.root / size, self.settings.sizes[size])
        return self.built[size]


def train_step(model: nn.Module, loss: Callable[[], Tensor]) -> Callable[[], float]:
    """One training step of ``model``: ``loss()`` (the forward with labels), backward, AdamW step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> float:
        value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value.item()

    return step


def train_step_in_backward(model: nn.Module, loss: Callable[[], Tensor]) -> Callable[[], float]:
    """The same step with ``optim.in_backward`` (``interleaf.train.optim.step_in_backward``): the
    same AdamW, each weight stepped as soon as its gradient is complete, that gradient then freed.
    The hooks live for the step only, so the other interleaf side (the same model) is unaffected."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> float:
        hooks = step_in_backward(optimizer)
        try:
            value = loss()
            value.backward()
        finally:
            for hook in hooks:
                hook.remove()
        return value.item()

    return step


def train_workload(run: Run, workload: str) -> list[dict]:
    size_name, batch, tokens, images = run.settings.train[workload]
    size, dirs = run.settings.sizes[size_name], run.dirs(size_name)
    peak_flops = run.machine["matmul_flop_per_s"][run.dtype_name]
    rows = []
    for mode in ("frozen", "full"):
        for peer in load_peers(dirs, size, run.dtype):
            where = f"{workload} {peer.name} {mode}"
            counts = peer.set_trainable(mode == "full")
            run.checks.record(
                where, "trainable parameters equal", counts[0] == counts[1], f"{counts[0]:,} vs {counts[1]:,}"
            )
            peer.model.train()
            peer.ours.train()
            ids = prompt_ids(batch, tokens, images, peer.image_prompt, size.vocab - 2, seed=0)
            pixels = random_pixels(batch, images, size, seed=0)
            labels = ids.masked_fill(torch.isin(ids, torch.tensor(peer.image_prompt)), -100)
            theirs, ours = peer.inputs(ids, pixels), peer.ours_inputs(ids, pixels)
            ours_loss = functools.partial(peer.ours_loss, ours, labels)
            steps = {
                "peer": train_step(peer.model, functools.partial(peer.loss, theirs, labels)),
                "interleaf": train_step(peer.ours, ours_loss),
                "in backward": train_step_in_backward(peer.ours, ours_loss),
            }
            first = warm_up(steps)  # the first step, from the same weights on both sides
            gap = abs(first["peer"] - first["interleaf"]) / abs(first["peer"])
            detail = f"{first['peer']:.6f} vs {first['interleaf']:.6f} (relative gap {gap:.1e})"
            run.checks.record(where, "first-step losses agree", gap <= run.checks.loss_rtol, detail)
            seconds = medians(alternate(steps, run.repeats)[0])
            peaks = {side: peak_added_mib(step) for side, step in steps.items()}
            flops = train_flops(peer.ours, batch, tokens, images)
            rows.append(
                {
                    "peer": peer.name,
                    "mode": mode,
                    "trainable_peer": counts[0],
                    "trainable_interleaf": counts[1],
                    "first_loss_peer": first["peer"],
                    "first_loss_interleaf": first["interleaf"],
                    "peer_s": seconds["peer"],
                    "interleaf_s": seconds["interleaf"],
                    "faster_by": seconds["peer"] / seconds["interleaf"],
                    "flop_per_step": flops,
                    "peer_flop_per_s": flops / seconds["peer"],
                    "interleaf_flop_per_s": flops / seconds["interleaf"],
                    "peer_share_of_matmul_peak": flops / seconds["peer"] / peak_flops,
                    "interleaf_share_of_matmul_peak": flops / seconds["interleaf"] / peak_flops,
                    "peak_mib_peer": peaks["peer"],
                    "peak_mib_interleaf": peaks["interleaf"],
                    "in_backward_s": seconds["in backward"],
                    "in_backward_faster_by": seconds["peer"] / seconds["in backward"],
                    "peak_mib_in_backward": peaks["in backward"],
                }
            )
    table(
        f"{workload}: batch {batch} x {tokens} tokens x {images} images, {run.dtype_name}, {size_name} models",
        rows,
        [
            ("peer", lambda r: r["peer"]),
            ("mode", lambda r: r["mode"]),
            ("trainable (peer / interleaf)", lambda r: f"{r['trainable_peer']:,} / {r['trainable_interleaf']:,}"),
            (
                "first loss (peer / interleaf)",
                lambda r: f"{r['first_loss_peer']:.5f} / {r['first_loss_interleaf']:.5f}",
            ),
            ("peer s", lambda r: f"{r['peer_s']:.4f}"),
            ("interleaf s", lambda r: f"{r['interleaf_s']:.4f}"),
            ("faster by", lambda r: f"{r['faster_by']:.2f}x"),
            ("GFLOP/step", lambda r: f"{r['flop_per_step'] / 1e9:.3f}"),
            ("peer GFLOP/s (% peak)", lambda r: flop_rate(r["peer_flop_per_s"], r["peer_share_of_matmul_peak"])),
            (
                "interleaf GFLOP/s (% peak)",
                lambda r: flop_rate(r["interleaf_flop_per_s"], r["interleaf_share_of_matmul_peak"]),
            ),
            ("peak MiB (peer / interleaf)", lambda r: f"{r['peak_mib_peer']:.0f} / {r['peak_mib_interleaf']:.0f}"),
            ("in_backward s", lambda r: f"{r['in_backward_s']:.4f}"),
            ("in_backward faster by", lambda r: f"{r['in_backward_faster_by']:.2f}x"),
            ("in_backward peak MiB", lambda r: f"{r['peak_mib_in_backward']:.0f}"),
        ],
    )
    return rows


def decode_workload(run: Run) -> list[dict]:
    settings, new, rows = run.settings, run.settings.decode_new, []
    bandwidth = run.machine["read_bytes_per_s"]
    for size_name in run.sizes:
        size, dirs = run.settings.sizes[size_name], run.dirs(size_name)
        bare = transformers.AutoModelForCausalLM.from_pretrained(dirs.lm, dtype=run.dtype).eval()
        for peer in load_peers(dirs, size, run.dtype):
            peer.model.eval()
            floor = matrix_bytes(peer.ours.language_model, skip=is_media_kv) / bandwidth
            for images in settings.decode_images:
                for batch in settings.decode_batches:
                    ids = prompt_ids(batch, settings.decode_prompt, images, peer.image_prompt, size.vocab - 2, seed=1)
                    pixels = random_pixels(batch, images, size, seed=1)
                    theirs, ours = peer.inputs(ids, pixels), peer.ours_inputs(ids, pixels)
                    sides = {
                        "peer": functools.partial(peer.greedy, theirs),
                        "interleaf": functools.partial(peer.ours_greedy, ours),
                        "bare LM": functools.partial(greedy_with_cache, bare, ids),
                    }
                    calls = {(side, n): functools.partial(f, n) for side, f in sides.items() for n in (new, 1)}
                    tokens = warm_up(calls)
                    where = f"decode {size_name} {peer.name} {images} images batch {batch}"
                    equal = run.checks.tokens(where, tokens[("peer", new)], tokens[("interleaf", new)])
                    seconds = medians(alternate(calls, run.repeats)[0])
                    step = {side: (seconds[(side, new)] - seconds[(side, 1)]) / (new - 1) for side in sides}
                    rows.append(
                        {
                            "size": size_name,
                            "peer": peer.name,
                            "images": images,
                            "batch": batch,
                            "peer_s": seconds[("peer", new)],
                            "interleaf_s": seconds[("interleaf", new)],
                            "faster_by": seconds[("peer", new)] / seconds[("interleaf", new)],
                            "peer_s_per_step": step["peer"],
                            "interleaf_s_per_step": step["interleaf"],
                            "bare_lm_s_per_step": step["bare LM"],
                            "floor_s_per_step": floor,
                            "bare_lm_floor_s_per_step": matrix_bytes(bare) / bandwidth,
                            "tokens_equal": equal,
                        }
                    )
    ms = 1e3
    table(
        f"decode: {settings.decode_prompt}-token prompt + {new} greedy tokens, {run.dtype_name}",
        rows,
        [
            ("size", lambda r: r["size"]),
            ("peer", lambda r: r["peer"]),
            ("images", lambda r: str(r["images"])),
            ("batch", lambda r: str(r["batch"])),
            ("peer s", lambda r: f"{r['peer_s']:.4f}"),
            ("interleaf s", lambda r: f"{r['interleaf_s']:.4f}"),
            ("faster by", lambda r: f"{r['faster_by']:.2f}x"),
            ("peer ms/step", lambda r: f"{r['peer_s_per_step'] * ms:.2f}"),
            ("interleaf ms/step", lambda r: f"{r['interleaf_s_per_step'] * ms:.2f}"),
            ("bare LM ms/step", lambda r: f"{r['bare_lm_s_per_step'] * ms:.2f}"),
            (
                "floor ms/step (Flamingo / bare LM)",
                lambda r: f"{r['floor_s_per_step'] * ms:.3f} / {r['bare_lm_floor_s_per_step'] * ms:.3f}",
            ),
            ("tokens equal", lambda r: r["tokens_equal"]),
        ],
    )
    return rows


def fewshot_workload(run: Run) -> list[dict]:
    rows = []
    for size_name in run.sizes:
        size, dirs = run.settings.sizes[size_name], run.dirs(size_name)
        peer = OpenFlamingo.load(dirs, size, run.dtype)
        peer.model.eval()
        processor = Processor.from_pretrained(dirs.openflamingo_converted)
        for classes in run.settings.classes:
            prompt, images, names = bench_eval.query(classes, run.settings.shots)
            rankers = {
                "peer": functools.partial(
                    bench_eval.rank_by_recomputing, peer.forward, processor, prompt, images, names
                ),
                "interleaf": functools.partial(rank_one, peer.ours, processor, prompt, images, names),
            }
            scores = warm_up(rankers)
            gap = max(abs(a - b) for a, b in zip(scores["peer"], scores["interleaf"], strict=True))
            where = f"fewshot-classify {size_name} {classes} classes"
            run.checks.record(where, "class scores agree", gap <= run.checks.score_atol, f"max gap {gap:.1e}")
            seconds = medians(alternate(rankers, run.repeats)[0])
            peaks = {side: peak_added_mib(rank) for side, rank in rankers.items()}
            rows.append(
                {
                    "size": size_name,
                    "peer": peer.name,
                    "classes": classes,
                    "prompt_tokens": processor(prompt, images=images)["input_ids"].shape[1],
                    "peer_s": seconds["peer"],
                    "interleaf_s": seconds["interleaf"],
                    "faster_by": seconds["peer"] / seconds["interleaf"],
                    "peak_mib_peer": peaks["peer"],
                    "peak_mib_interleaf": peaks["interleaf"],
                    "max_score_gap": gap,
                }
            )
    table(
        f"fewshot-classify: {run.settings.shots} demonstrations with images + the query, {run.dtype_name}; "
        "peer: OpenFlamingo's forward on every full prompt; interleaf: rank_candidates",
        rows,
        [
            ("size", lambda r: r["size"]),
            ("classes", lambda r: f"{r['classes']:,}"),
            ("prompt tokens", lambda r: str(r["prompt_tokens"])),
            ("peer s", lambda r: f"{r['peer_s']:.3f}"),
            ("interleaf s", lambda r: f"{r['interleaf_s']:.3f}"),
            ("faster by", lambda r: f"{r['faster_by']:.2f}x"),
            ("peak MiB (peer / interleaf)", lambda r: f"{r['peak_mib_peer']:.0f} / {r['peak_mib_interleaf']:.0f}"),
            ("max score gap", lambda r: f"{r['max_score_gap']:.1e}"),
        ],
    )
    return rows


def rank_one(model: Flamingo, processor, prompt: str, images: list, candidates: list[str]) -> list[float]:
    """interleaf's ranking of one prompt's candidates."""
    return rank_candidates(model, processor, [prompt], [images], [candidates])[0]


def data_workload(run: Run) -> list[dict]:
    settings, root = run.settings, run.root / "data"
    vision = build_vision(root / "vision", "clip", image_size=settings.doc_image_size)
    processor = Processor(build_tokenizer(), transformers.AutoImageProcessor.from_pretrained(vision))
    write_shards(
        bench_data.documents(settings.docs, settings.doc_image_size), root / "shards", max_samples=settings.docs // 12
    )
    shards = expand(root / "shards")
    readers = {w: functools.partial(bench_data.run, shards, processor, settings.doc_batch, w) for w in (0, 1, 2)}
    warm_up(readers)
    rates = {w: statistics.median(rate for rate, _ in runs) for w, runs in alternate(readers, run.repeats)[1].items()}
    rows = [{"workers": w, "documents_per_s": rate, "vs_0_workers": rate / rates[0]} for w, rate in rates.items()]
    table(
        f"data: {settings.docs} documents (1-3 noise PNGs of {settings.doc_image_size} px), batch "
        f"{settings.doc_batch}, interleaf only (no peer pipeline runs here)",
        rows,
        [
            ("workers", lambda r: str(r["workers"])),
            ("documents/s", lambda r: f"{r['documents_per_s']:.1f}"),
            ("vs 0 workers", lambda r: f"{r['vs_0_workers']:.2f}x"),
        ],
    )
    return rows


# -- report --------------------------------------------------------------------------------------


def flop_rate(per_s: float, share: float) -> str:
    return f"{per_s / 1e9:.1f} ({100 * share:.0f}%)"


def table(title: str, rows: list[dict], columns: list[tuple[str, Callable[[dict], str]]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header for header, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(cell(row) for _, cell in columns) + " |")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--repeats", type=int, help="timed calls per implementation (default 5)")
    ap.add_argument("--size", nargs="+", choices=("small", "medium"), default=["small", "medium"])
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    ap.add_argument(
        "--classes",
        nargs="+",
        type=int,
        help="fewshot-classify's class counts, each at least its 8 demonstrations (default 10 1000; --tiny: 10 30)",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "compare.json")
    ap.add_argument(
        "--tiny", action="store_true", help="every workload shrunk: the agreement checks only (timings mean nothing)"
    )
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print each side's N costliest operators")
    args = ap.parse_args()
    global PROFILE_ROWS
    PROFILE_ROWS = args.profile
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = TINY if args.tiny else FULL
    if args.classes:
        if "fewshot-classify" not in args.workload:
            ap.error("--classes applies to --workload fewshot-classify only")
        if min(args.classes) < settings.shots:
            ap.error(f"--classes: each count must be at least {settings.shots}, one class per demonstration")
        settings = dataclasses.replace(settings, classes=tuple(args.classes))
    dtype = getattr(torch, args.dtype)
    machine = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "matmul_flop_per_s": {
            name: matmul_flops(getattr(torch, name), settings.matmul_n) for name in ("float32", "bfloat16")
        },
        "read_bytes_per_s": read_bandwidth(settings.bandwidth_mib),
    }
    flops = machine["matmul_flop_per_s"]
    print(
        f"torch {machine['torch']}, transformers {machine['transformers']}, {machine['threads']} threads, "
        f"{machine['cpus']} CPUs; {settings.matmul_n}x{settings.matmul_n} matmul: "
        f"{flops['float32'] / 1e9:.1f} GFLOP/s float32, {flops['bfloat16'] / 1e9:.1f} GFLOP/s bfloat16; "
        f"memory read {machine['read_bytes_per_s'] / 1e9:.1f} GB/s" + (" [--tiny]" if args.tiny else "")
    )
    checks = Checks(dtype)
    report = {"machine": machine, "dtype": args.dtype, "tiny": args.tiny, "workloads": {}, "checks": checks.done}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(settings, dtype, args.repeats or settings.repeats, args.size, Path(tmp), checks, machine)
        for workload in args.workload:
            if workload.startswith("train-"):
                rows = train_workload(run, workload)
            else:
                rows = {"decode": decode_workload, "fewshot-classify": fewshot_workload, "data": data_workload}[
                    workload
                ](run)
            report["workloads"][workload] = rows
            args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")
    if checks.failed:
        print(f"{len(checks.failed)} agreement check(s) FAILED:")
        for check in checks.failed:
            print(f"  {check['where']}: {check['what']}: {check['detail']}")
        sys.exit(1)
    print(f"all {len(checks.done)} agreement checks passed")


if __name__ == "__main__":
    main()
