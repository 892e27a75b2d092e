"""Ranking candidates (interleaf.eval.ranking): chunks, batched prompts, bounded memory, and
candidates tokenized together with their prompt.

Scores are compared at TOL: chunking and batching change the shapes of the float operations,
which may change the last bits of a float32 score (shared/ARCHITECTURE.md), never more."""

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing
from transformers import AutoImageProcessor, PreTrainedTokenizerFast

from interleaf import Flamingo
from interleaf.cli import main, parser
from interleaf.config import LMConfig
from interleaf.data import tinyworld
from interleaf.eval.harness import EvalConfig
from interleaf.eval.ranking import candidate_tokens, rank_candidates
from interleaf.processing import Processor
from interleaf.tiny import build_lm

from conftest import open_gates, tiny_config

TOL = 1e-5


def picture(colour: str, shape: str = "circle"):
    return tinyworld.render(tinyworld.uniform_scene(random.Random(0), colour, shape, "large"))


def build(config, vision_dir: str):
    torch.manual_seed(0)
    model = Flamingo.from_config(config)
    open_gates(model)
    return model, Processor(model.tokenizer, AutoImageProcessor.from_pretrained(vision_dir))


@pytest.fixture(scope="module")
def llama(backbones):
    return build(tiny_config(backbones), backbones("vision", "clip"))


# Prompts of different lengths and image counts (one text-only), candidates of 1 to 4 tokens.
PROMPTS = [
    ("<image>Output: dax<|endofchunk|><image>Output:", ["red", "blue"], [" dax", " wug wug", " blicket", " red", " a"]),
    ("<image>Output:", ["green"], [" dax", " the dog sits", " wug"]),
    ("Output: dax<|endofchunk|>Output: wug<|endofchunk|>Output:", [], [" dax", " wug", " blicket wug"]),
]


def rank(model, processor, items, **kw):
    prompts, colours, candidates = zip(*items)
    images = [[picture(c) for c in cs] for cs in colours]
    return rank_candidates(model, processor, list(prompts), images, [list(c) for c in candidates], **kw)


def full_string_scores(model, processor, prompt: str, images: list, candidates: list[str]) -> list[float]:
    """The reference: each ``prompt + candidate`` alone through one plain forward pass (no
    cache); the candidate's tokens are those whose character span reaches past the prompt."""
    written = processor.write_images(prompt)
    scores = []
    for candidate in candidates:
        batch = processor(prompt + candidate, images=images)
        offsets = processor.tokenizer(written + candidate, return_offsets_mapping=True)["offset_mapping"]
        own = [i for i, (s, e) in enumerate(offsets) if e > len(written) and e > s]
        with torch.no_grad():
            logp = model(**batch).logits[0].float().log_softmax(-1)
        ids = batch["input_ids"][0]
        scores.append(torch.stack([logp[i - 1, ids[i]] for i in own]).mean().item())
    return scores


def assert_close(got: list[list[float]], expected: list[list[float]]) -> None:
    assert [len(s) for s in got] == [len(s) for s in expected]
    for row, ref in zip(got, expected):
        assert max(abs(a - b) for a, b in zip(row, ref)) < TOL, (row, ref)


# -- chunks and batches ----------------------------------------------------------------------


def test_scores_equal_one_forward_over_each_full_string(llama):
    model, processor = llama
    scores = rank(model, processor, PROMPTS)
    for (prompt, colours, candidates), got in zip(PROMPTS, scores):
        expected = full_string_scores(model, processor, prompt, [picture(c) for c in colours], candidates)
        assert_close([got], [expected])


@pytest.mark.parametrize("chunk_size", [1, 3, 11])
def test_chunk_size_does_not_change_scores(llama, chunk_size):
    model, processor = llama
    everything = rank(model, processor, PROMPTS, chunk_size=sum(len(c) for *_, c in PROMPTS))  # one chunk
    assert_close(rank(model, processor, PROMPTS, chunk_size=chunk_size), everything)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mpt"])
