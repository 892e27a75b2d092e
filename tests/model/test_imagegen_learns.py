"""A small run learns to draw the colour it is asked for: the tiny backbones (frozen), a small
pixel UNet at 16x16 trained alone on captions each followed by its picture (as a story
document opens), then pictures drawn for held-out captions and read by the attribute
classifier.

Colour is what the pooled condition carries first; shape and count need the demo's run
(``interleaf demo --generate``, measured in the README). The LM is frozen, so its states are
computed once and the loop trains the head alone (``Flamingo.image_loss``), as the demo's stage
3 trains it with the LM frozen."""

import dataclasses
import random
import time

import torch

from interleaf import Flamingo, Processor
from interleaf.data import tinyworld
from interleaf.data.collate import CollateConfig, Collator
from interleaf.data.schema import Document, Segment
from interleaf.eval import imagegen

from drawhelp import SMALL_UNET, draw_config

UNET = dataclasses.replace(
    SMALL_UNET, block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=8, norm_num_groups=8
)
DOCUMENTS, BATCH, STEPS = 512, 32, 600


def captioned(n: int) -> list[Document]:
    """A caption (``here we have two large red circles on a grey background.``), the
    begin-of-image token, the picture."""
    docs = []
    for i in range(n):
        rng = random.Random(f"test-imagegen-learns/{i}")
        scene = tinyworld.drawn_scene(rng)
        text = rng.choice(tinyworld.FIRST).format(tinyworld.caption(scene)) + tinyworld.BEGIN_OF_IMAGE
        docs.append(Document(id=str(i), segments=[Segment(text=text), tinyworld.picture(scene, 32)]))
    return docs


def test_a_small_run_draws_the_colour_asked_for(backbones):
    start = time.perf_counter()
    torch.manual_seed(0)
    config = draw_config(
        backbones, image_size=16, mmfs=False, num_conditions=4, condition_dim=32, token_context=48, unet=UNET
    )
    model = Flamingo.from_config(config).eval()
    processor = Processor(model.tokenizer, model.image_processor, tokens=model.config.tokens)
    model.requires_grad_(False)
    head = model.image_generator.requires_grad_(True).train()
    collate = Collator(processor, CollateConfig(max_tokens=96, max_images=1))
    docs = captioned(DOCUMENTS)
    batches = []
    with torch.no_grad():  # the frozen LM's states, once
        for at in range(0, DOCUMENTS, BATCH):
            batch = collate(docs[at : at + BATCH])
            ids, mask = batch["input_ids"], batch["attention_mask"]
            batches.append((batch, model.step(ids, history_ids=ids, attention_mask=mask, media=None).last_hidden_state))
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for step in range(STEPS):
        batch, hidden = batches[step % len(batches)]
        loss = model.image_loss(batch["input_ids"], batch["attention_mask"], hidden, None, batch["pixel_values"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    trained = time.perf_counter()
    head.eval()
    prompts = tinyworld.drawing_prompts(seed=0, n=48)
    drawn = model.draw(processor, [p.prompt for p in prompts], seed=0, inference_steps=10)
    classifier = imagegen.train_classifier(seed=0, n_train=2000, steps=200)
    asked = [{"colour": p.scene.things[0].colour} for p in prompts]
    colour = imagegen.attribute_accuracy(classifier, drawn, asked)["colour"]
    print(
        f"loss {losses[0]:.3f} -> {sum(losses[-20:]) / 20:.3f}; colour {colour:.2f}; "
        f"train {trained - start:.0f} s, draw and read {time.perf_counter() - trained:.0f} s"
    )
    assert colour >= 0.5  # chance 1/6
