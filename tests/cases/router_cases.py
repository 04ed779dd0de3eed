"""Router, reorderer and load-balancing checks against NumPy brute-force references (explicit loops, float64),
run on every rank of a world (each rank draws its own data) and in-process on torch. Layer classes are looked up
lazily (``moe.TokenReorderer``): building one needs the platform, chosen only when a case runs."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from hyper_parallel import get_platform, moe
from hyper_parallel.moe import losses as lb
from hyper_parallel.testing.conformance.errors import raises as _raises

TOL, GTOL = dict(rtol=1e-5, atol=1e-6), dict(rtol=1e-4, atol=1e-5)  # float32 values; gradients


def _t(a, dtype="float32"):
    a = np.asarray(a)
    return get_platform().tensor(a.tolist(), dtype=dtype) if a.size else get_platform().zeros(a.shape, dtype=dtype)


def _host(x) -> np.ndarray:
    return np.asarray(get_platform().tolist(x), dtype=np.float64).reshape(tuple(x.shape))


def _rng(seed: int) -> np.random.RandomState:
    p = get_platform()  # each rank its own draw: a 2-rank world checks two
    return np.random.RandomState(seed + (p.get_rank() if p.is_initialized() else 0))


# ---------------------------------------------------------------- NumPy references
def ref_route(x, gate, top_k, score_func, route_norm=False, route_scale=1.0, bias=None, groups=None, limited=None):
    """Scores, chosen experts (best first), their weights and the counts, one token at a time."""
    T, E, logits = x.shape[0], gate.shape[0], x @ gate.T
    ex = np.exp(logits - logits.max(1, keepdims=True))
    scores = ex / ex.sum(1, keepdims=True) if score_func == "softmax" else 1 / (1 + np.exp(-logits))
    sel, top = np.zeros((T, top_k), dtype=np.int64), np.zeros((T, top_k))
    for t in range(T):
        choice, allowed = scores[t] + (0 if bias is None else bias), list(range(E))
        if groups is not None:
            size = E // groups
            gscore = [sorted(choice[g * size:(g + 1) * size])[::-1] for g in range(groups)]
            gscore = [sum(s[:2]) if score_func == "sigmoid" else s[0] for s in gscore]
            best = sorted(range(groups), key=lambda g: -gscore[g])[:limited]
            allowed = [e for e in range(E) if e // size in best]
        sel[t] = sorted(allowed, key=lambda e: -choice[e])[:top_k]
        w = np.array([scores[t, e] for e in sel[t]])
        top[t] = (w / (w.sum() + 1e-20) if route_norm else w) * route_scale
    counts = np.array([(sel == e).sum() for e in range(E)], dtype=np.int64)
    return top, sel, counts, scores


def ref_dscores_of_top(scores, sel, w, route_norm, route_scale):
    """d sum(w * top) / d scores, with top as in :func:`ref_route`."""
    ds = np.zeros_like(scores)
    for t in range(sel.shape[0]):
        s, S = scores[t, sel[t]], scores[t, sel[t]].sum() + 1e-20
        for k, e in enumerate(sel[t]):
            ds[t, e] += route_scale * ((w[t, k] / S - (w[t] * s).sum() / S ** 2) if route_norm else w[t, k])
    return ds


def ref_back(ds, scores, score_func, x, gate):
    """Gradients of the gate and of x, given d loss / d scores."""
    soft = score_func == "softmax"
    dz = scores * (ds - (ds * scores).sum(1, keepdims=True)) if soft else ds * scores * (1 - scores)
    return dz.T @ x, dz @ gate


def ref_capacity(cf, T, K, E):
    return max(1, math.ceil(Fraction(str(cf)) * T * K / E))


def ref_reorder(scores, sel, E, cf=0.0):
    """Kept flat pair indices in expert-major, token order (the first ``capacity`` per expert), and the counts."""
    T, K = sel.shape
    cap = T * K if cf == 0 else ref_capacity(cf, T, K, E)
    runs = [[i for i in range(T * K) if sel.reshape(-1)[i] == e][:cap] for e in range(E)]
    kept, counts = np.array(sum(runs, []), dtype=np.int64), [len(r) for r in runs]
    return scores.reshape(-1)[kept], kept // K, np.array(counts, dtype=np.int64), kept


def ref_lb_loss(scores, counts, top_k):
    T, E = scores.shape
    loss = sum(E * (counts[e] / (T * top_k)) * (scores[:, e].sum() / T) for e in range(E))
    grad = np.array([[E * counts[e] / (T * top_k * T) for e in range(E)] for _ in range(T)])
    return loss, grad


def ref_update_bias(bias, counts, rate, center=False):
    delta = np.array([rate * np.sign(counts.mean() - c) for c in counts])
    return bias + (delta - delta.mean() if center else delta)


ROUTER_SUBCASES = [  # (top_k, score_func, route_norm, route_scale, with_bias, groups, limited)
    (2, "softmax", False, 1.0, False, None, None), (3, "softmax", False, 2.5, False, None, None),
    (2, "softmax", True, 1.0, False, None, None), (2, "sigmoid", False, 1.0, False, None, None),
    (2, "sigmoid", True, 1.5, False, None, None), (1, "sigmoid", False, 1.0, False, None, None),
    (8, "softmax", True, 1.0, False, None, None), (2, "softmax", False, 1.0, True, None, None),
    (3, "sigmoid", True, 2.0, True, None, None), (3, "sigmoid", False, 1.0, False, 4, 2),
    (2, "softmax", False, 1.0, True, 4, 1), (4, "sigmoid", True, 2.5, True, 2, 1),
]


def router_cases(seed: int = 0, T: int = 9, D: int = 6, E: int = 8, coeff: float = 0.01) -> int:
    """Every sub-case of ROUTER_SUBCASES: values, counts, and the gradients (gate and x) of
    ``sum(w * top_scores) + coeff * load-balancing loss``, the router feeding a tracker; then a forcing bias."""
    p = get_platform()
    rng = _rng(seed)
    bias_moved = groups_moved = 0
    for n, (K, func, norm, scale, with_bias, G, Lg) in enumerate(ROUTER_SUBCASES):
        what = f"sub-case {n}: K={K} {func} norm={norm} scale={scale} bias={with_bias} groups={G}/{Lg}"
        tracker = lb.LoadBalancingLossTracker()
        router = moe.TokenChoiceTopKRouter(dim=D, num_experts=E, top_k=K, score_func=func, route_norm=norm,
                                          route_scale=scale, num_expert_groups=G, num_limited_groups=Lg,
                                          init_std=0.7, seed=n + 100 * seed, loss_tracker=tracker)
        x, w = _t(rng.randn(T, D)), _t(rng.randn(T, K))
        bias_np = rng.randn(E) * 0.3 if with_bias else None
        bias, x_np, w_np, gate_np = _t(bias_np) if with_bias else None, _host(x), _host(w), _host(router.gate)
        top, sel, counts = router(x, expert_bias=bias) if with_bias else router(x)
        assert p.dtype_name(sel.dtype) == "int64" == p.dtype_name(counts.dtype) and len(tracker) == 1, what
        ref_top, ref_sel, ref_counts, ref_scores = ref_route(x_np, gate_np, K, func, norm, scale, bias_np, G, Lg)
        np.testing.assert_array_equal(_host(sel), ref_sel, err_msg=what)
        np.testing.assert_array_equal(_host(counts), ref_counts, err_msg=what)
        np.testing.assert_allclose(_host(top), ref_top, **TOL, err_msg=what)
        np.testing.assert_allclose(_host(router.scores(x)), ref_scores, **TOL, err_msg=what)
        if with_bias:  # the draw must let the bias change the choice (the weights stay unbiased: checked above)
            bias_moved += not np.array_equal(ref_route(x_np, gate_np, K, func, groups=G, limited=Lg)[1], ref_sel)
        if G is not None:
            groups_moved += not np.array_equal(ref_route(x_np, gate_np, K, func, bias=bias_np)[1], ref_sel)

        def loss(x_in):
            tracker.clear()
            return (router(x_in, bias)[0] * w).sum() + tracker.loss(K, coeff)

        value, (dx,), (dgate,) = p.value_and_grad(loss, [x], [router.gate])
        assert len(tracker) == 1, "clear() " + what
        ref_lb, ref_dlb = ref_lb_loss(ref_scores, ref_counts, K)
        ds = ref_dscores_of_top(ref_scores, ref_sel, w_np, norm, scale) + coeff * ref_dlb
        ref_dgate, ref_dx = ref_back(ds, ref_scores, func, x_np, gate_np)
        np.testing.assert_allclose(float(_host(value)), (w_np * ref_top).sum() + coeff * ref_lb, **TOL, err_msg=what)
        np.testing.assert_allclose(_host(dgate), ref_dgate, **GTOL, err_msg="gate grad " + what)
        np.testing.assert_allclose(_host(dx), ref_dx, **GTOL, err_msg="x grad " + what)
    assert bias_moved >= 2 and groups_moved >= 2, f"weak draw: bias moved {bias_moved}, groups {groups_moved}"

    # a strong bias on experts 0 and 1: every token picks them, 6 experts get no token, the weights stay unbiased
    router = moe.TokenChoiceTopKRouter(dim=D, num_experts=E, top_k=2, init_std=0.7, seed=seed)
    x = _t(rng.randn(T, D))
    top, sel, counts = router(x, _t([10.0, 9.0] + [0.0] * (E - 2)))
    np.testing.assert_array_equal(_host(sel), [[0, 1]] * T, err_msg="forced bias")
    np.testing.assert_array_equal(_host(counts), [T, T] + [0] * (E - 2), err_msg="forced bias counts")
    np.testing.assert_allclose(_host(top), _host(router.scores(x))[:, :2], **TOL, err_msg="forced bias weights")
    return len(ROUTER_SUBCASES) + 1


REORDER_SHAPES = [(11, 2, 4), (16, 3, 5), (25, 2, 5), (5, 1, 3), (7, 4, 4)]  # (T, K, E)
REORDER_SUBCASES = [0.0, 0.5, 1.0, 1.1, 1.25, 2.0, 100.0]  # 1.1 * 25 * 2 / 5 = 11.000000000000002


def reorderer_cases(seed: int = 0) -> int:
    """Stable expert-major order, token indices, counts and gradients; every capacity factor drops exactly the
    overflow (the LAST pairs of an over-full expert); an expert with no token; zero tokens."""
    p = get_platform()
    rng = _rng(seed)
    checked = 0
    for T, K, E in REORDER_SHAPES:
        # distinct experts per token, drawn from all but the last expert (which then receives nothing)
        sel_np = np.stack([rng.permutation(E - 1)[:K] if K < E else rng.permutation(E) for _ in range(T)])
        scores, sel = _t(rng.rand(T, K)), _t(sel_np, "int64")
        for cf in REORDER_SUBCASES:
            what = f"T={T} K={K} E={E} capacity_factor={cf}"
            re = moe.TokenReorderer(num_experts=E, top_k=K, capacity_factor=cf)
            assert re.top_k == K and re.capacity(T) == (None if cf == 0 else ref_capacity(cf, T, K, E)), what
            out, pairs, counts = re(scores, sel)
            ref_out, _, ref_counts, kept = ref_reorder(_host(scores), sel_np, E, cf)
            assert p.dtype_name(pairs.dtype) == "int64" == p.dtype_name(counts.dtype), what
            np.testing.assert_array_equal(_host(pairs), kept, err_msg=what)
            np.testing.assert_array_equal(_host(counts), ref_counts, err_msg=what)
            np.testing.assert_allclose(_host(out), ref_out, **TOL, err_msg=what)
            assert (K == E or ref_counts[-1] == 0) and (cf > 0 or ref_counts.sum() == T * K), what
            w = _t(rng.randn(len(kept)))
            _, (g,), _ = p.value_and_grad(lambda s: (re(s, sel)[0] * w).sum(), [scores])
            ref_g = np.bincount(kept, weights=_host(w), minlength=T * K)  # w at each kept pair, 0 where dropped
            np.testing.assert_allclose(_host(g).reshape(-1), ref_g, **TOL, err_msg="grad " + what)
            checked += 1
    # zero tokens: empty outputs and zero counts, without touching a zero-size sort or sum
    out, tokens, counts = moe.TokenReorderer(num_experts=3, top_k=2, capacity_factor=1.0)(
        p.zeros((0, 2)), p.zeros((0, 2), dtype="int64"))
    assert tuple(out.shape) == (0,) == tuple(tokens.shape) and _host(counts).tolist() == [0, 0, 0], "zero tokens"
    return checked + 1


def loss_cases(seed: int = 0, T: int = 10, E: int = 6, K: int = 2, L: int = 3, coeff: float = 0.01) -> int:
    """Per-layer loss and its gradient; the batched loss is coeff * the mean per-layer loss (values and
    gradients); the expert-bias update."""
    p = get_platform()
    rng = _rng(seed)
    scores_np = [rng.dirichlet(np.ones(E), T) for _ in range(L)]
    counts_np = [np.bincount(np.stack([rng.permutation(E)[:K] for _ in range(T)]).reshape(-1), minlength=E)
                 for _ in range(L)]
    counts_np[0][:2] = [0, counts_np[0][:2].sum()]  # an expert with no token
    scores, counts = [_t(s) for s in scores_np], [_t(c, "int64") for c in counts_np]
    refs = [ref_lb_loss(_host(s), c, K) for s, c in zip(scores, counts_np)]
    for layer in range(L):
        value, (g,), _ = p.value_and_grad(lambda s: lb.load_balancing_loss(s, counts[layer], K), [scores[layer]])
        np.testing.assert_allclose(float(_host(value)), refs[layer][0], **TOL, err_msg=f"layer {layer}")
        np.testing.assert_allclose(_host(g), refs[layer][1], **TOL, err_msg=f"grad of layer {layer}")

    def batched(*s):
        tracker = lb.LoadBalancingLossTracker()
        for layer in range(L):
            tracker.save(s[layer], counts[layer])
        assert len(tracker) == L
        return tracker.loss(K, coeff)

    value, grads, _ = p.value_and_grad(batched, scores)
    np.testing.assert_allclose(float(_host(value)), coeff * np.mean([r[0] for r in refs]), **TOL, err_msg="batched")
    for layer, (g, ref) in enumerate(zip(grads, refs)):
        np.testing.assert_allclose(_host(g), coeff / L * ref[1], **TOL, err_msg=f"batched grad of layer {layer}")

    # expert bias: overloaded experts go down, underloaded up, the two at the mean (load 4) stay
    bias_np, load_np = rng.randn(5) * 0.1, np.array([0, 4, 9, 4, 3])
    for center in (False, True):
        new = lb.update_expert_bias(_t(bias_np), _t(load_np, "int64"), 0.001, center=center)
        assert p.dtype_name(new.dtype) == "float32"
        np.testing.assert_allclose(_host(new), ref_update_bias(bias_np, load_np, 0.001, center), **TOL,
                                   err_msg=f"bias update center={center}")
    assert np.allclose(_host(new) - bias_np.astype(np.float32), [8e-4, -2e-4, -12e-4, -2e-4, 8e-4], atol=1e-7)
    return L + 3


def _router(G=None, Lg=None, **kw):
    kw = {**dict(dim=4, num_experts=8, top_k=2, num_expert_groups=G, num_limited_groups=Lg), **kw}
    return moe.TokenChoiceTopKRouter(**kw)


def _zeros(shape, dtype="float32"):
    return get_platform().zeros(shape, dtype=dtype)


def _tracker(shape=(3, 4)):
    tracker = lb.LoadBalancingLossTracker()
    tracker.save(_zeros(shape), _zeros(shape[1:]))
    return tracker


def _reorder(num_experts=4, top_k=2, capacity_factor=0.0, *inputs):
    re = moe.TokenReorderer(num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor)
    return re(*inputs) if inputs else re


#: (id, thunk that must raise ValueError, pattern of its message): each names the constraint and the value.
ERRORS = [
    ("router-dim", lambda: _router(dim=0), r"dim must be a positive int, got 0"),
    ("router-experts", lambda: _router(num_experts=2.0), r"num_experts must be a positive int, got 2\.0"),
    ("router-top-k", lambda: _router(top_k=0), r"top_k must be a positive int, got 0"),
    ("router-top-k-above-experts", lambda: _router(top_k=9), r"top_k must be <= num_experts \(8\), got top_k=9"),
    ("router-score-func", lambda: _router(score_func="relu"), r"one of \['softmax', 'sigmoid'\], got 'relu'"),
    ("router-groups-alone", lambda: _router(G=4), r"together, got num_expert_groups=4, num_limited_groups=None"),
    ("router-groups-divide", lambda: _router(G=3, Lg=1), r"\(8\) must be divisible by num_expert_groups, got .*=3"),
    ("router-limited-above-groups", lambda: _router(G=4, Lg=5), r"must be <= num_expert_groups \(4\), got .*=5"),
    ("router-limited-zero", lambda: _router(G=4, Lg=0), r"num_limited_groups must be a positive int, got 0"),
    ("router-top-k-above-kept", lambda: _router(G=4, Lg=2, top_k=5),
     r"top_k must be <= num_limited_groups \* experts per group \(2 \* 2\), got top_k=5"),
    ("router-sigmoid-groups-of-one", lambda: _router(G=8, Lg=2, top_k=1, score_func="sigmoid"),
     r"groups need >= 2 experts, got 1"),
    ("router-x-shape", lambda: _router()(_zeros((3, 5))), r"x must have shape \[tokens, 4\], got \[3, 5\]"),
    ("router-bias-shape", lambda: _router()(_zeros((3, 4)), _zeros((7,))), r"bias must have shape \[8\], got \[7\]"),
    ("reorderer-top-k", lambda: _reorder(2, 3), r"top_k must be <= num_experts \(2\), got top_k=3"),
    ("reorderer-capacity", lambda: _reorder(2, 1, -0.5), r"finite number >= 0 \(0 = dropless\), got -0\.5"),
    ("reorderer-capacity-nan", lambda: _reorder(2, 1, float("nan")), r"finite number >= 0 .*, got nan"),
    ("reorderer-shapes", lambda: _reorder(4, 2, 0.0, _zeros((3, 2)), _zeros((3, 1), "int64")),
     r"must both have shape \[tokens, 2\], got \[3, 2\] and \[3, 1\]"),
    ("loss-scores-shape", lambda: lb.load_balancing_loss(_zeros((4,)), _zeros((4,)), 2),
     r"scores must have shape \[tokens >= 1, experts\], got \[4\]"),
    ("loss-no-tokens", lambda: lb.load_balancing_loss(_zeros((0, 4)), _zeros((4,)), 2),
     r"scores must have shape \[tokens >= 1, experts\], got \[0, 4\]"),
    ("loss-counts-shape", lambda: lb.load_balancing_loss(_zeros((3, 4)), _zeros((5,)), 2),
     r"num_tokens_per_expert must have shape \[4\] \(the experts of scores\), got \[5\]"),
    ("loss-top-k", lambda: lb.load_balancing_loss(_zeros((3, 4)), _zeros((4,)), 0), r"top_k must be a posit.*got 0"),
    ("tracker-empty", lambda: lb.LoadBalancingLossTracker().loss(2), r"no layer has saved scores .* got 0 layers"),
    ("tracker-mismatch", lambda: _tracker().save(_zeros((5, 4)), _zeros((4,))),
     r"scores shape of the first \(\[tokens, experts\] = \[3, 4\]\), got \[5, 4\]"),
    ("tracker-top-k", lambda: _tracker().loss(1.5), r"top_k must be a positive int, got 1\.5"),
    ("bias-shape", lambda: lb.update_expert_bias(_zeros((4,)), _zeros((3,)), 0.1), r"got \[4\] and \[3\]"),
    ("bias-rate", lambda: lb.update_expert_bias(_zeros((4,)), _zeros((4,)), -1.0), r"finite number >= 0, got -1\.0"),
]


def error_cases() -> int:
    """Every entry of ERRORS raises ValueError with its message, on this rank's backend."""
    for name, thunk, pattern in ERRORS:
        try:
            _raises(ValueError, pattern, thunk)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    return len(ERRORS)


