"""Config validation: every bad value names itself and the fix."""

import pytest

from twinformer.config import LoraConfig, ModelConfig, TrainConfig, base_model_config
from twinformer.errors import ConfigError


def small(**changes):
    return ModelConfig(source_vocab_size=37, target_vocab_size=37, **changes)


def test_model_dim_not_divisible_names_both_numbers():
    with pytest.raises(ConfigError) as error:
        small(model_dim=35, num_heads=4)
    assert "model_dim (35)" in str(error.value)
    assert "num_heads (4)" in str(error.value)


@pytest.mark.parametrize(
    "changes, word",
    [
        ({"num_heads": 0}, "num_heads"),
        ({"ff_dim": -1}, "ff_dim"),
        ({"num_encoder_layers": 1.5}, "num_encoder_layers"),
        ({"dropout": 1.0}, "dropout"),
        ({"attention_dropout": -0.1}, "attention_dropout"),
        ({"norm_position": "middle"}, "norm_position"),
        ({"attention": "flash"}, "attention"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
        ({"max_length": True}, "max_length"),
    ],
)
def test_model_config_rejects_bad_field(changes, word):
    with pytest.raises(ConfigError, match=word):
        small(**changes)


def test_shared_embeddings_need_equal_vocabularies():
    with pytest.raises(ConfigError, match="share_embeddings"):
        ModelConfig(source_vocab_size=37, target_vocab_size=41)
    config = ModelConfig(
        source_vocab_size=37, target_vocab_size=41, share_embeddings=False
    )
    assert config.target_vocab_size == 41


def test_vocabulary_must_exceed_special_tokens():
    with pytest.raises(ConfigError, match="special tokens"):
        ModelConfig(source_vocab_size=4, target_vocab_size=4)


def test_model_config_dict_round_trip():
    config = small(model_dim=35, num_heads=5, norm_position="pre", tie_output=False)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.head_dim == 7


def test_from_dict_rejects_unknown_field():
    data = small().to_dict() | {"num_layers": 3}
    with pytest.raises(ConfigError, match="num_layers"):
        ModelConfig.from_dict(data)


def test_base_preset_matches_table_3():
    config = base_model_config(100, 100)
    assert (config.num_encoder_layers, config.num_decoder_layers) == (6, 6)
    assert (config.model_dim, config.ff_dim, config.num_heads) == (512, 2048, 8)
    assert config.dropout == 0.1
    assert config.head_dim == 64


def test_lora_scaling_plain_and_rslora():
    assert LoraConfig(rank=4, alpha=8).scaling == 2.0
    assert LoraConfig(rank=4, alpha=8, use_rslora=True).scaling == 4.0


def test_lora_targets_from_comma_string():
    config = LoraConfig(targets="query,feed_forward.*")
    assert config.targets == ("query", "feed_forward.*")
    assert LoraConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "changes, word",
    [({"rank": 0}, "rank"), ({"alpha": 0}, "alpha"), ({"targets": ()}, "targets")],
)
def test_lora_config_rejects_bad_field(changes, word):
    with pytest.raises(ConfigError, match=word):
        LoraConfig(**changes)


def test_train_config_rejects_bad_betas():
    with pytest.raises(ConfigError, match="betas"):
        TrainConfig(adam_beta2=1.0)


def test_train_config_rejects_negative_clip():
    with pytest.raises(ConfigError, match="clip_grad_norm"):
        TrainConfig(clip_grad_norm=-1.0)
