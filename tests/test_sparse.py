"""The sparse TopK kernels compute exactly what the dense TopK SAE computes, gradients included."""
import pytest
import torch

from dictcircuits.sparse import sparse_autoencoder, sparse_decode


def _dense_autoencoder(x, W_enc, b_enc, W_dec, b_dec, k, centre):
    """The reference: the whole [B, F] pre-activation, ReLU, top-k, dense decode. -> (x_hat, f [B, F])."""
    pre = torch.relu((x - b_dec if centre else x) @ W_enc + b_enc)
    vals, idx = pre.topk(k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, idx, vals)
    return f @ W_dec + b_dec, f


def _params(B, d, F, dtype, seed, negative_bias=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=dtype)
    W_enc = torch.randn(d, F, generator=g, dtype=dtype) / d ** 0.5
    b_enc = torch.randn(F, generator=g, dtype=dtype) * 0.1 - negative_bias
    W_dec = torch.randn(F, d, generator=g, dtype=dtype)
    b_dec = torch.randn(d, generator=g, dtype=dtype) * 0.3
    target = torch.randn(B, d, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, W_enc, b_enc, W_dec, b_dec)], target


@pytest.mark.parametrize("centre", [True, False])
def test_sparse_topk_autoencoder_matches_dense_forward_and_backward(centre):
    """float64: x̂, the selected features and the gradients of x, W_enc, b_enc, W_dec and b_dec equal dense
    autograd through the whole [B, F] matrix; only selected encoder columns get gradient."""
    B, d, F, k = 64, 16, 96, 5
    params, target = _params(B, d, F, torch.float64, seed=0)
    hat, f = _dense_autoencoder(*params, k, centre)
    dense_grads = torch.autograd.grad(((hat - target) ** 2).sum(), params)
    s_hat, sel = sparse_autoencoder(*params, k, centre=centre)
    assert not sel.vals.requires_grad and not sel.idx.requires_grad
    torch.testing.assert_close(s_hat, hat)
    torch.testing.assert_close(sel.to_dense(), f.detach())
    sparse_grads = torch.autograd.grad(((s_hat - target) ** 2).sum(), params)
    for name, a, b in zip(("x", "W_enc", "b_enc", "W_dec", "b_dec"), sparse_grads, dense_grads):
        torch.testing.assert_close(a, b, msg=name)
    assert (sparse_grads[1] != 0).any(dim=0).sum() <= B * k


def test_sparse_topk_autoencoder_workspace_adds_into_existing_grads():
    """With a workspace, the weights' gradients are added in place into the .grad already there (the trainer's
    zeroed buffers, here ones), twice in a row through the kept scratch, and equal plain gradients plus it."""
    B, d, F, k = 128, 8, 256, 4
    params, target = _params(B, d, F, torch.float64, seed=5)
    x, W_enc, b_enc, W_dec, b_dec = params
    hat, _ = sparse_autoencoder(*params, k)
    plain = torch.autograd.grad(((hat - target) ** 2).sum(), [W_enc, W_dec, b_enc, b_dec])
    W_enc.grad, W_dec.grad = torch.ones_like(W_enc), torch.ones_like(W_dec)
    enc_grad, dec_grad = W_enc.grad, W_dec.grad
    workspace = {}
    for rep in (1, 2):
        hat, _ = sparse_autoencoder(*params, k, workspace=workspace)
        ((hat - target) ** 2).sum().backward()
        assert W_enc.grad is enc_grad and W_dec.grad is dec_grad  # the same buffers, added into
        torch.testing.assert_close(W_enc.grad, 1 + rep * plain[0])
        torch.testing.assert_close(W_dec.grad, 1 + rep * plain[1])
        torch.testing.assert_close(b_enc.grad, rep * plain[2])
        torch.testing.assert_close(b_dec.grad, rep * plain[3])
    assert workspace["W_enc"].shape == (F, d)


