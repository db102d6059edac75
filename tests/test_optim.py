"""MuonAdamW in one process against a plain per-parameter reference (Muon written out by hand, torch.optim.AdamW),
its grouping, orthogonalisation and aspect scaling, and an exact state_dict round trip."""

from __future__ import annotations

import pytest
import torch

import nanochat_kernels
from nanochat.model.gpt import GPT, GPTConfig
from nanochat.model.optim import MuonAdamW, muon_update


def tiny_model(seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(sequence_len=16, vocab_size=61, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))


def train(model, opt, steps, seed=1, schedule=None):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        x = torch.randint(0, 61, (2, 17), generator=gen)
        if schedule:
            schedule(opt, step)
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_groups_by_shape_and_lr_scaling():
    model = tiny_model()
    opt = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02)
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    shapes = {tuple(g["params"][0].shape): len(g["params"]) for g in muon}
    assert shapes == {(64, 64): 4, (32, 64): 4, (256, 64): 2, (64, 256): 2}
    for g in muon:
        assert all(p.shape == g["params"][0].shape for p in g["params"])
    adam = {g["name"]: g for g in opt.param_groups if g["kind"] == "adamw"}
    scale = (64 / 768) ** -0.5
    assert adam["lm_head"]["lr"] == pytest.approx(0.004 * scale)
    assert adam["wte"]["lr"] == pytest.approx(0.2 * scale)
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == model.num_params()
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([torch.nn.Parameter(torch.zeros(3))], [])
    with pytest.raises(ValueError, match="more than one"):
        p = torch.nn.Parameter(torch.zeros(2, 2))
        MuonAdamW([p], [dict(params=[p], lr=0.1)])


def test_muon_update_is_orthogonal_and_aspect_scaled():
    torch.manual_seed(0)
    g = torch.randn(3, 64, 16)  # tall stack
    buf = torch.zeros_like(g)
    out = muon_update(g, buf, momentum=0.9, ns_steps=5, ns_coeffs="quintic")
    torch.testing.assert_close(buf, 0.1 * g)
    nesterov = g.lerp(buf, 0.9)
    expected = nanochat_kernels.reference.newton_schulz(nesterov, steps=5, coeffs="quintic") * 2.0  # sqrt(64/16)
    torch.testing.assert_close(out, expected)
    s = torch.linalg.svdvals(out / 2.0)
    assert s.min() > 0.5 and s.max() < 1.3  # quintic NS: singular values pushed into ~[0.7, 1.2]
    wide = muon_update(torch.randn(16, 64), torch.zeros(16, 64), 0.9, 5, "polar_express")
    s = torch.linalg.svdvals(wide)  # no aspect boost for wide matrices; Polar Express gets closer to 1
    assert s.min() > 0.8 and s.max() < 1.2


def reference_step(model, adam_opts, bufs, lr_matrix, momentum):
    """Muon per matrix, written plainly; AdamW by torch.optim."""
    with torch.no_grad():
        for block in model.blocks:
            for p in block.parameters():
                buf = bufs.setdefault(p, torch.zeros_like(p))
                buf.mul_(momentum).add_(p.grad, alpha=1 - momentum)
                nesterov = p.grad * (1 - momentum) + buf * momentum
                o = nanochat_kernels.reference.newton_schulz(nesterov, steps=5, coeffs="quintic")
                p.sub_(lr_matrix * max(1.0, p.shape[0] / p.shape[1]) ** 0.5 * o)
    for opt in adam_opts:
        opt.step()


def test_matches_plain_reference():
    model, ref = tiny_model(), tiny_model()
    opt = model.setup_optimizer(unembedding_lr=0.01, embedding_lr=0.1, matrix_lr=0.03, weight_decay=0.0)
    scale = (64 / 768) ** -0.5
    adams = [torch.optim.AdamW([ref.lm_head.weight], lr=0.01 * scale, betas=(0.8, 0.95), eps=1e-10,
                               weight_decay=0.0),
             torch.optim.AdamW([ref.wte.weight], lr=0.1 * scale, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)]
    gen = torch.Generator().manual_seed(3)
    bufs = {}
    for _ in range(4):
        x = torch.randint(0, 61, (2, 17), generator=gen)
        for m in (model, ref):
            m(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        reference_step(ref, adams, bufs, 0.03, 0.95)
        opt.zero_grad()
        for a in adams:
            a.zero_grad()
        ref.zero_grad()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=name)
    assert any(torch.count_nonzero(b.attn.c_proj.weight) for b in model.blocks), "zero-init weights moved"


def test_weight_decay_is_decoupled():
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt = MuonAdamW([], [dict(params=[p], lr=0.1, weight_decay=0.5)])
    p.grad = torch.zeros(4, 4)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4, 4), 1 - 0.1 * 0.5))


def test_state_dict_round_trip_is_exact():
    def schedule(opt, step):
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * (1.0 - 0.1 * step)

    model = tiny_model()
    opt = model.setup_optimizer()
    straight = train(model, opt, 4, schedule=schedule)

    model = tiny_model()
    opt = model.setup_optimizer()
    first = train(model, opt, 2, schedule=schedule)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = opt.state_dict()
    saved_opt = torch.load(_roundtrip(saved_opt), weights_only=True)

    model2 = tiny_model(seed=5)
    model2.load_state_dict(saved_model)
    opt2 = model2.setup_optimizer(matrix_lr=1.0)  # hyperparameters come back from the state dict
    opt2.load_state_dict(saved_opt)
    gen_state = torch.Generator().manual_seed(1)
    for _ in range(2):  # skip the first two batches
        torch.randint(0, 61, (2, 17), generator=gen_state)
    rest = []
    for step in range(2, 4):
        x = torch.randint(0, 61, (2, 17), generator=gen_state)
        schedule(opt2, step)
        loss = model2(x[:, :-1], x[:, 1:])
        loss.backward()
        opt2.step()
        opt2.zero_grad()
        rest.append(loss.item())
    assert first + rest == straight


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_load_state_dict_rejects_mismatch():
    model = tiny_model()
    opt = model.setup_optimizer()
    sd = opt.state_dict()
    bad = dict(sd, world_size=2)
    with pytest.raises(ValueError, match="world_size=2"):
        opt.load_state_dict(bad)
    other = GPT(GPTConfig(sequence_len=16, vocab_size=61, n_layer=1, n_head=1, n_kv_head=1, n_embd=64))
    with pytest.raises(ValueError, match="groups|does not match"):
        other.setup_optimizer().load_state_dict(sd)
