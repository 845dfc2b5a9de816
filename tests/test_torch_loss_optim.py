"""Label-smoothed loss, Adam with the warmup schedule, and gradient clipping."""

import pytest
import torch

from torch_impl.loss import label_smoothed_cross_entropy
from torch_impl.optim import clip_gradients, make_optimizer
from twinformer.config import PAD_ID, TrainConfig
from twinformer.errors import ConfigError, DataError
from twinformer.schedule import transformer_learning_rate

BATCH, LENGTH, VOCAB = 3, 13, 37


def logits_and_labels(dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(BATCH, LENGTH, VOCAB, generator=generator, dtype=dtype)
    labels = torch.randint(4, VOCAB, (BATCH, LENGTH), generator=generator)
    labels[1, 9:] = PAD_ID
    labels[2, 4:] = PAD_ID
    return logits, labels


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_matches_torch_cross_entropy(smoothing, reduction):
    logits, labels = logits_and_labels()
    reference = torch.nn.CrossEntropyLoss(
        ignore_index=PAD_ID, label_smoothing=smoothing, reduction=reduction
    )
    expected = reference(logits.reshape(-1, VOCAB), labels.reshape(-1))
    loss = label_smoothed_cross_entropy(logits, labels, smoothing, reduction)
    # float64: the same terms summed in a different order.
    assert float(loss) == pytest.approx(float(expected), rel=1e-12)


def test_loss_ignores_padding_logits():
    logits, labels = logits_and_labels()
    changed = logits.clone()
    changed[2, 4:] = 100.0  # logits at padding labels must not count
    before = label_smoothed_cross_entropy(logits, labels, 0.1)
    assert torch.equal(label_smoothed_cross_entropy(changed, labels, 0.1), before)


def test_loss_of_all_padding_is_zero():
    logits, _ = logits_and_labels()
    labels = torch.zeros(BATCH, LENGTH, dtype=torch.long)
    assert float(label_smoothed_cross_entropy(logits, labels, 0.1)) == 0.0


def test_loss_rejects_bad_input():
    logits, labels = logits_and_labels()
    with pytest.raises(ConfigError, match="'median'"):
        label_smoothed_cross_entropy(logits, labels, 0.1, "median")
    labels[0, 0] = VOCAB
    with pytest.raises(DataError, match="token id 37"):
        label_smoothed_cross_entropy(logits, labels, 0.1)


def test_optimizer_follows_schedule():
    config = TrainConfig(warmup_steps=4, lr_scale=2.0, adam_beta2=0.95, adam_eps=1e-7)
    weight = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    optimizer, scheduler = make_optimizer([weight], config, model_dim=35)
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.95)
    assert group["eps"] == 1e-7
    assert group["weight_decay"] == 0
    for step in range(1, 9):
        expected = transformer_learning_rate(step, 35, 4, 2.0)
        # LambdaLR multiplies a base rate of 1.0 by the schedule: exact.
        assert group["lr"] == pytest.approx(expected, rel=1e-15), f"step {step}"
        weight.grad = torch.full_like(weight, 0.5)
        optimizer.step()
        scheduler.step()


def test_first_adam_step_moves_by_learning_rate():
    config = TrainConfig(warmup_steps=10)
    weight = torch.nn.Parameter(torch.zeros(7, dtype=torch.float64))
    optimizer, scheduler = make_optimizer([weight], config, model_dim=64)
    weight.grad = torch.linspace(-3, 3, 7, dtype=torch.float64)
    optimizer.step()
    # Adam's first step is -lr * g / (|g| + eps'), i.e. -lr * sign(g) here.
    rate = transformer_learning_rate(1, 64, 10, 1.0)
    expected = -rate * torch.sign(weight.grad)
    # float64: bias corrections cancel to within a few ulps; eps=1e-9 adds 1e-9.
    assert torch.allclose(weight.detach(), expected, atol=1e-8 * rate, rtol=0)


def test_clip_gradients_scales_global_norm():
    first = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    second = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    first.grad = torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
    second.grad = torch.tensor([0.0, 4.0, 0.0, 0.0], dtype=torch.float64)
    norm = clip_gradients([first, second], max_norm=1.0)
    assert float(norm) == pytest.approx(5.0, rel=1e-15)
    scale = 1.0 / (5.0 + 1e-6)
    # float64: one multiply per element.
    assert float(first.grad[0]) == pytest.approx(3.0 * scale, rel=1e-14)
    assert float(second.grad[1]) == pytest.approx(4.0 * scale, rel=1e-14)


def test_clip_gradients_off_at_zero():
    weight = torch.nn.Parameter(torch.zeros(3))
    weight.grad = torch.full((3,), 100.0)
    assert clip_gradients([weight], max_norm=0.0) is None
    assert torch.equal(weight.grad, torch.full((3,), 100.0))
