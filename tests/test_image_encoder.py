"""CLIP ViT-H/14 image encoder for Wan I2V: equality with transformers and with the official recipe.

The reference weights come from a random tiny transformers `CLIPVisionModel`; the test writes
them in Wan's `.pth` layout (fused qkv, [1, 1, dim] class token, ...) and in ComfyUI's
transformers layout, loads each file through `load_image_encoder`, and compares:
- with transformers' `hidden_states[-2]` (penultimate block output, no post-norm);
- with a from-scratch forward of the official open-clip ViT written here on the Wan-layout
  tensors, so a qkv split that matched a wrong inverse conversion would still be caught.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from wan_core.loading.clip import WAN_UNUSED, convert_clip_vision, detect_layout, load_image_encoder
from wan_core.loading.io import CheckpointError
from wan_core.models.image_encoder import ImageEncoderConfig, WanImageEncoder, preprocess_images

LAYOUTS = Path(__file__).resolve().parent / "reference" / "checkpoint_layouts"

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _hf_model(dim: int, heads: int, layers: int = 3, image: int = 42, patch: int = 14) -> CLIPVisionModel:
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=dim,
        intermediate_size=2 * dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    cfg._attn_implementation = "eager"
    model = CLIPVisionModel(cfg).eval()
    # random (non-default) norms and biases so every tensor matters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def _tower_sd(model: CLIPVisionModel) -> dict[str, torch.Tensor]:
    """Canonical (no `vision_model.`) names, whatever transformers version is installed."""
    tower = getattr(model, "vision_model", model)
    return {k: v.detach().clone() for k, v in tower.state_dict().items() if not k.endswith("position_ids")}


def _to_wan_layout(sd: dict[str, torch.Tensor], embed: int = 24) -> dict[str, torch.Tensor]:
    """The test's own inverse map: transformers names -> official `visual.*` names (+ text side)."""
    dim = sd["embeddings.class_embedding"].shape[0]
    out = {
        "log_scale": torch.tensor(math.log(1 / 0.07)),
        "textual.token_embedding.weight": torch.randn(10, 8),
        "visual.cls_embedding": sd["embeddings.class_embedding"].reshape(1, 1, dim),
        "visual.pos_embedding": sd["embeddings.position_embedding.weight"].unsqueeze(0),
        "visual.patch_embedding.weight": sd["embeddings.patch_embedding.weight"],
        "visual.pre_norm.weight": sd["pre_layrnorm.weight"],
        "visual.pre_norm.bias": sd["pre_layrnorm.bias"],
        "visual.post_norm.weight": sd["post_layernorm.weight"],
        "visual.post_norm.bias": sd["post_layernorm.bias"],
        "visual.head": torch.randn(dim, embed),
    }
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"visual.transformer.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.to_qkv.{kind}"] = torch.cat(
                [sd[src + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0
            )
            out[dst + f"attn.proj.{kind}"] = sd[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"norm1.{kind}"] = sd[src + f"layer_norm1.{kind}"]
            out[dst + f"norm2.{kind}"] = sd[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.0.{kind}"] = sd[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.2.{kind}"] = sd[src + f"mlp.fc2.{kind}"]
    return out


def _official_visual(w: dict[str, torch.Tensor], pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """Open-clip ViT forward per the official recipe, on Wan-layout tensors, `use_31_block=True`."""
    b = pixels.shape[0]
    x = F.conv2d(pixels, w["visual.patch_embedding.weight"], stride=w["visual.patch_embedding.weight"].shape[-1])
    x = x.flatten(2).permute(0, 2, 1)  # [B, patches, dim]
    dim = x.shape[-1]
    x = torch.cat([w["visual.cls_embedding"].expand(b, -1, -1), x], dim=1) + w["visual.pos_embedding"]
    x = F.layer_norm(x, (dim,), w["visual.pre_norm.weight"], w["visual.pre_norm.bias"], 1e-5)
    layers = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("visual.transformer."))
    for i in range(layers - 1):  # all blocks but the last
        p = f"visual.transformer.{i}."
        h = F.layer_norm(x, (dim,), w[p + "norm1.weight"], w[p + "norm1.bias"], 1e-5)
        s = h.shape[1]
        q, k, v = F.linear(h, w[p + "attn.to_qkv.weight"], w[p + "attn.to_qkv.bias"]).view(b, s, 3, heads, -1).unbind(2)
        att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1]), dim=-1)
        o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, s, dim)
        x = x + F.linear(o, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        h = F.layer_norm(x, (dim,), w[p + "norm2.weight"], w[p + "norm2.bias"], 1e-5)
        h = F.gelu(F.linear(h, w[p + "mlp.0.weight"], w[p + "mlp.0.bias"]))  # nn.GELU(): exact erf
        x = x + F.linear(h, w[p + "mlp.2.weight"], w[p + "mlp.2.bias"])
    return x


def _official_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """Official `CLIPModel.visual` preprocessing, image by image as it loops over its list."""
    out = []
    for img in images:  # [3, H, W] in [-1, 1]
        video = img[:, None]  # [3, 1, H, W]: the official input is a list of [C, T, H, W]
        x = F.interpolate(video.transpose(0, 1), size=(size, size), mode="bicubic", align_corners=False)
        x = x.mul(0.5).add(0.5)
        out.append((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    return torch.cat(out)


@pytest.mark.parametrize("dim,heads,pass_heads", [(160, 2, False), (32, 4, True)])
def test_wan_pth_matches_transformers_and_official(tmp_path, dim, heads, pass_heads):
    hf = _hf_model(dim, heads)
    wan_sd = _to_wan_layout(_tower_sd(hf))
    path = tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    torch.save(wan_sd, path)

    enc = load_image_encoder(path, dtype=torch.float32, device="cpu", num_heads=heads if pass_heads else None)
    assert enc.config == ImageEncoderConfig(
        dim=dim, ffn_dim=2 * dim, num_heads=heads, num_layers=3, num_layers_used=2, image_size=42, patch_size=14
    )
    assert len(enc.tower.encoder.layers) == 2  # the last block is neither loaded nor run

    torch.manual_seed(1)
    images = torch.rand(2, 3, 50, 37) * 2 - 1
    ours = enc.encode(images)
    assert ours.shape == (2, 10, dim) and ours.dtype == torch.float32

    pixels = _official_preprocess(images, 42)
    with torch.no_grad():
        ref_hf = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        ref_official = _official_visual(wan_sd, pixels, heads)
    assert _rel(ours, ref_hf) <= 1e-5, _rel(ours, ref_hf)
    assert _rel(ours, ref_official) <= 1e-5, _rel(ours, ref_official)
    # not the last block's output (the DiT would get the wrong features)
    with torch.no_grad():
        assert _rel(ours, hf(pixel_values=pixels).last_hidden_state) > 1e-2


def test_preprocess_matches_official_recipe():
    torch.manual_seed(2)
    images = torch.rand(3, 3, 61, 90) * 2 - 1
    ours = preprocess_images(images, 42)
    ref = _official_preprocess(images, 42)
    assert ours.shape == (3, 3, 42, 42)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)
    # a flat grey image in [-1, 1] maps to ((v + 1) / 2 - mean) / std per channel, exactly
    flat = torch.full((1, 3, 20, 30), -0.2)
    expect = (0.4 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(preprocess_images(flat, 42)[0, :, 5, 7], expect, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        preprocess_images(torch.zeros(3, 20, 20), 42)


@pytest.mark.parametrize("prefix", ["", "clip_vision."])
def test_comfyui_layout_matches_wan_layout(tmp_path, prefix):
    hf = _hf_model(160, 2)
    tower = _tower_sd(hf)
    torch.save(_to_wan_layout(tower), tmp_path / "wan.pth")
    comfy = {f"{prefix}vision_model.{k}": v.contiguous() for k, v in tower.items()}
    comfy[f"{prefix}visual_projection.weight"] = torch.randn(24, 160)
    save_file(comfy, tmp_path / "clip_vision_h.safetensors")

    images = torch.rand(1, 3, 42, 42) * 2 - 1
    a = load_image_encoder(tmp_path / "wan.pth", torch.float32).encode(images)
    b = load_image_encoder(tmp_path / "clip_vision_h.safetensors", torch.float32).encode(images)
    assert torch.equal(a, b)


def _in_file_mapping(t: torch.Tensor, path: Path) -> bool:
    """Whether a tensor's data lies in a memory mapping of `path` (Linux /proc/self/maps)."""
    ptr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5] == str(path):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("name", ["c.safetensors", "c.pth"])
def test_from_file_adopts_memory_mapped_tensors(tmp_path, name):
    tower = _tower_sd(_hf_model(160, 2))
    path = tmp_path / name
    if name.endswith(".pth"):
        torch.save(_to_wan_layout(tower), path)
    else:
        save_file({f"vision_model.{k}": v.contiguous() for k, v in tower.items()}, path)
    enc = load_image_encoder(path, torch.float32)
    assert not any(p.is_meta for p in enc.parameters()) and not any(b.is_meta for b in enc.buffers())
    # same dtype on the CPU: every parameter (the split q/k/v included) is the mapped file's data
    assert all(_in_file_mapping(p, path) for p in enc.parameters())
    half = load_image_encoder(path, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.encode(torch.zeros(1, 3, 42, 42)).dtype == torch.bfloat16


def _json_meta(name: str) -> dict[str, torch.Tensor]:
    tensors = json.loads((LAYOUTS / name).read_text())["tensors"]
    return {k: torch.empty(shape, device="meta") for k, shape in tensors.items()}


def test_key_maps_cover_the_real_checkpoints():
    wan = _json_meta("clip_xlm_roberta_vit_h_14_wan.json")
    comfy = _json_meta("clip_vision_h_transformers.json")
    assert detect_layout(wan.keys()) == ("wan", "")
    assert detect_layout(comfy.keys()) == ("transformers", "vision_model.")

    got_wan = {k: tuple(v.shape) for k, v in convert_clip_vision(wan).items()}
    got_comfy = {k: tuple(v.shape) for k, v in convert_clip_vision(comfy).items()}

    # what a full-size transformers CLIPVisionModel (32 blocks, final norm) holds
    cfg = CLIPVisionConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14
    )
    with torch.device("meta"):
        full = CLIPVisionModel(cfg)
    full_sd = getattr(full, "vision_model", full).state_dict()
    expected = {k: tuple(v.shape) for k, v in full_sd.items() if not k.endswith("position_ids")}

    assert got_wan == expected
    assert got_comfy == expected
    # stated explicitly: what each file holds beyond the vision tower, left out by the maps
    wan_left = {k for k in wan if not k.startswith("visual.")} | set(WAN_UNUSED)
    assert {k for k in wan_left if not k.startswith("textual.")} == {"log_scale", "visual.head"}
    assert len(got_wan) == len(wan) - len(wan_left) + 2 * (2 * 32)  # 32 fused qkv weights + biases, 1 -> 3 each
    assert set(comfy) - {f"vision_model.{k}" for k in got_comfy} == {"visual_projection.weight"}

    # full-size config read off the shapes; the encoder runs 31 of 32 blocks and drops the final norm
    config = ImageEncoderConfig.from_state_dict(convert_clip_vision(wan))
    assert config == ImageEncoderConfig()  # 1280 wide, 16 heads, 5120 ffn, 224 px, patch 14
    assert config.num_tokens == 257 and config.num_layers_used == 31
    with torch.device("meta"):
        enc = WanImageEncoder(config)
    run = {k: tuple(v.shape) for k, v in enc.tower.state_dict().items()}
    unused = {k for k in expected if k.startswith(("encoder.layers.31.", "post_layernorm."))}
    assert run == {k: s for k, s in expected.items() if k not in unused}
    assert len(unused) == 16 + 2


def test_bad_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_image_encoder(tmp_path / "missing.pth")

    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_image_encoder(tmp_path / "junk.safetensors")

    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)}, tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match="not a CLIP vision checkpoint"):
        load_image_encoder(tmp_path / "dit.safetensors")

    wan = _to_wan_layout(_tower_sd(_hf_model(160, 2)))
    broken = {k: v for k, v in wan.items() if k != "visual.transformer.1.mlp.0.bias"}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing \['encoder\.layers\.1\.mlp\.fc1\.bias'\]"):
        load_image_encoder(tmp_path / "broken.pth")

    odd = dict(wan, **{"visual.pos_embedding": torch.zeros(1, 11, 160)})
    torch.save(odd, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="not 1 \\+ a square grid"):
        load_image_encoder(tmp_path / "odd.pth")

    torch.save(dict(wan, **{"visual.transformer.0.attn.extra.weight": torch.zeros(2)}), tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unknown key"):
        load_image_encoder(tmp_path / "extra.pth")

    with pytest.raises(CheckpointError, match="pass num_heads"):
        ImageEncoderConfig.from_state_dict(convert_clip_vision(_to_wan_layout(_tower_sd(_hf_model(32, 4)))))
