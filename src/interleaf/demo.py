"""``interleaf demo``: a tiny Flamingo, built and trained on a 2-core CPU in under a minute.

It writes tiny backbones to disk in the Hugging Face formats (a byte-level BPE tokenizer, a
Llama-style LM, a CLIP vision tower), builds a Flamingo over them, and trains only the
resampler, the cross-attention and the new tokens on interleaved documents about coloured
squares. It then asks, from one in-context example, for the colour of a new image, before
and after training, and saves, reloads and generates from the checkpoint.

The backbones here are random (the tiny-world demo with pretrained tiny backbones and
few-shot evaluation is the training issue's); what this shows is the whole path: build,
process interleaved prompts, train the right parameters, generate, save and load.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from interleaf.config import CrossAttentionConfig, FlamingoConfig, LMConfig, ResamplerConfig, VisionConfig
from interleaf.model.flamingo import Flamingo
from interleaf.model.masks import flamingo_labels
from interleaf.tiny import build_lm, build_tokenizer, build_vision

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
}


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    out: Path = Path("runs/demo")
    steps: int = 200
    batch_size: int = 12
    lr: float = 3e-3
    seed: int = 0


def square(colour: str, rng: random.Random, size: int = 32) -> Image.Image:
    """A coloured square at a random place on a grey, noisy background."""
    grey = rng.randint(90, 160)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    side = rng.randint(size // 2, size - 4)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    image.paste(COLOURS[colour], (x, y, x + side, y + side))
    return image


def caption(colour: str) -> str:
    return f"a photo of a {colour} square."


def document(rng: random.Random) -> list:
    """An interleaved document: two images, each followed by its caption."""
    items = []
    for colour in rng.sample(list(COLOURS), 2):
        items += [square(colour, rng), caption(colour) + "<|endofchunk|>"]
    return items


def query(rng: random.Random, colour: str) -> list:
    """One in-context example, then a new image whose colour is asked for."""
    example = rng.choice([c for c in COLOURS if c != colour])
    return [square(example, rng), caption(example) + "<|endofchunk|>", square(colour, rng), "a photo of a"]


def build(opts: DemoOptions) -> tuple[Flamingo, object]:
    from transformers import AutoImageProcessor

    from interleaf.processing import Processor

    lm_dir, vision_dir = opts.out / "backbones" / "lm", opts.out / "backbones" / "vision"
    if not (lm_dir / "config.json").exists():
        # A larger init than the usual 0.02 gives the random LM a head that can be confident.
        build_lm(lm_dir, "llama", tokenizer=build_tokenizer(), hidden=64, layers=4, initializer_range=0.3)
    if not (vision_dir / "config.json").exists():
        build_vision(vision_dir, "clip", hidden=64)
    config = FlamingoConfig(
        lm=LMConfig(source=str(lm_dir)),
        vision=VisionConfig(source=str(vision_dir)),
        resampler=ResamplerConfig(depth=2, num_latents=8, heads=4, head_dim=16, max_media=4),
        cross_attention=CrossAttentionConfig(interval=1, heads=4, head_dim=16),
    )
    torch.manual_seed(opts.seed)
    model = Flamingo.from_config(config)
    processor = Processor(model.tokenizer, AutoImageProcessor.from_pretrained(vision_dir), tokens=config.tokens)
    return model, processor


def accuracy(model, processor, rng: random.Random) -> tuple[float, str]:
    prompts, answers = [], []
    for colour in COLOURS:
        for _ in range(3):
            prompts.append(query(rng, colour))
            answers.append(colour)
    batch = processor(prompts)
    out = model.generate(**batch, max_new_tokens=4)
    texts = processor.batch_decode(out, skip_special_tokens=True)
    hits = [t.strip().startswith(a) for t, a in zip(texts, answers)]
    return sum(hits) / len(hits), texts[0]


def train(model, processor, opts: DemoOptions) -> list[float]:
    rng = random.Random(opts.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    model.train()
    losses = []
    bar = tqdm(range(opts.steps), desc="training", unit="step")
    for _ in bar:
        batch = processor([document(rng) for _ in range(opts.batch_size)], padding_side="right")
        labels = flamingo_labels(
            batch["input_ids"],
            batch["attention_mask"],
            image_token_id=model.ids.image,
            end_of_chunk_id=model.ids.end_of_chunk,
        )
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def run(opts: DemoOptions = DemoOptions()) -> dict:
    start = time.time()
    model, processor = build(opts)
    total = sum(p.numel() for p in model.parameters())
    print(f"built a Flamingo: {model.num_trainable_parameters():,} trainable of {total:,} parameters")
    before, _ = accuracy(model, processor, random.Random(1))
    losses = train(model, processor, opts)
    after, sample = accuracy(model, processor, random.Random(1))
    print()
    print("| colour from one in-context example | accuracy |")
    print("|---|---|")
    print(f"| before training | {before:.0%} |")
    print(f"| after {opts.steps} steps | {after:.0%} |")
    print(f"\nloss: {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f} (mean of the last 10 steps)")

    checkpoint = opts.out / "model"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    reloaded = Flamingo.from_pretrained(checkpoint)
    prompt = query(random.Random(7), "blue")
    batch = processor([prompt])
    answer = processor.batch_decode(reloaded.generate(**batch, max_new_tokens=4), skip_special_tokens=True)[0]
    print(f"\nprompt: <image> {prompt[1]!r} <image of a blue square> {prompt[3]!r}")
    print(f"reloaded model from {checkpoint} answers: {answer!r}")
    print(f"\ndone in {time.time() - start:.0f}s")
    return {"before": before, "after": after, "losses": losses, "answer": answer, "sample": sample}