def test_topk_trainer_sparse_and_dense_steps_agree():
    from dictcircuits.trainers import SPARSE_MIN_WIDTH_PER_K, TrainerConfig, make_trainer

    k = 4
    cfg = TrainerConfig(arch="topk", width=SPARSE_MIN_WIDTH_PER_K * k, k=k)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    trainer = make_trainer(16, cfg, total_steps=10, batch_tokens=256)
    trainer.init_from(x)
    trainer.since_fired[:5] = 10 ** 9  # a few dead latents, so the AuxK term runs too
    sparse_loss, sparse_hat, sparse_f = trainer.loss(x, 0)
    sparse_grads = torch.autograd.grad(sparse_loss, [trainer.dic.W_enc, trainer.dic.W_dec, trainer.dic.b_dec])
    dense_loss, dense_hat, dense_f = trainer.dense_loss(x, 0)
    dense_grads = torch.autograd.grad(dense_loss, [trainer.dic.W_enc, trainer.dic.W_dec, trainer.dic.b_dec])
    torch.testing.assert_close(sparse_loss, dense_loss)
    torch.testing.assert_close(sparse_f.to_dense(), dense_f.detach())
    for a, b in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_trainer_sparse_steps_track_dense_steps(arch):
    """Whole optimiser steps on the sparse kernels (gradients kept and zeroed between steps, added into in place,
    AuxK included, BatchTopK's threshold EMA): four sparse steps leave the same weights as four dense ones."""
    from dictcircuits.trainers import SPARSE_MIN_WIDTH_PER_K, TrainerConfig, make_trainer

    k = 4
    x = torch.randn(4, 256, 16, generator=torch.Generator().manual_seed(2))
    trainers = []
    for dense in (False, True):
        trainer = make_trainer(16, TrainerConfig(arch=arch, width=SPARSE_MIN_WIDTH_PER_K * k, k=k),
                               total_steps=4, batch_tokens=256)
        trainer.init_from(x[0])
        trainer.since_fired[:5] = 10 ** 9
        if dense:
            trainer.loss_fn = trainer.dense_loss
        for step in range(4):
            trainer.step(x[step], step)
        trainers.append(trainer)
    sparse, dense = trainers
    assert sparse.keep_grads and not dense.keep_grads
    for name, a in sparse.dic.named_parameters():
        torch.testing.assert_close(a, dict(dense.dic.named_parameters())[name], atol=1e-5, rtol=1e-4, msg=name)
    if arch == "batchtopk":
        torch.testing.assert_close(sparse.dic.threshold, dense.dic.threshold)
        assert float(sparse.dic.threshold) > 0


def test_sparse_topk_float32_gradients_and_metrics():
    """float32 at a wider shape, some rows with fewer than k positive pre-activations: every gradient within 1e-5
    relative of the dense path; the step metrics from (values, indices) equal those of the dense matrix."""
    from dictcircuits.trainers import Trainer

    B, d, F, k = 512, 64, 2048, 16
    params, target = _params(B, d, F, torch.float32, seed=2, negative_bias=0.3)
    with torch.no_grad():
        params[0][:8] = params[4]  # centred to zero: only the (mostly negative) bias is left
    hat, sf = sparse_autoencoder(*params, k)
    idx = sf.idx.view(B, k)
    assert (idx[:, 1:] > idx[:, :-1]).all()  # ascending along each row
    x, W_enc, b_enc, W_dec, b_dec = params
    f = torch.relu((x - b_dec) @ W_enc + b_enc)
    f = torch.zeros_like(f).scatter(-1, idx, f.gather(-1, idx))  # the same top k, densely
    dense_grads = torch.autograd.grad(((f @ W_dec + b_dec - target) ** 2).sum(), params)
    sparse_grads = torch.autograd.grad(((hat - target) ** 2).sum(), params)
    for g_sparse, g_dense in zip(sparse_grads, dense_grads):
        assert float((g_sparse - g_dense).norm() / g_dense.norm()) < 1e-5

    assert (sf.vals == 0).any()  # zero entries count neither as nonzero nor as firing
    fired, nonzero = Trainer.firing(sf)
    fired_dense, nonzero_dense = Trainer.firing(sf.to_dense())
    assert torch.equal(fired, fired_dense) and int(nonzero) == int(nonzero_dense)


