import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from interleaf import Flamingo, FlamingoConfig
from interleaf.cli import main
from interleaf.config import LMConfig, VisionConfig
from interleaf.model.trainable import GROUPS, parameter_report
from interleaf.train.config import load_recipe


@pytest.fixture(scope="module")
def demo_run(quick_demo):
    _, result = quick_demo
    return result["model"], result


def test_generate_verb(demo_run, tmp_path, capsys):
    model_dir, _ = demo_run
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 40), (220, 40, 40)).save(image)
    args = ["generate", "--model", str(model_dir), "--prompt", "<image>Output:", "--image", str(image)]
    assert main([*args, "--max-new-tokens", "3"]) == 0
    greedy = capsys.readouterr().out
    assert main([*args, "--max-new-tokens", "3", "--stream"]) == 0
    assert capsys.readouterr().out == greedy


def test_generate_verb_reports_bad_input(demo_run, tmp_path, capsys):
    model_dir, _ = demo_run
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    code = main(["generate", "--model", str(model_dir), "--prompt", "<image><image>two", "--image", str(image)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("interleaf generate: error:") and "prompt 0" in err
    code = main(["generate", "--model", str(model_dir), "--prompt", "<image>one", "--image", str(tmp_path / "y.png")])
    assert code == 2
    err = capsys.readouterr().err
    assert err == f"interleaf generate: error: argument --image: no such file: {tmp_path / 'y.png'}\n"
    assert main(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "hi"]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_eval_verb_checks_the_task_before_loading_the_model(demo_run, tmp_path, capsys):
    model_dir, _ = demo_run
    args = ["eval", "--model", str(model_dir), "--task", "tinyworld_classification", "--out", str(tmp_path / "r.json")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("interleaf eval: error: task tinyworld_classification needs --root, the directory holding")
    assert len(err.splitlines()) == 1
    assert main([*args, "--limit", "0"]) == 2
    assert capsys.readouterr().err == "interleaf eval: error: argument --limit: must be >= 1, got 0\n"
    assert not (tmp_path / "r.json").exists()


def test_eval_report_of_the_demo_skips_its_stage_file(quick_demo, tmp_path, capsys):
    opts, _ = quick_demo
    files = sorted(str(p) for p in (opts.out / "eval").glob("*.json"))
    assert any(f.endswith("stage.json") for f in files)
    assert main(["eval", "report", *files, "--out", str(tmp_path / "plot.png")]) == 0
    captured = capsys.readouterr()
    notes = captured.err.splitlines()
    assert len(notes) == 1 and notes[0].startswith("interleaf eval: note: ") and "stage.json" in notes[0]
    rows = [line for line in captured.out.splitlines() if line.startswith("| random demos | tinyworld_")]
    assert len(rows) == len(files) - 1, captured.out
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


# -- interleaf train -------------------------------------------------------------------------


def tiny_recipe(tmp_path, backbones, shards) -> Path:
    """A recipe small enough to train two steps on the CPU, with LoRA on the LM."""
    text = f"""
model:
  lm: {{source: {backbones("lm", "llama")}}}
  vision: {{source: {backbones("vision", "clip")}}}
  resampler: {{depth: 1, num_latents: 4, heads: 2, head_dim: 8}}
  cross_attention: {{interval: 2, heads: 2, head_dim: 8}}
  trainable:
    lora: {{rank: 2, alpha: 4}}
data:
  sources:
    world: {{shards: {shards}}}
  batch_size: 2
  collate: {{max_tokens: 64, max_images: 2}}
optim: {{lr: 1.0e-3, warmup_steps: 1}}
train: {{steps: 2, log_every: 1, checkpoint_every: 2, progress: false, out_dir: {tmp_path / "run"}}}
"""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_train_verb_reports_the_trainable_parameters_and_trains(tmp_path, backbones, shards, capsys):
    recipe = tiny_recipe(tmp_path, backbones, shards)
    assert main(["train", str(recipe), "train.seed=1"]) == 0
    out = capsys.readouterr().out
    model = Flamingo.from_config(load_recipe(recipe, []).model)
    report = parameter_report(model)
    assert report["lora"] > 0 and report["lm"] == 0
    assert f"trainable parameters: {report['total']:,} of " in out
    for group in GROUPS:
        if group == "image_generation":  # listed only for a model that draws
            assert group not in out
            continue
        assert re.search(rf"^\s+{group}\s+{report[group]:,}$", out, re.MULTILINE), group
    assert "trained to step 2" in out
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    final = Flamingo.from_pretrained(tmp_path / "run" / "final")
    assert final.config.trainable.lora == model.config.trainable.lora
    assert parameter_report(final) == report


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["optim.learning_rate=1"], ["unknown key 'learning_rate'"]),
        (["train.steps=many"], ["train.steps", "expected int", "'many'"]),
        (["data.sources.world.shards=/nowhere/shard-*.tar"], ["data.sources.world.shards", "/nowhere/shard-*.tar"]),
        (["model.lm.source=foo/bar"], ["lm.source 'foo/bar': cannot load the language model:"]),
        (["model.vision.source=/nowhere/vision"], ["vision.source '/nowhere/vision': cannot load the vision encoder:"]),
        (["model.trainable.lora.rank=0"], ["LoraConfig.rank must be >= 1"]),
        (["model.trainable.lora.target_modules=[nothing]"], ["target_modules: 'nothing' matches no linear layer"]),
    ],
)
def test_train_verb_errors_are_one_line(tmp_path, backbones, shards, capsys, overrides, words):
    recipe = tiny_recipe(tmp_path, backbones, shards)
    assert main(["train", str(recipe), *overrides]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("interleaf train: error: "), captured.err
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "run").exists()
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: cannot read the recipe" in capsys.readouterr().err


