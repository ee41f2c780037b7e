"""Inputs and comparisons shared by the attention tests: token contexts, perturbed fp64 modules, errors,
and running a fast path and its reference module side by side (forward and input gradients)."""

import torch

from eflow.model.rope import rope_table
from eflow.model.tokens import TokenContext


def rel_err(a, b):
    """Relative Frobenius error ||a - b|| / ||b||, in fp64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make_ctx(grid, batch, keep=None, head_dim=16, seed=0, device="cpu"):
    """Dense context, or one keeping `keep` random tokens per sample (sorted raster indices)."""
    table = rope_table(grid, head_dim, device=device)
    dense = TokenContext.dense(grid, batch, table)
    if keep is None:
        return dense
    g = torch.Generator().manual_seed(seed)
    n = dense.num_tokens
    index = torch.stack([torch.randperm(n, generator=g)[:keep].sort().values for _ in range(batch)])
    return dense.select(index.to(device), table)


def perturbed(module, seed=0, scale=0.2):
    """Random weights everywhere (norms, gates and zero-init branches too), so a misplaced one shows; fp64."""
    torch.manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def outputs_and_input_grads(modules, x, ctx, dtype):
    """Each module's output on x and d(sum y^2)/dx, under bf16 autocast when dtype is bf16 (CUDA)."""
    outputs, grads = [], []
    for module in modules:
        xi = x.clone().requires_grad_()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = module(xi, ctx)
        y.float().square().sum().backward()
        outputs.append(y)
        grads.append(xi.grad)
    return outputs, grads


def listed_blocks(block_mask, batch, num_blocks):
    """From a flex BlockMask: how often each (query block, key block) is listed [B, QB, KB] (partial and
    full tables together) and which are listed as full [B, QB, KB] bool (head 0)."""
    listed = torch.zeros(batch, num_blocks, num_blocks, dtype=torch.int64)
    full = torch.zeros(batch, num_blocks, num_blocks, dtype=torch.bool)
    for b in range(batch):
        for qb in range(num_blocks):
            for kb in block_mask.kv_indices[b, 0, qb, : block_mask.kv_num_blocks[b, 0, qb]].tolist():
                listed[b, qb, kb] += 1
            for kb in block_mask.full_kv_indices[
                b, 0, qb, : block_mask.full_kv_num_blocks[b, 0, qb]
            ].tolist():
                listed[b, qb, kb] += 1
                full[b, qb, kb] = True
    return listed, full


def real_block_pairs(m, num_blocks, block):
    """[QB, KB] bool: block pairs holding no padding (m real tokens padded to num_blocks * block)."""
    real = torch.zeros(num_blocks * block, dtype=torch.bool)
    real[:m] = True
    return (real[:, None] & real[None, :]).view(num_blocks, block, num_blocks, block).all(dim=(1, 3))