def test_sparse_decode_matches_dense_decode():
    """The decoder AuxK uses: Σ_j v_j W_dec[i_j] and its gradients, against a dense [B, F] product."""
    g = torch.Generator().manual_seed(6)
    B, d, F, k = 40, 8, 64, 3
    idx = torch.stack([torch.randperm(F, generator=g)[:k] for _ in range(B)]).sort(dim=-1).values
    vals = torch.rand(B, k, generator=g, dtype=torch.float64).requires_grad_()
    W_dec = torch.randn(F, d, generator=g, dtype=torch.float64).requires_grad_()
    dense = torch.zeros(B, F, dtype=vals.dtype).scatter(1, idx, vals) @ W_dec
    out = sparse_decode(vals, idx, W_dec)
    torch.testing.assert_close(out, dense)
    w = torch.randn(B, d, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((out * w).sum(), [vals, W_dec]), torch.autograd.grad((dense * w).sum(), [vals, W_dec])):
        torch.testing.assert_close(a, b)


def test_blocked_topk_equals_unblocked_with_ties_and_k_near_F():
    """Integer-valued inputs make every product exact whatever the block, with many tied pre-activations: the
    blocked encoder picks the same values and indices as the dense top-k, for k up to F and any block size."""
    from dictcircuits.sparse import blocked_topk

    g = torch.Generator().manual_seed(3)
    B, d, F = 50, 4, 24  # pre-activations in [-5, 5]: at most 11 distinct values among 24 per row
    x = torch.randint(-1, 2, (B, d), generator=g).float()
    W_enc = torch.randint(-1, 2, (d, F), generator=g).float()
    b_enc = torch.randint(-1, 2, (F,), generator=g).float()
    W_dec, b_dec = torch.zeros(F, d), torch.zeros(d)
    pre = x @ W_enc + b_enc
    assert all(len(row.unique()) < F // 2 for row in pre)  # plenty of ties in every row
    for k in (1, 5, F - 1, F):
        ref_vals, ref_idx = pre.topk(k, dim=-1, sorted=False)
        d_idx, order = ref_idx.sort(dim=-1)
        d_vals = ref_vals.gather(1, order).clamp_min(0)
        for rows in (1, 7, B, 4 * B):
            vals, idx = blocked_topk(x, W_enc, b_enc, k, rows)
            assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals), (k, rows)
            _, sel = sparse_autoencoder(x, W_enc, b_enc, W_dec, b_dec, k, centre=False, rows=rows)
            assert torch.equal(sel.idx.view(B, k), d_idx) and torch.equal(sel.vals.view(B, k), d_vals), (k, rows)


def test_blocked_sparse_step_gradients_match_dense():
    """float32: x̂, the features and every gradient of the blocked encoder (odd block sizes, a last short block)
    agree with dense autograd through the whole [B, F] matrix."""
    B, d, F, k = 300, 32, 1024, 16
    params, target = _params(B, d, F, torch.float32, seed=4)
    hat, f = _dense_autoencoder(*params, k, True)
    dense_grads = torch.autograd.grad(((hat - target) ** 2).sum(), params)
    for rows in (B, 64, 37, 1):
        s_hat, sel = sparse_autoencoder(*params, k, rows=rows)
        torch.testing.assert_close(sel.to_dense(), f.detach())
        grads = torch.autograd.grad(((s_hat - target) ** 2).sum(), params)
        for name, a, b in zip(("x", "W_enc", "b_enc", "W_dec", "b_dec"), grads, dense_grads):
            assert float((a - b).norm() / b.norm()) < 1e-5, (rows, name)