def test_prompts_batched_equal_one_at_a_time(backbones, family):
    """Left-padded prefixes and chunks that mix prompts give each candidate the score it gets
    alone, in LMs with rotary (llama), learned (gpt2) and ALiBi (mpt) positions."""
    model, processor = build(tiny_config(backbones, family), backbones("vision", "clip"))
    alone = [rank(model, processor, [item])[0] for item in PROMPTS]
    assert_close(rank(model, processor, PROMPTS, chunk_size=4), alone)
    assert_close(rank(model, processor, PROMPTS[::-1], chunk_size=5), alone[::-1])


def test_a_thousand_candidates_never_run_as_more_than_a_chunk(llama, monkeypatch):
    """Structural memory bound: no model call sees more rows than the chunk size, each chunk's
    cache copy holds at most that many rows, and the prompt's own cache is never written."""
    model, processor = llama
    prompt, colours = "<image>Output: dax<|endofchunk|><image>Output:", ["red", "blue"]
    names = [f" {random.Random(i).choice(['dax', 'wug', 'red', 'blue'])} {i}" for i in range(1000)]
    step, calls = model.step, []

    def recording(input_ids, *, cache=None, **kw):
        out = step(input_ids, cache=cache, **kw)
        rows = input_ids.shape[0]
        calls.append((rows, out.cache, out.cache.get_seq_length()) if cache is None else (rows, cache, None))
        return out

    monkeypatch.setattr(model, "step", recording)
    chunked = rank(model, processor, [(prompt, colours, names)], chunk_size=128)[0]
    (prompt_rows, prompt_cache, prompt_length), *chunks = calls
    assert prompt_rows == 1 and len(chunks) == 8  # ceil(1000 / 128)
    assert max(rows for rows, _, _ in chunks) == 128
    assert max(cache.layers[0].keys.shape[0] for _, cache, _ in chunks) == 128
    assert all(cache is not prompt_cache for _, cache, _ in chunks)
    assert prompt_cache.layers[0].keys.shape[0] == 1 and prompt_cache.get_seq_length() == prompt_length
    monkeypatch.undo()
    one_batch = rank(model, processor, [(prompt, colours, names)], chunk_size=1000)[0]
    assert_close([chunked], [one_batch])


# -- tokenized together with the prompt ---------------------------------------------------------

CORPUS = """\
Output: a dog. Output: a red circle. Output: another dog. Question: is there a dog? Answer: yes.
Question: is there a cat? Answer: no. Answer: maybe. the dog sits on the grass. dogs and cats.
a blue square and a green star. Output: a blue square. Output: two dogs. yes no maybe another.
"""


def sentencepiece_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """Two SentencePiece conventions, trained offline: ``metaspace`` (a Metaspace pre-tokenizer
    over a Unigram model, Mistral's and newer Llamas' layout) and ``llama2`` (Llama 2's: a ``▁``
    prepended and spaces replaced by ``▁`` in the normalizer, BPE merges across words)."""
    lines = CORPUS.splitlines()
    specials = ["<unk>", "<s>", "</s>"]
    if kind == "metaspace":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(
            vocab_size=120, special_tokens=specials, unk_token="<unk>", show_progress=False
        )
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


SP_PROMPTS = [
    ("<image>Output:", ["red"], [" a dog", " a red circle", "dog", " another dog", " two dogs"]),
    ("<image>Question: is there a dog? Answer: ", ["blue"], ["yes", "no", " yes", "maybe"]),
    ("Output: a dog<|endofchunk|><image>Output: a", ["green"], [" blue square", "nother dog", "n"]),
]


@pytest.fixture(scope="module", params=["metaspace", "llama2"])
def sentencepiece(request, backbones, tmp_path_factory):
    lm_dir = tmp_path_factory.mktemp(f"lm-{request.param}")
    build_lm(lm_dir, "llama", tokenizer=sentencepiece_tokenizer(request.param))
    return build(tiny_config(backbones, lm=LMConfig(source=str(lm_dir))), backbones("vision", "clip"))


