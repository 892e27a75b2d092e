"""Bad command-line input: one stderr line ``interleaf <verb>: error: <message>`` naming the option
(or recipe key, or file) and the bad value, exit status 2, before any model is loaded.

Most cases give a model that does not exist (``/nowhere/model``): had the check come after the
model load, the error would be about the model instead.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from interleaf.cli import main
from interleaf.data.shards import expand, write_shards
from interleaf.eval.harness import EvalConfig
from interleaf.eval.report import label, load, plot, table
from interleaf.eval.tasks import load_task
from interleaf.train.config import OptimConfig, SourceConfig, TrainConfig, load_recipe

NO_MODEL = "/nowhere/model"


def one_error_line(capsys, verb: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"interleaf {verb}: error: "), lines[0]
    return lines[0]


def check(capsys, argv: list[str], verb: str, *words: str) -> str:
    assert main(argv) == 2
    line = one_error_line(capsys, verb)
    for word in words:
        assert word in line, (word, line)
    return line


@pytest.fixture
def image(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "red.png"
    Image.new("RGB", (8, 8), (220, 40, 40)).save(path)
    return path


# -- numeric options and paths, checked by argparse ----------------------------------------------


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--limit", "0", ["argument --limit", "must be >= 1", "got 0"]),
        ("--limit", "-3", ["argument --limit", "got -3"]),
        ("--shots", "-1", ["argument --shots", "must be >= 0", "got -1"]),
        ("--shots", "two", ["argument --shots", "expected an integer", "'two'"]),
        ("--trials", "0", ["argument --trials", "must be >= 1", "got 0"]),
        ("--batch-size", "0", ["argument --batch-size", "must be >= 1", "got 0"]),
        ("--root", "/nowhere/data", ["argument --root", "/nowhere/data"]),
        ("--demos", "best", ["argument --demos", "'best'"]),
    ],
)
def test_eval_options_are_checked(capsys, tmp_path, option, value, words):
    argv = ["eval", "--model", NO_MODEL, "--task", "tinyworld_classification", "--out", str(tmp_path / "r.json")]
    check(capsys, [*argv, option, value], "eval", *words)


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--max-new-tokens", "0", ["argument --max-new-tokens", "must be >= 1", "got 0"]),
        ("--num-beams", "0", ["argument --num-beams", "must be >= 1", "got 0"]),
        ("--temperature", "0", ["argument --temperature", "must be > 0", "got 0"]),
        ("--temperature", "inf", ["argument --temperature", "got inf"]),
        ("--top-p", "0", ["argument --top-p", "in (0, 1]", "got 0"]),
        ("--top-p", "1.5", ["argument --top-p", "got 1.5"]),
        ("--image", "/nowhere/cat.png", ["argument --image", "no such file", "/nowhere/cat.png"]),
        ("--seed", "x", ["argument --seed", "'x'"]),
        ("--device", "gpu", ["argument --device", "expected cpu, cuda, cuda:N, mps or auto", "'gpu'"]),
        ("--dtype", "float8", ["argument --dtype", "invalid choice", "'float8'"]),
    ],
)
def test_generate_options_are_checked(capsys, image, option, value, words):
    argv = ["generate", "--model", NO_MODEL, "--prompt", "<image>hi", "--image", str(image)]
    check(capsys, [*argv, option, value], "generate", *words)


def test_generate_stream_with_beams_fails_before_the_model_loads(capsys, image):
    argv = ["generate", "--model", NO_MODEL, "--prompt", "<image>hi", "--image", str(image)]
    check(capsys, [*argv, "--stream", "--num-beams", "2"], "generate", "--stream", "--num-beams")


@pytest.mark.parametrize(
    "argv, verb, words",
    [
        (["demo", "--scale", "0"], "demo", ["argument --scale", "must be > 0", "got 0"]),
        (["demo", "--scale", "-1"], "demo", ["argument --scale", "got -1"]),
        (["demo", "--scale", "nan"], "demo", ["argument --scale", "got nan"]),
        (["demo", "--dtype", "float16"], "demo", ["argument --dtype", "'float16'"]),
        (["demo", "--device", "tpu"], "demo", ["argument --device", "'tpu'"]),
        (["data", "tinyworld", "OUT", "--n-train", "0"], "data tinyworld", ["argument --n-train", "got 0"]),
        (["data", "tinyworld", "OUT", "--n-eval", "-1"], "data tinyworld", ["argument --n-eval", "got -1"]),
        (["data", "tinyworld", "OUT", "--image-size", "0"], "data tinyworld", ["argument --image-size", "got 0"]),
        (["data", "inspect", "OUT", "--samples", "-1"], "data inspect", ["argument --samples", "got -1"]),
        (["data", "convert", "mmc4", "SRC", "OUT", "--shard-size", "0"], "data convert", ["--shard-size", "got 0"]),
        (["data", "convert", "mmc4", "SRC", "OUT", "--max-skip-rate", "1.5"], "data convert", ["--max-skip-rate"]),
        (["data", "convert", "mmc4", "SRC", "OUT", "--image-root", "/nowhere/im"], "data convert", ["/nowhere/im"]),
        (["data", "convert", "mmc4", "/nowhere/docs.jsonl", "OUT"], "data convert", ["src", "/nowhere/docs.jsonl"]),
        (["convert", "openflamingo", "SRC", "OUT", "--cross-attn-every-n-layers", "0"], "convert", ["got 0"]),
    ],
)
def test_other_verbs_options_are_checked(capsys, tmp_path, argv, verb, words):
    src = tmp_path / "docs.jsonl"
    src.write_text("{}\n")
    argv = [str(src) if a == "SRC" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    check(capsys, argv, verb, *words)
    assert not (tmp_path / "out").exists()


def test_argparse_errors_are_one_line_and_help_still_works(capsys):
    check(capsys, ["generate", "--prompt", "hi"], "generate", "required", "--model")
    check(capsys, ["eval", "summary"], "eval", "argument action", "'summary'")
    assert main(["nope"]) == 2
    assert capsys.readouterr().err.startswith("interleaf: error: argument verb: invalid choice: 'nope'")
    assert main(["eval", "-h"]) == 0
    assert "usage: interleaf eval" in capsys.readouterr().out


def test_convert_openflamingo_names_a_missing_checkpoint(capsys, tmp_path):
    argv = ["convert", "openflamingo", "/nowhere/checkpoint.pt", str(tmp_path / "dst"), "--lm", "/nowhere/lm"]
    check(capsys, argv, "convert", "/nowhere/checkpoint.pt")


# -- eval: the task and its root, before the model ----------------------------------------------


def test_eval_task_without_root_fails_before_the_model_loads(capsys, tmp_path):
    argv = ["eval", "--model", NO_MODEL, "--task", "tinyworld_classification", "--out", str(tmp_path / "r.json")]
    check(capsys, argv, "eval", "task tinyworld_classification needs --root", "directory holding its files")
    check(capsys, [*argv[:-2], "--out", str(tmp_path)], "eval", "--out", str(tmp_path), "is a directory")
    check(capsys, ["eval", "--model", NO_MODEL, "--task", "nope", "--out", "r.json"], "eval", "unknown task 'nope'")


def test_load_task_names_a_missing_or_bad_root(tmp_path):
    with pytest.raises(ValueError, match=r"^task tinyworld_vqa needs --root, the directory holding its files"):
        load_task("tinyworld_vqa")
    with pytest.raises(
        ValueError, match=r"^task tinyworld_vqa: the data root '.*missing' \(--root\) is not a directory"
    ):
        load_task("tinyworld_vqa", tmp_path / "missing")


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"limit": 0}, ["EvalConfig.limit", "got 0"]),
        ({"shots": (0, -2)}, ["EvalConfig.shots", "-2"]),
        ({"shots": ()}, ["EvalConfig.shots"]),
        ({"trials": 0}, ["EvalConfig.trials", "got 0"]),
        ({"batch_size": -1}, ["EvalConfig.batch_size", "got -1"]),
    ],
)
def test_eval_config_names_the_bad_field(changes, words):
    with pytest.raises(ValueError) as info:
        EvalConfig(**changes)
    assert "EvalConfig(" not in str(info.value)  # no dataclass repr
    for word in words:
        assert word in str(info.value)


# -- eval report ----------------------------------------------------------------------------------


def result(model: str, demos: str, task: str = "tinyworld_classification") -> dict:
    return {
        "task": task,
        "metric": "accuracy",
        "model": model,
        "config": {"task": {"name": task}, "eval": {"shots": [0, 2], "demos": demos}},
        "summary": {"0": {"mean": 0.25, "std": 0.0, "trials": [0.25]}, "2": {"mean": 0.5, "std": 0.0, "trials": [0.5]}},
    }


def test_eval_report_labels_rows_by_model_and_demonstrations(capsys, tmp_path):
    for demos in ("random", "rices"):
        (tmp_path / f"r-{demos}.json").write_text(json.dumps(result("runs/m", demos)))
    (tmp_path / "stage.json").write_text(json.dumps({"config": "abc", "seconds": 3.0}))
    files = sorted(str(p) for p in tmp_path.glob("*.json"))
    assert main(["eval", "report", *files, "--out", str(tmp_path / "plot.png")]) == 0
    captured = capsys.readouterr()
    assert "| runs/m (random demos) | tinyworld_classification | accuracy | 25.0 | 50.0 |" in captured.out
    assert "| runs/m (rices demos) | tinyworld_classification | accuracy |" in captured.out
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    notes = captured.err.splitlines()
    assert len(notes) == 1 and str(tmp_path / "stage.json") in notes[0] and "skipped" in notes[0], captured.err


def test_eval_report_bad_inputs(capsys, tmp_path, image):
    check(capsys, ["eval", "report"], "eval", "no result files given")
    check(capsys, ["eval", "report", str(image)], "eval", str(image), "cannot read evaluation results")
    check(capsys, ["eval", "report", str(tmp_path / "missing.json")], "eval", "missing.json")
    (tmp_path / "stage.json").write_text(json.dumps({"config": "abc"}))
    (tmp_path / "list.json").write_text("[1, 2]")
    assert main(["eval", "report", str(tmp_path / "stage.json"), str(tmp_path / "list.json")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines
    assert "stage.json" in lines[0] and "list.json" in lines[1]
    assert lines[2] == "interleaf eval: error: none of the 2 files given is an evaluation result"
    (tmp_path / "r.json").write_text(json.dumps(result("m", "random")))
    check(capsys, ["eval", "report", str(tmp_path / "r.json"), "--out", str(tmp_path)], "eval", "--out", "directory")


def test_report_labels_in_table_and_plot(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    reports = [result("runs/m", "rices"), result("rices demos", "rices"), {**result("", "random"), "model": None}]
    assert [label(r) for r in reports] == ["runs/m (rices demos)", "rices demos", "- (random demos)"]
    old = {k: v for k, v in result("runs/m", "random").items() if k != "config"}  # recorded no config
    assert label(old) == "runs/m" and "| runs/m | " in table([old])
    legends = []
    close = plt.close
    monkeypatch.setattr(
        plt, "close", lambda fig: legends.append(fig.axes[0].get_legend_handles_labels()[1]) or close(fig)
    )
    plot(reports[:1], tmp_path / "p.png")
    assert legends == [["tinyworld_classification (accuracy) - runs/m (rices demos)"]]
    with pytest.raises(ValueError, match="x.json: not an interleaf evaluation result"):
        (tmp_path / "x.json").write_text("{}")
        load([tmp_path / "x.json"])


# -- data --------------------------------------------------------------------------------------------


def test_data_inspect_names_a_missing_path(capsys, tmp_path):
    check(capsys, ["data", "inspect", str(tmp_path / "nothing")], "data inspect", str(tmp_path / "nothing"))
    pattern = str(tmp_path / "shard-{000..003}.tar")
    check(capsys, ["data", "inspect", pattern], "data inspect", pattern, "4 of its 4 files do not exist")


def test_data_convert_of_another_format_is_an_error(capsys, tmp_path):
    mmc4 = tmp_path / "docs.jsonl"
    mmc4.write_text(json.dumps({"url": "u", "text_list": ["a."], "image_info": []}) + "\n")
    not_a_list = tmp_path / "chat.json"
    not_a_list.write_text(json.dumps({"conversations": "nope"}))
    out = tmp_path / "shards"
    for src in (mmc4, not_a_list):
        line = check(capsys, ["data", "convert", "llava", str(src), str(out)], "data convert", str(src), "llava")
        assert "skipped" in line and "(e.g. " in line  # the skip reasons
    check(capsys, ["data", "convert", "annt", str(mmc4), str(out)], "data convert", "annt", "missing_field")
    (tmp_path / "empty").mkdir()
    check(capsys, ["data", "convert", "mmc4", str(tmp_path / "empty"), str(out)], "data convert", "no .jsonl")
    assert not out.exists()
    assert main(["data", "convert", "mmc4", str(mmc4), str(out)]) == 0
    assert "wrote 1 shards" in capsys.readouterr().out


def test_expand_requires_existing_shards(tmp_path):
    from interleaf.data.tinyworld import iter_train_documents

    docs = iter_train_documents(seed=0, n=4)
    shards = [str(s) for s in write_shards(docs, tmp_path / "data", max_samples=2)]
    assert expand(shards) == shards and expand(shards[0]) == shards[:1]
    assert expand(str(tmp_path / "data" / "shard-{000000..000001}.tar")) == shards
    for spec, words in [
        (tmp_path / "missing", ["no shards found", "missing", "no such file or directory"]),
        (str(tmp_path / "data" / "shard-{000000..000003}.tar"), ["2 of its 4 files do not exist", "shard-000002.tar"]),
        ([shards[0], str(tmp_path / "gone.tar")], ["gone.tar"]),
        (str(tmp_path / "data" / "*.tgz"), ["no shards found", "*.tgz"]),
        (tmp_path, ["no shards found", "a directory without .tar files"]),
        ([], ["no shards given"]),
        ("", ["no shards given"]),
    ]:
        with pytest.raises(ValueError) as info:
            expand(spec)
        for word in words:
            assert word in str(info.value), (spec, str(info.value))


# -- train recipes --------------------------------------------------------------------------------


@pytest.fixture
def recipe(tmp_path) -> Path:
    """A recipe over existing shards whose model cannot load: anything that fails before the
    model is built fails with its own message."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shard-000000.tar").write_bytes(b"")
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "model:\n  lm: {source: /nowhere/lm}\n  vision: {source: /nowhere/vision}\n"
        f"data:\n  sources:\n    world: {{shards: {tmp_path / 'data'}}}\n"
        f"train: {{steps: 1, progress: false, out_dir: {tmp_path / 'run'}}}\n"
    )
    return path


