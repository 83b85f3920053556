#!/usr/bin/env python
"""HE kernels against the NTT-domain floor (issue #11, "HE kernels at the floor": measurement only).

One run, one thread, the project's parameters (``HEConfig()``: BFV, N = 16384, t 42-bit; a data-level
ciphertext is 2 polynomials x L = 4 primes (54 bits) x N). Measures, median of --repeats after warm-up (µs):
  * Pyfhel/SEAL: BFV ct x pt with a pre-encoded plaintext (``multiply_plain`` out of place, as
    ``ServerEngine.mul_ct_pt`` calls it, and in place; and ``mul_ct_pt`` itself), ct + ct, rotation by 1,
    ciphertext copy, encode; BGV ct x pt at the same N, t and primes;
  * the floor: elementwise a*w mod q_i of a (2, L, N) uint64 array by a fixed (L, N) plaintext (2*L*N
    mulmods): Shoup with w' = floor(w 2^64 / q) from 32-bit halves (numpy; torch int64), a float-quotient
    variant, and -- wrong, lower bounds only -- ``(a*b) % q`` with uint64 wrap-around and a bare ``a*b``;
  * a multiply-accumulate of k ciphertexts with k fixed plaintexts (a mat-vec block): Pyfhel ct x pt + add,
    k times, vs the numpy floor (lazy Shoup, sums, one final reduction) per ciphertext and in one batched call;
  * the project's NTT-domain kernel (cryptogen/he/ntt.py, _ntt.c; what the linear layers run): one
    ct x pt as a 1-term multiply-accumulate, the k-term one, a ciphertext's forward and inverse NTTs
    (2L each), and a ciphertext's words out of and back into Pyfhel; a hoisted rotation (he/hoist.py:
    the per-input decomposition, then one step) against SEAL's rotation plus our forward NTT of it;
    where the CPU has AVX-512, the NTTs, the decomposition and the rotation again with the scalar stages.

    .venv/bin/python scripts/bench_he_floor.py [--repeats 51] [--mac-repeats 9] [--k 64] [--cpu N] \
        [--out docs/bench/he_floor.json]
"""
import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse, json, platform, subprocess, sys, time  # noqa: E401,E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
M32 = 0xFFFFFFFF


def log(msg):
    print(f"[he_floor] {msg}", file=sys.stderr, flush=True)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one-line errors
        sys.exit(f"bench_he_floor.py: error: {message}")


