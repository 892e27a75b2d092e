"""Pretraining the tiny backbones on the tiny world, so the Flamingo stage starts, as in the
papers, from a frozen language model and a frozen vision encoder that already know something.

- :func:`train_tokenizer`: a byte-level BPE tokenizer (``tokenizers``) trained on the world's text.
- :func:`pretrain_lm`: a small decoder LM (transformers' Llama or GPT-2 architecture) trained on
  the world's documents written as text, each picture replaced by its caption (so the LM reads
  "a large red star on a grey background. Output: bakex" where the Flamingo reads
  "<image>Output: bakex"), packed into fixed-length sequences.
- :func:`pretrain_vision`: a small CLIP vision tower trained contrastively (the symmetric InfoNCE
  loss of CLIP, with a learned temperature) against a small text encoder on (picture, caption)
  pairs; only the vision tower is kept.

Each writes a Hugging Face directory (``save_pretrained``) that ``LMConfig.source`` /
``VisionConfig.source`` load like any released checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from interleaf.data.schema import Document
from interleaf.data.tinyworld import TRAIN_COMBOS, Scene, caption, random_scene, reference_captions, render
from interleaf.eval.probes import lm_induction, ordinary_ids
from interleaf.tiny import CHAT_TEMPLATE, build_tokenizer, lm_config, vision_config


def document_text(doc: Document) -> str:
    """The document as plain text: each picture replaced by its caption (``image.meta["scene"]``),
    chat turns written ``role: text``; one line per segment pair."""
    parts = []
    for seg in doc.segments:
        if seg.image is not None:
            scene = seg.image.meta.get("scene")
            if scene is None:
                raise ValueError(f"document {doc.id!r}: an image without a scene cannot be written as text")
            parts.append(caption(Scene.from_dict(scene)))
        else:
            text = seg.text if seg.role is None else f"{seg.role}: {seg.text}"
            parts.append(text + "\n")
    return " ".join(parts).replace("\n ", "\n").strip()


def train_tokenizer(texts: Iterable[str], directory: str | Path | None = None, *, vocab_size: int = 512):
    """A byte-level BPE tokenizer with ``<s>``/``</s>``/``<unk>``, trained on ``texts``."""
    corpus = "\n".join(texts)
    return build_tokenizer(directory, vocab_size=vocab_size, corpus=corpus, chat_template=CHAT_TEMPLATE)


@dataclass(frozen=True, kw_only=True)
class LMPretraining:
    family: str = "llama"  # a family of interleaf.tiny.lm_config: llama, gpt2, ...
    hidden: int = 96
    layers: int = 4
    heads: int = 4
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 600
    lr: float = 3e-3
    warmup: int = 30
    seed: int = 0
    probe_every: int = 0  # > 0: the induction probe every so many steps and after the last (induction.json)
    # the share of a batch's rows that are synthetic copying text: random token runs, each
    # repeated at once (A A B B ...), learned on the repeats only: it rewards induction heads
    induction_share: float = 0.0
    # the runs' lengths, in tokens: runs of 4-24 formed no induction in 3,000 steps, 16-48 (at
    # lr 1e-3) did, abruptly between steps 750 and 1,000 (README)
    induction_run: tuple[int, int] = (16, 48)
    # the first so many steps train on copying rows alone (a curriculum): mixed in from the start
    # at share 0.5, they had formed no induction by step 2,000 (README)
    induction_first: int = 0

    def __post_init__(self):
        if not 0.0 <= self.induction_share <= 1.0:  # also refuses nan
            raise ValueError(f"induction_share must be in [0, 1], got {self.induction_share}")
        if not 0 <= self.induction_first <= self.steps:
            raise ValueError(f"induction_first must be in [0, steps={self.steps}], got {self.induction_first}")
        low, high = self.induction_run
        if not 1 <= low <= high:
            raise ValueError(
                f"induction_run must be (shortest, longest) with 1 <= shortest <= longest, got {self.induction_run}"
            )
        if self.steps < 1 or self.probe_every < 0:
            raise ValueError(f"steps must be >= 1 and probe_every >= 0, got {self.steps} and {self.probe_every}")


def _packed(ids: list[list[int]], seq_len: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless windows of ``seq_len`` tokens over the documents concatenated in shuffled order."""
    buffer: list[int] = []
    while True:
        order = list(range(len(ids)))
        rng.shuffle(order)
        for i in order:
            buffer += ids[i]
            while len(buffer) >= seq_len:
                yield buffer[:seq_len]
                buffer = buffer[seq_len:]


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_lm(
    texts: list[str], tokenizer, directory: str | Path, cfg: LMPretraining = LMPretraining(), *, progress: bool = True
) -> list[float]:
    """Train a small causal LM on ``texts`` (each ends with EOS) and save it with ``tokenizer``
    to ``directory``; returns the per-step losses."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    config = lm_config(cfg.family, len(tokenizer), hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads)
    model = transformers.AutoModelForCausalLM.from_config(config)
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    windows = _packed(ids, cfg.seq_len, rng)
    curve: list[dict] = []
    vocab = ordinary_ids(tokenizer)

    def probe(step: int) -> None:
        if cfg.probe_every > 0 and (step % cfg.probe_every == 0 or step == cfg.steps):
            curve.append({"step": step, **lm_induction(model, vocab, seed=cfg.seed)})

    probe(0)
    steps = iter(range(cfg.steps))

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        share = 1.0 if next(steps) < cfg.induction_first else cfg.induction_share
        return _lm_batch(windows, cfg, vocab, rng, share)

    losses = _optimise(
        model,
        lambda: _lm_loss(model, *batch()),
        cfg.steps,
        cfg.lr,
        cfg.warmup,
        desc="pretrain LM",
        progress=progress,
        after_step=probe,
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if curve:
        (Path(directory) / "induction.json").write_text(json.dumps({"curve": curve, "final": curve[-1]}, indent=1))
    return losses


def _lm_batch(
    windows: Iterator[list[int]], cfg: LMPretraining, vocab: tuple[int, int], rng: random.Random, share: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of (input ids, labels): windows of the texts (labels: the ids) and ``share`` of
    the rows copying text in their place."""
    copying = round(share * cfg.batch_size)
    rows = [next(windows) for _ in range(cfg.batch_size - copying)]
    ids, labels = [*rows], [*rows]
    for _ in range(copying):
        row, target = copying_row(rng, vocab, cfg.seq_len, cfg.induction_run)
        ids.append(row)
        labels.append(target)
    return torch.tensor(ids), torch.tensor(labels)