def test_sentencepiece_candidates_are_scored_as_the_full_string_reads(sentencepiece):
    model, processor = sentencepiece
    tokenizer = processor.tokenizer
    apart, boundary_merged = 0, 0
    for prompt, _, candidates in SP_PROMPTS:
        written = processor.write_images(prompt)
        alone = tokenizer(written)["input_ids"]
        for candidate, split in zip(candidates, candidate_tokens(tokenizer, written, candidates)):
            apart += split.ids[split.start : split.end] != tokenizer(candidate, add_special_tokens=False)["input_ids"]
            boundary_merged += split.ids[: split.start] != alone
    # The cases this test is for: a candidate tokenized alone has other ids than in its prompt,
    # and a token that holds both prompt and candidate text moves the boundary into the prompt.
    assert apart >= 3 and boundary_merged >= 2
    scores = rank(model, processor, SP_PROMPTS, chunk_size=3)
    for (prompt, colours, candidates), got in zip(SP_PROMPTS, scores):
        expected = full_string_scores(model, processor, prompt, [picture(c) for c in colours], candidates)
        assert_close([got], [expected])


def test_candidate_tokens_are_those_covering_the_candidate_text():
    tokenizer = sentencepiece_tokenizer("llama2")
    prompt = "Question: is there a dog? Answer: "
    candidates = ["yes", " yes", "maybe"]
    for candidate, split in zip(candidates, candidate_tokens(tokenizer, prompt, candidates)):
        offsets = tokenizer(prompt + candidate, return_offsets_mapping=True)["offset_mapping"]
        assert offsets[split.start][1] > len(prompt)  # the first token reaches into the candidate
        assert all(e <= len(prompt) for _, e in offsets[: split.start])  # the ones before do not
        assert split.end == len(split.ids)  # and the candidate runs to the end
        assert tokenizer.decode(split.ids[split.start :]).endswith(candidate.strip())


# -- configuration and bad inputs --------------------------------------------------------------


def test_bad_inputs(llama):
    model, processor = llama
    prompt, image = "<image>Output:", [picture("red")]
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        rank_candidates(model, processor, [prompt], [image], [[" dax"]], chunk_size=0)
    with pytest.raises(ValueError, match="has no tokens after the prompt"):
        rank_candidates(model, processor, [prompt], [image], [[" dax", ""]])
    with pytest.raises(ValueError, match="adds an image token"):
        rank_candidates(model, processor, [prompt], [image], [[" <image>"]])
    with pytest.raises(ValueError, match="one of each per prompt"):
        rank_candidates(model, processor, [prompt, prompt], [image], [[" dax"]])
    assert rank_candidates(model, processor, [prompt], [image], [[]]) == [[]]
    with pytest.raises(ValueError, match="rank_chunk_size must be >= 1"):
        EvalConfig(rank_chunk_size=0)


def test_cli_rank_chunk_size_reaches_the_eval_config(monkeypatch, tmp_path, capsys):
    import interleaf.eval.harness as harness
    import interleaf.eval.report as report
    from interleaf.model.flamingo import Flamingo as FlamingoClass

    tinyworld.write(tmp_path / "world", seed=0, n_train=4, n_eval=4)
    seen = {}
    monkeypatch.setattr(FlamingoClass, "from_pretrained", classmethod(lambda cls, path, **kw: "model"))
    monkeypatch.setattr(Processor, "from_pretrained", classmethod(lambda cls, path: "processor"))
    monkeypatch.setattr(harness, "evaluate", lambda *args, **kw: seen.setdefault("cfg", args[5]))
    monkeypatch.setattr(report, "table", lambda reports: "")
    argv = ["eval", "--model", "m", "--task", "tinyworld_classification", "--root", str(tmp_path / "world")]
    assert main([*argv, "--out", str(tmp_path / "r.json"), "--rank-chunk-size", "16"]) == 0
    assert seen["cfg"].rank_chunk_size == 16
    assert parser().parse_args(["eval"]).rank_chunk_size == EvalConfig().rank_chunk_size
    assert main([*argv, "--out", str(tmp_path / "r.json"), "--rank-chunk-size", "0"]) == 2
    assert "argument --rank-chunk-size: must be >= 1, got 0" in capsys.readouterr().err
