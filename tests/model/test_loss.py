"""The training loss from the hidden states (no whole logits) against the plain one."""

import pytest
import torch

from interleaf.config import TrainableConfig
from interleaf.model import loss as loss_module

from conftest import TEXTS, encode


def _loss_and_grads(model, batch, labels, **kwargs):
    model.zero_grad()
    out = model(**batch, labels=labels, z_loss_weight=1e-3, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("trainable", ["default", "lm"])
def test_the_loss_from_hidden_states_equals_the_loss_from_logits(make_model, monkeypatch, trainable):
    overrides = {"trainable": TrainableConfig(lm=True)} if trainable == "lm" else {}
    model = make_model(**overrides).train()
    ids, mask, pixels = encode(model, TEXTS)
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100  # a prompt not learned
    vocab = model.language_model.vocab_size
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 5 * vocab)  # chunks of 5 rows
    rows = []
    head = model.language_model.logits
    monkeypatch.setattr(model.language_model, "logits", lambda h: rows.append(h.shape[0]) or head(h))
    plain, plain_grads = _loss_and_grads(model, batch, labels)
    rows.clear()
    fused, fused_grads = _loss_and_grads(model, batch, labels, return_logits=False)
    assert fused.logits is None and plain.logits.shape[-1] == vocab
    # only the labelled positions are scored, 5 rows at a time: never the whole (B, T, V)
    scored = int((labels[:, 1:] != -100).sum())
    assert sum(rows) == scored and max(rows) == 5
    # the same sums in another order and grouping (chunks): float32 rounding only
    assert torch.allclose(fused.loss, plain.loss, rtol=1e-6, atol=1e-6)
    assert fused_grads.keys() == plain_grads.keys()
    # the new tokens' output rows always train (and get their gradient through the chunks); the
    # LM's own head only with the LM
    assert "language_model.extra_head.weight" in fused_grads
    assert ("language_model.lm.lm_head.weight" in fused_grads) == (trainable == "lm")
    for name, grad in plain_grads.items():
        assert torch.allclose(fused_grads[name], grad, rtol=1e-4, atol=1e-6), name
    with torch.no_grad():  # no gradient wanted: the chunks are scored and nothing else
        again = model(**batch, labels=labels, z_loss_weight=1e-3, return_logits=False).loss
    assert torch.allclose(again, plain.loss, rtol=1e-6, atol=1e-6)
    nothing = torch.full_like(labels, -100)
    assert model(**batch, labels=nothing, return_logits=False).loss.item() == 0.0  # nothing to learn: 0, not NaN
