"""Benchmark (not a test): exact top-k JS through the chunked kernel versus naive torch and Liger.

    python benchmarks/bench_topk_kernel.py                    # CPU figures (V=32k, N=1k/4k), writes
                                                               #   benchmarks/topk_kernel.md + topk_storage.md
    python benchmarks/bench_topk_kernel.py --device cuda      # GPU: correctness check of the Triton
                                                               #   backend first, then V=151,936, N=8k/32k bf16

Per method, one forward+backward of ``mean_t JSD_t`` over ``N`` positions with a stored top-k record
(``k`` ids, bf16 log-probs, rest mass) against bf16 logits ``[N, V]``:

* ``topk``: :func:`dyjr_verl.losses.topk_js.topk_jsd` (Triton backend on CUDA, torch backend on CPU);
  on CUDA also ``topk_torch`` (the chunked torch backend forced);
* ``naive``: ``log_softmax(logits.float() / T)``, gather, rest = ``log1p(-sum p_topk)``, same JSD;
* ``liger`` (CUDA, when ``liger_kernel`` imports): ``LigerJSD`` on full-vocabulary log-probs, i.e.
  ``log_softmax`` of the logits against a dense teacher distribution built from the record (rest
  spread uniformly); the dense teacher tensor is an input and is not counted as extra memory;
* ``lse``: ``torch.logsumexp(logits, -1)`` (forward, and forward+backward): the one-pass floor.

Memory: peak bytes allocated during forward+backward above what existed before (inputs), the
input gradient included (it has the size of the logits: 1.0x is the floor for any method that
returns d/dlogits). CUDA: ``torch.cuda.max_memory_allocated``; CPU: ``ru_maxrss`` growth of a fresh
child process per method, plus the bytes autograd saved for backward (saved-tensor hooks, inputs
excluded). Goals (issue 6): peak extra <= 1.1x the bf16 logits; time <= 1.3x one logsumexp pass;
faster than Liger's JSD.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dyjr_verl.losses.topk_js import (  # noqa: E402
    LOG_PROB_FLOOR,
    TopKRecord,
    jsd_from_logprobs,
    topk_buffer_bytes,
    topk_jsd,
    topk_record_bytes_per_token,
)

TEMPERATURE = 0.9
RATIO = "_min"  # time ratios from the fastest repetition (robust on a shared machine); "" = medians


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------


def make_inputs(n: int, vocab: int, k: int, device: str, seed: int = 0):
    """bf16 logits filled row-chunk by row-chunk (no fp32 [N, V] temporary), and a record of a
    perturbed distribution (the top-k of the logits shifted by noise)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    z = torch.empty((n, vocab), dtype=torch.bfloat16, device=device)
    # small row chunks: on CPU the child's ru_maxrss must not be dominated by this set-up
    step = max(1, (1 << (24 if device == "cuda" else 20)) // vocab)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        z[r0:r1] = (torch.randn((r1 - r0, vocab), generator=gen, device=device) * 2.5).to(torch.bfloat16)
    ids = torch.empty((n, k), dtype=torch.int32, device=device)
    logq = torch.empty((n, k), dtype=torch.bfloat16, device=device)
    lrest = torch.empty((n,), dtype=torch.bfloat16, device=device)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        zq = z[r0:r1].float() / TEMPERATURE + torch.randn((r1 - r0, vocab), generator=gen, device=device) * 0.3
        lp = torch.log_softmax(zq, -1)
        top = lp.topk(k, -1)
        ids[r0:r1] = top.indices.to(torch.int32)
        logq[r0:r1] = top.values.to(torch.bfloat16)
        lrest[r0:r1] = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-7)).to(torch.bfloat16)
        del zq, lp, top
    return z, TopKRecord(ids, logq, lrest)


# ----------------------------------------------------------------------------------------------
# methods: each returns a scalar loss (backward is run by the caller)
# ----------------------------------------------------------------------------------------------


def m_topk(z, rec, backend="auto"):
    return topk_jsd(z, rec, temperature=TEMPERATURE, backend=backend).mean()


