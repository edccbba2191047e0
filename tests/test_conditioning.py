"""I2V conditioning against the official `wan/image2video.py` recipe, written out here independently
with the official operations (numpy sqrt and float floor divisions, the mask built by
repeat_interleave / view / transpose), and the data flow into the VAE and CLIP checked with
recording stand-ins (the real encoders are compared with their references elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wan_core.models.conditioning import fit_to_area, i2v_mask, image_to_tensor, load_image, prepare_i2v, resize_image

AREA_480P = 480 * 832
AREA_720P = 720 * 1280


def official_lat_hw(h: int, w: int, max_area: int) -> tuple[int, int]:
    aspect_ratio = h / w
    lat_h = round(np.sqrt(max_area * aspect_ratio) // 8 // 2 * 2)
    lat_w = round(np.sqrt(max_area / aspect_ratio) // 8 // 2 * 2)
    return lat_h, lat_w


def official_mask(frames: int, lat_h: int, lat_w: int) -> torch.Tensor:
    msk = torch.ones(1, frames, lat_h, lat_w)
    msk[:, 1:] = 0
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)
    return msk.transpose(1, 2)[0]


@pytest.mark.parametrize("area", [AREA_480P, AREA_720P])
def test_fit_to_area_equals_official(area):
    sizes = [(480, 832), (720, 1280), (832, 480), (1024, 1024), (480, 640), (1080, 1920), (333, 1000), (1500, 701)]
    sizes += [(int(h), int(w)) for h, w in np.random.RandomState(0).randint(64, 4000, size=(200, 2))]
    for h, w in sizes:
        assert fit_to_area(h, w, area) == official_lat_hw(h, w, area), (h, w)
    # 720P 16:9 gives 720x1280. At 480P an 832x480 image gives 464x832, not 480x832: in floats
    # sqrt(399360 * (480 / 832)) = 479.99999999999994, so // 8 gives 59, and // 2 * 2 gives 58.
    # The official code and LightX2V compute exactly this; so do we.
    assert fit_to_area(480, 832, AREA_480P) == (58, 104)
    assert fit_to_area(720, 1280, AREA_720P) == (90, 160)
    assert fit_to_area(480, 640, AREA_480P) == (68, 90)


def test_fit_to_area_rejects_degenerate_images():
    with pytest.raises(ValueError, match="aspect ratio"):
        fit_to_area(10, 100000, AREA_480P)
    with pytest.raises(ValueError, match="positive"):
        fit_to_area(0, 10, AREA_480P)


@pytest.mark.parametrize("frames", [1, 5, 17, 81])
def test_mask_equals_official(frames):
    m = i2v_mask(frames, 6, 10)
    assert m.shape == (4, (frames - 1) // 4 + 1, 6, 10)
    assert torch.equal(m, official_mask(frames, 6, 10))
    assert m[:, 0].eq(1).all() and m[:, 1:].eq(0).all()
    with pytest.raises(ValueError, match="4n\\+1"):
        i2v_mask(frames + 1, 6, 10)


def test_image_to_tensor_is_to_tensor_arithmetic(tmp_path):
    from PIL import Image

    arr = (np.random.RandomState(1).rand(7, 9, 3) * 255).astype(np.uint8)
    expect = torch.from_numpy(arr.astype(np.float32) / 255).permute(2, 0, 1).sub(0.5).div(0.5)
    assert torch.equal(image_to_tensor(arr), expect)
    assert torch.equal(image_to_tensor(Image.fromarray(arr)), expect)
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr).convert("L").save(tmp_path / "gray.png")  # grey images become RGB
    assert torch.equal(load_image(tmp_path / "a.png"), expect)
    assert load_image(tmp_path / "gray.png").shape == (3, 7, 9)
    with pytest.raises(FileNotFoundError, match="input image not found: .*missing.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(tmp_path / "bad.png")


class _RecordingVAE:
    """Stands in for WanVAE.encode: records its input, returns a latent that encodes it recognisably."""

    dtype, device = torch.float32, torch.device("cpu")  # where the clip is built (WanVAE's properties)

    def encode(self, video):
        self.video = video.clone()
        b, _, t, h, w = video.shape
        # latent frame k = mean of its video frames, spread over 16 channels, at 1/8 size
        pooled = F.avg_pool3d(F.pad(video.float(), (0, 0, 0, 0, 3, 0), mode="replicate"), (4, 8, 8))  # [B, 3, F_lat, h, w]
        return pooled.repeat(1, 6, 1, 1, 1)[:, :16]


class _RecordingCLIP:
    def encode(self, images):
        self.images = images.clone()
        return torch.full((images.shape[0], 257, 1280), 0.5)


@pytest.mark.parametrize("area,size", [(AREA_480P, (300, 400)), (AREA_720P, (720, 1280))])
def test_prepare_i2v_follows_the_official_data_flow(area, size):
    h0, w0 = size
    img = torch.rand(3, h0, w0) * 2 - 1
    vae, clip = _RecordingVAE(), _RecordingCLIP()
    cond = prepare_i2v(img, vae, clip, frames=9, max_area=area)
    lat_h, lat_w = official_lat_hw(h0, w0, area)
    assert (cond.height, cond.width) == (8 * lat_h, 8 * lat_w)
    # CLIP sees the original image
    assert torch.equal(clip.images, img[None])
    # the VAE sees [bicubic-resized image, 8 zero frames]
    expect_first = F.interpolate(img[None], size=(8 * lat_h, 8 * lat_w), mode="bicubic", align_corners=False)[0]
    assert vae.video.shape == (1, 3, 9, 8 * lat_h, 8 * lat_w)
    assert torch.equal(vae.video[0, :, 0], expect_first)
    assert torch.equal(resize_image(img, 8 * lat_h, 8 * lat_w), expect_first)
    assert vae.video[0, :, 1:].eq(0).all()
    # y = [mask, latent]
    assert cond.y.shape == (1, 20, 3, lat_h, lat_w)
    assert torch.equal(cond.y[0, :4], official_mask(9, lat_h, lat_w))
    assert torch.equal(cond.y[0, 4:], vae.encode(vae.video)[0])
    assert cond.clip_fea.shape == (1, 257, 1280)


def test_first_frame_clip_is_built_in_the_vaes_dtype():
    """The clip goes to the VAE in its dtype (a bf16 VAE gets bf16 frames: the first one the image
    rounded once, the rest exact zeros), not as a float32 copy converted chunk by chunk."""
    from wan_core.models.conditioning import encode_first_frame

    vae = _RecordingVAE()
    vae.dtype = torch.bfloat16
    image = torch.rand(3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    encode_first_frame(vae, image, frames=5)
    assert vae.video.dtype == torch.bfloat16 and vae.video.shape == (1, 3, 5, 16, 24)
    assert torch.equal(vae.video[0, :, 0], image.bfloat16()) and vae.video[0, :, 1:].eq(0).all()
