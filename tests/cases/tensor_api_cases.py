"""Every entry of the shared tensor API on this rank's backend, against NumPy."""

from __future__ import annotations

import numpy as np

from hyper_parallel import get_platform
from hyper_parallel.tensor_api import SHARED_TENSOR_METHODS


def _checks():
    p = get_platform()
    a = np.arange(12, dtype=np.float32).reshape(3, 4) / 7 - 0.5
    i64 = np.array([2, 0, 1, 3], dtype=np.int64)
    x, n = p.tensor(a.tolist()), p.tensor(i64.tolist(), dtype="int64")
    host = lambda t: np.asarray(p.tolist(t))

    def setitem():
        y = p.zeros((4,))
        y[p.tensor([3, 1], dtype="int64")] = p.tensor([5.0, 6.0])
        return host(y), np.array([0, 6, 0, 5.0])

    yield "shape", (tuple(x.shape), (3, 4))
    yield "dtype", (p.dtype_name(n.dtype), "int64")
    yield "x[i:j], x[idx], x[mask]", (np.concatenate([host(x[1:2]).ravel(), host(x[p.tensor([2, 0], dtype="int64")])
                                                      .ravel(), host(x[x > 0])]),
                                      np.concatenate([a[1:2].ravel(), a[[2, 0]].ravel(), a[a > 0]]))
    yield "x[idx] = y", setitem()
    yield "reshape", (host(x.reshape(2, -1)), a.reshape(2, -1))
    yield "swapaxes", (host(x.swapaxes(0, 1)), a.T)
    yield "contiguous", (host(x.swapaxes(0, 1).contiguous().reshape(-1)), a.T.reshape(-1))
    yield "mT", (host(x.mT), a.T)
    yield "__matmul__", (host(x @ x.mT), a @ a.T)
    yield "arithmetic", (host((x + 1) * x - x / 2 - x ** 2 + (x > 0).float()), (a + 1) * a - a / 2 - a ** 2 + (a > 0))
    yield "sum", (np.concatenate([host(x.sum(0)), host(x.sum(-1, keepdim=True)).ravel()]),
                  np.concatenate([a.sum(0), a.sum(-1)]))
    yield "mean", (host(x.mean(1)), a.mean(1))
    yield "cumsum", (host(n.cumsum(0)), np.cumsum(i64))
    yield "repeat_interleave", (host(n.repeat_interleave(n, 0)), np.repeat(i64, i64))
    yield "softmax", (host(x.softmax(-1)), np.exp(a) / np.exp(a).sum(-1, keepdims=True))
    yield "sigmoid", (host(x.sigmoid()), 1 / (1 + np.exp(-a)))
    yield "exp", (host(x.exp()), np.exp(a))
    yield "log", (host((x + 1).log()), np.log(a + 1))
    yield "topk", (host(x.topk(2)[1].to(p.dtype("int64"))), np.argsort(-a, axis=-1)[:, :2])
    yield "argsort", (host(n.argsort(stable=True)), np.argsort(i64, kind="stable"))
    yield "float", (p.dtype_name(n.float().dtype), "float32")
    yield "to", (p.dtype_name(x.to(p.dtype("int32")).dtype), "int32")
    yield "unsqueeze", (tuple(x.unsqueeze(1).shape), (3, 1, 4))
    idx = p.tensor([[0], [3], [1]], dtype="int64")
    yield "gather", (host(x.gather(1, idx)), np.take_along_axis(a, np.array([[0], [3], [1]]), 1))
    yield "masked_fill", (host(x.masked_fill(x > 0, 0.0)), np.where(a > 0, 0, a))
    yield "amax", (host(x.amax(-1)), a.max(-1))
    yield "clamp", (host(x.clamp(min=-0.2, max=0.3)), np.clip(a, -0.2, 0.3))
    yield "unbind", (host(x.unbind(0)[2]), a[2])


def every_shared_method() -> int:
    seen = []
    for name, (got, want) in _checks():
        if isinstance(want, np.ndarray):
            np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            assert got == want, f"{name}: {got} != {want}"
        seen.append(name)
    missing = set(SHARED_TENSOR_METHODS) - set(seen)
    assert not missing, f"shared tensor API entries without a check: {sorted(missing)}"
    return len(seen)
