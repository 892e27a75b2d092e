"""Recipes: YAML + overrides validated against the dataclasses; one clear line per error."""

import pytest

from interleaf.train.config import EvalTaskConfig, OptimConfig, Recipe, load_recipe


@pytest.fixture
def shards(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shard-000000.tar").write_bytes(b"")
    return tmp_path / "data"


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def base(shards) -> str:
    return f"data:\n  sources:\n    world: {{shards: {shards}, weight: 2}}\noptim:\n  lr: 1.0e-3\n"


def test_recipe_loads_with_overrides(tmp_path, shards):
    recipe = load_recipe(
        write(tmp_path, base(shards)),
        ["optim.lr=5e-4", "optim.betas=[0.9, 0.95]", "train.precision=bf16", "model.resampler.depth=2"],
    )
    assert isinstance(recipe, Recipe)
    assert recipe.optim == OptimConfig(lr=5e-4, betas=(0.9, 0.95))
    assert recipe.train.precision == "bf16"
    assert recipe.model.resampler.depth == 2
    assert recipe.data.sources["world"].weight == 2.0


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["optim.learning_rate=1"], ["optim", "'learning_rate'"]),
        (["train.steps=many"], ["train.steps", "expected int", "'many'"]),
        (["train.precision=fp8"], ["precision", "fp8"]),
        (["optim.lr.x=1"], ["optim.lr", "not a mapping"]),
        (["optim.lr"], ["key.sub=value"]),
    ],
)
def test_bad_recipe_is_one_clear_line(tmp_path, shards, overrides, words):
    with pytest.raises(ValueError) as info:
        load_recipe(write(tmp_path, base(shards)), overrides)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "recipe.yaml"))
    for word in words:
        assert word in message


def test_unknown_key_in_yaml(tmp_path, shards):
    text = base(shards).replace("data:\n", "data:\n  batchsize: 3\n")
    with pytest.raises(ValueError, match=r"^[^\n]*: data: unknown key 'batchsize'[^\n]*$"):
        load_recipe(write(tmp_path, text), [])


def test_missing_data_path_names_it(tmp_path, shards):
    missing = tmp_path / "nowhere" / "*.tar"
    with pytest.raises(ValueError) as info:
        load_recipe(write(tmp_path, base(shards)), [f"data.sources.world.shards={missing}"])
    message = str(info.value)
    assert "\n" not in message
    assert "data.sources.world.shards" in message and str(missing) in message


def test_no_sources_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="data.sources: no data sources"):
        load_recipe(write(tmp_path, "train: {steps: 3}\n"), [])


def test_distributed_logging_and_eval_fields(tmp_path, shards):
    task = "[{task: tinyworld_vqa, root: /data/tw, shots: [0, 4], limit: 8}]"
    recipe = load_recipe(
        write(tmp_path, base(shards)),
        [
            "train.parallel=fsdp",
            "train.fsdp_sharding=hybrid",
            "train.gradient_checkpointing=true",
            "train.tensorboard=true",
            "train.eval_every=50",
            f"train.eval_tasks={task}",
            "data.rank_split=rows",
        ],
    )
    cfg = recipe.train
    assert (cfg.parallel, cfg.fsdp_sharding, cfg.gradient_checkpointing, cfg.tensorboard) == (
        "fsdp",
        "hybrid",
        True,
        True,
    )
    assert cfg.eval_tasks == (EvalTaskConfig(task="tinyworld_vqa", root="/data/tw", shots=(0, 4), limit=8),)
    assert recipe.data.rank_split == "rows"
    assert load_recipe(write(tmp_path, base(shards)), []).train.parallel == "auto"


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["train.parallel=horovod"], ["train.parallel", "horovod"]),
        (["train.fsdp_sharding=zero"], ["train.fsdp_sharding", "zero"]),
        (["train.eval_every=10"], ["eval_tasks is empty"]),
        (["train.eval_every=10", "train.eval_tasks=[{shots: [0]}]"], ["eval_tasks[0]", "name a built-in task"]),
        (["data.rank_split=cols"], ["data.rank_split", "cols"]),
    ],
)
def test_bad_distributed_fields_are_one_line(tmp_path, shards, overrides, words):
    with pytest.raises(ValueError) as info:
        load_recipe(write(tmp_path, base(shards)), overrides)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message
