"""Interleaved generation (MM-Interleaved's inference loop): continue a document with text and
drawn images in turn.

Each round writes text until the model emits the begin-of-image token (or its EOS), then draws
an image from the LM's states up to that token (see :mod:`interleaf.model.imagegen`), which
joins the document as an input image for the text that follows. ``mode="generate_texts"``
starts a round with text, ``"generate_images"`` with an image (the prompt's text describes
it); ``num_iter`` rounds, fewer if the model ends the document (EOS).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from PIL import Image

from interleaf.model.imagegen import Targets, to_images
from interleaf.processing import Processor, interleaved_items

Mode = Literal["generate_texts", "generate_images"]
MODES = ("generate_texts", "generate_images")


def generate_interleaved(
    model,
    processor,
    prompt: Sequence[Any],
    *,
    mode: Mode = "generate_texts",
    num_iter: int = 1,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    guidance_scale: float | None = None,
    image_guidance_scale: float | None = None,
    inference_steps: int | None = None,
) -> list[dict[str, Any]]:
    """The document: the prompt's items, then the generated ones, each ``{"text": str}`` or
    ``{"image": PIL.Image}``, with ``"generated": True`` on the new ones. Sampling (text with
    ``do_sample``, and always the images' noise) is seeded by ``seed``: the same call gives the
    same document. ``num_iter`` is the most rounds: the document ends sooner when the model
    ends it (EOS, or no begin-of-image token within ``max_new_tokens``). The drawing settings
    are those of :func:`draw_images`."""
    drawing = dict(guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale, steps=inference_steps)
    check_drawing(model, processor, seed=seed, **drawing)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"num_iter must be an integer >= 1, got {num_iter!r}")
    if seed + num_iter > 2**63:
        raise ValueError(f"seed must be below 2**63 - num_iter (round r draws with seed + r), got {seed!r}")
    items = interleaved_items(prompt)
    if not items:
        raise ValueError("prompt is empty: give at least one text or image")
    check_text(model, items, "prompt")
    document: list[dict[str, Any]] = [{"text": x} if isinstance(x, str) else {"image": x} for x in items]
    settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p)
    steps = ("text", "image") if mode == "generate_texts" else ("image", "text")
    for round_ in range(num_iter):
        for step in steps:
            if step == "image":
                image = _draw(model, processor, document, seed + round_, drawing)
                document.append({"image": image, "generated": True})
                continue
            text, ended = _write(model, processor, document, seed=seed + round_, **settings)
            if text:
                document.append({"text": text, "generated": True})
            if ended:
                return document
    return document


def _write(model, processor, document, *, seed: int, **settings) -> tuple[str, bool]:
    """Generate text after the document; whether the model ended the document (EOS, or no
    begin-of-image token within the budget)."""
    batch = processor([_prompt(model, document)])
    ids = model.generate(**batch, seed=seed if settings["do_sample"] else None, stop_at_end_of_chunk=False, **settings)
    tokens = ids[0].tolist()
    ended = not tokens or tokens[-1] != model.ids.begin_of_image
    return processor.decode(tokens, skip_special_tokens=True), ended


def _draw(model, processor, document, seed: int, drawing: dict[str, Any]) -> Image.Image:
    """Draw the next image of the document, announced by the begin-of-image token."""
    items = [*_prompt(model, document), model.config.tokens.begin_of_image]
    (image,) = _draw_batch(model, processor, [items], seed, drawing)
    return image


@torch.no_grad()
def draw_images(
    model,
    processor,
    prompts: Sequence[Sequence[Any]],
    *,
    seed: int = 0,
    guidance_scale: float | None = None,
    image_guidance_scale: float | None = None,
    inference_steps: int | None = None,
) -> list[Image.Image]:
    """One image drawn after each prompt (an interleaved list; the begin-of-image token is
    appended), in one batch: the prompts are left-padded, so each ends at the last position.
    ``guidance_scale``, ``image_guidance_scale`` (the earlier images' own guidance, see
    :class:`~interleaf.config.ImageGenerationConfig`) and ``inference_steps`` default to the
    config's. Prompt ``i`` starts
    from the noise of ``seed + i``: it draws what ``draw([prompt], seed=seed + i)`` draws,
    whatever else is in the batch (up to float rounding, which batching may change)."""
    drawing = dict(guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale, steps=inference_steps)
    check_drawing(model, processor, seed=seed, **drawing)
    if not prompts:
        raise ValueError("draw: no prompt (give a list of prompts, each a list of text and images)")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str) or not prompt:
            what = "a string" if isinstance(prompt, str) else "empty"
            raise ValueError(f"draw: prompt {i} is {what}; each prompt is a non-empty list of text and images")
    if seed + len(prompts) > 2**63:
        raise ValueError(f"seed must be below 2**63 - len(prompts) (prompt i draws with seed + i), got {seed!r}")
    boi = model.config.tokens.begin_of_image
    items = [[*interleaved_items(p, f"prompt {i}"), boi] for i, p in enumerate(prompts)]
    for i, prompt_items in enumerate(items):
        check_text(model, prompt_items[:-1], f"prompt {i}")
    return _draw_batch(model, processor, items, seed, drawing)


@torch.no_grad()
def _draw_batch(model, processor, items: list[list], seed: int, drawing: dict[str, Any]) -> list[Image.Image]:
    """Draw after each of ``items`` (checked processor items, each ending with the
    begin-of-image token); item ``i`` from the noise of ``seed + i``; ``drawing``: the
    checked keywords of :meth:`ImageGenerator.sample`."""
    batch = processor(items, padding_side="left")
    input_ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
    patches = model.config.image_generation.mmfs_features == "patches"
    latents, features = model.encode_images_and_features(input_ids, batch["pixel_values"], features=patches)
    out = model.step(input_ids, history_ids=input_ids, attention_mask=mask, media=model.media(latents))
    rows = torch.arange(len(items), device=input_ids.device)
    targets = Targets(
        sample=rows,
        image=(input_ids == model.ids.image).sum(-1),
        position=torch.full_like(rows, input_ids.shape[1] - 1),
    )
    gen = model.image_generator
    states = model.generation_states(input_ids, out.last_hidden_state)
    media = model.generation_media(latents, features)
    context, keep = gen.context(states, mask, media, targets, batch["pixel_values"])
    noise = [torch.Generator().manual_seed(seed + i) for i in range(len(items))]
    return to_images(gen.sample(context, keep, generator=noise, **drawing))


def check_drawing(
    model,
    processor,
    *,
    seed: Any = 0,
    guidance_scale: Any = None,
    image_guidance_scale: Any = None,
    steps: Any = None,
) -> None:
    """A clear error, before any work, for what drawing cannot use: a model without an image
    head; a processor that is not an interleaf ``Processor`` or whose tokenizer lacks the
    model's begin-of-image token (a text-only processor would draw after the wrong token); a
    seed that is not an integer in [0, 2**63); a guidance scale (or the images' own) that is not
    a finite number >= 0; a number of sampling steps (``inference_steps``) that is not an
    integer in [1, the config's ``train_timesteps``]."""
    if model.image_generator is None:
        raise ValueError("this model has no image generation head (its config has no image_generation)")
    if not isinstance(processor, Processor):
        raise ValueError(f"processor: expected an interleaf Processor, got {type(processor).__name__}")
    boi = model.config.tokens.begin_of_image
    if processor.ids.begin_of_image != model.ids.begin_of_image:
        raise ValueError(
            f"processor: its tokenizer gives the begin-of-image token {boi!r} the id {processor.ids.begin_of_image}, "
            f"the model {model.ids.begin_of_image}: load the processor saved with this model "
            "(Processor.from_pretrained(model_dir))"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    for name, scale in (("guidance_scale", guidance_scale), ("image_guidance_scale", image_guidance_scale)):
        if scale is not None and (
            isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0
        ):
            raise ValueError(f"{name} must be a finite number >= 0 (1: no guidance), got {scale!r}")
    most = model.config.image_generation.train_timesteps
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= most):
        raise ValueError(
            f"inference_steps must be an integer in [1, {most}] (the model's train_timesteps), got {steps!r}"
        )


def check_text(model, items: Sequence[Any], where: str) -> None:
    """Refuse a text item that writes the begin-of-image token itself: where images are drawn
    is the model's to say (generate) or the call's (draw), never a string's."""
    boi = model.config.tokens.begin_of_image
    for i, item in enumerate(items):
        if isinstance(item, str) and boi in item:
            raise ValueError(f"{where}, item {i}: the text contains the begin-of-image token {boi!r}")


def _prompt(model, document) -> list[str | Image.Image]:
    """Processor items: text, images, and the begin-of-image token before each drawn image (as
    the training documents write an image that follows its text)."""
    boi = model.config.tokens.begin_of_image
    items: list[str | Image.Image] = []
    for part in document:
        if "text" in part:
            items.append(part["text"])
            continue
        if part.get("generated"):
            items.append(boi)
        items.append(part["image"])
    return items
