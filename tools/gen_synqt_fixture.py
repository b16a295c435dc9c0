#!/usr/bin/env python3
"""SynQT parity fixture from the *official* SynQT code (taolinzhang/SynQT, `synqt.py`).

    .venv/bin/python tools/gen_synqt_fixture.py /path/to/SynQT/synqt.py fixtures/tiny-f

The official module hard-codes ViT-B/16 (width 768, 12 layers, 37 head tokens) and calls
`.cuda()`; a fixture of that size would be hundreds of MB. This script reads the official source
and substitutes only those constants (768 -> D, 12 -> L, 37 -> 1 + 3L), drops `.cuda()` and the
unused IPython import, then runs it unchanged on a tiny random timm ViT in eval mode (every
dropout and drop-path off). The official code is not committed; the fixture it produces is.

It writes a `vqt-parity/1` directory with a `vit` check and a `synqt` check: per-layer Ĥ_i,
F_att_i, F_ffn_i, H_i (token-mean when T > 1, as the official code pools them), logits, the
cross-entropy loss and the gradients of every SynQT tensor and of the classifier.
"""
import json
import os
import re
import sys
import types

import safetensors.torch as st
import timm
import torch
from torch import nn

D, L, HEADS, PATCH, IMG, T, C, B = 48, 3, 4, 8, 32, 4, 5, 3
SCALES = dict(feat_scale=0.5, attn_scale=0.7, ffn_scale=0.3)


def load_official(path):
    src = open(path).read()
    src = src.replace("from IPython import embed\n", "")
    src = src.replace("torch.ones(bs, 1).cuda()", "torch.ones(bs, 1)")
    src = re.sub(r"\b768\b", str(D), src)
    src = re.sub(r"\b12\b", str(L), src)
    src = re.sub(r"\b37\b", str(1 + 3 * L), src)
    mod = types.ModuleType("synqt_official")
    exec(compile(src, path, "exec"), mod.__dict__)
    return mod


def main(synqt_py, out):
    torch.manual_seed(5)
    off = load_official(synqt_py)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=IMG, patch_size=PATCH, embed_dim=D, depth=L, num_heads=HEADS, num_classes=C)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if n.endswith("norm.weight") or ".norm" in n and n.endswith("weight")
                    else 0.2 * torch.randn_like(p))
    backbone_sd = {k: v.clone() for k, v in model.state_dict().items()}
    # Attributes the timm-0.4.12-era code expects on the model and its blocks.
    model.dist_token, model.head_dist, model.pre_logits = None, None, nn.Identity()
    for blk in model.blocks:
        blk.drop_path = nn.Identity()
    args = types.SimpleNamespace(token_nums=T, **SCALES)
    off.set_synqt(args, model)
    model.eval()

    x = torch.randn(B, 3, IMG, IMG)
    labels = torch.tensor([0, 3, 4])
    h_hat, blocks_out = [], []
    model.synqt.prompt_drop.register_forward_hook(lambda m, i, o: h_hat.append(o))
    for blk in model.blocks:
        blk.register_forward_hook(lambda m, i, o: blocks_out.append(o))
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, labels)
    loss.backward()

    exp = {}
    pool = (lambda t: t.mean(dim=1, keepdim=True)) if T > 1 else (lambda t: t)
    for i, (prompt, _x, h_prompt, hh_prompt) in enumerate(blocks_out):
        exp[f"synqt.h_hat.{i}"] = h_hat[i]
        exp[f"synqt.f_att.{i}"] = pool(h_prompt)
        exp[f"synqt.f_ffn.{i}"] = pool(hh_prompt)
        exp[f"synqt.h.{i}"] = pool(prompt)
    exp["synqt.logits"] = logits
    exp["synqt.loss"] = loss
    params = {}
    for n, p in model.named_parameters():
        if n.startswith("synqt.") or n.startswith("head."):
            params[n] = p.detach().clone()
            if p.grad is not None:
                exp[f"synqt.grad.{n}"] = p.grad
    # The plain backbone outputs, from an untouched copy of the same weights.
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=IMG, patch_size=PATCH, embed_dim=D, depth=L, num_heads=HEADS, num_classes=C).eval()
    ref.load_state_dict(backbone_sd)
    with torch.no_grad():
        z = ref._pos_embed(ref.patch_embed(x))
        for i, blk in enumerate(ref.blocks):
            z = blk(z)
            exp[f"vit.block.{i}"] = z
        exp["vit.cls"] = ref.norm(z)[:, 0]
        exp["vit.logits"] = ref.head(exp["vit.cls"])
        # The official query stream must leave the trunk untouched (up to SDPA vs explicit attention).
        for i, o in enumerate(blocks_out):
            assert torch.allclose(o[1], exp[f"vit.block.{i}"], atol=1e-5), "official trunk differs from plain ViT"

    os.makedirs(out, exist_ok=True)
    st.save_file(backbone_sd, os.path.join(out, "vit.safetensors"))
    st.save_file({"images": x, "labels": labels}, os.path.join(out, "inputs.safetensors"))
    st.save_file({k: v.detach().contiguous().float() for k, v in exp.items()}, os.path.join(out, "expected.safetensors"))
    st.save_file({k: v.contiguous() for k, v in params.items()}, os.path.join(out, "synqt_params.safetensors"))
    vit_tensors = [k for k in exp if k.startswith("vit.")]
    synqt_tensors = [k for k in exp if k.startswith("synqt.")]
    manifest = {
        "format": "vqt-parity/1",
        "model": {"img_size": IMG, "patch_size": PATCH, "in_chans": 3, "embed_dim": D, "depth": L,
                  "num_heads": HEADS, "mlp_ratio": 4.0, "qkv_bias": True, "class_token": True,
                  "layer_norm_eps": 1e-6, "num_classes": C},
        "checkpoint": {"file": "vit.safetensors", "naming": "timm"},
        "inputs": {"file": "inputs.safetensors"},
        "tolerance": {"abs": 1e-4},
        "checks": {
            "vit": {"file": "expected.safetensors", "tensors": vit_tensors},
            "synqt": {"params": "synqt_params.safetensors", "naming": "official", "num_tokens": T,
                      **SCALES, "file": "expected.safetensors", "tensors": synqt_tensors},
        },
        "generator": f"official SynQT synqt.py (constants substituted), timm {timm.__version__}, "
                     f"torch {torch.__version__}, tools/gen_synqt_fixture.py",
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    print("wrote", out, len(synqt_tensors), "synqt tensors")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
