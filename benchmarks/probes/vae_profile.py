"""Probe: where the VAE decode's 1.28 s go (480x832x81, random bf16, channels-last): kernels grouped."""
import os, sys, time, collections
import torch
sys.path.insert(0, os.getcwd())
from wan_core.models.vae import WanVAE
with torch.device("cuda"):
    vae = WanVAE()
vae = vae.to(torch.bfloat16).eval()
latent = torch.randn(1, 16, 21, 60, 104, device="cuda")
with torch.no_grad():
    vae.decode(latent); torch.cuda.synchronize()
    t0 = time.perf_counter(); vae.decode(latent); torch.cuda.synchronize(); print("decode", time.perf_counter() - t0)
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        vae.decode(latent); torch.cuda.synchronize()
groups = collections.defaultdict(lambda: [0.0, 0])
total = 0.0
for e in prof.events():
    if e.device_type == torch.autograd.DeviceType.CUDA:
        name = e.name
        key = ("conv:" + name[:60]) if ("conv" in name.lower() or "xmma" in name or "cudnn" in name.lower() or "sm90" in name) else name[:90]
        groups[key][0] += e.device_time / 1e3; groups[key][1] += 1; total += e.device_time / 1e3
print(f"GPU kernel time {total:.1f} ms")
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=40))
for k, (ms, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:30]:
    print(f"{ms:8.1f} ms {n:6d}  {k}")
