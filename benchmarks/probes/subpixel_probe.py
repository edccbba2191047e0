"""Probe: nearest 2x upsample + 3x3 conv (the VAE's Resample) vs its sub-pixel form: one 2x2 conv
at the low resolution with the four output phases' kernels stacked (4*O channels, padding 1), then
one strided gather into the 2x image. bf16, channels-last, one 4-frame chunk."""
import time, torch
import torch.nn.functional as F
torch.backends.cudnn.benchmark = False
def bench(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n * 1e3
def phase_weights(w):  # [O, C, 3, 3] -> [4*O, C, 2, 2]: phase (py, px) sums the taps that land on the same source pixel
    o = w.shape[0]
    # rows: phase 0 reads source rows (i-1, i) with taps (0) and (1+2); phase 1 reads (i, i+1) with (0+1) and (2)
    R = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=w.dtype, device=w.device)  # [phase, k2, k3]
    out = w.new_zeros(2, 2, o, w.shape[1], 2, 2)
    for py in range(2):
        for px in range(2):
            for a in range(2):
                for b in range(2):
                    out[py, px, :, :, a, b] = sum(w[:, :, ky, kx] for ky in range(3) if R[py, a, ky] for kx in range(3) if R[px, b, kx])
    return out.reshape(4 * o, w.shape[1], 2, 2)
def upsample(x):  # [N, C, H, W] channels-last -> nearest 2x
    n, c, h, w = x.shape
    y = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(n, h, 2, w, 2, c).reshape(n, 2 * h, 2 * w, c)
    return y.permute(0, 3, 1, 2)
def subpixel(x, wp, bp, o):
    y = F.conv2d(x, wp, bp, padding=1)  # [N, 4O, H+1, W+1] channels-last
    n, _, h1, w1 = y.shape
    h, w = h1 - 1, w1 - 1
    sN, sC, sH, sW = y.stride()
    # out[n, 2i+py, 2j+px, c] = y[n, (2py+px)*O + c, i+py, j+px]
    v = y.as_strided((n, h, 2, w, 2, o), (sN, sH, sH + 2 * o, sW, sW + o, 1))
    out = torch.empty(n, 2 * h, 2 * w, o, dtype=x.dtype, device=x.device)
    out.view(n, h, 2, w, 2, o).copy_(v)
    return out.permute(0, 3, 1, 2)
rows = []
with torch.no_grad():
    for name, c, o, h, w in [("up2d 192->96 @240x416", 192, 96, 240, 416), ("up3d 384->192 @120x208", 384, 192, 120, 208),
                             ("up3d 384->192 @60x104", 384, 192, 60, 104)]:
        n = 4
        x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        wt = (torch.randn(o, c, 3, 3, device="cuda") / (9 * c) ** 0.5).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        b = torch.randn(o, device="cuda", dtype=torch.bfloat16) * 0.1
        wp = phase_weights(wt.float()).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        bp = b.repeat(4)
        ref = F.conv2d(upsample(x), wt, b, padding=1)
        got = subpixel(x, wp, bp, o)
        exact = F.conv2d(upsample(x.float()), wt.float(), b.float(), padding=1)
        err = lambda a: ((a.float() - exact).abs().max() / exact.abs().max()).item()
        t_ref = bench(lambda: F.conv2d(upsample(x), wt, b, padding=1))
        t_conv = bench(lambda: F.conv2d(upsample(x).contiguous(memory_format=torch.channels_last), wt, b, padding=1))
        t_sub = bench(lambda: subpixel(x, wp, bp, o))
        t_subconv = bench(lambda: F.conv2d(x, wp, bp, padding=1))
        line = (f"{name:26s} upsample+conv {t_ref:6.3f} ms  sub-pixel {t_sub:6.3f} ms (its conv {t_subconv:6.3f})  "
                f"err ref {err(ref):.4f} sub {err(got):.4f}")
        print(line, flush=True); rows.append(line)
print("\nsub-pixel probe, 4 frames bf16"); print("\n".join(rows))
