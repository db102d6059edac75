"""MuonAdamW: Muon for the transformer's block matrices, AdamW for the embedding and lm_head; one class for one
process and for N processes under torch.distributed (no DDP wrapper).

- Muon: Nesterov momentum, then the update is orthogonalised by Newton-Schulz (`nanochat_kernels.newton_schulz`,
  "quintic" 3.4445/-4.7750/2.0315 or "polar_express" coefficients) and scaled by max(1, rows/cols)^0.5 so tall
  matrices (the MLP's c_fc) take steps of the same RMS size as square ones.
- Matrices of the same shape form one stack (K, rows, cols): one batched Newton-Schulz per shape, one collective.
- AdamW (decoupled weight decay, bias correction) on the embedding and lm_head, one group each so each has its lr.
- ZeRO-2 with N ranks: gradients are averaged by reduce-scatter, so each rank receives only the averaged gradient
  of the shard it owns (stack entries for Muon, rows for AdamW), keeps optimizer state only for that shard, updates
  it, and all-gathers the new parameters. Stacks and row counts are zero-padded to a multiple of N; zero padding
  stays zero under both updates. One process runs the same code with the collectives skipped.
- Collectives are launched asynchronously: all reduce-scatters first, then each group is updated as its gradient
  arrives and its all-gather is launched at once, so communication overlaps compute.
- State is per rank (`state_dict()` holds this rank's shard) and must be loaded with the same world size.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.distributed as dist

import nanochat_kernels
from nanochat.common import rank_and_world

# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _ceil_to(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def muon_update(grad: torch.Tensor, momentum_buffer: torch.Tensor, momentum: float, ns_steps: int,
                ns_coeffs) -> torch.Tensor:
    """Nesterov momentum then Newton-Schulz, batched over the stack: grad and buffer (K, rows, cols).
    Updates the buffer in place; returns the orthogonalised direction scaled by max(1, rows/cols)^0.5."""
    momentum_buffer.lerp_(grad, 1 - momentum)
    direction = grad.lerp(momentum_buffer, momentum)  # Nesterov: look ahead along the momentum
    direction = nanochat_kernels.newton_schulz(direction, steps=ns_steps, coeffs=ns_coeffs)
    rows, cols = grad.shape[-2:]
    return direction * max(1.0, rows / cols) ** 0.5


# ---------------------------------------------------------------------------------------------------------------
# The optimizer


class MuonAdamW:
    """Muon on `matrix_params` (2-D), AdamW on each of `adamw_groups` (dicts with "params", "lr" and optionally
    "betas", "eps", "weight_decay", "name").

    `param_groups` follows torch's convention so schedules can set group["lr"] (and group["momentum"] on the groups
    whose group["kind"] == "muon"); group["initial_lr"] keeps the starting lr.
    """

    def __init__(self, matrix_params, adamw_groups, *, matrix_lr: float = 0.02, momentum: float = 0.95,
                 ns_steps: int = 5, ns_coeffs="quintic", adam_betas: tuple[float, float] = (0.8, 0.95),
                 adam_eps: float = 1e-10, weight_decay: float = 0.0):
        self.rank, self.world_size = rank_and_world()
        self.param_groups: list[dict] = []
        by_shape: OrderedDict[tuple, list] = OrderedDict()
        for p in matrix_params:
            if p.ndim != 2:
                raise ValueError(f"Muon takes 2-D matrices, got a parameter of shape {tuple(p.shape)}")
            by_shape.setdefault(tuple(p.shape), []).append(p)
        for shape, params in by_shape.items():
            self.param_groups.append(dict(kind="muon", params=params, lr=matrix_lr, initial_lr=matrix_lr,
                                          momentum=momentum, ns_steps=ns_steps, ns_coeffs=ns_coeffs,
                                          weight_decay=weight_decay, name=f"muon{list(shape)}"))
        for group in adamw_groups:
            if "params" not in group or "lr" not in group:
                raise ValueError(f"an AdamW group needs 'params' and 'lr', got keys {sorted(group)}")
            self.param_groups.append(dict(kind="adamw", params=list(group["params"]), lr=group["lr"],
                                          initial_lr=group["lr"], betas=tuple(group.get("betas", adam_betas)),
                                          eps=group.get("eps", adam_eps),
                                          weight_decay=group.get("weight_decay", weight_decay),
                                          name=group.get("name", "adamw")))
        seen = set()
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in seen:
                    raise ValueError("a parameter appears in more than one optimizer group")
                seen.add(id(p))
        self.state: list[dict] = [{} for _ in self.param_groups]
        self.step_count = 0

    # -- sharding geometry ------------------------------------------------------------------------------------

    def _muon_shard(self, group) -> tuple[int, int]:
        """(padded stack size, entries per rank) of a Muon group."""
        padded = _ceil_to(len(group["params"]), self.world_size)
        return padded, padded // self.world_size

    def _rows_shard(self, p) -> tuple[int, int, int]:
        """AdamW shards a parameter viewed as (rows, cols) by rows: (rows, padded rows, rows per rank)."""
        rows = p.shape[0] if p.ndim > 0 else 1
        padded = _ceil_to(rows, self.world_size)
        return rows, padded, padded // self.world_size

    # -- collectives ------------------------------------------------------------------------------------------

    def _reduce_scatter(self, full: torch.Tensor) -> tuple[torch.Tensor, object]:
        """Sum `full` (W x n, ...) over ranks and keep this rank's n slices (async); one process: identity."""
        if self.world_size == 1:
            return full, None
        out = torch.empty((full.size(0) // self.world_size, *full.shape[1:]), dtype=full.dtype, device=full.device)
        work = dist.reduce_scatter_tensor(out, full, op=dist.ReduceOp.SUM, async_op=True)
        return out, work

    def _all_gather(self, shard: torch.Tensor) -> tuple[torch.Tensor, object]:
        if self.world_size == 1:
            return shard, None
        full = torch.empty((shard.size(0) * self.world_size, *shard.shape[1:]), dtype=shard.dtype,
                           device=shard.device)
        work = dist.all_gather_into_tensor(full, shard, async_op=True)
        return full, work

    # -- the step ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self):
        self.step_count += 1
        # 1. launch the gradient reduce-scatters of every group
        pending = []
        for group in self.param_groups:
            if group["kind"] == "muon":
                padded, _ = self._muon_shard(group)
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group["params"]]
                grads += [torch.zeros_like(grads[0])] * (padded - len(grads))
                pending.append([self._reduce_scatter(torch.stack(grads))])  # (K_pad, rows, cols) -> own shard
            else:
                items = []
                for p in group["params"]:
                    rows, padded, _ = self._rows_shard(p)
                    g = p.grad if p.grad is not None else torch.zeros_like(p)
                    g = g.reshape(rows, -1)
                    if padded > rows:
                        g = torch.cat([g, g.new_zeros(padded - rows, g.size(1))])
                    items.append(self._reduce_scatter(g))
                pending.append(items)

        # 2. as each group's averaged gradient shard arrives, update the shard and launch its all-gather
        gathers = []
        for gi, (group, items) in enumerate(zip(self.param_groups, pending)):
            if group["kind"] == "muon":
                (grad, work), = items
                if work is not None:
                    work.wait()
                gathers.append([self._all_gather(self._muon_step(gi, group, grad / self.world_size))])
            else:
                out = []
                for p, (grad, work) in zip(group["params"], items):
                    if work is not None:
                        work.wait()
                    out.append(self._all_gather(self._adamw_step(gi, group, p, grad / self.world_size)))
                gathers.append(out)

        # 3. copy the gathered parameters back
        for group, items in zip(self.param_groups, gathers):
            if group["kind"] == "muon":
                (full, work), = items
                if work is not None:
                    work.wait()
                for i, p in enumerate(group["params"]):
                    p.copy_(full[i])
            else:
                for p, (full, work) in zip(group["params"], items):
                    if work is not None:
                        work.wait()
                    rows = p.shape[0] if p.ndim > 0 else 1
                    p.copy_(full[:rows].reshape(p.shape))

    def _muon_step(self, gi: int, group: dict, grad: torch.Tensor) -> torch.Tensor:
        """Update this rank's entries of a Muon stack; grad (n, rows, cols) averaged. Returns the new entries."""
        params = group["params"]
        _, per_rank = self._muon_shard(group)
        start = self.rank * per_rank
        current = [params[i] if i < len(params) else None for i in range(start, start + per_rank)]
        shard = torch.stack([p.detach() if p is not None else torch.zeros_like(params[0]) for p in current])
        state = self.state[gi]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad, dtype=torch.float32)
        update = muon_update(grad.float(), state["momentum_buffer"], group["momentum"], group["ns_steps"],
                             group["ns_coeffs"])
        lr, wd = group["lr"], group["weight_decay"]
        if wd:
            shard.mul_(1 - lr * wd)
        shard.add_(update.to(shard.dtype), alpha=-lr)
        return shard

    def _adamw_step(self, gi: int, group: dict, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Update this rank's rows of `p`; grad (n, cols) averaged. Returns the new rows (padding rows stay 0)."""
        rows, padded, per_rank = self._rows_shard(p)
        start = self.rank * per_rank
        flat = p.detach().reshape(rows, -1)
        shard = grad.new_zeros(per_rank, flat.size(1), dtype=p.dtype)
        take = max(0, min(rows, start + per_rank) - start)
        if take:
            shard[:take] = flat[start:start + take]
        state = self.state[gi].setdefault(group["params"].index(p), {})
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(shard, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(shard, dtype=torch.float32)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        g = grad.float()
        state["exp_avg"].lerp_(g, 1 - beta1)
        state["exp_avg_sq"].lerp_(g.square(), 1 - beta2)
        bias1 = 1 - beta1 ** state["step"]
        bias2 = 1 - beta2 ** state["step"]
        denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(eps)
        if wd:
            shard.mul_(1 - lr * wd)
        shard.add_((state["exp_avg"] / bias1 / denom).to(shard.dtype), alpha=-lr)
        if take < per_rank:
            shard[take:] = 0
        return shard

    def zero_grad(self, set_to_none: bool = True):
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    # -- checkpointing ----------------------------------------------------------------------------------------

    _HYPER = ("lr", "initial_lr", "momentum", "ns_steps", "ns_coeffs", "betas", "eps", "weight_decay")

    def state_dict(self) -> dict:
        """This rank's shard of the state plus every group's hyperparameters (torch.save-able)."""
        groups = [{k: group[k] for k in self._HYPER if k in group} | {"kind": group["kind"], "name": group["name"]}
                  for group in self.param_groups]
        return {"world_size": self.world_size, "rank": self.rank, "step_count": self.step_count,
                "groups": groups, "state": self.state}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("world_size") != self.world_size:
            raise ValueError(f"optimizer state was saved with world_size={state_dict.get('world_size')}, this run "
                             f"has world_size={self.world_size}; resume with the same number of processes")
        if len(state_dict["groups"]) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(state_dict['groups'])} groups, this model has "
                             f"{len(self.param_groups)}; was it saved for a different model?")
        for group, saved in zip(self.param_groups, state_dict["groups"]):
            if saved["kind"] != group["kind"] or saved["name"] != group["name"]:
                raise ValueError(f"optimizer group {saved['name']} ({saved['kind']}) does not match this model's "
                                 f"{group['name']} ({group['kind']})")
            for k in self._HYPER:
                if k in saved:
                    group[k] = tuple(saved[k]) if k == "betas" else saved[k]
        device = self.param_groups[0]["params"][0].device

        def to_device(obj):
            if isinstance(obj, torch.Tensor):
                return obj.to(device)
            if isinstance(obj, dict):
                return {k: to_device(v) for k, v in obj.items()}
            return obj

        self.state = [to_device(s) for s in state_dict["state"]]
        self.step_count = int(state_dict.get("step_count", 0))
