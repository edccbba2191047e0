"""Fifteenth session's probe: (text) the text cross-attention, FA3 over the 512 padded rows vs the
collapsed-padding kernel at several prompt lengths; (textacc) both against float64 attention;
(x264) the x264 tail with rgb24 frames (swscale on the writer thread) vs yuv420p planes handed
over ready (ran at c2b575f, whose `video.yuv420_planes` is reverted since); (step) one 720p step
with the whole run's inputs vs bench_dit's inputs on the same compiled radial DiT.
  python benchmarks/probe_fifteenth.py text,textacc,step"""

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.environ.get("OUT", ".")
R = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def log(*a):
    print(*a, flush=True)


def cuda_time(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps


def part_text():
    from flash_attn_interface import flash_attn_func

    from wan_core.kernels.text_attention import text_attention

    for name, L in (("720p", 75600), ("480p", 32760)):
        q = torch.randn(1, L, 40, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 512, 40, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 512, 40, 128, device="cuda", dtype=torch.bfloat16)
        t_fa3 = cuda_time(lambda: flash_attn_func(q, k, v))
        row = {"fa3_512": t_fa3}
        for n in (12, 64, 128, 256, 512):
            kk, vv = k.clone(), v.clone()
            if n < 512:
                kk[:, n:] = kk[:, n]
                vv[:, n:] = vv[:, n]
            lens = torch.tensor([n], dtype=torch.int32, device="cuda")
            row[f"ours_n{n}"] = cuda_time(lambda kk=kk, vv=vv, lens=lens: text_attention(q, kk, vv, lens))
            ref = flash_attn_func(q, kk, vv)
            ref = ref[0] if isinstance(ref, tuple) else ref
            out = text_attention(q, kk, vv, lens)
            row[f"maxdiff_n{n}"] = (out.float() - ref.float()).abs().max().item()
        R[f"text_{name}"] = row
        log(name, json.dumps({k_: round(v_, 4) for k_, v_ in row.items()}))


def part_textacc():
    """Error of FA3 over all 512 rows and of the collapsed kernel against float64 attention, with
    the whole run's statistics (tiny scores: near-uniform weights, the padding ~98 % of the mass)
    and with unit-variance q, k."""
    from flash_attn_interface import flash_attn_func

    from wan_core.kernels.text_attention import text_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    for name, scale in (("tiny_scores", 0.05), ("unit_scores", 1.0)):
        n, lk = 12, 512
        q = (torch.randn(1, 8192, 40, 128, device="cuda", generator=g) * scale).bfloat16()
        k = (torch.randn(1, lk, 40, 128, device="cuda", generator=g) * scale).bfloat16()
        v = torch.randn(1, lk, 40, 128, device="cuda", generator=g).bfloat16()
        k[:, n:] = k[:, n].clone()
        v[:, n:] = v[:, n].clone()
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2).double() for t in (q, k, v))).transpose(1, 2)
        fa = flash_attn_func(q, k, v)
        fa = fa[0] if isinstance(fa, tuple) else fa
        ours = text_attention(q, k, v, torch.tensor([n], dtype=torch.int32))
        row = {}
        for label, out in (("fa3_all_rows", fa), ("collapsed", ours)):
            err = out.double() - ref
            row[label] = dict(rel=(err.norm() / ref.norm()).item(), max=err.abs().max().item())
        R[f"textacc_{name}"] = row
        log("textacc", name, json.dumps(row))


