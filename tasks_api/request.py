"""A LightX2V task request body -> a checked `TaskRequest`, without touching the disk.

The fields and their defaults are those of LightX2V's `VideoTaskRequest` (lightx2v/server/
schema.py). Fields this server honours are type-checked (a wrong type is a 400 with a message);
LightX2V fields it has no use for, and unknown fields, are ignored with a warning, as a pydantic
model ignores extra fields. `null` counts as "not given".

Paths are confined to ComfyUI's folders, because the request comes from the network:
- `save_result_path`: relative to ComfyUI's output folder (`./x.mp4`, `sub/x.mp4`), or absolute
  inside it; `.mp4` or no suffix (then `.mp4` is added); empty -> `<task_id>.mp4`.
- `image_path`: a file relative to ComfyUI's input folder (or absolute inside it), or the image
  itself base64-encoded (raw, as LightX2V's `post_i2v.py` sends it, or a `data:image/...;base64,`
  URL), which is written to `input/tasks_api/<task_id>.<ext>` when the task is queued. URLs are
  refused (this server fetches nothing from the network): upload with ComfyUI's `/upload/image`
  and pass the name.
Both are resolved with symlinks followed, so neither `..`, an absolute path nor a symlink can leave
the folder.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
import secrets
import string
from dataclasses import dataclass, field

UPLOAD_SUBFOLDER = "tasks_api"  # in ComfyUI's input folder: base64 images sent with a request
SEED_MAX = 2**64 - 1  # WanSampler's seed range
RANDOM_SEED_MAX = 2**32 - 1  # LightX2V draws random seeds in [0, 2**32 - 1]
MAX_FRAMES = 1025
MAX_SIDE = 4096
MAX_STEPS = 1000
# a prompt is cut to 512 umT5 tokens (a few thousand characters); far longer text is a mistake or an attack
MAX_PROMPT_CHARS = 20_000
# request bodies: JSON with at most one base64 image (env WAN_TASKS_MAX_BODY_MB overrides)
MAX_BODY_BYTES = 64 * 2**20

# LightX2V request fields without an effect here, with LightX2V's defaults: a value other than the
# default gets a warning (video requests; the image-only ones come with /v1/tasks/image/).
IGNORED_FIELDS = {
    "use_prompt_enhancer": False,
    "last_frame_path": "",
    "image_mask_path": "",
    "presigned_url": "",
    "reuse": False,
    "num_fragments": 1,
    "video_path": "",
    "sr_ratio": 2.0,
    "audio_path": "",
    "video_duration": 5,
    "talk_objects": None,
    "target_fps": 16,
    "resize_mode": "adaptive",
    "data_bootstrap_room": None,
    "disagg_phase1_receiver_engine_rank": None,
    "disagg_bootstrap_room": None,
    "disagg_decoder_bootstrap_room": None,
}
HONOURED_FIELDS = (
    "task_id",
    "prompt",
    "negative_prompt",
    "image_path",
    "save_result_path",
    "seed",
    "infer_steps",
    "target_video_length",
    "target_shape",
    "lora_name",
    "lora_strength",
)

_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# ComfyUI's LoadImage reads "name [output]" / "name [temp]" from other folders: never pass one
_ANNOTATED = re.compile(r"\s\[(input|output|temp)\]$")
_IMAGE_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpg", b"GIF87a": "gif", b"GIF89a": "gif"}
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


class RequestError(Exception):
    """A request this server refuses: `status` is the HTTP status, the message its `detail`."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class ImageInput:
    """The I2V start image: a file already in the input folder, or decoded base64 bytes to write."""

    name: str  # path relative to ComfyUI's input folder, '/'-separated (what LoadImage takes)
    data: bytes | None = None  # set for a base64 image: written to `name` when the task is queued


@dataclass
class TaskRequest:
    """A checked request. `None` means "keep the template's value"."""

    task_id: str
    prompt: str
    seed: int
    seed_given: bool
    save_result_path: str  # as sent (or the task id), echoed back while the task is not finished
    output: str  # the video's path relative to ComfyUI's output folder, '/'-separated, ends in .mp4
    negative_prompt: str | None = None
    image: ImageInput | None = None
    infer_steps: int | None = None
    target_video_length: int | None = None
    target_shape: tuple[int, int] | None = None  # (height, width), as LightX2V
    lora_name: str | None = None
    lora_strength: float | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def task(self) -> str:
        """The template kind: "i2v" when a start image is given, else "t2v"."""
        return "i2v" if self.image is not None else "t2v"


def new_task_id() -> str:
    """A task id in LightX2V's format: five groups of four upper-case letters or digits."""
    chars = string.ascii_uppercase + string.digits
    return "-".join("".join(secrets.choice(chars) for _ in range(4)) for _ in range(5))


