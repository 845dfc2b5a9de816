"""The PyTorch Transformer: checkpoint names, shapes, masks, init and errors.

Tiny models use prime-like sizes: 5 heads of 7 (model_dim 35), ff_dim 22,
vocabulary 37, source length 11, target length 13.
"""

import math

import pytest
import torch

from torch_impl.layers import sinusoidal_position_encoding
from torch_impl.model import Transformer
from twinformer.config import PAD_ID, ModelConfig, base_model_config
from twinformer.errors import DataError
from twinformer.param_map import base_tensor_specs

VOCAB, SOURCE_LENGTH, TARGET_LENGTH, BATCH = 37, 11, 13, 3


def tiny_config(**changes) -> ModelConfig:
    fields = dict(
        source_vocab_size=VOCAB,
        target_vocab_size=VOCAB,
        model_dim=35,
        num_heads=5,
        ff_dim=22,
        num_encoder_layers=2,
        num_decoder_layers=2,
        max_length=17,
    )
    fields.update(changes)
    return ModelConfig(**fields)


def tiny_model(dtype=torch.float64, seed=0, **changes) -> Transformer:
    generator = torch.Generator().manual_seed(seed)
    return Transformer(tiny_config(**changes), dtype, generator).eval()


def token_batch(seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Source (B, S) and decoder input (B, T) ids with padding in rows 1 and 2."""
    generator = torch.Generator().manual_seed(seed)
    source = torch.randint(4, VOCAB, (BATCH, SOURCE_LENGTH), generator=generator)
    target = torch.randint(4, VOCAB, (BATCH, TARGET_LENGTH), generator=generator)
    target[:, 0] = 1
    source[1, 7:] = PAD_ID
    source[2, 2:] = PAD_ID
    target[2, 9:] = PAD_ID
    return source, target


@pytest.mark.parametrize("norm_position", ["post", "pre"])
@pytest.mark.parametrize("share_embeddings", [True, False])
@pytest.mark.parametrize("tie_output", [True, False])
def test_state_dict_matches_checkpoint_specs(
    norm_position, share_embeddings, tie_output
):
    config = tiny_config(
        norm_position=norm_position,
        share_embeddings=share_embeddings,
        tie_output=tie_output,
    )
    state = Transformer(config).state_dict()
    specs = {spec.name: spec.shape for spec in base_tensor_specs(config)}
    assert sorted(state) == sorted(specs)
    for name, shape in specs.items():
        assert tuple(state[name].shape) == shape, name
        assert state[name].dtype == torch.float32, name


def test_base_preset_parameter_count():
    vocab = 37
    config = base_model_config(vocab, vocab)
    # The meta device allocates nothing, so the 44M-parameter model is free.
    with torch.device("meta"):
        model = Transformer(config)
    d, f, n = 512, 2048, 6
    attention = 4 * (d * d + d)  # query, key, value, output with biases
    feed_forward = (d * f + f) + (f * d + d)
    layer_norm = 2 * d
    encoder_layer = attention + feed_forward + 2 * layer_norm
    decoder_layer = 2 * attention + feed_forward + 3 * layer_norm
    # One shared and tied (V, D) embedding; post-LN has no final norms.
    expected = vocab * d + n * encoder_layer + n * decoder_layer
    assert sum(p.numel() for p in model.parameters()) == expected


def test_position_encoding_values():
    length, dim = 13, 35  # odd dim: 18 sine and 17 cosine dimensions
    table = sinusoidal_position_encoding(length, dim, torch.float64)
    assert table.shape == (length, dim)
    for pos in (0, 1, 12):
        for i in (0, 5, 17):
            angle = pos / 10000 ** (2 * i / dim)
            # float64: the same formula in another order of operations.
            assert table[pos, 2 * i] == pytest.approx(math.sin(angle), abs=1e-14)
            if 2 * i + 1 < dim:
                assert table[pos, 2 * i + 1] == pytest.approx(
                    math.cos(angle), abs=1e-14
                )


def test_embeddings_scale_and_add_positions():
    model = tiny_model()
    ids = torch.tensor([[5, 7, 11], [13, 2, 0]])
    output = model.target_embedding(ids, offset=4)
    positions = sinusoidal_position_encoding(7, 35, torch.float64)[4:]
    expected = model.target_embedding.weight[ids] * math.sqrt(35) + positions
    # float64: one multiply and one add, done the same way.
    assert torch.allclose(output, expected, atol=1e-14, rtol=0)


def test_embeddings_reject_bad_ids_and_positions():
    embeddings = tiny_model().target_embedding
    with pytest.raises(DataError, match=r"token id 37 .* size 37"):
        embeddings(torch.tensor([[4, 37]]))
    with pytest.raises(DataError, match=r"token id -1 "):
        embeddings(torch.tensor([[-1, 4]]))
    with pytest.raises(DataError, match="max_length is 17"):
        embeddings(torch.full((1, 18), 4))
    with pytest.raises(DataError, match="positions up to 18"):
        embeddings(torch.full((1, 3), 4), offset=15)


def test_forward_shape_and_dtype():
    source, target = token_batch()
    for dtype in (torch.float32, torch.float64):
        logits = tiny_model(dtype)(source, target)
        assert logits.shape == (BATCH, TARGET_LENGTH, VOCAB)
        assert logits.dtype == dtype


def test_forward_ignores_source_padding():
    model = tiny_model()
    source, target = token_batch()
    logits = model(source, target)
    # Appending padding columns must not change any logit.
    padded = torch.cat([source, torch.zeros(BATCH, 4, dtype=torch.long)], dim=1)
    # float64: padded keys get weight exactly 0, only the sum length changes.
    assert torch.allclose(model(padded, target), logits, atol=1e-12, rtol=0)


def test_forward_is_causal():
    model = tiny_model()
    source, target = token_batch()
    logits = model(source, target)
    changed = target.clone()
    changed[:, 6:] = 4
    new_logits = model(source, changed)
    # float64: positions before 6 see exactly the same inputs.
    assert torch.allclose(new_logits[:, :6], logits[:, :6], atol=1e-12, rtol=0)
    assert not torch.allclose(new_logits[0, 6:], logits[0, 6:])


@pytest.mark.parametrize("tie_output", [True, False])
def test_output_logits_tied_and_untied(tie_output):
    model = tiny_model(tie_output=tie_output)
    x = torch.randn(BATCH, TARGET_LENGTH, 35, dtype=torch.float64)
    if tie_output:
        matrix = model.target_embedding.weight
        assert not hasattr(model, "output_projection")
    else:
        matrix = model.output_projection.weight
        assert model.output_projection.bias is None
    # float64: one matmul either way.
    assert torch.allclose(model.output_logits(x), x @ matrix.T, atol=1e-12, rtol=0)


def test_shared_embeddings_feed_encoder():
    shared = tiny_model(share_embeddings=True)
    assert not hasattr(shared, "source_embedding")
    assert shared.source_embedder is shared.target_embedding
    separate = tiny_model(share_embeddings=False, seed=1)
    assert separate.source_embedder is separate.source_embedding


def test_pre_norm_uses_final_norms():
    model = tiny_model(norm_position="pre")
    source, target = token_batch()
    before = model(source, target)
    with torch.no_grad():
        model.decoder.final_norm.bias.fill_(0.5)
    assert not torch.allclose(model(source, target), before)
    assert tiny_model(norm_position="post").decoder.final_norm is None


def test_init_follows_architecture():
    model = tiny_model(dtype=torch.float32, ff_dim=222, model_dim=140, num_heads=5)
    embedding = model.target_embedding.weight.detach()
    # 37 x 140 = 5180 draws: the sample std is within ~1% of 140^-0.5; 5% is safe.
    assert float(embedding.std()) == pytest.approx(140**-0.5, rel=0.05)
    hidden = model.encoder.layers[0].feed_forward.hidden.requires_grad_(False)
    bound = math.sqrt(6 / (140 + 222))  # Xavier-uniform
    assert float(hidden.weight.abs().max()) <= bound
    assert float(hidden.weight.abs().max()) > 0.9 * bound
    assert torch.equal(hidden.bias, torch.zeros(222))
    norm = model.decoder.layers[1].cross_attention_norm
    assert torch.equal(norm.weight, torch.ones(140))
    assert torch.equal(norm.bias, torch.zeros(140))


def test_generator_seeds_init():
    first = tiny_model(seed=7).state_dict()
    second = tiny_model(seed=7).state_dict()
    other = tiny_model(seed=8).state_dict()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert not torch.equal(
        first["target_embedding.weight"], other["target_embedding.weight"]
    )


def test_dropout_only_in_training():
    model = tiny_model(dropout=0.3, embedding_dropout=0.3, attention_dropout=0.3)
    source, target = token_batch()
    assert torch.equal(model(source, target), model(source, target))
    model.train()
    assert not torch.equal(model(source, target), model(source, target))


def test_encode_rejects_out_of_vocabulary_id():
    model = tiny_model(share_embeddings=False, source_vocab_size=41)
    source, target = token_batch()
    source[0, 0] = 40  # valid in the source vocabulary only
    memory = model.encode(source)
    with pytest.raises(DataError, match=r"token id 40 .* size 37"):
        model.decode(source, memory, source)
