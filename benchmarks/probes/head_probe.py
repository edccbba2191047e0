"""Probe: the decoder head conv (96 -> 3) time-folded (current rule) or as cuDNN's conv3d."""
import time, torch
from wan_core.models import vae as V
from wan_core.models.vae import WanVAE, CausalConv3d
torch.manual_seed(0)
m = WanVAE()
with torch.no_grad():
    for p in m.parameters():
        p.normal_(0, 0.02)
m = m.to("cuda", torch.bfloat16).eval()
z = torch.randn(1, 16, 21, 60, 104, device="cuda")
def t(fn, n=3):
    fn(); torch.cuda.synchronize(); s = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - s) / n
can = CausalConv3d.can_fold_time
rows = []
for rep in range(2):
    for name, pred in [("head folded (current)", can), ("head as conv3d", lambda self: can(self) and self.out_channels != 3)]:
        CausalConv3d.can_fold_time = pred
        d = t(lambda: m.decode(z, keep=False, on_frames=lambda c: None))
        rows.append(f"{name:24s} decode {d:.4f} s"); print(rows[-1], flush=True)
print("\nhead probe"); print("\n".join(rows))