def bookkeeping_kernel_cases(seed: int = 0) -> int:
    """The platform's bookkeeping kernels (``expert_counts``, ``stable_order``, ``convert``: the MindSpore adapter
    runs them through NumPy on CPU) and ``take_rows`` (torch on CPU: ``index_select``) against NumPy and against the
    neutral references run on the same platform: ids outside ``[0, E)``, ties, no ids, int32 and int64 inputs,
    masks, repeated rows and their gradient."""
    from hyper_parallel.kernels import Kernels

    p = get_platform()
    rng = _rng(seed)
    checked = 0
    for kernels in (p.kernels, Kernels(p)):  # the platform's, then the references on this platform
        for n, E, dtype in ((1, 1, "int64"), (37, 5, "int64"), (64, 8, "int32"), (200, 3, "int32")):
            ids_np = rng.randint(0, E, n)
            ids_np[:3] = [E, -1, E + 2][:n] if n >= 3 else ids_np[:3]  # out of range: counted nowhere
            ids = _t(ids_np, dtype)
            counts = kernels.expert_counts(ids, E)
            assert p.dtype_name(counts.dtype) == "int64", p.dtype_name(counts.dtype)
            want = np.array([(ids_np == e).sum() for e in range(E)])
            assert p.tolist(counts) == want.tolist(), (type(kernels).__name__, n, E, dtype)
            assert p.tolist(kernels.expert_counts(ids.reshape(1, -1), E)) == want.tolist()
            order = kernels.stable_order(ids)
            assert p.dtype_name(order.dtype) == "int64"
            assert p.tolist(order) == np.argsort(ids_np, kind="stable").tolist(), (type(kernels).__name__, n)
            for to in ("int64", "int32", "float32"):
                got = kernels.convert(ids, to)
                assert p.dtype_name(got.dtype) == to and p.tolist(got) == ids_np.astype(to).tolist()
            mask = kernels.convert(_t(ids_np, "float32") > 1.5, "float32")
            assert p.tolist(mask) == (ids_np > 1.5).astype(np.float32).tolist()
            checked += 1
        none = kernels.expert_counts(p.zeros((0,), dtype="int64"), 4)
        assert p.tolist(none) == [0, 0, 0, 0] and p.dtype_name(none.dtype) == "int64"
        # a float value keeps its gradient through convert (the framework's own cast)
        _, (g,), _ = p.value_and_grad(lambda x: (kernels.convert(x, "float32") * 3.0).sum(), [_t([1.0, 2.0])])
        assert p.tolist(g) == [3.0, 3.0]
        # take_rows: values and the gradient (repeated rows accumulate)
        x_np, idx_np = rng.randn(6, 3), np.array([4, 0, 0, 5, 2, 4, 4])
        w_np = rng.randn(len(idx_np), 3)
        idx, w = _t(idx_np, "int64"), _t(w_np)
        value, (g,), _ = p.value_and_grad(lambda x: (kernels.take_rows(x, idx) * w).sum(), [_t(x_np)])
        np.testing.assert_allclose(float(_host(value)), (x_np[idx_np] * w_np).sum(), **TOL)
        want_g = np.zeros_like(x_np)
        np.add.at(want_g, idx_np, w_np)
        np.testing.assert_allclose(_host(g), want_g, **TOL)
        np.testing.assert_array_equal(_host(kernels.take_rows(_t(x_np), idx)), x_np[idx_np].astype(np.float32))
        checked += 1
    return checked