# ---------------------------------------------------------------------------------------------
# field types


def _str(body: dict, name: str) -> str | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise RequestError(400, f"{name} must be a string, got {type(v).__name__} {v!r:.80}")
    return v


def _int(body: dict, name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise RequestError(400, f"{name} must be an integer, got {type(v).__name__} {v!r:.80}")
    if not lo <= v <= hi:
        raise RequestError(400, f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def _float(body: dict, name: str, lo: float, hi: float) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise RequestError(400, f"{name} must be a number, got {type(v).__name__} {v!r:.80}")
    if not lo <= v <= hi:
        raise RequestError(400, f"{name} must be in [{lo}, {hi}], got {v}")
    return float(v)


def _target_shape(body: dict) -> tuple[int, int] | None:
    v = body.get("target_shape")
    if v is None or v == []:
        return None  # LightX2V's default [] means "the configured size"
    if not isinstance(v, list) or len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise RequestError(400, f"target_shape must be [height, width] (two integers), got {v!r:.80}")
    h, w = v
    if not (16 <= h <= MAX_SIDE and 16 <= w <= MAX_SIDE) or h % 16 or w % 16:
        raise RequestError(400, f"target_shape [height, width] must be multiples of 16 in [16, {MAX_SIDE}], got {v}")
    return h, w


# ---------------------------------------------------------------------------------------------
# paths


def confine(path: str, root: str, what: str, folder: str) -> str:
    """`path` (relative to `root`, or absolute) -> its real absolute path, which must lie in `root`."""
    if "\x00" in path or "\\" in path:
        raise RequestError(400, f"{what} {path!r:.200}: NUL and backslash are not allowed (use '/')")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path):
        raise RequestError(
            400, f"{what} {path!r:.200}: URLs are not accepted, give a path in ComfyUI's {folder} folder"
        )
    root_real = os.path.realpath(root)
    real = os.path.realpath(path if os.path.isabs(path) else os.path.join(root_real, path))
    if real == root_real or os.path.commonpath([root_real, real]) != root_real:
        raise RequestError(
            400, f"{what} {path!r:.200} points outside ComfyUI's {folder} folder (no '..', no absolute paths elsewhere)"
        )
    return real


def output_path(save_result_path: str, task_id: str, output_dir: str) -> str:
    """The video's path relative to the output folder ('/'-separated), from `save_result_path`."""
    wanted = save_result_path or task_id
    if wanted.endswith("/"):
        raise RequestError(400, f"save_result_path {save_result_path!r:.200} names a folder, not a file")
    real = confine(wanted, output_dir, "save_result_path", "output")
    stem, ext = os.path.splitext(real)
    if ext.lower() not in ("", ".mp4"):
        raise RequestError(400, f"save_result_path {save_result_path!r:.200}: this server writes .mp4 videos only")
    real = stem + ".mp4" if not ext else real
    if os.path.isdir(real):
        raise RequestError(400, f"save_result_path {save_result_path!r:.200} is an existing folder")
    return os.path.relpath(real, os.path.realpath(output_dir)).replace(os.sep, "/")


def decode_base64_image(text: str) -> tuple[bytes, str] | None:
    """(bytes, extension) if `text` is a base64 image (data URL or raw, as LightX2V detects it), else None."""
    m = _DATA_URL.match(text)
    payload = text[m.end() :] if m else text
    if not m and (len(text) < 16 or len(text) % 4):
        return None
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        if m:
            raise RequestError(400, "image_path: the data URL does not hold valid base64") from None
        return None
    ext = next((e for sig, e in _IMAGE_SIGNATURES.items() if data.startswith(sig)), None)
    if ext is None and len(data) > 12 and data[8:12] == b"WEBP":
        ext = "webp"
    if ext is None:
        if m:
            raise RequestError(400, "image_path: the data URL does not hold a PNG, JPEG, GIF or WEBP image")
        return None
    return data, ext


def _bomb(e: Exception, shown: str) -> RequestError:
    return RequestError(400, f"image_path {shown}: the image is too large ({e})")


def _check_image_bytes(data: bytes) -> None:
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over PIL's limit: refused, not warned
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb(e, "(base64 data)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise RequestError(400, f"image_path: the base64 data is not a readable image ({e})") from None


def _check_image_file(path: str, shown: str) -> None:
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path):
                pass
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb(e, repr(shown)[:200]) from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise RequestError(400, f"image_path {shown!r:.200} is not a readable image ({type(e).__name__})") from None


def max_body_bytes() -> int:
    """The body size limit: WAN_TASKS_MAX_BODY_MB (megabytes) if set to a positive number, else MAX_BODY_BYTES."""
    raw = os.environ.get("WAN_TASKS_MAX_BODY_MB", "")
    try:
        return int(float(raw) * 2**20) if raw and float(raw) > 0 else MAX_BODY_BYTES
    except ValueError:
        return MAX_BODY_BYTES


def parse_body(raw: bytes, limit: int | None = None) -> object:
    """The bytes of a request body -> its JSON value; RequestError 413 over the size limit, 400 if not JSON."""
    limit = max_body_bytes() if limit is None else limit
    if len(raw) > limit:
        raise body_too_large(len(raw), limit)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise RequestError(400, "the request body must be JSON (UTF-8)") from None


def body_too_large(size: int | None, limit: int) -> RequestError:
    got = f"{size / 2**20:.1f} MB" if size is not None else "more"
    return RequestError(
        413, f"the request body is {got}; at most {limit / 2**20:.0f} MB is accepted (a larger image: upload it "
        "with ComfyUI's /upload/image and pass its name as image_path)",
    )  # fmt: skip


def image_input(image_path: str, task_id: str, input_dir: str) -> ImageInput:
    """`image_path` -> the LoadImage name (checked to exist) or base64 bytes to be written."""
    decoded = decode_base64_image(image_path)
    if decoded is not None:
        data, ext = decoded
        _check_image_bytes(data)
        return ImageInput(name=f"{UPLOAD_SUBFOLDER}/{task_id}.{ext}", data=data)
    if _ANNOTATED.search(image_path):
        raise RequestError(400, f"image_path {image_path!r:.200}: folder annotations like ' [output]' are not accepted")
    real = confine(image_path, input_dir, "image_path", "input")
    if not os.path.isfile(real):
        raise RequestError(400, f"image_path {image_path!r:.200} not found in ComfyUI's input folder")
    _check_image_file(real, image_path)
    return ImageInput(name=os.path.relpath(real, os.path.realpath(input_dir)).replace(os.sep, "/"))


# ---------------------------------------------------------------------------------------------
# the whole body


def parse_request(
    body: object,
    *,
    input_dir: str,
    output_dir: str,
    lora_names: list[str] | None = None,
    task_id: str | None = None,
) -> TaskRequest:
    """Check a `POST /v1/tasks/video/` body; raises RequestError (400) with a message. Writes nothing.

    `lora_names`: the files in ComfyUI's loras folder (None: not checked). `task_id`: the id to use
    when the body has none (default: a new random one).
    """
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    warnings = []
    for name in body:
        if name in IGNORED_FIELDS:
            if body[name] not in (None, IGNORED_FIELDS[name]):
                warnings.append(f"{name} is not supported by this server and was ignored")
        elif name not in HONOURED_FIELDS:
            warnings.append(f"unknown field {name!r} ignored")

    given_id = _str(body, "task_id")
    if given_id is not None and not _TASK_ID.match(given_id):
        raise RequestError(400, f"task_id must be 1-64 letters, digits, '-' or '_', got {given_id!r:.80}")
    tid = given_id or task_id or new_task_id()

    seed = _int(body, "seed", 0, SEED_MAX)
    steps = _int(body, "infer_steps", 1, MAX_STEPS)
    frames = _int(body, "target_video_length", 1, MAX_FRAMES)
    if frames is not None and (frames - 1) % 4:
        raise RequestError(400, f"target_video_length must be 4n+1 (e.g. 81), got {frames}")
    shape = _target_shape(body)
    lora_name = _str(body, "lora_name") or None
    lora_strength = _float(body, "lora_strength", -10.0, 10.0)
    if lora_name is not None and lora_names is not None and lora_name not in lora_names:
        raise RequestError(400, f"lora_name {lora_name!r:.200} not found in ComfyUI's loras folder")
    prompt = _str(body, "prompt") or ""
    negative = _str(body, "negative_prompt")
    for name, text in (("prompt", prompt), ("negative_prompt", negative or "")):
        if len(text) > MAX_PROMPT_CHARS:
            raise RequestError(
                400, f"{name} is {len(text):,} characters; at most {MAX_PROMPT_CHARS:,} are accepted "
                "(the text encoder reads the first 512 tokens, a few thousand characters)",
            )  # fmt: skip
    save = _str(body, "save_result_path") or ""
    image_path = _str(body, "image_path") or ""

    # paths last: every cheap check above has passed, and nothing is written here
    out = output_path(save, tid, output_dir)
    image = image_input(image_path, tid, input_dir) if image_path else None
    return TaskRequest(
        task_id=tid,
        prompt=prompt,
        seed=seed if seed is not None else secrets.randbelow(RANDOM_SEED_MAX + 1),
        seed_given=seed is not None,
        save_result_path=save or tid,
        output=out,
        negative_prompt=negative,
        image=image,
        infer_steps=steps,
        target_video_length=frames,
        target_shape=shape,
        lora_name=lora_name,
        lora_strength=lora_strength,
        warnings=warnings,
    )