def test_block_rows_keeps_a_block_in_cache_budget():
    from dictcircuits.sparse import BLOCK_BYTES, MIN_BLOCK_ROWS, block_rows

    for F in (1024, 16384, 20480, 2 ** 20):
        rows = block_rows(F)
        assert rows >= MIN_BLOCK_ROWS
        assert rows == MIN_BLOCK_ROWS or rows * F * 4 <= BLOCK_BYTES


def test_topk_init_scale_gives_low_early_fvu_on_known_sparse_features():
    """Superposition data with 512 known sparse directions (d = 64): after init_from, the first four steps of
    TopK, BatchTopK and standard L1 reconstruct most of the variance (with the encoder at the decoder's unit scale
    they started at FVU 0.87, 2.4 and 69), and the scaling keeps which latents are selected."""
    from dictcircuits.synthetic import Superposition
    from dictcircuits.trainers import TrainerConfig, make_trainer

    sp = Superposition.make(64, 512, avg_active=8, seed=0)
    x, _ = sp.sample(512 * 4, seed=1)  # [2048, 64]
    x = x * (64 / x.pow(2).sum(-1).mean()).sqrt()  # the trainers' units: E‖x‖² = d
    for arch, limit in (("topk", 0.35), ("batchtopk", 0.5), ("relu", 0.2)):  # relu unscaled: FVU 64-69
        trainer = make_trainer(64, TrainerConfig(arch=arch, width=1024, k=8, decay_start=1.0), total_steps=4,
                               batch_tokens=512)
        w_before = trainer.dic.W_enc.detach().clone()
        trainer.init_from(x[:512])
        c = trainer.dic.W_enc.detach() / w_before
        assert 0.1 < float(c.mean()) < 0.9 and torch.allclose(c, c.mean())  # one positive factor below 1
        fvu = [float(trainer.step(x[i * 512:(i + 1) * 512], i)[2]) for i in range(4)]
        assert max(fvu) < limit, (arch, fvu)


def _dense_batch_topk(pre, k):
    """BatchTopK's reference: the k·B largest entries of ReLU(pre) over the whole batch, densely."""
    flat = torch.relu(pre).reshape(-1)
    vals, idx = flat.topk(k * pre.shape[0])
    return torch.zeros_like(flat).scatter(0, idx, vals).view_as(pre)


@pytest.mark.parametrize("case", ["even", "skewed", "few-positive"])
def test_blocked_batch_topk_is_the_exact_batch_selection(case):
    """The candidates-then-threshold selection equals the dense top-(k·B) of the whole batch: rows of similar
    scale; a few rows holding far more than their candidates (they are re-encoded in full); fewer than k·B
    positive entries in the batch (τ at 0)."""
    from dictcircuits import sparse

    g = torch.Generator().manual_seed(7)
    B, d, F, k = 96, 16, 512, 4
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    W_enc = torch.randn(d, F, generator=g, dtype=torch.float64) / d ** 0.5
    bias = torch.randn(F, generator=g, dtype=torch.float64) * 0.1
    if case == "skewed":
        x[:3] *= 25  # three rows take most of the batch's k·B entries
    if case == "few-positive":
        bias -= 3.0
    pre = x @ W_enc + bias
    dense = _dense_batch_topk(pre, k)
    calls = []
    original = sparse.torch.addmm

    def counting_addmm(*args, **kwargs):
        calls.append(args[1].shape[0])
        return original(*args, **kwargs)

    sparse.torch.addmm = counting_addmm
    try:
        sel = sparse.blocked_batch_topk(x, W_enc, bias, k, rows=40)
    finally:
        sparse.torch.addmm = original
    torch.testing.assert_close(sel.to_dense(), dense)
    counts = sel.crow.diff()
    assert int(counts.sum()) == int((dense > 0).sum()) and bool((sel.vals > 0).all())
    for r in range(B):  # columns ascend within each row
        cols = sel.idx[sel.crow[r]:sel.crow[r + 1]]
        assert bool((cols[1:] > cols[:-1]).all())
    redone = sum(calls) - B  # rows encoded a second time, in full
    if case == "skewed":
        assert int(counts[:3].min()) > sparse.CANDIDATES_PER_K * k and 3 <= redone < B // 4
    else:  # where rows are alike, few hold more than their candidates above τ
        assert redone <= B // 8
    if case == "few-positive":
        assert int(counts.sum()) < k * B


