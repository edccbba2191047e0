"""Cross-attention backends at Wan 14B shapes: q [1, L, 40, 128] bf16, k/v [1, 512 (text) or 257 (image), 40, 128]."""
import torch
import torch.nn.functional as F
from wan_core.kernels.attention import get_attention
dev = torch.device("cuda")
def bench(fn, iters=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return sorted(ts)[len(ts) // 2]
names = ["flash_attn3", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient"]
fns = {}
for n in names:
    try:
        fns[n] = get_attention(n, dev)
    except Exception as e:
        print("skip", n, e)
for res, s in (("480p", 32760), ("720p", 75600)):
    for lk in (512, 257):
        torch.manual_seed(0)
        q = torch.randn(1, s, 40, 128, device=dev).bfloat16()
        k = torch.randn(1, lk, 40, 128, device=dev).bfloat16()
        v = torch.randn(1, lk, 40, 128, device=dev).bfloat16()
        ref = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float()).transpose(1, 2)
        floor = 2 * q.numel() * 2 / 3.35e12
        for n, fn in fns.items():
            try:
                out = fn(q, k, v)
                t = bench(lambda: fn(q, k, v))
                err = (out.float() - ref).abs().max().item()
                print(f"RESULT cross {res} Lk={lk} {n:16} {t*1e3:7.3f} ms  (q+o bytes at 3.35 TB/s: {floor*1e3:.3f} ms) max err {err:.2e}")
            except Exception as e:
                print(f"RESULT cross {res} Lk={lk} {n:16} failed: {type(e).__name__}: {str(e)[:100]}")
        del q, k, v, ref
