"""The GPTQ solver (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), Algorithm 1, as a pure function of (W, H, config).

Quantize W (N, K) column by column; after each column, spread its rounding error over the columns not
yet quantized using the inverse Hessian H^-1 of the layer-wise objective ||XW^T - XQ^T||² (H = 2XᵀX),
as in Optimal Brain Quantization. GPTQ's three changes to OBQ (§4):
  1. one column order for all rows (so H^-1 is shared and updated once per column);
  2. "lazy batch updates": errors are applied inside a block of `block_size` columns at once, and to
     the rest of the matrix once per block;
  3. the "Cholesky reformulation": the rows of H^-1 needed in order are those of the upper Cholesky
     factor of H^-1 (with damping λ = damp_percent · mean(diag H) for numerical stability).
Plus the reference implementation's options: act-order (descending diag H), group-wise grids (grid of
each group fitted when its first column is reached, or from the unquantized W with static groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.primitives import check_bits, check_group_size, grid_params, quantize


@dataclass
class GPTQResult:
    q: torch.Tensor  # (N, K) int32, in the original column order
    scales: torch.Tensor  # (N, G) fp32
    zeros: torch.Tensor  # (N, G) fp32 holding integers
    g_idx: torch.Tensor  # (K,) int64: group of each (original) column
    perm: torch.Tensor | None  # (K,) the column order used (act-order), None for 0..K-1
    loss: float  # Σ (w - q)² / [H^-1]_ii: the OBS estimate of the objective's increase (Alg. 1's E)

    def dequantize(self) -> torch.Tensor:
        """(N, K) fp32."""
        g = self.g_idx
        return (self.q.float() - self.zeros[:, g]) * self.scales[:, g]


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, *, bits: int, group_size: int | None, sym: bool = True,
                  act_order: bool = False, static_groups: bool = False, damp_percent: float = 0.01,
                  block_size: int = 128, min_zero: int = 0) -> GPTQResult:
    """W (N, K) weight, H (K, K) = 2 XᵀX / num_tokens over calibration inputs X (num_tokens, K)."""
    check_bits(bits)
    N, K = W.shape
    check_group_size(group_size, K)
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    # Inputs that are always zero carry no information: fix their weights to 0 (reference `dead`).
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    g = group_size or K
    num_groups = K // g
    static = None
    if static_groups and group_size is not None:  # grids from the unquantized W, one per original group
        static = [grid_params(W[:, j * g:(j + 1) * g], bits, sym=sym, min_zero=min_zero) for j in range(num_groups)]

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]

    damp = damp_percent * torch.mean(torch.diag(H))
    H[range(K), range(K)] += damp
    # Upper Cholesky factor of H^-1: row i holds what Alg. 1 needs of H^-1 after columns < i are gone.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # (K, K)

    Q = torch.zeros_like(W, dtype=torch.int32)  # (N, K), permuted order
    scales = torch.zeros(N, num_groups)
    zeros = torch.zeros(N, num_groups)
    losses = torch.zeros(N)
    scale = zero = None
    if group_size is None:
        scale, zero = grid_params(W, bits, sym=sym, min_zero=min_zero)  # (N,): row stats, order-free
        scales[:, 0], zeros[:, 0] = scale, zero

    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()  # (N, B)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group_size is not None:
                if static is not None:
                    orig = int(perm[col]) if perm is not None else col
                    scale, zero = static[orig // g]
                    scales[:, orig // g], zeros[:, orig // g] = scale, zero
                elif col % g == 0:
                    # As the reference: fitted on W as updated by all earlier blocks (not yet by this block's
                    # columns < i, which only matters when a group starts mid-block).
                    scale, zero = grid_params(W[:, col:col + g], bits, sym=sym, min_zero=min_zero)
                    scales[:, col // g], zeros[:, col // g] = scale, zero
            w = W1[:, i]  # (N,)
            d = Hinv1[i, i]
            q = quantize(w, scale, zero, bits)  # (N,)
            Q[:, col] = q
            deq = (q.float() - zero) * scale
            losses += (w - deq) ** 2 / d**2
            err = (w - deq) / d  # (N,)
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # OBS update within the block
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the lazy batch update of everything after the block

    g_idx = torch.arange(K) // g  # group of each position in the order quantized
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        # Without static groups, group j is the j-th run of g columns *in act order*; with static groups
        # the groups are the original column ranges.
        g_idx = torch.arange(K) // g if static is not None else g_idx[inv]
    return GPTQResult(q=Q, scales=scales, zeros=zeros, g_idx=g_idx, perm=perm, loss=float(losses.sum() / 2))


def rtn_result(W: torch.Tensor, *, bits: int, group_size: int | None, sym: bool = True, min_zero: int = 0) -> GPTQResult:
    """Round-to-nearest in the same result type (the baseline GPTQ is compared against)."""
    from quant.primitives import quantize_rtn

    q, scales, zeros = quantize_rtn(W, bits, group_size, sym=sym, min_zero=min_zero)
    K = W.shape[1]
    return GPTQResult(q=q, scales=scales, zeros=zeros, g_idx=torch.arange(K) // (group_size or K), perm=None,
                      loss=float("nan"))
