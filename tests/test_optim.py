import pytest

from shardwise.train.optim import lr_factor


def test_warmup_then_constant():
    f = [lr_factor(s, total_steps=10, schedule="constant", warmup_steps=4) for s in range(10)]
    assert f == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_cosine_decays_to_zero_at_the_end():
    f = [lr_factor(s, total_steps=12, schedule="cosine", warmup_steps=2) for s in range(13)]
    assert f[2] == 1.0 and f[7] == pytest.approx(0.5) and f[12] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(f[2:], f[3:], strict=False))


def test_step_schedule():
    f = [lr_factor(s, total_steps=100, schedule="step", warmup_steps=0, step_every=3, step_gamma=0.5) for s in range(7)]
    assert f == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]


def _zero_vs_torch(optimizer: str, *, group):
    """ZeRO-1 over the ranks of `group` against torch's optimizer on one process, on a
    model where one parameter gets no gradient in some steps (unused that step)."""
    import torch

    from shardwise.parallel.zero import ShardedOptimizer

    def build(params):
        if optimizer == "adamw":
            return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)

    torch.manual_seed(0)
    whole = [torch.randn(shape, requires_grad=True) for shape in ((5, 3), (4,), (7,))]
    mine = [p.detach().clone().requires_grad_(True) for p in whole]
    reference, sharded = build(whole), ShardedOptimizer(mine, build, group)
    for step in range(6):
        used = [0, 1, 2] if step % 3 == 0 else [0, 2]  # parameter 1 sits out two steps in three
        grads = [torch.full_like(p, 0.1 * (step + 1) * (i + 1)) for i, p in enumerate(whole)]
        for params, opt in ((whole, reference), (mine, sharded)):
            opt.zero_grad(set_to_none=True)
            for i in used:
                params[i].grad = grads[i].clone()
            opt.step()
    return [p.detach() for p in whole], [p.detach() for p in mine]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_sharded_optimizer_leaves_a_parameter_without_gradient_alone(pool, optimizer):
    import torch

    for reference, sharded in pool.run(_zero_vs_torch, optimizer, ranks=[0, 1, 2]):
        for want, got in zip(reference, sharded, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
