"""Reference constructions from dense matrices (NumPy, float64), independent of the library.

The circular cross-correlation on the M-grid is built entry by entry from its definition
(Appendix B.2), the preconditioner ``P_k = (A_k A_k^T + eps I)^{-1/2}`` by an eigendecomposition
(eq. 6), so nothing here shares code with the FFT implementation.
"""

from __future__ import annotations

import numpy as np

from strategies import ConvGeometry

_NUMPY_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def correlation_matrix(weight: np.ndarray, groups: int, grid: tuple[int, int], dilation: tuple[int, int]) -> np.ndarray:
    """Dense ``(C_out*M_h*M_w) x (C_in*M_h*M_w)`` matrix of the circular cross-correlation.

    Row ``(k, i, j)`` gives ``sum_{c,t,u} w[k, c, t, u] x[c, (i + t d_h - f_h) mod M_h, (j + u d_w - f_w) mod M_w]``,
    which on a zero-embedded input equals the full linear correlation ("full" conv).
    """
    c_out, c_in_g, kh, kw = weight.shape
    mh, mw = grid
    dh, dw = dilation
    fh, fw = dh * (kh - 1), dw * (kw - 1)
    c_in = c_in_g * groups
    out_per_group = c_out // groups
    a = np.zeros((c_out, mh, mw, c_in, mh, mw))
    for k in range(c_out):
        g = k // out_per_group
        for cl in range(c_in_g):
            c = g * c_in_g + cl
            for t in range(kh):
                for u in range(kw):
                    for i in range(mh):
                        for j in range(mw):
                            a[k, i, j, c, (i + t * dh - fh) % mh, (j + u * dw - fw) % mw] += weight[k, cl, t, u]
    return a.reshape(c_out * mh * mw, c_in * mh * mw)


def inverse_sqrt_psd(matrix: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """``(matrix + eps I)^{-1/2}`` of a symmetric PSD matrix; zero eigenvalues map to 0 (pseudo-inverse)."""
    vals, vecs = np.linalg.eigh(matrix + eps * np.eye(matrix.shape[0]))
    inv = np.where(vals > 1e-12, 1.0 / np.sqrt(np.clip(vals, 1e-300, None)), 0.0)
    return (vecs * inv) @ vecs.T


def preconditioned_operator(
    weight: np.ndarray, groups: int, grid: tuple[int, int], dilation: tuple[int, int], eps: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """``(A, Q)`` with ``Q = blockdiag(P_k) A`` and ``P_k = (A_k A_k^T + eps I)^{-1/2}``."""
    a = correlation_matrix(weight, groups, grid, dilation)
    rows = grid[0] * grid[1]
    q = np.zeros_like(a)
    for k in range(weight.shape[0]):
        block = a[k * rows : (k + 1) * rows]
        q[k * rows : (k + 1) * rows] = inverse_sqrt_psd(block @ block.T, eps) @ block
    return a, q


def conv_norm2d_dense(
    geometry: ConvGeometry,
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    eps: float = 0.0,
    affine_weight: np.ndarray | None = None,
    affine_bias: np.ndarray | None = None,
) -> np.ndarray:
    """The whole ConvNorm site from dense matrices: pad (mode), zero-embed in the M-grid,
    ``Q = P A``, the affine transform ``r_k`` (§3.3: a per-channel "same" correlation on the
    zero-extended normalized signal, PyTorch's split of the halo, plus its bias), crop to the
    original conv's window (zeros beyond the full padding, but for what the affine kernel
    reaches), stride, bias."""
    top, bottom, left, right = geometry.explicit_padding()
    if geometry.padding_mode != "zeros":
        x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), mode=_NUMPY_PAD_MODES[geometry.padding_mode])
        top = bottom = left = right = 0
    n, c_in, h, w = x.shape
    (kh, kw), (dh, dw) = geometry.kernel, geometry.dilation
    fh, fw = dh * (kh - 1), dw * (kw - 1)
    mh, mw = h + fh, w + fw
    _, q = preconditioned_operator(weight, geometry.groups, (mh, mw), geometry.dilation, eps)
    embedded = np.zeros((n, c_in, mh, mw))
    embedded[:, :, :h, :w] = x
    z = (embedded.reshape(n, -1) @ q.T).reshape(n, -1, mh, mw)
    out_h, out_w = h + top + bottom - fh, w + left + right - fw
    window = np.zeros((n, z.shape[1], out_h, out_w))
    for o in range(out_h):
        i = o + fh - top
        for p in range(out_w):
            j = p + fw - left
            window[:, :, o, p] = _affine_at(z, i, j, affine_weight)
    if affine_bias is not None:
        window = window + affine_bias.reshape(1, -1, 1, 1)
    out = window[:, :, :: geometry.stride[0], :: geometry.stride[1]]
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return out


def _affine_at(z: np.ndarray, i: int, j: int, affine_weight: np.ndarray | None) -> np.ndarray:
    """``(r_k (star) z)[i, j]`` on the zero-extended signal (``z`` itself without ``r``): ``(N, C)``."""
    n, c, mh, mw = z.shape
    if affine_weight is None:
        return z[:, :, i, j] if 0 <= i < mh and 0 <= j < mw else np.zeros((n, c))
    rh, rw = affine_weight.shape[2:]
    value = np.zeros((n, c))
    for t in range(rh):
        for u in range(rw):
            a, b = i + t - (rh - 1) // 2, j + u - (rw - 1) // 2  # 'same': the smaller half before
            if 0 <= a < mh and 0 <= b < mw:
                value += affine_weight[:, 0, t, u][None, :] * z[:, :, a, b]
    return value
