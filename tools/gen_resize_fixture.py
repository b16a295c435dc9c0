#!/usr/bin/env python3
"""Reference resizes for crates/vqt-core/tests/resize_parity.rs -> fixtures/resize/resize.safetensors.

For each input image (u8, HWC, grey images replicated to RGB first as our pipeline does) and
each output size it stores:
  tf_<name>_<S>      f32 [S,S,3]  tf.image.resize(x, (S,S), "bilinear", antialias=False): half-pixel
                                  centres, no antialias, float output (the VQT/VPT TF recipe).
                                  Made with TensorFlow when it is installed, else with
                                  torch.nn.functional.interpolate(bilinear, align_corners=False,
                                  antialias=False), which computes the same function; `source`
                                  in the metadata says which.
  pil_<name>_<S>     u8  [S,S,3]  PIL Image.resize((S,S), BILINEAR): the antialiased filter of the
                                  timm/torchvision PIL pipelines (rounded to u8 by PIL).
  pilcubic_<name>_<S> u8 [S,S,3]  PIL BICUBIC (SynQT's torchvision Resize((224,224)) on PIL).

Run:  /path/to/python tools/gen_resize_fixture.py [out_dir]   (needs numpy, torch, pillow,
safetensors; tensorflow optional).
"""
import os
import sys

import numpy as np
from PIL import Image
from safetensors.numpy import save_file

out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "fixtures", "resize")
os.makedirs(out_dir, exist_ok=True)
rng = np.random.default_rng(0)


def smooth(h, w, c):
    """A natural-ish image: low-frequency gradients plus noise, so filters differ visibly."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = 127 + 80 * np.sin(x / max(w, 1) * 6.0)[..., None] * np.cos(y / max(h, 1) * 4.0)[..., None]
    img = base + rng.normal(0, 30, size=(h, w, c))
    return np.clip(img, 0, 255).astype(np.uint8)


images = {
    "grey28": np.repeat(smooth(28, 28, 1), 3, axis=2),  # Fashion-MNIST size, replicated grey
    "rgb37x23": smooth(23, 37, 3),  # H=23, W=37: non-square, odd
    "rgb180x120": smooth(120, 180, 3),  # a photo-like image, downscaled
}
sizes = {"grey28": [112, 20], "rgb37x23": [64, 16], "rgb180x120": [96, 56]}

try:
    import tensorflow as tf  # noqa: F401

    def tf_resize(img, s):
        return tf.image.resize(img[None].astype(np.float32), (s, s), method="bilinear", antialias=False).numpy()[0]

    source = f"tensorflow {tf.__version__} tf.image.resize bilinear antialias=False"
except ImportError:
    import torch
    import torch.nn.functional as F

    def tf_resize(img, s):
        t = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None]
        r = F.interpolate(t, size=(s, s), mode="bilinear", align_corners=False, antialias=False)
        return r[0].permute(1, 2, 0).numpy()

    source = f"torch {torch.__version__} interpolate bilinear align_corners=False antialias=False"

tensors = {}
for name, img in images.items():
    tensors[f"in_{name}"] = np.ascontiguousarray(img)
    for s in sizes[name]:
        tensors[f"tf_{name}_{s}"] = np.ascontiguousarray(tf_resize(img, s).astype(np.float32))
        pil = Image.fromarray(img)
        tensors[f"pil_{name}_{s}"] = np.asarray(pil.resize((s, s), Image.BILINEAR))
        tensors[f"pilcubic_{name}_{s}"] = np.asarray(pil.resize((s, s), Image.BICUBIC))

path = os.path.join(out_dir, "resize.safetensors")
save_file(tensors, path, metadata={"tf_source": source, "pillow": Image.__version__ if hasattr(Image, "__version__") else __import__("PIL").__version__})
print(f"wrote {path} ({len(tensors)} tensors; tf reference: {source})")
