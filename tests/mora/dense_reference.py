"""An independent, deliberately naive reading of MORA_SPEC.md: explicit compression, rotation and decompression
matrices built element by element in Python loops, so that the library's vectorised code is checked against the
equations rather than against itself."""
from __future__ import annotations

import math

import torch


def padding_selector(k: int, length: int) -> torch.Tensor:
    """P (`length × k`): `x̃[t] = x[t mod k]`."""
    P = torch.zeros(length, k, dtype=torch.float64)
    for t in range(length):
        P[t, t % k] = 1.0
    return P


def groups(m: int, side: int) -> list[int]:
    """Group of each of `m` positions: the first `m mod r̂` groups hold one more index."""
    q, s = divmod(m, side)
    out = []
    for g in range(side):
        out += [g] * (q + 1 if g < s else q)
    return out


def compress_matrix(kind: str, k: int, side: int) -> torch.Tensor:
    """C (`r̂ × k`) with `c = C x`."""
    C = torch.zeros(side, k, dtype=torch.float64)
    if kind == "strided":
        n = math.ceil(k / side)
        P = padding_selector(k, n * side)
        for t in range(n * side):
            for i in range(k):
                C[t % side, i] += P[t, i]
    elif kind == "contiguous":
        for i, g in enumerate(groups(k, side)):
            C[g, i] = 1.0
    elif kind == "truncate":
        for j in range(min(side, k)):
            C[j, j] = 1.0
    return C


def decompress_matrix(kind: str, d: int, side: int) -> torch.Tensor:
    """D (`d × r̂`) with `y = D z`."""
    D = torch.zeros(d, side, dtype=torch.float64)
    if kind == "tile":
        for o in range(d):
            D[o, o % side] = 1.0
    elif kind == "interleave":
        for o, g in enumerate(groups(d, side)):
            D[o, g] = 1.0
    elif kind == "zero-pad":
        for o in range(min(d, side)):
            D[o, o] = 1.0
    return D


def rotation_matrix(chunk: int, side: int) -> torch.Tensor:
    """R_i: rotate-half pairing of j with j + r̂/2 by `i·θ_j`."""
    half = side // 2
    R = torch.zeros(side, side, dtype=torch.float64)
    for j in range(half):
        theta = 10000.0 ** (-2.0 * j / side)
        phi = chunk * theta
        c, s = math.cos(phi), math.sin(phi)
        R[j, j], R[j, j + half] = c, -s
        R[j + half, j + half], R[j + half, j] = c, s
    return R


def dense_delta(M: torch.Tensor, k: int, d: int, variant: str) -> torch.Tensor:
    """ΔW (`d × k`) from the spec's equations, in float64."""
    M = M.double()
    side = M.shape[0]
    grouped = {
        "sharing": ("strided", "tile"),
        "type2": ("contiguous", "interleave"),
        "type3": ("contiguous", "tile"),
        "type4": ("strided", "interleave"),
        "truncation": ("truncate", "zero-pad"),
    }
    if variant in grouped:
        comp, decomp = grouped[variant]
        return decompress_matrix(decomp, d, side) @ M @ compress_matrix(comp, k, side)
    n = math.ceil(k / side)
    L = n * side
    block = torch.zeros(L, L, dtype=torch.float64)
    for i in range(n):
        R = rotation_matrix(i, side) if variant == "rope" else torch.eye(side, dtype=torch.float64)
        block[i * side:(i + 1) * side, i * side:(i + 1) * side] = M @ R
    T = torch.zeros(d, L, dtype=torch.float64)
    for o in range(d):
        T[o, o if L >= d else o % L] = 1.0
    return T @ block @ padding_selector(k, L)