def part_x264():
    import queue
    import threading

    import av

    g = torch.Generator().manual_seed(0)
    h, w = 720, 1280
    base = torch.rand(3, 45, 80, generator=g)
    frames = []
    for i in range(81):  # a smooth moving pattern 
        f = torch.nn.functional.interpolate(torch.roll(base, i, 2)[None], size=(h, w), mode="bilinear")[0]
        f = f.permute(1, 2, 0) * 200 + torch.rand(h, w, 3, generator=g) * 55  # plus noise: the random-weight run's
        frames.append(f.to(torch.uint8).contiguous())  # video is noise-like (~25 MB for 81 frames)
    from wan_core.video import yuv420_planes

    yuvs = [yuv420_planes(f[None]).planes[0].numpy() for f in frames]
    for mode in ("rgb24", "yuv420p", "rgb24", "yuv420p"):
        path = os.path.join(OUT, f"probe_{mode}.mp4")
        c = av.open(path, mode="w", format="mp4")
        s = c.add_stream("libx264", rate=16, options={"crf": "19", "preset": "faster"})
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.thread_type = "AUTO"
        q: queue.Queue = queue.Queue(maxsize=8)

        def drain():
            while (chunk := q.get()) is not None:
                for fr in chunk:
                    vf = (av.VideoFrame.from_ndarray(fr.numpy(), format="rgb24") if mode == "rgb24"
                          else av.VideoFrame.from_ndarray(fr, format="yuv420p"))
                    for p in s.encode(vf):
                        c.mux(p)

        th = threading.Thread(target=drain)
        th.start()
        src = frames if mode == "rgb24" else yuvs
        t0 = time.perf_counter()
        for i in range(0, 81, 4):  # paced as the 720p decode hands chunks over (~1.68 s / 21)
            time.sleep(0.08)
            q.put(src[i:i + 4])
        t_fed = time.perf_counter()
        q.put(None)
        th.join()
        t_drained = time.perf_counter()
        for p in s.encode():
            c.mux(p)
        c.close()
        t_end = time.perf_counter()
        row = dict(feed=t_fed - t0, drain_tail=t_drained - t_fed, flush=t_end - t_drained, tail=t_end - t_fed,
                   size_MB=os.path.getsize(path) / 1e6)
        R.setdefault("x264", []).append({mode: row})
        log("x264", mode, json.dumps({k_: round(v_, 3) for k_, v_ in row.items()}))


def part_step():
    from benchmarks.bench_e2e import random_dit, random_t5

    t5 = random_t5("cuda")
    ctx_t5 = t5.encode(["a cat surfing a wave at sunset"])[0]  # [Lt, 4096]
    R["t5_tokens"] = int(ctx_t5.shape[0])
    del t5
    torch.cuda.empty_cache()
    dit = random_dit("fast@radial_attn+res16")
    g = torch.Generator(device="cuda").manual_seed(0)
    grid = (21, 90, 160)
    x_bench = torch.randn(1, 16, *grid, device="cuda", dtype=torch.bfloat16, generator=g)
    ctx_bench = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    noise = torch.randn(1, 16, *grid, device="cuda", dtype=torch.float32, generator=g)
    from wan_core.kernels.text_attention import text_attention
    from wan_core.models.dit import attend_all_text_rows

    def collapsed(on: bool):
        for blk in dit.blocks:
            blk.cross_attn.text_attn_fn = text_attention if on else attend_all_text_rows(blk.cross_attn.attn_fn)

    t500, t750 = torch.tensor([500.0], device="cuda"), torch.tensor([750.0], device="cuda")
    cases = {  # name: (collapse the text padding, x, t, context)
        "bench_inputs": (True, x_bench, t500, ctx_bench),  # 512 tokens: all rows through FA3 either way
        "run_inputs_all_rows": (False, noise, t750, [ctx_t5]),
        "run_inputs_collapsed": (True, noise, t750, [ctx_t5]),
    }
    times: dict = {k_: [] for k_ in cases}
    with torch.inference_mode():
        for on, x, t, c in cases.values():  # compiles (a graph per text function)
            collapsed(on)
            dit(x, t, c)
        outs = {}
        for _ in range(2):
            for name, (on, x, t, c) in cases.items():
                collapsed(on)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                outs[name] = dit(x, t, c)
                torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
    cos = torch.nn.functional.cosine_similarity
    for a, b in (("run_inputs_all_rows", "run_inputs_collapsed"),):
        R[f"cos_{a}_{b}"] = cos(outs[a].flatten().float(), outs[b].flatten().float(), dim=0).item()
        log("cos", a, b, R[f"cos_{a}_{b}"])
    R["step"] = times
    for k_, v_ in times.items():
        log("step", k_, [round(s_, 3) for s_ in v_])


if __name__ == "__main__":
    parts = sys.argv[1].split(",") if len(sys.argv) > 1 else ["text", "x264", "step"]
    for p in parts:
        t0 = time.time()
        try:
            globals()[f"part_{p}"]()
        except Exception as e:  # one part failing leaves the others
            import traceback

            traceback.print_exc()
            R[f"{p}_error"] = repr(e)
        log(f"-- {p}: {time.time() - t0:.0f} s")
        with open(os.path.join(OUT, "probe_fifteenth.json"), "w") as f:
            json.dump(R, f, indent=1)