def copying_row(
    rng: random.Random, vocab: tuple[int, int], length: int, run: tuple[int, int] = (16, 48)
) -> tuple[list[int], list[int]]:
    """``length`` tokens of random runs each shown twice (A A B B ...), ids drawn uniformly from
    ``vocab`` (low, high); labels -100 (no loss) on each first copy and on each repeat's first
    token, which nothing predicts: the loss is on what can be copied."""
    low, high = vocab
    ids: list[int] = []
    labels: list[int] = []
    while len(ids) < length:
        tokens = [rng.randrange(low, high) for _ in range(rng.randint(*run))]
        ids += tokens + tokens
        labels += [-100] * len(tokens) + [-100] + tokens[1:]
    return ids[:length], labels[:length]


def _lm_loss(model, batch: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=labels, use_cache=False).loss  # no KV cache while training


def _optimise(
    model: nn.Module,
    loss_fn,
    steps: int,
    lr: float,
    warmup: int,
    *,
    desc: str,
    progress: bool,
    after_step: Callable[[int], None] | None = None,
):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps, warmup))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for _ in bar:
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if after_step is not None:
            after_step(len(losses))
    model.eval()
    return losses


@dataclass(frozen=True, kw_only=True)
class VisionPretraining:
    hidden: int = 64
    layers: int = 4
    image_size: int = 32
    patch_size: int = 8
    text_hidden: int = 64
    text_layers: int = 2
    embed_dim: int = 64
    batch_size: int = 64
    steps: int = 400
    lr: float = 2e-3
    warmup: int = 20
    seed: int = 0


class TextEncoder(nn.Module):
    """CLIP's other half, small: a transformer over caption tokens, mean-pooled and projected."""

    def __init__(self, vocab_size: int, cfg: VisionPretraining):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.text_hidden)
        self.position = nn.Parameter(torch.randn(64, cfg.text_hidden) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.text_hidden, 4, cfg.text_hidden * 2, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.text_hidden)
        self.project = nn.Linear(cfg.text_hidden, cfg.embed_dim, bias=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position[: ids.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=~mask.bool()))
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.project(pooled)


