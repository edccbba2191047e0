"""Image-to-video conditioning, as the official `wan/image2video.py` prepares it.

The I2V DiT reads two things about the start image besides the text:
- `clip_fea` [1, 257, 1280]: CLIP ViT-H/14 tokens of the image at its *original* size (the image
  encoder resizes it to 224 px itself);
- `y` [1, 20, F, h, w]: 4 mask channels and the 16-channel VAE latent of the clip
  [resized image, F_video - 1 black frames]. The mask is 1 on every video frame the image fixes
  (the first) and 0 elsewhere; the VAE packs the first video frame alone into latent frame 0 and
  each following 4 video frames into one latent frame, so the first frame's mask value is
  repeated 4 times and the per-frame mask folded into 4 channels per latent frame.

The video size comes from the image: the target area `max_area` (target_height x target_width,
e.g. 480 x 832) is kept, the aspect ratio taken from the image, and each side rounded down to a
multiple of vae_stride x patch = 16 pixels, with the official float arithmetic (LightX2V does the
same). So a 480P or 720P run differs only in `max_area`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "I2VCondition",
    "load_image",
    "image_to_tensor",
    "fit_to_area",
    "resize_image",
    "i2v_mask",
    "encode_first_frame",
    "prepare_i2v",
    "TI2VCondition",
    "best_output_size",
    "prepare_ti2v",
]

VAE_STRIDE = (4, 8, 8)  # (time, height, width) compression of the Wan2.1 VAE
PATCH = (1, 2, 2)  # DiT patch size: latent sides must be even


@dataclass
class I2VCondition:
    """What an I2V run is conditioned on (the same for the positive and negative branch)."""

    y: torch.Tensor  # [1, 20, F_lat, lat_h, lat_w] float32: mask (4) + first-frame latent (16)
    clip_fea: torch.Tensor | None  # [1, 257, 1280] CLIP tokens of the original image (None: Wan2.2 I2V-A14B)
    height: int  # video size fixed by the image and the target area
    width: int


def image_to_tensor(image) -> torch.Tensor:
    """A PIL image, a uint8 [H, W, 3] array or a float [3, H, W] tensor in [-1, 1] -> float32 [3, H, W] in [-1, 1].

    For PIL / uint8 input the arithmetic is torchvision's `to_tensor(img).sub_(0.5).div_(0.5)`,
    what both the official code and LightX2V run, so the values are bit-identical.
    """
    import numpy as np

    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be [3, H, W] in [-1, 1], got shape {tuple(image.shape)}")
        return image.float()
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8 [H, W, 3], got {arr.dtype} {arr.shape}")
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)  # [H, W, 3] -> [3, H, W]
    return x.sub_(0.5).div_(0.5)


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as RGB -> float32 [3, H, W] in [-1, 1]; a one-line error if it is missing,
    unreadable, not an image, or a decompression bomb (more pixels than PIL's limit)."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"input image {path!r} is a folder, not an image file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input image not found: {path}")
    try:
        with Image.open(path) as img:
            return image_to_tensor(to_rgb(img))
    except Image.DecompressionBombError as e:
        raise ValueError(f"input image {path!r} is too large to open safely ({e})") from None
    except UnidentifiedImageError:
        raise ValueError(f"input image {path!r} is not a readable image file (PNG, JPEG, WEBP, ...)") from None
    except (OSError, SyntaxError) as e:  # unreadable (permissions) or a truncated / corrupt file
        raise ValueError(f"input image {path!r} cannot be read ({getattr(e, 'strerror', None) or e})") from None


def to_rgb(img):
    """A PIL image -> 8-bit RGB. 16- and 32-bit integer images (16-bit grayscale PNG: mode I;16 or I)
    are scaled from their 0..65535 range: PIL's own convert clips them at 255, a nearly white image."""
    import numpy as np
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img, dtype=np.float64)
        full = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = np.clip(np.round(a / full * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if img.mode == "F":  # float images: 0..1 by convention
        a = np.clip(np.round(np.asarray(img, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    return img.convert("RGB")


def fit_to_area(height: int, width: int, max_area: int) -> tuple[int, int]:
    """Latent (lat_h, lat_w) of a video with the image's aspect ratio and about `max_area` pixels.

    Official rule: lat_h = round(sqrt(max_area * h / w) // 8 // 2 * 2) (float floor divisions),
    likewise lat_w with w / h; the video is then 8 * lat_h by 8 * lat_w pixels.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = height / width
    lat_h = round(math.sqrt(max_area * aspect) // VAE_STRIDE[1] // PATCH[1] * PATCH[1])
    lat_w = round(math.sqrt(max_area / aspect) // VAE_STRIDE[2] // PATCH[2] * PATCH[2])
    if lat_h < PATCH[1] or lat_w < PATCH[2]:
        raise ValueError(
            f"an image of {width}x{height} has too extreme an aspect ratio for a target area of {max_area} pixels "
            f"(the video would be {lat_w * 8}x{lat_h * 8})"
        )
    return lat_h, lat_w


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[3, H, W] -> [3, height, width]: bicubic, align_corners=False, no antialias, on the CPU in float32,
    values not clamped (the cubic overshoot goes to the VAE as the official code sends it)."""
    return F.interpolate(image[None].float().cpu(), size=(height, width), mode="bicubic")[0]


def i2v_mask(frames: int, lat_h: int, lat_w: int, device=None) -> torch.Tensor:
    """The 4-channel frame mask [4, F_lat, lat_h, lat_w]: 1 where the video frame is given (frame 0).

    Per video frame the mask is [1, 0, ..., 0]; frame 0 is repeated 4 times so that the
    frames + 3 entries fold into (F_lat, 4): latent frame k holds video frames 4k-3..4k
    (frame 0 four times for k = 0), and the 4 become the channel dimension.
    """
    if (frames - 1) % VAE_STRIDE[0]:
        raise ValueError(f"frame count must be 4n+1 (e.g. 81), got {frames}")
    per_frame = torch.zeros(frames, lat_h, lat_w, device=device)
    per_frame[0] = 1
    per_frame = torch.cat([per_frame[:1].expand(VAE_STRIDE[0], lat_h, lat_w), per_frame[1:]])  # [F + 3, h, w]
    return per_frame.view(-1, VAE_STRIDE[0], lat_h, lat_w).transpose(0, 1)  # [F_lat, 4, h, w] -> [4, F_lat, h, w]


def encode_first_frame(vae, image: torch.Tensor, frames: int) -> torch.Tensor:
    """VAE latent [16, F_lat, h, w] of the clip [image, frames - 1 black (zero) frames].

    `image` is [3, H, W] in [-1, 1] at the video size. The zero frames are real VAE input: the
    causal encoder carries the first frame's features into every later latent frame. The clip is
    built where the VAE runs, in its dtype (what each chunk becomes on its way in), so that no
    float32 CPU clip costs a CPU pass and a synchronous copy per chunk.
    """
    _, h, w = image.shape
    video = torch.zeros(3, frames, h, w, dtype=vae.dtype, device=vae.device)
    video[:, 0] = image
    return vae.encode(video[None])[0].float()  # [1, 3, F, H, W] -> [16, F_lat, h, w]


def prepare_i2v(image, vae, image_encoder, frames: int, max_area: int) -> I2VCondition:
    """The whole official I2V preparation for one image: size, CLIP tokens, mask and first-frame latent.

    `image`: anything `image_to_tensor` takes; `max_area`: target pixel count (480 * 832 for 480P,
    720 * 1280 for 720P); image_encoder None: no CLIP tokens (Wan2.2 I2V-A14B, same y otherwise).
    """
    img = image_to_tensor(image)
    lat_h, lat_w = fit_to_area(img.shape[1], img.shape[2], max_area)
    height, width = lat_h * VAE_STRIDE[1], lat_w * VAE_STRIDE[2]
    # the original image (the encoder resizes it to 224); Wan2.2 I2V-A14B has no CLIP branch
    clip_fea = image_encoder.encode(img[None]) if image_encoder is not None else None
    latent = encode_first_frame(vae, resize_image(img, height, width), frames)
    mask = i2v_mask(frames, lat_h, lat_w, device=latent.device)
    y = torch.cat([mask, latent])[None]  # [1, 4 + 16, F_lat, lat_h, lat_w]
    return I2VCondition(y=y, clip_fea=clip_fea, height=height, width=width)


@dataclass
class TI2VCondition:
    """TI2V-5B image conditioning: the image's latent, held as latent frame 0 (`sampling.FirstFrame`)."""

    z: torch.Tensor  # [1, 48, 1, oh/16, ow/16] float32
    height: int
    width: int


def best_output_size(w: int, h: int, dw: int, dh: int, expected_area: int) -> tuple[int, int]:
    """(ow, oh): multiples of (dw, dh) within `expected_area`, the aspect closest to w / h
    (official wan/utils/utils.py rule: fit the width first or the height first, keep the better)."""
    ratio = w / h
    ow = (expected_area * ratio) ** 0.5
    oh = expected_area / ow
    ow1 = int(ow // dw * dw)
    oh1 = int(expected_area / ow1 // dh * dh)
    oh2 = int(oh // dh * dh)
    ow2 = int(expected_area / oh2 // dw * dw)
    if min(ow1, oh1, ow2, oh2) <= 0:
        raise ValueError(f"an image of {w}x{h} has too extreme an aspect ratio for a target area of {expected_area} pixels")
    ratio1, ratio2 = ow1 / oh1, ow2 / oh2
    if max(ratio / ratio1, ratio1 / ratio) < max(ratio / ratio2, ratio2 / ratio):
        return ow1, oh1
    return ow2, oh2


def prepare_ti2v(image, vae, max_area: int, multiple: int = 32) -> TI2VCondition:
    """The official TI2V-5B image preparation (wan/textimage2video.py `i2v`): the image LANCZOS-resized
    to cover `best_output_size` (multiples of `multiple` = patch 2 x VAE stride 16) and centre-cropped,
    then encoded alone by the Wan2.2 VAE -> z [1, 48, 1, oh/16, ow/16]."""
    import numpy as np
    from PIL import Image

    if isinstance(image, torch.Tensor):  # [3, H, W] in [-1, 1] -> the PIL image the official code resizes
        arr = image_to_tensor(image).add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
        image = Image.fromarray(arr.numpy())
    elif not hasattr(image, "convert"):
        image = Image.fromarray(np.asarray(image))
    img = to_rgb(image)
    iw, ih = img.width, img.height
    ow, oh = best_output_size(iw, ih, multiple, multiple, max_area)
    scale = max(ow / iw, oh / ih)
    img = img.resize((round(iw * scale), round(ih * scale)), Image.LANCZOS)
    x1, y1 = (img.width - ow) // 2, (img.height - oh) // 2
    img = img.crop((x1, y1, x1 + ow, y1 + oh))
    x = image_to_tensor(img)  # [3, oh, ow] in [-1, 1]
    z = vae.encode(x[:, None][None].to(device=vae.device, dtype=vae.dtype)).float()  # [1, 48, 1, oh/16, ow/16]
    return TI2VCondition(z=z, height=oh, width=ow)
