"""Images that remember how they were made: the generation parameters in each PNG's text chunks.

Every image ``ddpm-jax txt2img/img2img --model`` writes is a PNG of its own whose text chunks hold what made it,
so that the file alone is enough to make it again (``ddpm-jax txt2img --from-png image.png``):

- one chunk per parameter — ``prompt``, ``negative_prompt``, ``seed``, ``steps``, ``guidance_scale``,
  ``scheduler``, ``height``, ``width``, ``model``, ``loras``, … — readable with ``PIL.Image.open(path).text``;
- ``parameters``: the same in AUTOMATIC1111's one-chunk format (``prompt⏎Negative prompt: …⏎Steps: 50, Sampler:
  DDIM, CFG scale: 7.5, Seed: 3, Size: 512x512, Model: …``), which image browsers and model sites read;
- ``ddpm_jax``: the whole :class:`Generation` as JSON, what :func:`read_generation` reads back, types kept.

A seed belongs to one image: image b of a call with ``seed`` is made from seed + b alone
(``pipelines/stable_diffusion.image_keys``), so the file records seed + b, and a re-run of that one seed, in a
batch of any size, gives the same image.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from ddpm_jax.plotting import to_uint8

FORMAT = "ddpm_jax.generation/1"      # the JSON chunk's "format": bumped if a field changes meaning

# Our scheduler names → the sampler names AUTOMATIC1111 writes (what other tools parse in "parameters").
A1111_SAMPLERS = {"ddim": "DDIM", "pndm": "PLMS", "euler": "Euler", "euler_ancestral": "Euler a",
                  "dpmsolver++": "DPM++ 2M", "ddpm": "DDPM"}


@dataclasses.dataclass(frozen=True)
class Generation:
    """What made one image: enough to make it again (with the same weights and LoRA files).

    ``loras``: (file, scale) pairs in load order. ``mode``: "txt2img", "img2img" or "inpaint"; ``image``,
    ``mask`` and ``strength``: img2img's / inpainting's source image, mask and strength (None for txt2img).
    ``refiner`` and ``high_noise_frac``: SDXL base → refiner.
    ``prompt_2`` and ``negative_prompt_2``: SDXL's second text encoder's texts, when they differ from the first's
    (AUTOMATIC1111 has no field for them: "parameters" holds the first's only).
    """

    prompt: str
    seed: int
    steps: int
    guidance_scale: float
    scheduler: str
    height: int
    width: int
    negative_prompt: str | None = None
    model: str | None = None
    loras: tuple[tuple[str, float], ...] = ()
    guidance_rescale: float = 0.0
    mode: str = "txt2img"
    image: str | None = None
    mask: str | None = None
    strength: float | None = None
    refiner: str | None = None
    high_noise_frac: float | None = None
    prompt_2: str | None = None
    negative_prompt_2: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "loras", tuple((str(f), float(s)) for f, s in self.loras))

    def text_chunks(self) -> dict[str, str]:
        """{chunk keyword: text}: one per parameter that is set, "parameters" (A1111) and "ddpm_jax" (JSON)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and v != ()}
        chunks = {k: (json.dumps(v) if isinstance(v, (list, tuple)) else str(v)) for k, v in fields.items()}
        chunks["parameters"] = self.a1111_parameters()
        chunks["ddpm_jax"] = json.dumps({"format": FORMAT, **dataclasses.asdict(self)})
        return chunks

    def a1111_parameters(self) -> str:
        """The AUTOMATIC1111 "parameters" text: prompt, negative prompt, then "Key: value" pairs on one line."""
        lines = [self.prompt + "".join(f" <lora:{Path(f).stem}:{s:g}>" for f, s in self.loras)]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        pairs = {"Steps": self.steps, "Sampler": A1111_SAMPLERS.get(self.scheduler, self.scheduler),
                 "CFG scale": f"{self.guidance_scale:g}", "Seed": self.seed, "Size": f"{self.width}x{self.height}",
                 "Model": Path(self.model).name if self.model else None,
                 "Denoising strength": self.strength,
                 "CFG Rescale phi": f"{self.guidance_rescale:g}" if self.guidance_rescale else None}
        lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items() if v is not None))
        return "\n".join(lines)

    @classmethod
    def from_json(cls, text: str, where: str = "the ddpm_jax chunk") -> Generation:
        record = json.loads(text)
        if record.pop("format", None) != FORMAT:
            raise ValueError(f"{where}: not a {FORMAT} record; it was written by another version or program")
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(record) - known):
            raise ValueError(f"{where}: unknown fields {', '.join(unknown)} (written by a newer ddpm_jax?)")
        return cls(**record)


def save_png(image: Any, path: str | Path, generation: Generation) -> Path:
    """One image [H, W, C] in [−1, 1] as a PNG at ``path`` whose text chunks record ``generation``."""
    info = PngImagePlugin.PngInfo()
    for keyword, text in generation.text_chunks().items():
        info.add_itxt(keyword, text)                          # iTXt: UTF-8, so any prompt fits
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(np.asarray(image)[None])[0]             # [H, W, C] uint8
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path, pnginfo=info)
    return path


def read_generation(path: str | Path) -> Generation:
    """The :class:`Generation` recorded in a PNG written by :func:`save_png` (``--from-png``)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--from-png {path}: no such file")
    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}))
    except OSError as err:
        raise ValueError(f"--from-png {path}: not an image ({err})") from None
    if "ddpm_jax" not in text:
        raise ValueError(f"--from-png {path}: the PNG holds no ddpm_jax generation record (text chunks: "
                         f"{', '.join(sorted(text)) or 'none'}); only images written by ddpm-jax txt2img/img2img have one")
    return Generation.from_json(text["ddpm_jax"], f"--from-png {path}")


def per_image(values: Sequence[Any] | None, num_per_prompt: int) -> list[Any] | None:
    """[a, b] → [a, a, b, b] for two images per prompt: the order of a batch of ``num_per_prompt`` images each
    (None stays None: no negative prompts)."""
    if not isinstance(num_per_prompt, int) or num_per_prompt < 1:
        raise ValueError(f"--num-images-per-prompt must be a positive integer, got {num_per_prompt!r}")
    if values is None:
        return None
    return [v for v in values for _ in range(num_per_prompt)]
