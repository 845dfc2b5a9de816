"""Attention of the PyTorch twin: manual and fused paths, masks, a reference.

Sizes are prime-like (5 heads of 7, query length 11, key length 13) so that a
swapped axis changes a shape or a value and cannot pass.
"""

import pytest
import torch

from torch_impl import attention as torch_attention
from torch_impl.attention import MultiHeadAttention, attend_fused, attend_manual
from twinformer.config import ModelConfig
from twinformer.errors import ConfigError

BATCH, HEADS, HEAD_DIM, QUERIES, KEYS = 3, 5, 7, 11, 13


def _inputs(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(BATCH, HEADS, QUERIES, HEAD_DIM)] + [(BATCH, HEADS, KEYS, HEAD_DIM)] * 2
    return tuple(
        torch.randn(shape, generator=generator, dtype=dtype).requires_grad_()
        for shape in shapes
    )


def _padding_mask() -> torch.Tensor:
    # Row 0 may attend to all keys, row 1 the first 8, row 2 the first 3: (B, 1, 1, K).
    lengths = torch.tensor([KEYS, 8, 3])
    return (torch.arange(KEYS)[None, :] < lengths[:, None])[:, None, None, :]


def _outputs_and_grads(attend, dtype, mask):
    query, key, value = _inputs(dtype)
    output = attend(query, key, value, mask)
    weights = torch.linspace(-1, 1, output.numel(), dtype=dtype).view_as(output)
    (output * weights).sum().backward()
    return output.detach(), [t.grad for t in (query, key, value)]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    difference = (actual - expected).detach().abs().max()
    return float(difference / expected.detach().abs().max())


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [
        # float64: the two paths order the same sums differently; ~1e-16 each.
        (torch.float64, 1e-12),
        # float32: the same reordering at eps 6e-8, through softmax and matmuls.
        (torch.float32, 1e-5),
    ],
)
def test_attend_manual_matches_fused(dtype, tolerance):
    mask = _padding_mask()
    manual, manual_grads = _outputs_and_grads(attend_manual, dtype, mask)
    fused, fused_grads = _outputs_and_grads(attend_fused, dtype, mask)
    assert manual.shape == (BATCH, HEADS, QUERIES, HEAD_DIM)
    assert _relative_error(fused, manual) < tolerance
    for name, got, want in zip("qkv", fused_grads, manual_grads, strict=True):
        assert _relative_error(got, want) < tolerance, f"gradient of {name}"


def _attend_fused_guarded(*args, **kwargs):
    # attend_fused as it runs on devices whose kernels may return NaN for a
    # fully masked row: the row attends everywhere and is zeroed afterwards.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch_attention, "ZEROS_FULLY_MASKED_ROWS", frozenset())
        return attend_fused(*args, **kwargs)


@pytest.mark.parametrize("attend", [attend_manual, attend_fused, _attend_fused_guarded])
def test_attend_fully_masked_row_is_zero(attend):
    mask = _padding_mask().expand(BATCH, 1, QUERIES, KEYS).clone()
    mask[1, :, 4] = False  # query 4 of sequence 1 may attend to nothing
    output, grads = _outputs_and_grads(attend, torch.float64, mask)
    assert not output.isnan().any()
    assert torch.equal(
        output[1, :, 4], torch.zeros(HEADS, HEAD_DIM, dtype=torch.float64)
    )
    assert output[1, :, 3].abs().sum() > 0  # the neighbouring row is untouched
    for name, grad in zip("qkv", grads, strict=True):
        assert torch.isfinite(grad).all(), f"gradient of {name}"
    # The masked query row gets no gradient at all.
    assert torch.equal(
        grads[0][1, :, 4], torch.zeros(HEADS, HEAD_DIM, dtype=torch.float64)
    )