@pytest.mark.parametrize(
    "override, words",
    [
        ("data.sources.world.shards=/nonexistent/dir", ["data.sources.world.shards", "/nonexistent/dir"]),
        ("data.sources.world.shards=/nowhere/shard-*.tar", ["data.sources.world.shards", "/nowhere/shard-*.tar"]),
        ("data.sources.world.shards=/x/shard-{000..003}.tar", ["data.sources.world.shards", "/x/shard-{000..003}"]),
        ("data.sources.world.shards=[/x/a.tar]", ["data.sources.world.shards", "/x/a.tar"]),
        ("data.sources.world.weight=0", ["data.sources.world", "SourceConfig.weight must be > 0", "got 0"]),
        ("optim.lr=-1", ["optim", "OptimConfig.lr must be > 0", "got -1"]),
        ("optim.lr=0", ["OptimConfig.lr", "got 0"]),
        ("optim.lr=.nan", ["OptimConfig.lr", "got nan"]),
        ("optim.betas=[0.9, 1.0]", ["OptimConfig.betas", "[0, 1)", "1.0"]),
        ("optim.betas=[-0.1, 0.9]", ["OptimConfig.betas", "-0.1"]),
        ("optim.betas=[0.9]", ["OptimConfig.betas", "[0.9]"]),
        ("optim.eps=0", ["OptimConfig.eps must be > 0", "got 0"]),
        ("optim.weight_decay=-0.1", ["OptimConfig.weight_decay", "got -0.1"]),
        ("optim.grad_clip=-1", ["OptimConfig.grad_clip", "got -1"]),
        ("optim.min_lr_ratio=2", ["OptimConfig.min_lr_ratio", "got 2"]),
        ("optim.accumulation=0", ["OptimConfig.accumulation", "got 0"]),
        ("optim.warmup_steps=-1", ["OptimConfig.warmup_steps", "got -1"]),
        ("data.batch_size=0", ["DataConfig.batch_size", "got 0"]),
        ("data.num_workers=-1", ["DataConfig.num_workers", "got -1"]),
        ("train.z_loss_weight=-1", ["TrainConfig.z_loss_weight", "got -1"]),
        ("train.steps=0", ["TrainConfig.steps", "got 0"]),
        ("train.eval_every=-5", ["TrainConfig.eval_every", "got -5"]),
    ],
)
def test_recipe_errors_name_the_key_and_value_before_the_model_is_built(capsys, recipe, override, words):
    with pytest.raises(ValueError) as info:
        load_recipe(recipe, [override])
    assert "\n" not in str(info.value)
    line = check(capsys, ["train", str(recipe), override], "train", *words)
    assert "/nowhere/lm" not in line
    assert not (recipe.parent / "run").exists()