def test_blocked_batch_topk_with_ties_picks_a_valid_top_set():
    """Integer pre-activations with many ties at the threshold: k·B entries (or all positive ones), each at
    least as large as every entry left out."""
    from dictcircuits.sparse import blocked_batch_topk

    g = torch.Generator().manual_seed(8)
    B, d, F, k = 40, 4, 64, 3
    x = torch.randint(-1, 2, (B, d), generator=g).float()
    W_enc = torch.randint(-1, 2, (d, F), generator=g).float()
    bias = torch.randint(-1, 2, (F,), generator=g).float()
    pre = torch.relu(x @ W_enc + bias)
    for candidates in (1, 2, 3 * k, F):
        sel = blocked_batch_topk(x, W_enc, bias, k, rows=7, candidates=candidates)
        f = sel.to_dense()
        chosen = f > 0
        assert int(chosen.sum()) == min(k * B, int((pre > 0).sum()))
        assert torch.equal(f[chosen], pre[chosen])
        assert float(pre[chosen].min()) >= float(pre[~chosen].max()), candidates


@pytest.mark.parametrize("centre", [True, False])
def test_sparse_batchtopk_autoencoder_matches_dense_forward_and_backward(centre):
    B, d, F, k = 64, 16, 96, 5
    params, target = _params(B, d, F, torch.float64, seed=9)
    x, W_enc, b_enc, W_dec, b_dec = params
    f = _dense_batch_topk((x - b_dec if centre else x) @ W_enc + b_enc, k)
    hat = f @ W_dec + b_dec
    dense_grads = torch.autograd.grad(((hat - target) ** 2).sum(), params)
    s_hat, sel = sparse_autoencoder(*params, k, batch=True, centre=centre, rows=24)
    assert len(set(sel.crow.diff().tolist())) > 1  # rows hold different numbers of features
    torch.testing.assert_close(s_hat, hat)
    torch.testing.assert_close(sel.to_dense(), f.detach())
    sparse_grads = torch.autograd.grad(((s_hat - target) ** 2).sum(), params)
    for name, a, b in zip(("x", "W_enc", "b_enc", "W_dec", "b_dec"), sparse_grads, dense_grads):
        torch.testing.assert_close(a, b, msg=name)


def test_batchtopk_step_with_nothing_firing_keeps_its_threshold():
    """A batch where no pre-activation is positive: the sparse selection is empty, x̂ = b_dec, and the step
    leaves the inference threshold where it was (as the dense path does) instead of failing."""
    from dictcircuits.trainers import SPARSE_MIN_WIDTH_PER_K, TrainerConfig, make_trainer

    k = 4
    trainer = make_trainer(16, TrainerConfig(arch="batchtopk", width=SPARSE_MIN_WIDTH_PER_K * k, k=k),
                           total_steps=2, batch_tokens=64)
    with torch.no_grad():
        trainer.dic.b_enc.fill_(-100.0)
        trainer.dic.threshold.fill_(0.25)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(4))
    _, x_hat, f = trainer.loss(x, 0)
    assert f.idx.numel() == 0 and torch.equal(x_hat, trainer.dic.b_dec.expand_as(x_hat).detach())
    trainer.threshold_seen = True
    metrics = trainer.step(x, 0)
    assert float(metrics[1]) == 0.0 and float(trainer.dic.threshold) == 0.25