def test_train_verb_errors_are_one_line_in_a_real_process(tmp_path, backbones, shards):
    """Nothing else reaches the real stderr (loading bars, library logs) before the error."""
    recipe = str(tiny_recipe(tmp_path, backbones, shards))
    script = (
        "import sys; from interleaf.cli import main; "
        f"codes = [main(['train', {recipe!r}, 'model.lm.source=foo/bar']), "
        f"main(['train', {recipe!r}, 'model.vision.source={tmp_path}'])]; "
        "sys.exit(0 if codes == [2, 2] else 1)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}  # the CLI quiets transformers
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2, done.stderr
    assert lines[0].startswith("interleaf train: error: lm.source 'foo/bar': cannot load the language model: ")
    assert lines[1].startswith(f"interleaf train: error: vision.source '{tmp_path}': cannot load the vision encoder: ")


def test_from_config_names_the_backbone_that_cannot_load(backbones):
    good = LMConfig(source=backbones("lm", "llama"))
    with pytest.raises(ValueError, match=r"^lm.source 'foo/bar': cannot load the language model: [^\n]+$"):
        Flamingo.from_config(FlamingoConfig(lm=LMConfig(source="foo/bar")))
    with pytest.raises(ValueError, match=r"^vision.source is empty"):
        Flamingo.from_config(FlamingoConfig(lm=good))
    with pytest.raises(ValueError, match=r"^vision.source 'nope/vision': cannot load the vision encoder: [^\n]+$"):
        Flamingo.from_config(FlamingoConfig(lm=good, vision=VisionConfig(source="nope/vision")))


def test_the_demo_prints_a_generate_command_that_gives_its_caption(demo_run, capsys):
    """The README's generate example is this command: it must answer what the demo answered."""
    import shlex

    _, result = demo_run
    words = shlex.split(result["command"])
    assert words[:2] == ["interleaf", "generate"]
    assert all(Path(words[i + 1]).is_file() for i, w in enumerate(words) if w == "--image")
    capsys.readouterr()
    assert main(words[1:]) == 0
    assert capsys.readouterr().out.strip() == result["caption"]
