"""cuDNN bf16 SDPA: every execution plan the frontend offers (heuristics A, B, fallback) vs torch's pick, Wan 14B shapes."""
import math
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
import cudnn
dev = torch.device("cuda")
print("cudnn frontend", getattr(cudnn, "__version__", "?"), "backend", cudnn.backend_version())
handle = cudnn.create_handle()
cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
def bench(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return sorted(ts)[len(ts) // 2]
for res, s in (("480p", 32760), ("720p", 75600)):
    b, h, d = 1, 40, 128
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device=dev).bfloat16() for _ in range(3))
    flop = 4 * b * h * s * s * d
    it = 12 if s < 50000 else 5
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        f = lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        ref = f()
        t = bench(f, it)
    print(f"RESULT {res} torch cudnn            {t*1e3:8.2f} ms {flop/t/1e12:5.0f} TFLOP/s")
    bf = cudnn.data_type.BFLOAT16
    for knobs in (False,):
        g = cudnn.pygraph(io_data_type=bf, intermediate_data_type=cudnn.data_type.FLOAT, compute_data_type=cudnn.data_type.FLOAT, handle=handle)
        shape, strides = (b, h, s, d), (s * h * d, d, h * d, 1)
        tq, tk, tv = [g.tensor(name=n, dim=shape, stride=strides, data_type=bf) for n in ("q", "k", "v")]
        try:
            out, _ = g.sdpa(q=tq, k=tk, v=tv, generate_stats=False, attn_scale=1.0 / math.sqrt(d), use_causal_mask=False)
        except TypeError:
            out, _ = g.sdpa(q=tq, k=tk, v=tv, is_inference=True, attn_scale=1.0 / math.sqrt(d), use_causal_mask=False)
        out.set_output(True).set_dim(shape).set_stride(strides).set_data_type(bf)
        g.validate(); g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
        g.check_support()
        n = g.get_execution_plan_count()
        print(res, "plans", n)
        o_buf = torch.empty(b, s, h, d, device=dev, dtype=torch.bfloat16)
        pack = {tq: q, tk: k, tv: v, out: o_buf}
        for i in range(n):
            try:
                g.build_plan_at_index(i)
                ws = torch.empty(max(1, g.get_workspace_size_plan_at_index(i)), dtype=torch.uint8, device=dev)
                try:
                    tag = g.get_plan_name_at_index(i)
                except Exception:
                    tag = "?"
                fn = lambda: g.execute_plan_at_index(pack, ws, i, handle=handle)
                ti = bench(fn, it)
                err = (o_buf.float() - ref.transpose(1, 2).float()).abs().max().item()
                print(f"RESULT {res} plan {i:2d} {tag[:60]:60} {ti*1e3:8.2f} ms {flop/ti/1e12:5.0f} TFLOP/s err {err:.1e}")
            except Exception as e:
                print(f"RESULT {res} plan {i} failed: {str(e)[:150]}")
    del q, k, v, ref
    torch.cuda.empty_cache()
