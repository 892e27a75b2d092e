import pytest

from interleaf.config import CrossAttentionConfig, FlamingoConfig, TrainableConfig


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
