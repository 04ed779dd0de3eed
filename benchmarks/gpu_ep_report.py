"""The tables ``gpu_ep.py`` prints: rows of the summary (steps against their floors and targets) and of the
bandwidth table (dispatch and combine alone against the raw ``all_to_all_single`` of the same rows), built from one
shape's result dict, and the printing of both with the checks. Pure formatting: nothing here touches a device."""

from __future__ import annotations

from gpu_common import gb_per_s


def gpus_label(r: dict, world: int):
    return world if r["layout"] == "ep" else f"{world} (ep{r['mesh'][0]} x tp{r['mesh'][1]})"


def summary_rows(name: str, r: dict, world: int) -> list[tuple]:
    t = r["times"]
    us = lambda k: t[k]["us"]  # noqa: E731
    etp = r["layout"] == "etp"
    gpus = gpus_label(r, world)
    rows = []
    if "copy_floor" in t:
        floor = us("copy_floor")
        rows += [(name, gpus, "copy floor (T x D rows, read+write)", floor, "", "", "", ""),
                 (name, gpus, "gather alone x[idx]", us("gather_only"), "copy", us("gather_only") / floor, "", "")]
        for impl, label in (("neutral", "neutral (2 hidden syncs)"), ("eager", "eager + output_size"),
                            ("graph", "CUDA graph"), ("triton", "Triton")):
            if f"index_build_{impl}" in t:
                rows.append((name, gpus, f"index build: {label}", us(f"index_build_{impl}"), "", "", "", ""))
        for key, label in (("permute_step_no_cat", "permute step: index build + gather"),
                           ("permute_step_package_gather", "permute step: permute() through an index"),
                           ("permute_step_package", "permute step: permute(), the package's Triton block copy"),
                           ("permute_step_fused_prototype", "permute step, one fused kernel (prototype)")):
            if key not in t:
                continue
            ratio = us(key) / floor
            rows.append((name, gpus, label, us(key), "copy", ratio, "<= 1.15", "yes" if ratio <= 1.15 else "no"))
        b2b_floor = us("copy_floor_back_to_back")
        rows.append((name, gpus, "copy floor, back to back", b2b_floor, "", "", "", ""))
        for key, label in (("gather_only_back_to_back", "gather alone, back to back"),
                           ("permute_step_package_gather_back_to_back", "permute() through an index, back to back"),
                           ("permute_step_package_back_to_back", "permute() block copy, back to back"),
                           ("permute_step_fused_prototype_back_to_back", "fused prototype, back to back")):
            if key in t:
                rows.append((name, gpus, label, us(key), "copy b2b", us(key) / b2b_floor, "", ""))
    if "raw_all_to_all_pair" in t:
        raw = us("raw_all_to_all_pair")
        rows.append((name, gpus, "raw a2a + tp all_reduce + a2a" if etp else "raw all_to_all_single pair", raw,
                     "", "", "", ""))
        for key, label in (("dispatch_combine_ours", "dispatch+combine ours" + (" (ETP)" if etp else "")),
                           ("dispatch_combine_seed", "dispatch+combine seed")):
            if key not in t:
                continue
            ratio = us(key) / raw
            target = "<= 1.10" if key.endswith("ours") else ""
            met = ("yes" if ratio <= 1.10 else "no") if target else ""
            rows.append((name, gpus, label, us(key), "raw", ratio, target, met))
    if "layer_fwd_bwd_ours" in t:
        ours, seed_t = us("layer_fwd_bwd_ours"), us("layer_fwd_bwd_seed")
        if etp:
            rows.append((name, gpus, "layer fwd+bwd seed reference (EP over ep, full-hidden experts)", seed_t,
                         "", "", "", ""))
            rows.append((name, gpus, "layer fwd+bwd ours, ExpertTensorParallel", ours, "seed/ours", seed_t / ours,
                         "", ""))
        else:
            rows.append((name, gpus, "layer fwd+bwd seed reference", seed_t, "", "", "", ""))
            rows.append((name, gpus, "layer fwd+bwd ours (speedup)", ours, "seed/ours", seed_t / ours, ">= 1.3",
                         "yes" if seed_t / ours >= 1.3 else "no"))
        for key, label in (("layer_fwd_bwd_ep_only_full_hidden",
                            "layer fwd+bwd ours, EP over ep only, full-hidden experts (no TP)"),
                           ("layer_fwd_bwd_ours_unbind_loop_experts", "layer fwd+bwd ours, cuBLAS-loop experts"),
                           ("layer_fwd_bwd_ours_neutral_loop_experts", "layer fwd+bwd ours, neutral-loop experts"),
                           ("experts_fwd_bwd_ours", "experts alone fwd+bwd, ours (_grouped_mm)"
                            + (", tp shard" if etp else "")),
                           ("experts_fwd_bwd_full_hidden", "experts alone fwd+bwd, ours, full hidden"),
                           ("experts_fwd_bwd_seed_loop", "experts alone fwd+bwd, seed loop")):
            if key in t:
                rows.append((name, gpus, label, us(key), "", "", "", ""))
    return rows


