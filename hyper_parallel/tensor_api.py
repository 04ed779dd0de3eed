"""The shared tensor API: tensor methods the neutral core calls directly, because PyTorch and MindSpore spell them
the same way. Everything else that differs goes through :class:`~hyper_parallel.platform.Platform`.

The list is the contract's other half: ``tests/test_tensor_api.py`` runs every entry on every backend against NumPy,
so a framework release that changes one of them fails the suite instead of a model. Notes say where the two
frameworks agree only on a narrower form than either accepts.
"""

SHARED_TENSOR_METHODS = {
    "shape": "tuple-like sizes",
    "dtype": "compare with Platform.dtype(name) / Platform.dtype_name",
    "x[i:j], x[idx], x[mask]": "slices, int64 index tensors (gradient: gather), boolean masks",
    "x[idx] = y": "indexed assignment with unique int64 indices (differentiable)",
    "reshape": "reshape(*sizes) with -1",
    "swapaxes": "swapaxes(a, b); transpose() means different things on the two frameworks",
    "contiguous": "after swapaxes, before reshape",
    "mT": "matrix transpose of the last two dims",
    "__matmul__": "x @ y, batched over leading dims",
    "arithmetic": "+ - * / ** and comparisons, broadcasting like NumPy",
    "sum": "sum(dim) and sum(dim, keepdim=True); never on an empty tensor (MindSpore CPU returns garbage)",
    "mean": "mean(dim)",
    "cumsum": "cumsum(dim), int64 kept",
    "repeat_interleave": "repeat_interleave(repeats_tensor, 0); never with all-zero repeats (MindSpore raises)",
    "softmax": "softmax(dim) with dim POSITIONAL (MindSpore has no `dim=` keyword)",
    "sigmoid": "sigmoid()",
    "exp": "exp()",
    "log": "log()",
    "topk": "topk(k) along the last dim; indices are int32 on MindSpore: convert with kernels.convert(i, 'int64')",
    "argsort": "argsort(stable=True); int32 on MindSpore",
    "float": "float() -> float32",
    "to": "to(native_dtype)",
    "unsqueeze": "unsqueeze(dim)",
    "gather": "gather(dim, index)",
    "masked_fill": "masked_fill(mask, value)",
    "amax": "amax(dim)",
    "clamp": "clamp(min=..., max=...)",
    "unbind": "unbind(0) into a tuple of slices",
}
