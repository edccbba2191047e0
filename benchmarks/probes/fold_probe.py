"""Probe: which causal convs to time-fold (vae.FOLD_TIME_CHANNELS), whole decode/encode 480x832x81 bf16."""
import time, torch
from wan_core.models import vae as V
from wan_core.models.vae import WanVAE
torch.manual_seed(0)
m = WanVAE()
with torch.no_grad():
    for p in m.parameters():
        p.normal_(0, 0.02)
m = m.to("cuda", torch.bfloat16).eval()
z = torch.randn(1, 16, 21, 60, 104, device="cuda")
video = torch.rand(1, 3, 81, 480, 832, device="cuda", dtype=torch.bfloat16) * 2 - 1
def t(fn, n=2):
    fn(); torch.cuda.synchronize(); s = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - s) / n
rows = []
ref = None
for name, chans in [("none", set()), ("96 (current)", set(range(64, 97))), ("96+192", set(range(64, 97)) | {192}),
                    ("96+192+384", set(range(64, 97)) | {192, 384}), ("96+3 (enc conv1)", set(range(64, 97)) | {3}),
                    ("96 again", set(range(64, 97)))]:
    V.FOLD_TIME_CHANNELS = chans
    torch.cuda.reset_peak_memory_stats()
    d = t(lambda: m.decode(z, keep=False, on_frames=lambda c: None))
    e = t(lambda: m.encode(video))
    out = m.decode(z[:, :, :3])
    ref = out if ref is None else ref
    rows.append(f"{name:22s} decode {d:.3f} s  encode {e:.3f} s  peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB  rel {((out - ref).abs().max() / ref.abs().max()).item():.4f}")
    print(rows[-1], flush=True)
print("\nfold probe"); print("\n".join(rows))
