"""The recipes in configs/recipes/: each loads and validates with its data and backbones pointed
at tiny local ones, builds, and trains exactly the parameters counted here independently."""

from pathlib import Path

import pytest
import transformers
import yaml

from interleaf import Flamingo
from interleaf.model.trainable import GROUPS, parameter_report
from interleaf.train.config import load_recipe

RECIPES = Path(__file__).parents[2] / "configs" / "recipes"
SHIPPED = [
    "openflamingo_3b_pretrain",
    "idefics_pretrain",
    "multitask",
    "instruct_lora",
    "instruct_unfreeze",
]


def tiny_overrides(name: str, shards: Path, backbones, out_dir: Path) -> list[str]:
    """Point every data source of the recipe at the tiny shards, and the backbones at tiny ones."""
    recipe = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    # a later stage names the earlier stage's export, which is checked to exist when the recipe
    # loads: here it starts fresh (test_shipped_stages_start_from_the_pretraining_export checks the name)
    stage = ["train.init_from=''"] if recipe.get("train", {}).get("init_from") else []
    return [
        *stage,
        *(f"data.sources.{source}.shards={shards}" for source in recipe["data"]["sources"]),
        f"model.lm.source={backbones('lm', 'llama')}",
        f"model.vision.source={backbones('vision', 'clip')}",
        f"train.out_dir={out_dir}",
    ]


def test_every_shipped_recipe_is_tested():
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted(SHIPPED)


def expected_report(model: Flamingo, recipe) -> dict[str, int]:
    """Trainable counts per group from the tiny LM loaded on its own and the sizes of the
    Flamingo's modules, not from the trainability policy."""
    t, lm_cfg = recipe.model.trainable, recipe.model.lm
    lm = transformers.AutoModelForCausalLM.from_pretrained(lm_cfg.source)
    hidden, vocab, rows = lm.config.hidden_size, lm.config.vocab_size, len(model.tokenizer)
    embeddings = {id(m.weight): m.weight for m in (lm.get_input_embeddings(), lm.get_output_embeddings())}
    if lm_cfg.new_token_embeddings == "decoupled":
        new_rows = 2 * (rows - vocab) * hidden  # extra_embed + extra_head
        lm_group = sum(p.numel() for p in lm.parameters())
    else:  # resize: the embedding matrices (one if tied), grown to the tokenizer's length, train whole
        new_rows = len(embeddings) * rows * hidden
        lm_group = sum(p.numel() for p in lm.parameters()) - sum(w.numel() for w in embeddings.values())
    lora = 0
    if t.lora is not None:
        projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
        linears = [m for n, m in lm.named_modules() if n.endswith(projections)]
        assert len(linears) == 4 * lm.config.num_hidden_layers
        lora = sum(t.lora.rank * (m.in_features + m.out_features) for m in linears)
    report = {
        "resampler": sum(p.numel() for p in model.resampler.parameters()) if t.resampler else 0,
        "cross_attention": sum(p.numel() for b in model.blocks for p in b.parameters()) if t.cross_attention else 0,
        "new_token_embeddings": new_rows if t.new_token_embeddings else 0,
        "lm": lm_group if t.lm else 0,
        "lora": lora,
        "vision": sum(p.numel() for p in model.vision.parameters()) if t.vision else 0,
        "image_generation": 0,  # no shipped recipe draws
    }
    return {**report, "total": sum(report.values())}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_loads_builds_and_trains_the_expected_parameters(name, shards, backbones, tmp_path):
    recipe = load_recipe(RECIPES / f"{name}.yaml", tiny_overrides(name, shards, backbones, tmp_path))
    model = Flamingo.from_config(recipe.model)
    report = parameter_report(model)
    assert report == expected_report(model, recipe)
    assert report["total"] == model.num_trainable_parameters() == sum(report[g] for g in GROUPS)
    assert report["resampler"] > 0 and report["cross_attention"] > 0
    assert (report["lora"] > 0) == (name == "instruct_lora")
    assert (report["lm"] > 0) == (name == "instruct_unfreeze")


def test_shipped_recipes_mirror_the_published_settings(shards, backbones, tmp_path):
    def load(name):
        return load_recipe(RECIPES / f"{name}.yaml", tiny_overrides(name, shards, backbones, tmp_path))

    of = load("openflamingo_3b_pretrain")
    assert (of.model.resampler.depth, of.model.resampler.num_latents, of.model.cross_attention.interval) == (6, 64, 1)
    assert set(of.data.sources) == {"mmc4", "laion"} and of.optim.lr == 1e-4 and of.optim.schedule == "cosine"
    idefics = load("idefics_pretrain")
    assert idefics.model.cross_attention.qk_norm == "rmsnorm" and idefics.model.resampler.qk_norm
    assert idefics.model.lm.new_token_embeddings == "decoupled" and idefics.train.z_loss_weight == 1e-3
    assert idefics.model.cross_attention.reset_at_eos and idefics.data.collate.pack
    lora = load("instruct_lora").model.trainable
    assert lora.lora is not None and not lora.lm
    assert load("instruct_unfreeze").model.trainable.lm


def test_shipped_stages_start_from_the_pretraining_export():
    for name in ("multitask", "instruct_lora", "instruct_unfreeze"):
        recipe = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
        assert recipe["train"]["init_from"] == "runs/openflamingo-3b-pretrain/final", name