@pytest.mark.parametrize("attend", [attend_manual, attend_fused, _attend_fused_guarded])
def test_attend_padding_and_causal_combine(attend):
    # Square self-attention over KEYS positions with padding and causal masks.
    generator = torch.Generator().manual_seed(1)
    query, key, value = (
        torch.randn(
            BATCH, HEADS, KEYS, HEAD_DIM, generator=generator, dtype=torch.float64
        )
        for _ in range(3)
    )
    causal = torch.ones(KEYS, KEYS, dtype=torch.bool).tril()[None, None]
    output = attend(query, key, value, _padding_mask() & causal)

    # Reference: for each query, softmax over the keys it may see, one at a time.
    lengths = [KEYS, 8, 3]
    for b in range(BATCH):
        for i in range(KEYS):
            visible = min(i + 1, lengths[b])
            scores = torch.einsum("he,hke->hk", query[b, :, i], key[b, :, :visible])
            weights = torch.softmax(scores / HEAD_DIM**0.5, dim=-1)
            expected = torch.einsum("hk,hke->he", weights, value[b, :, :visible])
            # float64: one softmax and one matmul, summed in another order.
            assert torch.allclose(output[b, :, i], expected, atol=1e-12, rtol=0)


def _attention(attention: str = "manual") -> MultiHeadAttention:
    config = ModelConfig(
        37, 37, model_dim=HEADS * HEAD_DIM, num_heads=HEADS, attention=attention
    )
    torch.manual_seed(2)
    module = MultiHeadAttention(config).double()
    with torch.no_grad():
        for linear in (module.query, module.key, module.value, module.output):
            linear.bias.normal_()
    return module.eval()


def test_multi_head_attention_matches_torch_reference():
    module = _attention("manual")
    model_dim = HEADS * HEAD_DIM
    reference = torch.nn.MultiheadAttention(
        model_dim, HEADS, batch_first=True, dtype=torch.float64
    ).eval()
    with torch.no_grad():
        reference.in_proj_weight.copy_(
            torch.cat([module.query.weight, module.key.weight, module.value.weight])
        )
        reference.in_proj_bias.copy_(
            torch.cat([module.query.bias, module.key.bias, module.value.bias])
        )
        reference.out_proj.weight.copy_(module.output.weight)
        reference.out_proj.bias.copy_(module.output.bias)

    generator = torch.Generator().manual_seed(3)
    queries = torch.randn(
        BATCH, QUERIES, model_dim, generator=generator, dtype=torch.float64
    )
    memory = torch.randn(
        BATCH, KEYS, model_dim, generator=generator, dtype=torch.float64
    )
    mask = _padding_mask()
    output = module(queries, memory, mask)
    # MultiheadAttention masks where key_padding_mask is True: the opposite.
    expected, _ = reference(
        queries, memory, memory, key_padding_mask=~mask[:, 0, 0], need_weights=False
    )
    assert output.shape == (BATCH, QUERIES, model_dim)
    # float64: the same projections and softmax, fused differently.
    assert _relative_error(output, expected) < 1e-12


def test_multi_head_attention_path_override():
    module = _attention("fused")
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(
        BATCH, KEYS, HEADS * HEAD_DIM, generator=generator, dtype=torch.float64
    )
    fused = module(x, x, _padding_mask())
    manual = module(x, x, _padding_mask(), attention="manual")
    # float64: the two paths differ only in summation order.
    assert _relative_error(manual, fused) < 1e-12
    with pytest.raises(ConfigError, match="'flash'"):
        module(x, x, None, attention="flash")


def test_multi_head_attention_cache_matches_full():
    module = _attention("manual")
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(
        BATCH, KEYS, HEADS * HEAD_DIM, generator=generator, dtype=torch.float64
    )
    causal = torch.ones(KEYS, KEYS, dtype=torch.bool).tril()[None, None]
    full = module(x, x, causal)

    # Feed positions one at a time. At step t the cache returns the t + 1
    # keys written so far, so the mask covers those.
    shape = (BATCH, HEADS, KEYS, HEAD_DIM)
    cache = {"key": x.new_zeros(shape), "value": x.new_zeros(shape)}
    steps = [
        module(
            x[:, t : t + 1], x[:, t : t + 1], causal[:, :, t : t + 1, : t + 1], cache, t
        )
        for t in range(KEYS)
    ]
    # float64: per-step and whole-sequence matmuls round differently.
    assert _relative_error(torch.cat(steps, dim=1), full) < 1e-12
