"""The induction probe: a model that copies reads near 0, one that cannot reads 1, and
probing during pretraining leaves the training itself unchanged."""

import json
import math
import types

import pytest
import torch
from torch import nn

from interleaf.eval.probes import lm_induction

VOCAB = 50


class Copier(nn.Module):
    """Next-token logits that know the answer from ``period`` tokens back (an induction head at
    its best); uniform where there is nothing to copy."""

    def __init__(self, period: int):
        super().__init__()
        self.period = period
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, VOCAB)
        for j in range(self.period - 1, input_ids.shape[1]):
            logits[:, j].scatter_(1, input_ids[:, j - self.period + 1, None], 30.0)
        return types.SimpleNamespace(logits=logits)


class Uniform(Copier):
    def forward(self, input_ids):
        return types.SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))


def test_a_copying_model_reads_near_zero_and_a_blind_one_reads_one():
    copied = lm_induction(Copier(period=16), (3, VOCAB), length=16, n=8)
    # the first copy has nothing to copy (uniform: log(VOCAB) nats a token, up to rounding);
    # the second is copied from the first with logit margin 30 (loss about 50 * exp(-30))
    assert copied["first"] == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert copied["second"] < 1e-9 and copied["ratio"] < 1e-9
    blind = lm_induction(Uniform(period=16), (3, VOCAB), length=16, n=8, bos=1)
    # uniform logits: both copies cost log(VOCAB) nats a token, up to float rounding
    assert blind["first"] == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert blind["ratio"] == pytest.approx(1.0, rel=1e-6)
    assert (blind["length"], blind["n"]) == (16, 8)


def test_the_probe_keeps_the_models_mode_and_refuses_bad_ranges():
    model = Uniform(period=4).train()
    lm_induction(model, (0, VOCAB), length=4, n=2)
    assert model.training
    with pytest.raises(ValueError, match="vocab"):
        lm_induction(model, (5, 5))
    with pytest.raises(ValueError, match="length"):
        lm_induction(model, (0, VOCAB), length=1)


def test_the_lm_probe_refuses_ids_the_model_has_no_embedding_for():
    from transformers import LlamaConfig, LlamaForCausalLM

    from interleaf.eval.probes import lm_induction

    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    assert lm_induction(lm, (3, 50), n=2)["ratio"] > 0
    with pytest.raises(ValueError, match="must be token ids of the model's 50 embeddings"):
        lm_induction(lm, (3, 5000))  # a tokenizer of another model
    with pytest.raises(ValueError, match="50 embeddings"):
        lm_induction(lm, (3, 50), bos=99)


def test_the_induction_plot_refuses_what_is_not_a_curve(tmp_path):
    from interleaf.eval.report import plot_induction

    for bad in ([], {"curve": [], "final": {}}, [{"step": 0, "second": 1.0}]):
        with pytest.raises(ValueError, match="curve: a list of probe points"):
            plot_induction(bad, tmp_path / "p.png")
    points = [{"step": 0, "first": 6.0, "second": 6.0}, {"step": 10, "first": 6.0, "second": 0.5}]
    assert plot_induction(points, tmp_path / "p.png", copying_until=5).read_bytes()[:4] == b"\x89PNG"


