#!/usr/bin/env python3
"""Generates the `vqt-parity/1` fixtures under fixtures/ from the PyTorch reference stack.

Needs torch, timm, transformers, safetensors, numpy (CPU is enough):
    python3 -m venv .venv && .venv/bin/pip install torch timm transformers safetensors numpy
    .venv/bin/python tools/gen_fixtures.py fixtures/

Never run in CI: the fixtures it writes are committed. Each fixture is a small random-initialised
model, an input batch, and the tensors the reference produced for it (eval mode, f32).

  tiny-b  timm ViT with LayerScale, no qkv bias, MLP ratio 2, saved as a nested `.pth`
          ({"model": state_dict}), trained grid 6x6 loaded at 8x8 (timm resamples the position
          table with antialiased bicubic via checkpoint_filter_fn).
  tiny-c  the same kind of ViT exported to a Google JAX `.npz` (ViT-B_16.npz layout); timm's own
          `_load_weights` reads it back and must reproduce the source model before we use it.
  tiny-d  HuggingFace Dinov2Model (LayerScale, eps 1e-6), model.safetensors; expected values from
          transformers' hidden states.
  tiny-e  HuggingFace ViTModel (layernorm_before/after naming, eps 1e-12), model.safetensors.
"""
import json
import os
import sys

import numpy as np
import safetensors.torch as st
import timm
import torch

TOL = 1e-4


def seed(n):
    torch.manual_seed(n)
    np.random.seed(n)