def timed(fn, repeats, warmup=3, setup=None):
    """median/min wall time of fn(setup()) in µs; setup (e.g. a copy for in-place ops) is not timed."""
    ts = []
    for i in range(warmup + repeats):
        arg = setup() if setup else None
        t0 = time.perf_counter_ns()
        fn(arg)
        ts += [time.perf_counter_ns() - t0] if i >= warmup else []
    ts.sort()
    return {"median_us": round(ts[len(ts) // 2] / 1e3, 1), "min_us": round(ts[0] / 1e3, 1), "repeats": repeats}


def sh(*cmd):  # without our thread caps: GNU nproc obeys OMP_NUM_THREADS
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT")}
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def machine():
    with open("/proc/cpuinfo") as fh:
        model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), None)
    return {"uname_m": sh("uname", "-m"), "nproc": sh("nproc"), "cpu_model": model, "python": platform.python_version()}


# ---- the floor ---------------------------------------------------------------------------------
def shoup_pre(w, q_col):
    """w' = floor(w 2^64 / q) per element (exact, Python ints), split into 32-bit halves."""
    rows, qs = w.reshape(-1, w.shape[-1]), np.broadcast_to(q_col, w.shape).reshape(-1, w.shape[-1])[:, 0].tolist()
    wp = np.array([[(x << 64) // qi for x in row] for row, qi in zip(rows.tolist(), qs)], np.uint64).reshape(w.shape)
    return wp & np.uint64(M32), wp >> np.uint64(32)


class NumpyShoup:
    """r = a*w mod q elementwise: hi = high64(a * w') from 32-bit halves, r = a*w - hi*q in [0, 2q)
    (uint64 wrap-around is exact here), then one conditional subtraction (min(r, r - q))."""

    def __init__(self, shape):
        self.s = [np.empty(shape, np.uint64) for _ in range(5)]

    def __call__(self, a, w, w0, w1, q, out, lazy=False):
        a0, a1, t1, t2, hi = self.s
        s32, m32 = np.uint64(32), np.uint64(M32)
        np.bitwise_and(a, m32, out=a0); np.right_shift(a, s32, out=a1)
        np.multiply(a0, w0, out=t1); np.right_shift(t1, s32, out=t1)
        np.multiply(a1, w0, out=t2); np.add(t2, t1, out=t2)                      # mid1
        np.bitwise_and(t2, m32, out=t1); np.right_shift(t2, s32, out=t2)
        np.multiply(a0, w1, out=hi); np.add(hi, t1, out=hi); np.right_shift(hi, s32, out=hi)
        np.multiply(a1, w1, out=t1); np.add(t1, t2, out=t1); np.add(t1, hi, out=t1)  # high word
        np.multiply(t1, q, out=t1); np.multiply(a, w, out=out); np.subtract(out, t1, out=out)
        if not lazy:
            np.subtract(out, q, out=t1); np.minimum(out, t1, out=out)
        return out


class NumpyFloatQ:
    """Quotient from float64 (a * (w/q)), exact remainder in int64 (|r| < 8q), a second float
    quotient, then two branch-free corrections to [0, q)."""

    def __init__(self, shape):
        self.f, self.i, self.t = np.empty(shape), np.empty(shape, np.uint64), np.empty(shape, np.uint64)

    def __call__(self, a, w, wq, q, qinv, out):
        f, i, t = self.f, self.i, self.t
        np.multiply(a, wq, out=f); np.copyto(i, f, casting="unsafe")
        np.multiply(i, q, out=i); np.multiply(a, w, out=out); np.subtract(out, i, out=out)
        r = out.view(np.int64)
        np.multiply(r, qinv, out=f); np.floor(f, out=f); np.copyto(i.view(np.int64), f, casting="unsafe")
        np.multiply(i, q, out=i); np.subtract(out, i, out=out)                    # r in [-q, 2q)
        np.add(out, q, out=t); np.minimum(out, t, out=out)                         # [0, 2q)
        np.subtract(out, q, out=t); np.minimum(out, t, out=out)                    # [0, q)
        return out


class TorchShoup:
    """NumpyShoup in torch int64 (same bits: products wrap; logical shifts masked to 32 bits)."""

    def __init__(self, shape):
        self.s = [torch.empty(shape, dtype=torch.int64) for _ in range(5)]

    def __call__(self, a, w, w0, w1, q, out, lazy=False):
        a0, a1, t1, t2, hi = self.s
        torch.bitwise_and(a, M32, out=a0); torch.bitwise_right_shift(a, 32, out=a1)
        torch.mul(a0, w0, out=t1); t1.bitwise_right_shift_(32).bitwise_and_(M32)
        torch.mul(a1, w0, out=t2); t2.add_(t1)
        torch.bitwise_and(t2, M32, out=t1); t2.bitwise_right_shift_(32)
        torch.mul(a0, w1, out=hi); hi.add_(t1).bitwise_right_shift_(32).bitwise_and_(M32)
        torch.mul(a1, w1, out=t1); t1.add_(t2).add_(hi).mul_(q)
        torch.mul(a, w, out=out); out.sub_(t1)
        if not lazy:
            torch.sub(out, q, out=t1); torch.bitwise_right_shift(t1, 63, out=t2)  # -1 where r < q
            out.copy_(t1).add_(t2.bitwise_and_(q))
        return out


def check(name, got, A, W, q, idx):
    """got == sum_m A[m] * W[m] mod q (exact Python ints) at flat positions idx; A (k, 2, L, N), W (k, 1, L, N)."""
    k, LN = A.shape[0], W[0].size
    g, Af, Wf = np.asarray(got).reshape(-1).view(np.uint64), A.reshape(k, -1), W.reshape(k, -1)
    ref = [sum(int(Af[m, j]) * int(Wf[m, j % LN]) for m in range(k)) % q[j % LN // (LN // len(q))] for j in idx]
    if [int(g[j]) for j in idx] != ref:
        raise SystemExit(f"bench_he_floor.py: floor variant {name} gives wrong residues")


def main(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=51, help="timed calls per single-op measurement (>= 3)")
    p.add_argument("--mac-repeats", type=int, default=9, help="timed runs of each k-term multiply-accumulate (>= 1)")
    p.add_argument("--k", type=int, default=64, help="ciphertexts in the multiply-accumulate (1..256)")
    p.add_argument("--cpu", type=int, default=None, help="pin the process to this CPU (default: no pinning)")
    p.add_argument("--out", default="docs/bench/he_floor.json")
    args = p.parse_args(argv)
    out_path, cpus = Path(args.out), sorted(os.sched_getaffinity(0))
    for bad, msg in ((args.repeats < 3, f"--repeats must be at least 3, got {args.repeats}"),
                     (args.mac_repeats < 1, f"--mac-repeats must be at least 1, got {args.mac_repeats}"),
                     (not 1 <= args.k <= 256, f"--k must be in 1..256, got {args.k}"),
                     (args.cpu is not None and args.cpu not in cpus, f"--cpu {args.cpu} is not one of {cpus}"),
                     (not out_path.parent.is_dir(), f"--out: directory {out_path.parent} does not exist")):
        if bad:
            p.error(msg)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})

    global np, torch
    import numpy as np, torch, Pyfhel  # noqa: E401
    from Pyfhel import Pyfhel as PyfhelCls
    from cryptogen.he import ClientKeys, HEConfig, ServerEngine
    from cryptogen.he.engine import Cipher
    from cryptogen.he.serialize import seal_ciphertext_header
    torch.set_num_threads(1)

    rec = {"command": " ".join([".venv/bin/python", "scripts/bench_he_floor.py"] + sys.argv[1:]),
           "date": sh("date", "-u", "+%F"), "commit": sh("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"),
           "machine": machine(), "load_avg_start": list(os.getloadavg()), "threads": 1, "pinned_cpu": args.cpu,
           "versions": {"Pyfhel": Pyfhel.__version__, "numpy": np.__version__, "torch": torch.__version__}}
    R, rng, t_start = args.repeats, np.random.default_rng(11), time.perf_counter()
    cfg = HEConfig()
    log(f"keys: BFV N={cfg.n}, qi {cfg.qi_sizes}, Galois key for step 1")
    keys = ClientKeys.generate(cfg, (1,))
    ctx = keys.public_context()  # the server's view (no secret key): all timed ops run on its Pyfhel object
    he = ctx.he
    qi_all = [int(q) for q in ctx.qi]  # read from the loaded SEAL context (incl. the special prime)
    slots = lambda: rng.integers(0, cfg.t, cfg.n, dtype=np.int64)  # noqa: E731
    ct, ct2 = ctx.encrypt_public(slots()), ctx.encrypt_public(slots())
    head = seal_ciphertext_header(ct.to_bytes("none"))
    L, N, q = head["k"], head["n"], qi_all[:head["k"]]  # L: primes of a data-level ciphertext (no special prime)
    rec.update(N=N, L=L, ciphertext_polys=head["size"], ciphertext_ntt_form=bool(head["ntt"]),
               data_primes_bits=[x.bit_length() for x in q], special_prime_bits=qi_all[-1].bit_length(),
               t_bits=cfg.t.bit_length(), mulmods_per_ct_pt=2 * L * N)
    pt, arr, py = ctx.encode(slots()), np.ascontiguousarray(slots()), {}
    log(f"Pyfhel single ops ({R} repeats each; L={L} data primes on ciphertexts)")
    py["ct_pt_out_of_place"] = timed(lambda _: he.multiply_plain(ct, pt, True), R)
    py["ct_pt_in_place"] = timed(lambda c: he.multiply_plain(c, pt), R, setup=ct.copy)
    eng = ServerEngine(ctx)
    cip = Cipher(ct, eng.noise.fresh_encryption)  # the project's call: noise bookkeeping + multiply_plain(.., True)
    py["engine_mul_ct_pt"] = timed(lambda _: eng.mul_ct_pt(cip, pt), R)
    py["ct_ct_add_out_of_place"] = timed(lambda _: he.add(ct, ct2, True), R)
    py["ct_ct_add_in_place"] = timed(lambda c: he.add(c, ct2), R, setup=ct.copy)
    py["rotate_1_out_of_place"] = timed(lambda _: he.rotate(ct, 1, True), R)
    py["rotate_1_in_place"] = timed(lambda c: he.rotate(c, 1), R, setup=ct.copy)
    py["ct_copy"] = timed(lambda _: ct.copy(), R)
    py["encode_project"] = timed(lambda _: ctx.encode(arr), R)
    py["encode_encodeInt"] = timed(lambda _: he.encodeInt(arr), R)
    py["ntt_transforms"] = {"exposed": False, "note": "Pyfhel 3.5.0 has no transform_to_ntt/from_ntt in its API"}
    rec["pyfhel_bfv"] = py

    log("BGV ct x pt (same N, t, primes)")
    try:
        hb = PyfhelCls()
        hb.contextGen(scheme="bgv", n=cfg.n, t=cfg.t, sec=cfg.security_bits, qi=qi_all)
        hb.keyGen()
        cb, pb = hb.encryptPtxt(hb.encodeBGV(arr)), hb.encodeBGV(np.ascontiguousarray(slots()))
        hbh = seal_ciphertext_header(cb.to_bytes("none"))
        rec["pyfhel_bgv"] = {
            "ciphertext_ntt_form": bool(hbh["ntt"]), "ciphertext_primes": hbh["k"],
            "plaintext_ntt_form": bool(pb.is_ntt_form()),
            "ct_pt_out_of_place": timed(lambda _: hb.multiply_plain(cb, pb, True), R),
            "ct_pt_in_place": timed(lambda c: hb.multiply_plain(c, pb), R, setup=cb.copy)}
    except Exception as exc:  # noqa: BLE001 - record, do not fail the run
        rec["pyfhel_bgv"] = {"error": f"{type(exc).__name__}: {exc}"}

    log("floor: one ct x pt, (2, L, N) uint64 against a fixed (L, N) plaintext")
    q_col = np.array(q, np.uint64).reshape(L, 1)
    a, w = rng.integers(0, q_col, (2, L, N), dtype=np.uint64), rng.integers(0, q_col, (L, N), dtype=np.uint64)
    a[:, :, 0], w[:, 0] = q_col[:, 0] - 1, q_col[:, 0] - 1  # extremes
    w0, w1 = shoup_pre(w, q_col)
    wq, qinv = w.astype(np.float64) / q_col.astype(np.float64), 1.0 / q_col.astype(np.float64)
    out, idx = np.empty_like(a), rng.integers(0, a.size, 4000).tolist() + [0, L * N]
    ck = lambda name, got: check(name, got, a[None], w[None, None], q, idx)  # noqa: E731
    fl, ns, nf = {}, NumpyShoup(a.shape), NumpyFloatQ(a.shape)
    ck("numpy_shoup32", ns(a, w, w0, w1, q_col, out))
    fl["numpy_shoup32"] = timed(lambda _: ns(a, w, w0, w1, q_col, out), R)
    ck("numpy_float_quotient", nf(a, w, wq, q_col, qinv, out))
    fl["numpy_float_quotient"] = timed(lambda _: nf(a, w, wq, q_col, qinv, out), R)
    T = {k: torch.from_numpy(v.view(np.int64)) for k, v in dict(a=a, w=w, w0=w0, w1=w1, q=q_col).items()}
    tout, ts = torch.empty(a.shape, dtype=torch.int64), TorchShoup(a.shape)
    ck("torch_shoup32", ts(T["a"], T["w"], T["w0"], T["w1"], T["q"], tout).numpy())
    fl["torch_shoup32_int64"] = timed(lambda _: ts(T["a"], T["w"], T["w0"], T["w1"], T["q"], tout), R)
    correct = list(fl)
    fl["numpy_naive_wrap_LOWER_BOUND_WRONG"] = timed(
        lambda _: (np.multiply(a, w, out=out), np.remainder(out, q_col, out=out)), R)
    fl["numpy_mul_only_LOWER_BOUND_WRONG"] = timed(lambda _: np.multiply(a, w, out=out), R)
    fl["torch_naive_wrap_LOWER_BOUND_WRONG"] = timed(
        lambda _: (torch.mul(T["a"], T["w"], out=tout), torch.remainder(tout, T["q"], out=tout)), R)
    b, tmp = rng.integers(0, q_col, (2, L, N), dtype=np.uint64), np.empty_like(a)
    fl["numpy_add_mod"] = timed(lambda _: (np.add(a, b, out=out), np.subtract(out, q_col, out=tmp),
                                           np.minimum(out, tmp, out=out)), R)
    best = fl["best_correct"] = min(correct, key=lambda k: fl[k]["median_us"])
    rec["floor_ct_pt"] = fl

    k, MR = args.k, args.mac_repeats
    log(f"multiply-accumulate of k={k} ciphertexts x fixed plaintexts ({MR} repeats)")
    cts, pts = [ctx.encrypt_public(slots()) for _ in range(k)], [ctx.encode(slots()) for _ in range(k)]
    ciphers = [Cipher(c, eng.noise.fresh_encryption) for c in cts]

    def py_mac(_):
        acc = he.multiply_plain(cts[0], pts[0], True)
        for c, p_ in zip(cts[1:], pts[1:]):
            acc += he.multiply_plain(c, p_, True)
        return acc
    mac = {"k": k, "pyfhel": timed(py_mac, MR, warmup=1),
           "engine_mul_ct_pt_then_sum": timed(lambda _: eng.sum([eng.mul_ct_pt(c, p_) for c, p_ in zip(ciphers, pts)]),
                                              MR, warmup=1)}
    A, Wk = rng.integers(0, q_col, (k, 2, L, N), dtype=np.uint64), rng.integers(0, q_col, (k, 1, L, N), dtype=np.uint64)
    (Wk0, Wk1), midx = shoup_pre(Wk, q_col), rng.integers(0, 2 * L * N, 200).tolist()
    check_mac = lambda name, got: check(name, got, A, Wk, q, midx)  # noqa: E731
    acc, part = np.empty((2, L, N), np.uint64), np.empty((2, L, N), np.uint64)

    def np_mac(kb):  # kb cts per call; lazy Shoup products in [0, 2q), sums (< 2kq < 2^64), one final reduction
        sh_, rk = NumpyShoup((kb, 2, L, N)), np.empty((kb, 2, L, N), np.uint64)

        def run(_):
            acc.fill(0)
            for s in range(0, k, kb):
                r = sh_(A[s:s + kb], Wk[s:s + kb], Wk0[s:s + kb], Wk1[s:s + kb], q_col, rk, lazy=True)
                np.add(acc, r[0] if kb == 1 else np.add.reduce(r, axis=0, out=part), out=acc)
            return np.remainder(acc, q_col, out=acc)
        return run
    for name, blk in (("numpy_shoup32_per_ct", 1), ("numpy_shoup32_batched", k)):
        fn = np_mac(blk)
        check_mac(name, fn(None))
        mac[name] = timed(fn, MR, warmup=1)
        del fn
    for m in (m for m in mac if isinstance(mac[m], dict)):
        mac[m]["per_ct_pt_us"] = round(mac[m]["median_us"] / k, 1)
    mf = mac["best_floor"] = min((m for m in mac if m.startswith("numpy")), key=lambda m: mac[m]["median_us"])
    rec["mac"] = mac

    log("the project's NTT-domain kernel (cryptogen/he/ntt.py)")
    from cryptogen.he import ntt
    tb = ntt.tables(N, tuple(q), cfg.t)
    prefix, words = ntt.ct_words(ct)
    one = ntt.forward(tb, np.array(words)[None])  # (1, 2, L, N)
    wn = ntt.plain_ntt(tb, ntt.plain_coeffs(pt, N))[None]
    An = np.ascontiguousarray(A)
    Wn = np.ascontiguousarray(Wk[:, 0])
    nk = {"ct_pt_1_term_mac": timed(lambda _: ntt.mac(tb, one, wn, np.zeros(1, np.int64)), R),
          f"mac_{k}_terms": timed(lambda _: ntt.mac(tb, An, Wn, np.arange(k)), MR, warmup=1),
          "forward_ntt_ciphertext_2L": timed(lambda c: ntt.forward(tb, c), R, setup=lambda: np.array(words)),
          "inverse_ntt_ciphertext_2L": timed(lambda c: ntt.inverse(tb, c), R, setup=lambda: np.array(words)),
          "words_out_of_pyfhel": timed(lambda _: ntt.ct_words(ct), R),
          "words_into_pyfhel": timed(lambda _: ntt.ct_from_words(he, prefix, words), R)}
    nk[f"mac_{k}_terms"]["per_ct_pt_us"] = round(nk[f"mac_{k}_terms"]["median_us"] / k, 1)
    from cryptogen.he import hoist  # hoisted baby steps: one decomposition per input, then per step
    tb_all = ntt.tables(N, tuple(qi_all), cfg.t)
    dec = hoist.decompose(tb_all, words)
    nk["hoist_decompose_per_input"] = timed(lambda _: hoist.decompose(tb_all, words), R)
    nk["hoisted_rotation_1"] = timed(lambda _: hoist.rotate(tb_all, dec, ctx.hoist_keys[1]), R)
    nk["seal_rotation_1_then_forward_ntt"] = timed(
        lambda _: ntt.forward(tb, np.array(ntt.ct_words(he.rotate(ct, 1, True))[1])), R)
    nk["simd"] = ntt._ntt.simd()  # the NTT's AVX-512 stages (he/_ntt_rows.h); the scalar ones alike, same run
    if nk["simd"]:
        ntt._ntt.set_simd(False)
        for name, fn in (("forward_ntt_ciphertext_2L", lambda c: ntt.forward(tb, c)),
                         ("inverse_ntt_ciphertext_2L", lambda c: ntt.inverse(tb, c))):
            nk[name + "_scalar"] = timed(fn, R, setup=lambda: np.array(words))
        nk["hoist_decompose_per_input_scalar"] = timed(lambda _: hoist.decompose(tb_all, words), R)
        nk["hoisted_rotation_1_scalar"] = timed(lambda _: hoist.rotate(tb_all, dec, ctx.hoist_keys[1]), R)
        ntt._ntt.set_simd(True)
    rec["ntt_kernel"] = nk

    f, bgv = fl[best]["median_us"], rec["pyfhel_bgv"]
    ops = {n: py[n] for n in ("ct_pt_out_of_place", "ct_pt_in_place", "engine_mul_ct_pt", "rotate_1_out_of_place")}
    ops.update({"bgv_ct_pt_in_place": bgv["ct_pt_in_place"]} if "ct_pt_in_place" in bgv else {})
    rec["ratios"] = {"floor_ct_pt_us": f, "floor_ns_per_mulmod": round(f * 1e3 / (2 * L * N), 2),
                     "target_ct_pt_at_3x_floor_us": round(3 * f, 1),
                     **{f"{n}_over_floor": round(d["median_us"] / f, 2) for n, d in ops.items()},
                     "ct_ct_add_in_place_over_numpy_add_mod": round(
                         py["ct_ct_add_in_place"]["median_us"] / fl["numpy_add_mod"]["median_us"], 2),
                     "mac_per_ct_pt_pyfhel_over_floor": round(mac["pyfhel"]["median_us"] / mac[mf]["median_us"], 2),
                     "ntt_kernel_ct_pt_over_floor": round(nk["ct_pt_1_term_mac"]["median_us"] / f, 3),
                     "hoisted_rotation_over_floor": round(nk["hoisted_rotation_1"]["median_us"] / f, 2),
                     "seal_rotation_then_forward_over_hoisted": round(
                         nk["seal_rotation_1_then_forward_ntt"]["median_us"] / nk["hoisted_rotation_1"]["median_us"], 2),
                     "ntt_kernel_mac_per_ct_pt_over_floor": round(
                         nk[f"mac_{k}_terms"]["per_ct_pt_us"] / mac[mf]["per_ct_pt_us"], 3),
                     **{f"{n}_scalar_over_simd": round(nk[n + "_scalar"]["median_us"] / nk[n]["median_us"], 2)
                        for n in ("forward_ntt_ciphertext_2L", "inverse_ntt_ciphertext_2L", "hoist_decompose_per_input",
                                  "hoisted_rotation_1") if n + "_scalar" in nk}}
    rec["load_avg_end"] = list(os.getloadavg())
    rec["wall_s"] = round(time.perf_counter() - t_start, 1)
    out_path.write_text(json.dumps(rec, indent=2) + "\n")
    log(f"wrote {out_path} in {rec['wall_s']} s; floor {best} {f} µs; ratios {rec['ratios']}")


if __name__ == "__main__":
    main()