def test_probing_during_pretraining_records_a_curve_and_changes_nothing(tmp_path):
    from interleaf.data.tinyworld import iter_train_documents
    from interleaf.eval.probes import ordinary_ids
    from interleaf.train.backbones import LMPretraining, document_text, pretrain_lm, train_tokenizer

    texts = [document_text(d) for d in iter_train_documents(seed=0, n=40)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    low, high = ordinary_ids(tokenizer)
    assert low == 3 and high == len(tokenizer)  # <s>, </s>, <unk> first; nothing added yet
    cfg = LMPretraining(hidden=32, layers=2, heads=2, seq_len=64, batch_size=4, steps=12, warmup=2)
    plain = pretrain_lm(texts, tokenizer, tmp_path / "plain", cfg, progress=False)
    probed_cfg = LMPretraining(**{**vars(cfg), "probe_every": 5})
    probed = pretrain_lm(texts, tokenizer, tmp_path / "probed", probed_cfg, progress=False)
    assert probed == plain  # the same computation on the same shapes: the probe uses no shared RNG
    assert not (tmp_path / "plain" / "induction.json").exists()
    record = json.loads((tmp_path / "probed" / "induction.json").read_text())
    assert [p["step"] for p in record["curve"]] == [0, 5, 10, 12]
    assert record["final"] == record["curve"][-1]
    # an untrained LM cannot copy: both copies cost about log(vocabulary size)
    assert 0.8 < record["curve"][0]["ratio"] < 1.2
    with pytest.raises(ValueError, match="induction_share must be in"):
        pretrain_lm(texts, tokenizer, tmp_path / "bad", LMPretraining(**{**vars(cfg), "induction_share": 1.5}))
    assert not (tmp_path / "bad").exists()  # refused before any work


def test_copying_comes_first_for_induction_first_steps_then_its_share(tmp_path, monkeypatch):
    """The curriculum that formed induction heads in the demo's LM: the first ``induction_first``
    batches are copying rows alone, the rest ``induction_share`` of them."""
    from interleaf.data.tinyworld import iter_train_documents
    from interleaf.train import backbones
    from interleaf.train.backbones import LMPretraining, document_text, pretrain_lm, train_tokenizer

    texts = [document_text(d) for d in iter_train_documents(seed=0, n=20)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    batches = []
    make = backbones._lm_batch

    def recording(*args):
        ids, labels = make(*args)
        batches.append((labels == -100).any(dim=1).tolist())  # a copying row masks its first copy
        return ids, labels

    monkeypatch.setattr(backbones, "_lm_batch", recording)
    cfg = LMPretraining(
        hidden=32,
        layers=1,
        heads=2,
        seq_len=64,
        batch_size=4,
        steps=6,
        warmup=1,
        induction_first=2,
        induction_share=0.5,
    )
    pretrain_lm(texts, tokenizer, tmp_path / "lm", cfg, progress=False)
    assert batches == [[True] * 4] * 2 + [[False, False, True, True]] * 4
    with pytest.raises(ValueError, match=r"induction_run must be \(shortest, longest\)"):
        LMPretraining(induction_run=(30, 10))
    with pytest.raises(ValueError, match="steps must be >= 1 and probe_every >= 0"):
        LMPretraining(probe_every=-5)
    with pytest.raises(ValueError, match=r"induction_first must be in \[0, steps=6\]"):
        pretrain_lm(texts, tokenizer, tmp_path / "bad", LMPretraining(**{**vars(cfg), "induction_first": 7}))


@pytest.fixture(scope="module")
def classification(tmp_path_factory):
    from interleaf.data import tinyworld
    from interleaf.eval.tasks import load_task

    root = tmp_path_factory.mktemp("world")
    tinyworld.write(root, seed=0, n_train=10, n_eval=12)
    spec, support, _ = load_task("tinyworld_classification", root)
    return spec, support


def test_the_picture_probe_reads_first_sight_repeat_and_same_class(classification, monkeypatch):
    """A stand-in ranker that knows a word once the prompt has shown it (log-prob -0.1 a token)
    and not before (-5): the probe's first sight costs 5, the repeat and the same class 0.1."""
    from interleaf.eval import probes

    spec, support = classification

    def ranker(model, processor, prompts, images, candidates):
        assert all(len(imgs) == p.count("<image>") for p, imgs in zip(prompts, images))
        return [[-0.1 if c[0].strip() in p else -5.0] for p, c in zip(prompts, candidates)]

    monkeypatch.setattr(probes, "rank_candidates", ranker)
    processor = types.SimpleNamespace(tokens=types.SimpleNamespace(end_of_chunk="<|endofchunk|>"))
    result = probes.flamingo_induction(None, processor, spec, support, shots=4, n=20)
    assert result["first"] == pytest.approx(5.0) and result["repeat"] == pytest.approx(0.1)
    assert result["same_class"] == pytest.approx(0.1) and result["ratio"] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="distinct classes"):
        probes.flamingo_induction(None, processor, spec, support, shots=7)


def test_the_picture_probe_runs_on_a_flamingo(classification, backbones, tmp_path):
    from interleaf import Flamingo
    from interleaf.eval.probes import flamingo_induction
    from interleaf.processing import Processor

    from conftest import tiny_config

    torch.manual_seed(0)
    Flamingo.from_config(tiny_config(backbones)).save_pretrained(tmp_path)
    model, processor = Flamingo.from_pretrained(tmp_path), Processor.from_pretrained(tmp_path)
    spec, support = classification
    result = flamingo_induction(model, processor, spec, support, shots=2, n=3)
    assert all(math.isfinite(result[k]) and result[k] > 0 for k in ("first", "repeat", "same_class"))
    assert (result["shots"], result["n"]) == (2, 3)


def test_copying_rows_are_learned_on_their_repeats_only():
    import random

    from interleaf.train.backbones import copying_row

    ids, labels = copying_row(random.Random(0), (3, VOCAB), 200, (4, 9))
    assert len(ids) == len(labels) == 200 and all(3 <= i < VOCAB for i in ids)
    start, runs = 0, 0
    while start + 18 < len(ids):  # walk the runs: each first copy, then its repeat
        n = next(k for k in range(4, 10) if ids[start : start + k] == ids[start + k : start + 2 * k])
        assert labels[start : start + n + 1] == [-100] * (n + 1)  # the first copy and the repeat's first token
        assert labels[start + n + 1 : start + 2 * n] == ids[start + n + 1 : start + 2 * n]
        start, runs = start + 2 * n, runs + 1
    assert runs >= 10