def randomize_(model, std=0.2):
    """Random non-trivial values everywhere (LayerNorm affine and LayerScale included), so a
    transposed or misplaced tensor cannot go unnoticed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm.weight") \
                    or "layernorm" in name and name.endswith("weight") or name.endswith("layernorm_before.weight") \
                    or name.endswith("layernorm_after.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "ls1" in name or "ls2" in name or "lambda1" in name:
                p.copy_(0.5 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))


def write(dirpath, manifest, ckpt_writer, inputs, expected):
    os.makedirs(dirpath, exist_ok=True)
    ckpt_writer(os.path.join(dirpath, manifest["checkpoint"]["file"]))
    st.save_file({k: v.contiguous() for k, v in inputs.items()}, os.path.join(dirpath, "inputs.safetensors"))
    st.save_file({k: v.contiguous().float() for k, v in expected.items()}, os.path.join(dirpath, "expected.safetensors"))
    manifest["generator"] = f"timm {timm.__version__}, torch {torch.__version__}, tools/gen_fixtures.py"
    with open(os.path.join(dirpath, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    print("wrote", dirpath)


def timm_trace(model, x):
    """Per-block outputs, final normalised class token, logits (if a head exists)."""
    out = {}
    z = model.patch_embed(x)
    z = model._pos_embed(z)
    z = model.norm_pre(z)
    for i, blk in enumerate(model.blocks):
        z = blk(z)
        out[f"vit.block.{i}"] = z
    z = model.norm(z)
    out["vit.cls"] = z[:, 0]
    if model.num_classes:
        out["vit.logits"] = model.head(z[:, 0])
        ref = model(x)
        assert torch.allclose(ref, out["vit.logits"], atol=1e-6), "trace disagrees with model(x)"
    return out


def model_manifest(img, patch, dim, depth, heads, mlp_ratio, qkv_bias, eps, classes, ls=None):
    m = {"img_size": img, "patch_size": patch, "in_chans": 3, "embed_dim": dim, "depth": depth,
         "num_heads": heads, "mlp_ratio": mlp_ratio, "qkv_bias": qkv_bias, "class_token": True,
         "layer_norm_eps": eps, "num_classes": classes}
    if ls is not None:
        m["layer_scale_init"] = ls
    return m


def vit_check(expected):
    return {"vit": {"file": "expected.safetensors", "tensors": list(expected.keys())}}


def tiny_b(root):
    seed(1)
    kw = dict(patch_size=4, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0, qkv_bias=False,
              init_values=0.1, num_classes=7)
    src = timm.models.vision_transformer.VisionTransformer(img_size=24, **kw).eval()
    randomize_(src)
    sd = src.state_dict()
    dst = timm.models.vision_transformer.VisionTransformer(img_size=32, **kw).eval()
    filtered = timm.models.vision_transformer.checkpoint_filter_fn(dict(sd), dst)
    dst.load_state_dict(filtered)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        exp = timm_trace(dst, x)
    man = {"format": "vqt-parity/1",
           "model": model_manifest(32, 4, 48, 3, 3, 2.0, False, 1e-6, 7, ls=0.1),
           "checkpoint": {"file": "vit.pth", "naming": "timm", "pos_resample": "timm-bicubic-antialias"},
           "inputs": {"file": "inputs.safetensors"}, "tolerance": {"abs": TOL}, "checks": vit_check(exp)}
    write(os.path.join(root, "tiny-b"), man, lambda p: torch.save({"model": sd, "epoch": 3}, p),
          {"images": x, "labels": torch.tensor([0, 3, 6])}, exp)


def to_jax_npz(model, path):
    """timm ViT -> Google vit_jax npz (the inverse of timm's _load_weights, formats.md §1.2)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d = model.embed_dim
    h = model.blocks[0].attn.num_heads
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"],
         "cls": sd["cls_token"],
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"],
         "Transformer/encoder_norm/bias": sd["norm.bias"],
         "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"],
         "pre_logits/kernel": np.random.randn(d, d).astype(np.float32),
         "pre_logits/bias": np.zeros(d, np.float32)}
    for i in range(len(model.blocks)):
        b, t = f"Transformer/encoderblock_{i}", f"blocks.{i}"
        w[f"{b}/LayerNorm_0/scale"] = sd[f"{t}.norm1.weight"]
        w[f"{b}/LayerNorm_0/bias"] = sd[f"{t}.norm1.bias"]
        w[f"{b}/LayerNorm_2/scale"] = sd[f"{t}.norm2.weight"]
        w[f"{b}/LayerNorm_2/bias"] = sd[f"{t}.norm2.bias"]
        qkv_w, qkv_b = sd[f"{t}.attn.qkv.weight"], sd[f"{t}.attn.qkv.bias"]
        mha = f"{b}/MultiHeadDotProductAttention_1"
        for j, part in enumerate(["query", "key", "value"]):
            w[f"{mha}/{part}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, h, d // h)
            w[f"{mha}/{part}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(h, d // h)
        w[f"{mha}/out/kernel"] = sd[f"{t}.attn.proj.weight"].T.reshape(h, d // h, d)
        w[f"{mha}/out/bias"] = sd[f"{t}.attn.proj.bias"]
        w[f"{b}/MlpBlock_3/Dense_0/kernel"] = sd[f"{t}.mlp.fc1.weight"].T
        w[f"{b}/MlpBlock_3/Dense_0/bias"] = sd[f"{t}.mlp.fc1.bias"]
        w[f"{b}/MlpBlock_3/Dense_1/kernel"] = sd[f"{t}.mlp.fc2.weight"].T
        w[f"{b}/MlpBlock_3/Dense_1/bias"] = sd[f"{t}.mlp.fc2.bias"]
    np.savez(path, **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in w.items()})


def tiny_c(root):
    seed(2)
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=6)
    src = timm.models.vision_transformer.VisionTransformer(**kw).eval()
    randomize_(src)
    d = os.path.join(root, "tiny-c")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "ViT-tiny.npz")
    to_jax_npz(src, path)
    # timm's own npz loader must reproduce the source model from our file.
    back = timm.models.vision_transformer.VisionTransformer(**kw).eval()
    timm.models.vision_transformer._load_weights(back, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        exp = timm_trace(src, x)
        assert torch.allclose(back(x), exp["vit.logits"], atol=1e-5), "timm reads our npz differently"
    man = {"format": "vqt-parity/1", "model": model_manifest(32, 8, 64, 2, 4, 4.0, True, 1e-6, 6),
           "checkpoint": {"file": "ViT-tiny.npz", "naming": "jax-npz"},
           "inputs": {"file": "inputs.safetensors"}, "tolerance": {"abs": TOL}, "checks": vit_check(exp)}
    # The npz is already written; `write` would rewrite it identically.
    write(d, man, lambda p: None, {"images": x, "labels": torch.tensor([1, 4])}, exp)


def hf_expected(model, x, pixel_key="pixel_values"):
    out = model(**{pixel_key: x}, output_hidden_states=True)
    exp = {}
    # hidden_states[0] is the embedding output; [i+1] is block i's output.
    for i, hs in enumerate(out.hidden_states[1:]):
        exp[f"vit.block.{i}"] = hs
    exp["vit.cls"] = out.last_hidden_state[:, 0]
    return exp


def tiny_d(root):
    from transformers import Dinov2Config, Dinov2Model
    seed(3)
    cfg = Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192,
                       image_size=28, patch_size=7, layer_norm_eps=1e-6, layerscale_value=0.5)
    m = Dinov2Model(cfg).eval()
    randomize_(m)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        exp = hf_expected(m, x)
    man = {"format": "vqt-parity/1", "model": model_manifest(28, 7, 48, 2, 4, 4.0, True, 1e-6, 0, ls=1.0),
           "checkpoint": {"file": "model.safetensors", "naming": "hf-dinov2"},
           "inputs": {"file": "inputs.safetensors"}, "tolerance": {"abs": TOL}, "checks": vit_check(exp)}
    write(os.path.join(root, "tiny-d"), man, lambda p: m.save_pretrained(os.path.dirname(p)),
          {"images": x, "labels": torch.tensor([0, 1])}, exp)
    cfgfile = os.path.join(root, "tiny-d", "config.json")
    if os.path.exists(cfgfile):
        os.remove(cfgfile)


def tiny_e(root):
    from transformers import ViTConfig, ViTModel
    seed(4)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=16, patch_size=4, layer_norm_eps=1e-12)
    m = ViTModel(cfg, add_pooling_layer=True).eval()
    randomize_(m)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        exp = hf_expected(m, x)
    man = {"format": "vqt-parity/1", "model": model_manifest(16, 4, 32, 2, 2, 2.0, True, 1e-12, 0),
           "checkpoint": {"file": "model.safetensors", "naming": "hf-vit"},
           "inputs": {"file": "inputs.safetensors"}, "tolerance": {"abs": TOL}, "checks": vit_check(exp)}
    write(os.path.join(root, "tiny-e"), man, lambda p: m.save_pretrained(os.path.dirname(p)),
          {"images": x, "labels": torch.tensor([0, 1])}, exp)
    cfgfile = os.path.join(root, "tiny-e", "config.json")
    if os.path.exists(cfgfile):
        os.remove(cfgfile)


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else "fixtures"
    torch.set_num_threads(1)
    which = sys.argv[2:] or ["b", "c", "d", "e"]
    for w in which:
        {"b": tiny_b, "c": tiny_c, "d": tiny_d, "e": tiny_e}[w](root)