def m_topk_torch(z, rec):
    return m_topk(z, rec, backend="torch")


def m_naive(z, rec):
    lp = torch.log_softmax(z.float() / TEMPERATURE, dim=-1)
    logp = lp.gather(-1, rec.ids.long())
    log_rest = torch.log1p(-logp.exp().sum(-1).clamp(max=1 - 1e-7)).clamp(min=LOG_PROB_FLOOR)
    p = torch.cat([logp, log_rest[:, None]], -1)
    q = torch.cat([rec.logp.float(), rec.log_rest.float()[:, None]], -1)
    return jsd_from_logprobs(p, q).mean()


def m_lse(z, rec):
    return torch.logsumexp(z, dim=-1).float().mean()


_LIGER = None


def liger_jsd():
    global _LIGER
    if _LIGER is None:
        try:
            from liger_kernel.transformers.jsd import LigerJSD

            _LIGER = LigerJSD(beta=0.5)
        except Exception as exc:  # not installed / cannot import (e.g. no GPU)
            _LIGER = exc
    return _LIGER


def dense_teacher(z, rec):
    """Full-vocabulary teacher log-probs from the record: top-k as stored, the rest mass spread
    evenly over the other V - k tokens (Liger's JSD needs both distributions dense)."""
    n, vocab = z.shape
    k = rec.ids.shape[1]
    fill = (rec.log_rest.float() - math.log(max(vocab - k, 1)))[:, None]
    t = fill.expand(n, vocab).contiguous()
    t.scatter_(1, rec.ids.long(), rec.logp.float())
    return t


def m_liger(z, rec, teacher):
    fn = liger_jsd()
    lq = torch.log_softmax(z.float() / TEMPERATURE, dim=-1)
    return fn(lq, teacher)


METHODS = {"topk": m_topk, "topk_torch": m_topk_torch, "naive": m_naive, "lse": m_lse}


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def saved_bytes(fn, z, *args):
    """Bytes autograd saves for backward (inputs excluded), and the loss."""
    seen = {}
    inputs = {z.data_ptr()}

    def pack(t):
        if t.data_ptr() not in inputs:
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(z, *args)
    return sum(seen.values()), loss


def time_it(fn, z, args, device, reps, backward=True):
    times = []
    for _ in range(reps):
        z.grad = None
        _sync(device)
        t0 = time.perf_counter()
        loss = fn(z, *args)
        if backward:
            loss.backward()
        _sync(device)
        times.append(time.perf_counter() - t0)
    z.grad = None
    return statistics.median(times), min(times)


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def run_one(method: str, n: int, vocab: int, k: int, device: str, reps: int) -> dict:
    """Measure one method (in this process; on CPU the caller starts a fresh process per method)."""
    z, rec = make_inputs(n, vocab, k, device)
    args = (rec,)
    if method == "liger":
        if not isinstance(liger_jsd(), torch.nn.Module):
            return {"method": method, "n": n, "vocab": vocab, "k": k, "skipped": f"liger_kernel unavailable: {liger_jsd()!r}"[:200]}
        args = (rec, dense_teacher(z, rec))
    fn = m_liger if method == "liger" else METHODS[method]
    z.requires_grad_(True)
    logits_bytes = z.numel() * z.element_size()
    res = {"method": method, "n": n, "vocab": vocab, "k": k, "logits_mb": logits_bytes / 2**20}
    try:
        if device == "cuda":
            fn(z, *args).backward()  # warm-up / compile
            z.grad = None
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn(z, *args).backward()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            z.grad = None
            with torch.no_grad():
                torch.cuda.reset_peak_memory_stats()
                base_f = torch.cuda.memory_allocated()
                fn(z, *args)
                torch.cuda.synchronize()
                res["peak_fwd_nograd_mb"] = (torch.cuda.max_memory_allocated() - base_f) / 2**20
        else:
            # warm-up on 8 rows: loads the code pages the method touches (they count in RSS too)
            zw, recw = make_inputs(8, vocab, k, device, seed=1)
            argsw = (recw, dense_teacher(zw, recw)) if method == "liger" else (recw,)
            fn(zw.requires_grad_(True), *argsw).backward()
            del zw, recw, argsw
            _malloc_trim()  # hand the set-up's freed heap back, so the RSS base is what is live
            base = rss_bytes()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            fn(z, *args).backward()  # first call: its ru_maxrss growth is the peak
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            peak = after - base
            res["rss_peak_hidden_by_setup"] = after <= before  # then `peak` is only an upper bound
            z.grad = None
        res["peak_extra_mb"] = peak / 2**20
        res["peak_extra_x_logits"] = peak / logits_bytes
        sb, loss = saved_bytes(fn, z, *args)
        del loss
        res["saved_mb"] = sb / 2**20
        med, best = time_it(fn, z, args, device, reps, backward=False)
        res["fwd_ms"], res["fwd_ms_min"] = 1e3 * med, 1e3 * best
        med, best = time_it(fn, z, args, device, reps, backward=True)
        res["fwd_bwd_ms"], res["fwd_bwd_ms_min"] = 1e3 * med, 1e3 * best
    except torch.OutOfMemoryError:
        res["skipped"] = "out of memory"
    return res


