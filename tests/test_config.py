import pytest

from interleaf.config import CrossAttentionConfig, FlamingoConfig, LoraConfig, TrainableConfig


def test_json_round_trip(tmp_path):
    cfg = FlamingoConfig(
        cross_attention=CrossAttentionConfig(interval=4, offset=3, qk_norm="rmsnorm", gate="vector"),
        trainable=TrainableConfig(lm_patterns=("model.norm.*",)),
    )
    cfg.to_json(tmp_path / "c.json")
    assert FlamingoConfig.from_json(tmp_path / "c.json") == cfg


def test_configs_are_frozen_and_keyword_only():
    cfg = FlamingoConfig()
    with pytest.raises(AttributeError):
        cfg.lm = None
    with pytest.raises(TypeError):
        CrossAttentionConfig(2)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"resampler": {"depht": 2}}, "resampler: unknown key 'depht'"),
        ({"resampler": {"depth": "2"}}, "resampler.depth: expected int, got '2'"),
        ({"resampler": {"depth": True}}, "resampler.depth: expected int, got True"),
        ({"cross_attention": {"gate": "matrix"}}, r"cross_attention.gate: expected one of \['scalar', 'vector'\]"),
        ({"trainable": {"lm_patterns": "x"}}, "trainable.lm_patterns: expected a list"),
        ({"lm": 3}, "lm: expected a mapping"),
        ({"nope": {}}, "<root>: unknown key 'nope'"),
        ({"cross_attention": {"interval": 0}}, "cross_attention: CrossAttentionConfig.interval must be >= 1"),
        ({"cross_attention": {"interval": 2, "offset": 2}}, "offset must be < interval=2"),
        ({"resampler": {"num_latents": 0}}, "ResamplerConfig.num_latents must be >= 1"),
        ({"trainable": {"lora": {"rnak": 2}}}, "trainable.lora: unknown key 'rnak'"),
        ({"trainable": {"lora": {"rank": 0}}}, "trainable.lora: LoraConfig.rank must be >= 1"),
        ({"trainable": {"lora": {"dropout": 1.5}}}, r"LoraConfig.dropout must be in \[0, 1\)"),
        ({"trainable": {"lora": {"target_modules": "q_proj"}}}, "trainable.lora.target_modules: expected a list"),
        ({"trainable": {"lm": True, "lora": {}}}, "trainable: .*lora .* does not combine with lm=true"),
    ],
)
def test_bad_config_names_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        FlamingoConfig.from_dict(data)


def test_unreadable_config_file(tmp_path):
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ValueError, match="c.json: cannot read a Flamingo config"):
        FlamingoConfig.from_json(tmp_path / "c.json")


def test_direct_construction_is_validated_too():
    with pytest.raises(ValueError, match=r"CrossAttentionConfig.activation: expected one of \['gelu'"):
        CrossAttentionConfig(activation="swish")


def test_lora_settings_round_trip_through_json(tmp_path):
    lora = LoraConfig(rank=16, alpha=32.0, dropout=0.1, target_modules=("*.q_proj", "*.v_proj"))
    cfg = FlamingoConfig(trainable=TrainableConfig(lora=lora, lm_patterns=("model.norm.*",)))
    cfg.to_json(tmp_path / "c.json")
    assert FlamingoConfig.from_json(tmp_path / "c.json") == cfg
    assert FlamingoConfig.from_dict({"trainable": {"lora": {"rank": 4}}}).trainable.lora == LoraConfig(rank=4)
    assert FlamingoConfig.from_dict({"trainable": {"lora": None}}).trainable.lora is None
    assert FlamingoConfig().trainable.lora is None
