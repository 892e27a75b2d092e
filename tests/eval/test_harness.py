import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from interleaf import Flamingo
from interleaf.data import tinyworld
from interleaf.eval.harness import EvalConfig, choose_demos, evaluate, rank_candidates
from interleaf.eval.report import load, plot, table
from interleaf.eval.rices import Rices
from interleaf.eval.tasks import load_task
from interleaf.processing import Processor

from conftest import open_gates, tiny_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    tinyworld.write(root, seed=0, n_train=10, n_eval=10)
    return root


@pytest.fixture(scope="module")
def model_and_processor(backbones, tmp_path_factory):
    torch.manual_seed(0)
    model = Flamingo.from_config(tiny_config(backbones))
    open_gates(model)
    ckpt = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(ckpt)
    return model, Processor.from_pretrained(ckpt)


def vqa_as_accuracy(world):
    spec, support, queries = load_task("tinyworld_vqa", world)
    return dataclasses.replace(spec, metric="accuracy", max_new_tokens=4, num_beams=1), support, queries


def test_ranking_with_a_shared_prefix_equals_scoring_each_candidate_alone(model_and_processor):
    model, processor = model_and_processor
    scene = tinyworld.uniform_scene(random.Random(0), "red", "circle", "large")
    images = [tinyworld.render(scene)]
    prompt, candidates = "<image>Output:", [" dax", " wug wug", " blicket"]
    fast = rank_candidates(model, processor, [prompt], [images], [candidates])[0]
    for candidate, score in zip(candidates, fast):
        full = processor(prompt + candidate, images=images)
        n = len(processor.tokenizer(candidate, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = model(**full).logits[0, :-1].log_softmax(-1)
        target = full["input_ids"][0, 1:]
        expected = logp.gather(-1, target[:, None])[-n:, 0].mean().item()
        assert abs(score - expected) < 1e-5


@pytest.mark.parametrize("task", ["tinyworld_classification", "vqa"])
def test_batch_size_does_not_change_results(model_and_processor, world, task):
    model, processor = model_and_processor
    spec, support, queries = load_task(task, world) if task != "vqa" else vqa_as_accuracy(world)
    run = lambda bs: evaluate(  # noqa: E731
        model, processor, spec, support, queries, EvalConfig(shots=(0, 2), batch_size=bs, limit=6), progress=False
    )
    one, many = run(1), run(4)
    # Batched prompts run in other float shapes: scores agree to float32 rounding (shared/ARCHITECTURE.md).
    for a, b in zip(one["results"], many["results"]):
        for x, y in zip(a["samples"], b["samples"], strict=True):
            x, y = dict(x), dict(y)
            sx, sy = x.pop("scores", {}), y.pop("scores", {})
            assert x == y and sx.keys() == sy.keys()
            assert all(abs(sx[c] - sy[c]) < 1e-5 for c in sx)


def test_results_schema_and_demonstrations(model_and_processor, world):
    model, processor = model_and_processor
    spec, support, queries = load_task("tinyworld_classification", world)
    report = evaluate(
        model,
        processor,
        spec,
        support,
        queries,
        EvalConfig(shots=(0, 2), trials=2, limit=5),
        model_name="tiny",
        progress=False,
    )
    assert report["task"] == "tinyworld_classification" and report["metric"] == "accuracy"
    assert set(report["summary"]) == {"0", "2"} and len(report["summary"]["2"]["trials"]) == 2
    assert "text-only" in report["zero_shot"] and report["versions"]["torch"] == torch.__version__
    zero, two = report["results"][0]["samples"][0], report["results"][1]["samples"][0]
    assert len(zero["demos"]) == 2 and zero["prompt"].count("<image>") == 1  # text-only demonstrations
    assert len(two["demos"]) == 2 and two["prompt"].count("<image>") == 3
    assert set(two["scores"]) == set(queries[0].options) and two["answer"] in queries[0].options
    assert 0.0 <= report["summary"]["2"]["mean"] <= 1.0


def test_resume_skips_finished_samples(model_and_processor, world, tmp_path, monkeypatch):
    import interleaf.eval.harness as harness

    model, processor = model_and_processor
    spec, support, queries = vqa_as_accuracy(world)
    cfg = EvalConfig(shots=(2,), batch_size=2, limit=6)
    out = tmp_path / "new" / "dir" / "results.json"
    full = evaluate(model, processor, spec, support, queries, cfg, out=tmp_path / "full.json", progress=False)
    calls = []
    original = harness._run_batch

    def crash_after_two(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(harness, "_run_batch", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, processor, spec, support, queries, cfg, out=out, progress=False)
    assert len(Path(f"{out}.partial.jsonl").read_text().splitlines()) == 4
    calls.clear()
    monkeypatch.setattr(harness, "_run_batch", lambda *a: calls.append(1) or original(*a))
    resumed = evaluate(model, processor, spec, support, queries, cfg, out=out, progress=False)
    assert len(calls) == 1  # only the last batch of two queries was left
    assert resumed["results"] == full["results"]
    assert json.loads(out.read_text())["results"] == full["results"]


def test_rices_puts_the_most_similar_last(model_and_processor, world, tmp_path):
    model, processor = model_and_processor
    spec, support, queries = load_task("tinyworld_classification", world)
    rices = Rices.from_model(model, processor, cache_dir=tmp_path)
    ranked = rices.rank(queries[:3], support, k=3)
    emb_q, emb_s = rices.embed(queries[:3]), rices.embed(support)
    for q, order in enumerate(ranked):
        sims = (emb_s @ emb_q[q]).tolist()
        assert sims[order[0]] == max(sims)
        demos, _ = choose_demos(support, q, 3, seed=0, ranked=order)
        assert demos[-1] is support[order[0]]  # the most similar next to the query
    assert list(tmp_path.glob("rices-*/*.safetensors"))  # embeddings cached on disk
    report = evaluate(
        model,
        processor,
        spec,
        support,
        queries,
        EvalConfig(shots=(2,), demos="rices", limit=3),
        rices=rices,
        progress=False,
    )
    assert report["results"][0]["samples"][0]["demos"] == [support[i].id for i in reversed(ranked[0][:2])]


def test_report_table_and_plot(model_and_processor, world, tmp_path):
    model, processor = model_and_processor
    spec, support, queries = load_task("tinyworld_classification", world)
    evaluate(
        model,
        processor,
        spec,
        support,
        queries,
        EvalConfig(shots=(0, 2), limit=3),
        out=tmp_path / "r.json",
        model_name="tiny",
        progress=False,
    )
    reports = load([tmp_path / "r.json"])
    text = table(reports)
    assert "| tiny (random demos) | tinyworld_classification | accuracy |" in text and "2-shot" in text
    png = plot(reports, tmp_path / "plot.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="not an interleaf evaluation result"):
        (tmp_path / "x.json").write_text("{}")
        load([tmp_path / "x.json"])


def test_bad_inputs(model_and_processor, world):
    with pytest.raises(ValueError, match="unknown task 'nope'|no task"):
        load_task("nope", world)
    _, support, _ = load_task("tinyworld_classification", world)
    with pytest.raises(ValueError, match="needs 32 demonstrations"):
        choose_demos(support, 0, 32, seed=0)
    with pytest.raises(ValueError, match="demos must be"):
        EvalConfig(demos="best")


@pytest.mark.parametrize("task", ["tinyworld_caption", "tinyworld_vqa"])
def test_generation_tasks_are_scored_by_their_reference_metrics(model_and_processor, world, task):
    from interleaf.eval.metrics import cider, vqa_accuracy

    model, processor = model_and_processor
    spec, support, queries = load_task(task, world)
    spec = dataclasses.replace(spec, max_new_tokens=4, num_beams=1)
    report = evaluate(model, processor, spec, support, queries, EvalConfig(shots=(2,), limit=4), progress=False)
    samples, queries = report["results"][0]["samples"], queries[:4]
    if spec.metric == "cider":
        expected = cider(
            {q.id: s["answer"] for q, s in zip(queries, samples)}, {q.id: list(q.answers) for q in queries}
        )
    else:
        expected = sum(vqa_accuracy(s["answer"], list(q.answers)) for q, s in zip(queries, samples)) / 4
    assert report["summary"]["2"]["mean"] == pytest.approx(expected)