def bandwidth_rows(name: str, r: dict, world: int) -> list[tuple]:
    """Dispatch and combine alone against the raw ``all_to_all_single`` of the same rows (see ``BANDWIDTH``)."""
    t, nbytes = r["times"], r.get("a2a_bytes_per_rank")
    if not nbytes or "dispatch_ours" not in t:
        return []
    gpus, etp = gpus_label(r, world), r["layout"] == "etp"
    rows = []

    def row(label, key, raw_key, counted=True):
        us = t[key]["us"]
        b = nbytes if counted else None
        rows.append((name, gpus, label, us, b["all"] / 1e6 if b else "", gb_per_s(b["all"], us) if b else "",
                     gb_per_s(b["off_rank"], us) if b else "", t[raw_key]["us"] / us if raw_key else ""))

    row("raw all_to_all_single, dispatch direction", "raw_all_to_all_dispatch", "raw_all_to_all_dispatch")
    row("dispatch ours" + (" (ETP)" if etp else ""), "dispatch_ours", "raw_all_to_all_dispatch")
    if etp:
        row("raw tp all_reduce of the [T, D] rows alone (not an all-to-all)", "raw_tp_all_reduce", None, False)
        row("raw all_to_all_single, combine direction, alone", "raw_all_to_all_combine_bare",
            "raw_all_to_all_combine_bare")
        row("raw tp all_reduce + all_to_all_single, combine direction", "raw_all_to_all_combine",
            "raw_all_to_all_combine")
        row("combine ours (ETP: tp all_reduce + unpermute + a2a)", "combine_ours", "raw_all_to_all_combine")
    else:
        row("raw all_to_all_single, combine direction", "raw_all_to_all_combine", "raw_all_to_all_combine")
        row("combine ours", "combine_ours", "raw_all_to_all_combine")
    return rows


BANDWIDTH = ("GB/s = bytes one rank sends + receives in the token all_to_all_single (rows x D x 2 bytes, bf16; "
             "mean over ranks) / time (max over ranks of the per-rank medians); the off-rank column leaves out the "
             "rank's own chunk. share of raw = raw time / our time (= our GB/s / raw GB/s, same bytes).")


def print_table(rows, checks_by_shape, bw_rows=()) -> None:
    print("\nchecks (worst over ranks; relative errors; bf16 operands land between 1e-3 and 1e-2):")
    for name, checks in checks_by_shape.items():
        for k, v in checks.items():
            print(f"  {name:8s} {k:44s} {v:.2e}" if isinstance(v, float) else f"  {name:8s} {k:44s} {v}")
    print("\n| shape | GPUs | step | time (us, max over ranks) | vs | ratio | target | met |")
    print("|---|---|---|---|---|---|---|---|")
    for name, world, label, us, vs, ratio, target, met in rows:
        ratio = f"{ratio:.2f}" if isinstance(ratio, float) else ratio
        print(f"| {name} | {world} | {label} | {us:.1f} | {vs} | {ratio} | {target} | {met} |")
    if bw_rows:
        print("\n" + BANDWIDTH)
        print("\n| shape | GPUs | step | time (us, max over ranks) | MB per rank (sent + received) | GB/s | "
              "GB/s, off-rank rows only | share of raw |")
        print("|---|---|---|---|---|---|---|---|")
        fmt = lambda v, f: format(v, f) if isinstance(v, float) else v  # noqa: E731
        for name, world, label, us, mb, gbs, gbs_off, share in bw_rows:
            print(f"| {name} | {world} | {label} | {us:.1f} | {fmt(mb, '.1f')} | {fmt(gbs, '.1f')} | "
                  f"{fmt(gbs_off, '.1f')} | {fmt(share, '.2f')} |")
