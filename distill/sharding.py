"""Sharded training with PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): ``train.fsdp=true``, or an
Accelerate FSDP launch (``configs/accelerate/fsdp.yaml``).

Each trained network is sharded over the launch's processes (its down / up / mid blocks one by one, then
the rest), so its parameters, gradients, AdamW moments and EMA shadow are held 1/N per process; frozen
networks (the teacher, its VAE and text encoders) are replicated. distill applies ``fully_shard`` itself,
one network at a time, because a score-distillation run trains two or three networks together while
Accelerate's FSDP2 ``prepare`` wraps one model per call, and Accelerate runs FSDP on GPUs only (its CPU
launches ignore ``--use_fsdp``): the same FSDP2 then runs over gloo on CPU, where the tests run it.

Checkpoints hold FULL state dicts in the unsharded format: every tensor is gathered (one at a time, kept on
the main process only) and written by the main process, so a checkpoint resumes at any process count,
sharded or not, and an unsharded checkpoint resumes sharded. On load each process keeps its own shard.
"""

from __future__ import annotations

import torch


def _dtensor():
    """PyTorch's DTensor class (imported on use: FSDP2 needs torch >= 2.6 built with distributed support)."""
    from torch.distributed.tensor import DTensor

    return DTensor

BLOCK_LISTS = ("down_blocks", "up_blocks", "blocks", "transformer_blocks", "single_transformer_blocks")


def shard_network(net: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 over the default process group: each block of the network's block lists (diffusers UNets:
    down_blocks, up_blocks and mid_block; transformers: transformer_blocks, FLUX's single_transformer_blocks)
    is its own unit, the root holds the rest. In place; returns
    ``net``."""
    from torch.distributed.fsdp import fully_shard

    for name in BLOCK_LISTS:
        for block in getattr(net, name, None) or []:
            fully_shard(block)
    if getattr(net, "mid_block", None) is not None:
        fully_shard(net.mid_block)
    fully_shard(net)
    return net


def reshard(*nets) -> None:
    """Free the gathered weights of every FSDP2 unit in ``nets`` (a no-op for unsharded networks)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    from torch.distributed.fsdp import FSDPModule

    for net in nets:
        for m in net.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def gather(value, keep: bool):
    """``value`` (a tensor, or a dict / list holding tensors) with every DTensor gathered into a full CPU
    tensor (a collective: every process calls it in the same order); ``keep`` False drops the result
    (processes other than the one that writes)."""
    if isinstance(value, _dtensor()):
        full = value.full_tensor()
        return full.detach().cpu() if keep else None
    if isinstance(value, dict):
        return {k: gather(v, keep) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(gather(v, keep) for v in value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu() if keep else None
    return value


def like(value: torch.Tensor, ref) -> torch.Tensor:
    """A full tensor placed as ``ref``: this process's shard when ``ref`` is a DTensor."""
    if isinstance(ref, _dtensor()):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
    return value


def load_model(net: torch.nn.Module, full: dict) -> None:
    own = net.state_dict()
    net.load_state_dict({k: like(v, own[k]) if k in own else v for k, v in full.items()})


def load_optimizer(opt: torch.optim.Optimizer, full: dict) -> None:
    """An unsharded (index-keyed) AdamW state dict into an optimizer over sharded parameters."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for idx, s in full["state"].items():
        p = params[int(idx)]
        state[idx] = {k: like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v for k, v in s.items()}
    opt.load_state_dict({**full, "state": state})


def load_ema(ema, full: dict) -> None:
    """An EMAModel state dict with full shadow tensors into an EMA over sharded parameters."""
    shadows = [like(v, ref) for v, ref in zip(full["shadow_params"], ema.shadow_params)]
    ema.load_state_dict({**full, "shadow_params": shadows})


class ShardedLoad:
    """``obj`` offered with the ``load_state_dict(full)`` the checkpoint reader calls, keeping this process's
    shard."""

    def __init__(self, obj, load):
        self.obj, self.load = obj, load

    def load_state_dict(self, full: dict) -> None:
        self.load(self.obj, full)


class Gathered:
    """A state dict gathered for writing, offered with the ``state_dict()`` the checkpoint writer calls."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state
