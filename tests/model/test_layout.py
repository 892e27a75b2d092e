"""Weight layout (``interleaf.model.layout``): float32 linear weights on a CPU lie (in, out)-major,
the same shapes and values as torch's (out, in); checkpoints, training and the tied embeddings
do not notice; bfloat16 and FSDP get torch's layout."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from interleaf import Flamingo
from interleaf.model.layout import is_in_major, set_weight_layout

from conftest import TEXTS, encode


def _linear_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear) and min(m.weight.shape) > 1]


def test_layouts_move_storage_not_values():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4), nn.Linear(4, 1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = [id(p) for p in net.parameters()]
    x = torch.randn(3, 8)
    ref = net(x)
    assert set_weight_layout(net) == 2  # the (1, 4) weight has one layout only
    assert all(is_in_major(w) for w in _linear_weights(net))
    assert [id(p) for p in net.parameters()] == params  # the same Parameters (optimisers keep them)
    for k, v in net.state_dict().items():
        assert v.shape == before[k].shape and torch.equal(v, before[k]), k
    # The matmul sums in another order: the outputs agree to float32 rounding.
    torch.testing.assert_close(net(x), ref, rtol=1e-6, atol=1e-6)
    assert set_weight_layout(net) == 0  # idempotent
    assert set_weight_layout(net, "out-major") == 2
    assert all(w.is_contiguous() for w in _linear_weights(net))
    net.to(torch.bfloat16)
    assert set_weight_layout(net, "auto") == 0  # bfloat16 keeps torch's layout
    with pytest.raises(ValueError, match="weight layout 'column'"):
        set_weight_layout(net, "column")


def test_tied_embeddings_share_the_moved_weight():
    """An LM whose output head is its input embedding: one Parameter, moved once; the lookup
    reads the same rows and its gradient lands in the same layout."""
    embed = nn.Embedding(50, 16)
    head = nn.Linear(16, 50, bias=False)
    head.weight = embed.weight
    ids = torch.tensor([[3, 7, 49, 0]])
    ref_rows, ref_logits = embed(ids).detach().clone(), head(embed(ids)).detach().clone()
    model = nn.ModuleDict({"embed": embed, "head": head})
    assert set_weight_layout(model) == 1
    assert head.weight is embed.weight and is_in_major(embed.weight)
    assert torch.equal(embed(ids), ref_rows)
    logits = head(embed(ids))
    torch.testing.assert_close(logits, ref_logits, rtol=1e-6, atol=1e-6)
    logits.sum().backward()
    assert embed.weight.grad.shape == embed.weight.shape


def test_auto_puts_bfloat16_weights_back_in_torch_layout():
    net = nn.Linear(8, 16)
    set_weight_layout(net)
    assert is_in_major(net.weight)
    net.to(torch.bfloat16)  # .to() keeps the strides it finds
    assert is_in_major(net.weight)
    assert set_weight_layout(net) == 1 and net.weight.is_contiguous()


def test_loaded_models_are_in_major_and_round_trip(make_model, tmp_path):
    model = make_model()
    weights = _linear_weights(model)
    assert weights and all(is_in_major(w) for w in weights)
    assert is_in_major(model.language_model.lm.get_output_embeddings().weight)
    batch = encode(model, TEXTS)
    with torch.no_grad():
        ours = model(*batch).logits
    model.save_pretrained(tmp_path / "ckpt")
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    again = Flamingo.from_pretrained(tmp_path / "ckpt")
    assert all(is_in_major(w) for w in _linear_weights(again))
    with torch.no_grad():
        assert torch.equal(again(*batch).logits, ours)  # same layout, same computation: to the bit
    bf16 = Flamingo.from_pretrained(tmp_path / "ckpt", dtype="bfloat16")
    assert all(w.is_contiguous() for w in _linear_weights(bf16))
    torch_layout = Flamingo.from_pretrained(tmp_path / "ckpt")
    set_weight_layout(torch_layout, "out-major")
    with torch.no_grad():
        # float32 rounding of sums of a few hundred terms, reordered
        torch.testing.assert_close(torch_layout(*batch).logits, ours, rtol=1e-5, atol=1e-5)


def test_training_step_keeps_the_layout_and_matches_torchs(make_model):
    """A step of AdamW in either layout: the same update to float32 rounding, the layout kept
    (the gradients and the optimiser's state follow the parameter's strides)."""
    updated = []
    for layout in ("in-major", "out-major"):
        model = make_model()
        set_weight_layout(model, layout)
        model.train()
        trained = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trained, lr=1e-2)
        ids, mask, pixels = encode(model, TEXTS)
        loss = model(ids, mask, pixels, labels=ids.masked_fill(mask == 0, -100), return_logits=False).loss
        loss.backward()
        opt.step()
        weights = [m.weight for m in model.blocks[0].modules() if isinstance(m, nn.Linear)]
        assert all(is_in_major(w) == (layout == "in-major") for w in weights)
        updated.append([p.detach().clone() for p in trained])
    for a, b in zip(*updated, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_arguments_name_the_problem():
    with pytest.raises(TypeError, match="takes a torch module .* not str"):
        set_weight_layout("ckpt")
    with pytest.raises(TypeError, match="takes a 2-D weight tensor .* not Linear"):
        is_in_major(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="not a 3-D tensor"):
        is_in_major(torch.zeros(2, 3, 4))
