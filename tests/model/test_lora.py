"""LoRA on the frozen LM (peft): zero-initialised adapters change nothing, only the adapters
and the Flamingo parts train, checkpoints round-trip, and the count is the analytic one."""

import json

import pytest
import torch
import transformers

from interleaf import Flamingo
from interleaf.config import LoraConfig, TrainableConfig
from interleaf.model.masks import flamingo_labels
from interleaf.model.trainable import parameter_groups, parameter_report

from conftest import TEXTS, encode

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
# The attention projections of each family's decoder layers, as (name suffix, in, out) from its HF config.
ATTENTION = {
    "llama": lambda c: [
        ("self_attn.q_proj", c.hidden_size, c.num_attention_heads * c.head_dim),
        ("self_attn.k_proj", c.hidden_size, c.num_key_value_heads * c.head_dim),
        ("self_attn.v_proj", c.hidden_size, c.num_key_value_heads * c.head_dim),
        ("self_attn.o_proj", c.num_attention_heads * c.head_dim, c.hidden_size),
    ],
    "gpt2": lambda c: [("attn.c_attn", c.n_embd, 3 * c.n_embd), ("attn.c_proj", c.n_embd, c.n_embd)],
}


def lora_model(make_model, family, lora=LORA, **trainable):
    return make_model(family, trainable=TrainableConfig(lora=lora, **trainable))


def logits(model, seed=0):
    ids, mask, pixels = encode(model, TEXTS, seed=seed)
    with torch.no_grad():
        return model(ids, mask, pixels).logits


def train_steps(model, steps=3):
    model.train()
    ids, mask, pixels = encode(model, TEXTS, seed=1)
    labels = flamingo_labels(ids, mask, image_token_id=model.ids.image, end_of_chunk_id=model.ids.end_of_chunk)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        loss = model(ids, mask, pixels, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def same_weights(plain, model):
    """Give ``model`` (with adapters) the weights of ``plain`` (without), adapters aside."""
    source = plain.state_dict()
    state = {k: source[k.replace(".base_layer.", ".")] for k in model.state_dict() if ".lora_" not in k}
    model.load_state_dict(state, strict=False)


def adapted(model):
    """{module name below language_model.lm: module} of the layers that carry an adapter."""
    return {n: m for n, m in model.language_model.lm.named_modules() if hasattr(m, "lora_A")}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fresh_adapters_leave_the_model_unchanged_and_compute_w_plus_scaled_ba(make_model, family):
    plain, model = make_model(family), lora_model(make_model, family)
    same_weights(plain, model)
    layers = adapted(model)
    assert layers and all(".xattn." not in n for n in layers)
    assert all(not m.lora_B["default"].weight.any() and m.lora_A["default"].weight.any() for m in layers.values())
    before = logits(model)
    # bit-identical: the same batch and base layers, and with B = 0 the adapters add exact zeros
    assert torch.equal(before, logits(plain))

    # With random B the layer computes W x + (alpha / rank) B A x: fold B A into the plain
    # model's weights and the logits agree.
    torch.manual_seed(1)
    plain_modules = dict(plain.language_model.lm.named_modules())
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_B["default"].weight.normal_(0, 0.5)
            delta = (LORA.alpha / LORA.rank) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            target = plain_modules[name]
            target.weight += delta.T if isinstance(target, transformers.pytorch_utils.Conv1D) else delta
    changed = logits(model)
    assert not torch.allclose(changed, before, atol=1e-3)
    torch.testing.assert_close(changed, logits(plain), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_moves_only_the_adapters_and_the_flamingo_parts(make_model, family):
    model = lora_model(make_model, family, LoraConfig(rank=4, dropout=0.1))
    groups = parameter_groups(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {groups[n] for n in trainable} == {"resampler", "cross_attention", "new_token_embeddings", "lora"}
    assert {n for n, g in groups.items() if g == "lora"} <= trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved <= trainable
    assert any(".lora_B." in n for n in moved) and any(".lora_A." in n for n in moved)
    assert any(".xattn." in n for n in moved) and any(n.startswith("resampler.") for n in moved)
    assert not any(".base_layer." in n for n in moved)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_checkpoints_round_trip_with_adapters(make_model, family, tmp_path):
    model = train_steps(lora_model(make_model, family))
    expected = logits(model)
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "small", trainable_only=True)
    saved = json.loads((tmp_path / "full" / "config.json").read_text())["trainable"]["lora"]
    assert saved == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": []}
    for kind in ("full", "small"):
        loaded = Flamingo.from_pretrained(tmp_path / kind)
        assert loaded.config == model.config
        assert loaded.trainable_names == model.trainable_names
        assert parameter_report(loaded) == parameter_report(model)
        assert torch.equal(logits(loaded), expected), kind


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_trainable_count_is_the_analytic_one(make_model, backbones, family):
    model = lora_model(make_model, family)
    config = transformers.AutoConfig.from_pretrained(backbones("lm", family))
    per_layer = sum(LORA.rank * (n_in + n_out) for _, n_in, n_out in ATTENTION[family](config))
    report = parameter_report(model)
    assert report["lora"] == config.num_hidden_layers * per_layer
    flamingo_parts = sum(p.numel() for p in model.resampler.parameters()) + sum(
        p.numel() for block in model.blocks for p in block.parameters()
    )
    new_rows = 2 * (len(model.tokenizer) - config.vocab_size) * config.hidden_size  # decoupled embed + head
    assert report["resampler"] + report["cross_attention"] == flamingo_parts
    assert report["new_token_embeddings"] == new_rows
    assert report["total"] == flamingo_parts + new_rows + report["lora"] == model.num_trainable_parameters()
    assert report["lm"] == report["vision"] == 0


def test_target_globs_lm_patterns_and_errors(make_model):
    only_qv = lora_model(make_model, "llama", LoraConfig(rank=2, target_modules=("*.q_proj", "*.v_proj")))
    assert {n.rsplit(".", 1)[1] for n in adapted(only_qv)} == {"q_proj", "v_proj"}
    with_norm = lora_model(make_model, "llama", lm_patterns=("model.norm.*",))
    lm_trainable = {n for n in with_norm.trainable_names if parameter_groups(with_norm)[n] == "lm"}
    assert lm_trainable == {"language_model.lm.model.norm.weight"}
    with pytest.raises(ValueError, match=r"target_modules: '\*.query' matches no linear layer"):
        lora_model(make_model, "llama", LoraConfig(target_modules=("*.query",)))
    with pytest.raises(ValueError, match="does not combine with lm=true"):
        TrainableConfig(lm=True, lora=LoraConfig())