def run_cpu_child(method, n, vocab, k, reps, threads) -> dict:
    cmd = [sys.executable, __file__, "--_child", json.dumps([method, n, vocab, k, reps, threads])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        return {"method": method, "n": n, "vocab": vocab, "k": k, "skipped": proc.stderr.strip().splitlines()[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# GPU correctness check of the Triton backend (the first run on a GPU)
# ----------------------------------------------------------------------------------------------


def gpu_check() -> bool:
    from dyjr_verl.kernels import topk_log_softmax, triton_available

    if not triton_available():
        print("CHECK: Triton/CUDA not available; the 'auto' backend uses torch")
        return False
    ok = True
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, vocab, k, dt, rows, r in [
        (256, 151936, 32, torch.bfloat16, None, 8),
        (300, 32000, 8, torch.float32, True, 4),
        (64, 1000, 1, torch.float16, None, 0),
        (17, 50, 0, torch.float32, True, 3),
    ]:
        z = (torch.randn((n, vocab), generator=gen, device="cuda") * 3).to(dt)
        z[:, -3:] = float("-inf")
        z.requires_grad_(True)
        ids = torch.argsort(torch.rand((n, vocab - 3), generator=gen, device="cuda"), dim=1)[:, :k] if k else None
        rows_t = torch.randperm(n, device="cuda", generator=gen)[: n // 2] if rows else None
        outs = {}
        for be in ("triton", "torch"):
            o = topk_log_softmax(z, ids, temperature=0.8, rows=rows_t, entropy=True, top_r=r, backend=be)
            obj = o.lse.sum() * 0.3 - o.log_rest.sum() + o.entropy.sum() * 0.7
            if k:
                obj = obj + (o.logp * torch.linspace(-1, 1, k, device="cuda")).sum()
            (g,) = torch.autograd.grad(obj, z)
            outs[be] = (o, g)
        # float64 reference on the computed rows
        zz = (z.detach() if rows_t is None else z.detach()[rows_t]).double() / 0.8
        lp = torch.log_softmax(zz, -1)
        ref = {"lse": torch.logsumexp(zz, -1), "entropy": -(lp.exp() * lp.nan_to_num(0.0, 0.0, 0.0)).sum(-1)}
        if k:
            idr = ids if rows_t is None else ids[rows_t]
            ref["logp"] = lp.gather(-1, idr)
            ref["log_rest"] = torch.logsumexp(lp.scatter(-1, idr, float("-inf")), -1).clamp(min=LOG_PROB_FLOOR)
        if r:
            ref["top_probs"] = lp.exp().topk(r, -1).values
        (o_t, g_t), (o_c, g_c) = outs["triton"], outs["torch"]
        for name, want in ref.items():
            err = float((getattr(o_t, name).double() - want).abs().max())
            tol = 1e-5 * max(1.0, float(want.abs().max()))
            status = "ok" if err <= tol else "FAIL"
            ok &= status == "ok"
            print(f"CHECK n={n} V={vocab} k={k} {str(dt).split('.')[-1]} rows={bool(rows)}: {name} max|triton-fp64|={err:.2e} {status}")
        gerr = float((g_t.float() - g_c.float()).abs().max())
        gtol = (1e-5 if dt == torch.float32 else 2e-2) * max(1.0, float(g_c.float().abs().max()))
        status = "ok" if gerr <= gtol and torch.isfinite(g_t.float()).all() else "FAIL"
        ok &= status == "ok"
        print(f"CHECK n={n} V={vocab} k={k}: grad max|triton-torch|={gerr:.2e} {status}")
    print("CHECK:", "PASS" if ok else "FAIL")
    return ok


# ----------------------------------------------------------------------------------------------
# reports
# ----------------------------------------------------------------------------------------------


def _fmt(x, spec=".1f"):
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def report(results: list[dict], args, device_desc: str, check_line: str) -> str:
    lines = [
        "# Top-k JS kernel benchmark",
        "",
        f"Last run: {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, `{' '.join(['python', 'benchmarks/bench_topk_kernel.py'] + sys.argv[1:])}`",
        f"Device: {device_desc}; torch {torch.__version__}; temperature {TEMPERATURE}; bf16 logits; "
        f"median (min) of {args.reps} repetitions; ratios use the {'minima' if RATIO else 'medians'}.",
        "",
        "Per method: forward (and forward+backward) of the token-mean JSD between the current "
        "distribution and a stored top-k record. `peak extra` = memory allocated during forward+backward "
        "above the inputs, the input gradient included (1.0x the logits is the floor for anything that "
        "returns d/dlogits); `saved` = bytes autograd kept for backward, inputs excluded.",
        "",
    ]
    if check_line:
        lines += [check_line, ""]
    if not any(r["method"] == "liger" for r in results):
        lines += ["Liger-Kernel's JSD: not run here (Triton-only, needs CUDA; run with `--device cuda`).", ""]
    lines += [
        "| method | N | V | k | logits MB | fwd ms (min) | fwd+bwd ms (min) | fwd / lse fwd | fwd+bwd / lse fwd+bwd | peak extra MB | peak extra / logits | saved MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["n"], r["vocab"], r["k"]): r for r in results if r["method"] == "lse" and "skipped" not in r}
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['method']} | {r['n']} | {r['vocab']} | {r['k']} | | skipped: {r['skipped']} | | | | | | |")
            continue
        b = base.get((r["n"], r["vocab"], r["k"]))
        rf = r[f"fwd_ms{RATIO}"] / b[f"fwd_ms{RATIO}"] if b else None
        rb = r[f"fwd_bwd_ms{RATIO}"] / b[f"fwd_bwd_ms{RATIO}"] if b else None
        lines.append(
            f"| {r['method']} | {r['n']} | {r['vocab']} | {r['k']} | {r['logits_mb']:.0f} | {r['fwd_ms']:.1f} ({r['fwd_ms_min']:.1f}) "
            f"| {r['fwd_bwd_ms']:.1f} ({r['fwd_bwd_ms_min']:.1f}) | "
            f"{_fmt(rf, '.2f')} | {_fmt(rb, '.2f')} | {r['peak_extra_mb']:.0f} | {r['peak_extra_x_logits']:.2f} | {r['saved_mb']:.2f} |"
        )
    lines.append("")
    return "\n".join(lines)


def storage_report() -> str:
    prompts, rollouts = 512, 16
    lengths = [1024, 2048, 4096, 8192]
    ks = [1, 4, 8, 16, 32, 64]
    lines = [
        "# Buffer memory of stored top-k records",
        "",
        "Generated by `python benchmarks/bench_topk_kernel.py --storage-only` from "
        "`dyjr_verl.losses.topk_js.topk_record_bytes_per_token` / `topk_buffer_bytes`.",
        "",
        f"One training step at paper scale: {prompts} prompts x {rollouts} rollouts = {prompts * rollouts} "
        "trajectories, every response at the given length (an upper bound: multiply by mean/max response "
        "length for the real figure). Record per token: k int32 ids + k bf16 log-probs + 1 bf16 log rest mass "
        "= 6k + 2 bytes. The sampled-token estimator stores one log-prob per token (4 bytes fp32, 2 bf16). "
        "A buffer holding W steps needs W times the per-step figure (host memory; only the sampled rows of "
        "a step travel to the GPUs).",
        "",
        "| k | bytes / token | " + " | ".join(f"GiB / step @ {L // 1024}k tokens" for L in lengths) + " |",
        "|---|---|" + "---|" * len(lengths),
    ]
    for k in ks:
        cells = [f"{topk_buffer_bytes(k, prompts * rollouts * L) / 2**30:.2f}" for L in lengths]
        lines.append(f"| {k} | {topk_record_bytes_per_token(k)} | " + " | ".join(cells) + " |")
    cells = [f"{prompts * rollouts * L * 4 / 2**30:.2f}" for L in lengths]
    lines.append("| sampled (fp32 log-prob) | 4 | " + " | ".join(cells) + " |")
    k32f = [f"{topk_buffer_bytes(32, prompts * rollouts * L, logp_dtype=torch.float32) / 2**30:.2f}" for L in lengths]
    lines.append(f"| 32, fp32 log-probs | {topk_record_bytes_per_token(32, logp_dtype=torch.float32)} | " + " | ".join(k32f) + " |")
    lines += [
        "",
        "For comparison, a full-vocabulary bf16 distribution (Qwen2.5, V = 151,936) is 303,872 bytes per token: "
        f"{prompts * rollouts * 4096 * 151936 * 2 / 2**40:.1f} TiB per step at 4k tokens.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--k", type=int, nargs="+")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--methods", nargs="+")
    parser.add_argument("--no-check", action="store_true", help="CUDA: skip the Triton correctness check")
    parser.add_argument("--check", action="store_true", help="CUDA: run only the Triton correctness check")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "topk_kernel.md")
    parser.add_argument("--storage-out", type=Path, default=REPO / "benchmarks" / "topk_storage.md")
    parser.add_argument("--storage-only", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU: torch threads per measurement (default 1: on a shared machine, intra-op thread-pool "
        "barriers make many-op methods erratic)",
    )
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:
        method, n, vocab, k, reps, threads = json.loads(args._child)
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        print(json.dumps(run_one(method, n, vocab, k, "cpu", reps)))
        return 0

    args.storage_out.write_text(storage_report())
    print(f"wrote {args.storage_out}")
    if args.storage_only:
        return 0

    check_line = ""
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda but CUDA is not available", file=sys.stderr)
            return 2
        if not args.no_check:
            passed = gpu_check()
            check_line = f"Triton correctness check (`--check`): {'PASS' if passed else 'FAIL'}."
            if args.check:
                return 0 if passed else 1
        vocab = args.vocab or 151936
        tokens = args.tokens or [8192, 32768]
        ks = args.k or [8, 32]
        reps = args.reps or 10
        methods = args.methods or ["lse", "topk", "topk_torch", "naive", "liger"]
        desc = torch.cuda.get_device_name()
    else:
        vocab = args.vocab or 32768
        tokens = args.tokens or [1024, 4096]
        ks = args.k or [32]
        reps = args.reps or 3
        methods = args.methods or ["lse", "topk", "naive"]
        desc = (
            f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible and shared with other "
            f"jobs, load average {os.getloadavg()[0]:.1f} at start; torch threads {args.threads}; run under nice)"
        )
    args.reps = reps
    results = []
    for n in tokens:
        for k in ks:
            for method in methods:
                if args.device == "cuda":
                    r = run_one(method, n, vocab, k, "cuda", reps)
                    torch.cuda.empty_cache()
                else:
                    r = run_cpu_child(method, n, vocab, k, reps, args.threads)
                results.append(r)
                print(json.dumps(r), flush=True)
    text = report(results, args, desc, check_line)
    args.out.write_text(text)
    print(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