def test_recipe_dataclasses_check_ranges_directly():
    with pytest.raises(ValueError, match=r"^OptimConfig.lr must be > 0, got -0.1$"):
        OptimConfig(lr=-0.1)
    with pytest.raises(ValueError, match=r"^SourceConfig.weight must be > 0, got -1$"):
        SourceConfig(shards="x", weight=-1)
    with pytest.raises(ValueError, match=r"^TrainConfig.z_loss_weight: expected a finite number, got inf$"):
        TrainConfig(z_loss_weight=float("inf"))
    assert OptimConfig(lr=1e-3, betas=(0.0, 0.5), grad_clip=0.0).grad_clip == 0.0


# -- real processes -------------------------------------------------------------------------------


def run(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    return subprocess.run(list(argv), capture_output=True, text=True, env=env, timeout=300)


def test_errors_in_a_real_process(recipe, tmp_path):
    script = Path(sys.executable).with_name("interleaf")
    if not script.exists():
        pytest.skip("the interleaf console script is not installed beside this Python")
    done = run(str(script), "eval", "--model", NO_MODEL, "--task", "tinyworld_vqa", "--out", "r.json", "--limit", "0")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "interleaf eval: error: argument --limit: must be >= 1, got 0\n"
    done = run(
        sys.executable, "-m", "interleaf.cli", "train", str(recipe), "data.sources.world.shards=/nonexistent/dir"
    )
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"interleaf train: error: {recipe}: data.sources.world.shards: ")
    assert "/nonexistent/dir" in lines[0]
    assert not (tmp_path / "run").exists()