class Clip(nn.Module):
    """A CLIP vision tower, a projection of its pooled output, a text encoder, and the temperature."""

    def __init__(self, vocab_size: int, cfg: VisionPretraining):
        super().__init__()
        vcfg = vision_config(
            "clip", image_size=cfg.image_size, patch_size=cfg.patch_size, hidden=cfg.hidden, layers=cfg.layers
        )
        self.vision = transformers.CLIPVisionModel(vcfg)
        self.project = nn.Linear(cfg.hidden, cfg.embed_dim, bias=False)
        self.text = TextEncoder(vocab_size, cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def loss(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.project(self.vision(pixel_values=pixels).pooler_output), dim=-1)
        text = F.normalize(self.text(ids, mask), dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * image @ text.T
        target = torch.arange(len(logits))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def image_processor(image_size: int = 32):
    """CLIP's preprocessing at ``image_size`` (the PIL implementation: torchvision is optional)."""
    cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    return cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def scene_pairs(seed: int, image_size: int = 32, *, shape_negatives: bool = False) -> Iterator[tuple[Image.Image, str]]:
    """Endless (picture, caption) pairs of random training scenes, a caption paraphrase each.

    With ``shape_negatives`` every scene is followed by its hard negative: the same scene (places,
    colours, sizes, background) with each group's shape changed to another one that the training
    combinations allow in that colour, and its caption. A contrastive batch can then only be
    told apart by shape, which plain batches seldom require (colour separates most pairs), as
    NegCLIP's swapped-word negatives do for word order (Yuksekgonul et al., ICLR 2023)."""
    rng = random.Random(f"tinyworld/{seed}/clip")
    while True:
        scene = random_scene(rng)
        scenes = [scene, _shape_swapped(scene, rng)] if shape_negatives else [scene]
        for shown in scenes:
            yield render(shown, image_size), rng.choice([caption(shown), *reference_captions(shown)])


def _shape_swapped(scene: Scene, rng: random.Random) -> Scene:
    """``scene`` with every group's shape replaced by another of its colour's training shapes
    (held-out colour+shape combinations stay unseen); a group with no other keeps its shape."""
    shown = scene.combos()
    swap: dict[tuple[str, str], str] = {}
    for thing in scene.things:
        key = (thing.colour, thing.shape)
        if key not in swap:
            taken = shown | {(c, s) for (c, _), s in swap.items()}  # two groups never become one
            others = [s for c, s in TRAIN_COMBOS if c == thing.colour and (c, s) not in taken]
            swap[key] = rng.choice(others) if others else thing.shape
    things = tuple(dataclasses.replace(t, shape=swap[(t.colour, t.shape)]) for t in scene.things)
    return dataclasses.replace(scene, things=things)


def pretrain_vision(
    pairs: Iterator[tuple[Image.Image, str]],
    tokenizer,
    directory: str | Path,
    cfg: VisionPretraining = VisionPretraining(),
    *,
    progress: bool = True,
) -> list[float]:
    """Train a CLIP vision tower contrastively on ``pairs`` and save it (``CLIPVisionModel``
    and its ``CLIPImageProcessor``) to ``directory``; returns the per-step losses."""
    torch.manual_seed(cfg.seed)
    clip = Clip(len(tokenizer), cfg)
    processor = image_processor(cfg.image_size)

    def batch_loss() -> torch.Tensor:
        images, texts = zip(*(next(pairs) for _ in range(cfg.batch_size)))
        pixels = processor(list(images), return_tensors="pt")["pixel_values"]
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=64)
        return clip.loss(pixels, enc["input_ids"], enc["attention_mask"])

    pad = tokenizer.pad_token
    if pad is None:
        tokenizer.pad_token = tokenizer.unk_token
    try:
        losses = _optimise(clip, batch_loss, cfg.steps, cfg.lr, cfg.warmup, desc="pretrain vision", progress=progress)
    finally:
        tokenizer.pad_token = pad
    clip.vision.save_pretrained(directory)
    processor.save_pretrained(directory)
    return losses
