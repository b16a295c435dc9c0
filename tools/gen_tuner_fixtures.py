#!/usr/bin/env python3
"""Generates the tuner parity fixtures (format `vqt-parity/1`, check `tuned`) under fixtures/.

Needs torch, timm, safetensors (CPU); never run in CI (the outputs are committed):
    .venv/bin/python tools/gen_tuner_fixtures.py fixtures/

The reference is written from the methods' definitions on top of timm's ViT modules, in the
*sequence form* the official codes use (queries concatenated with the trunk tokens and masked out
of the keys), independent of our decoupled implementation:

  tiny-g  LoRA on the fused qkv, q and v (rank 4, alpha 8: scale 2), linear head.
  tiny-h  AdaptFormer (bottleneck 5, scale 0.1) beside every MLP, reading the residual stream.
  tiny-i  VQT (2 queries per layer) jointly with AdaptFormer and LoRA: queries pass the tuned
          blocks, are not keys, and the VQT head reads [cls, query outputs], L2-normalised.

Tuner tensors are random and non-zero (their identity inits would make the check vacuous).
`tuned_params.safetensors` holds them with vqt-rs's stable names and Burn's [in, out] layout, as
`vqt-train` writes trainable parameters, so the Rust side loads it with `load_trainable`.
Expected: every block's trunk output, the class token, logits, mean CE loss and the gradient of
every trainable tensor (`tuned.grad.<name>`, same layout as the parameter).
"""
import json
import os
import sys

import safetensors.torch as st
import timm
import torch
import torch.nn.functional as F

from gen_fixtures import randomize_, model_manifest, seed, TOL

D, DEPTH, HEADS, CLASSES, B = 48, 3, 3, 6, 3


def make_vit():
    m = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=D, depth=DEPTH, num_heads=HEADS, mlp_ratio=2.0,
        qkv_bias=True, init_values=0.3, num_classes=0).eval()
    randomize_(m)
    return m


def block_forward(blk, x, nq, lora, af):
    """One timm block over [queries ; trunk] rows; queries (the first nq rows) are not keys."""
    h = blk.norm1(x)
    qkv = blk.attn.qkv(h)
    q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
    if lora is not None:
        s = lora["scale"]
        q = q + s * (h @ lora["q.a"]) @ lora["q.b"]
        v = v + s * (h @ lora["v.a"]) @ lora["v.b"]
    b, t, _ = x.shape
    split = lambda z: z.reshape(b, t, HEADS, D // HEADS).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-2, -1) / (D // HEADS) ** 0.5
    if nq:
        mask = torch.zeros(t, t)
        mask[:, :nq] = float("-inf")
        scores = scores + mask
    o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, D)
    x = x + blk.ls1(blk.attn.proj(o))
    adapt = 0.0
    if af is not None:  # AdaptFormer official: adapter on the residual stream, added outside the MLP
        adapt = af["scale"] * F.linear(F.relu(F.linear(x, af["down.weight"], af["down.bias"])), af["up.weight"], af["up.bias"])
    return x + blk.ls2(blk.mlp(blk.norm2(x))) + adapt


def forward(vit, x, tuners, queries=None):
    z = vit._pos_embed(vit.patch_embed(x))
    nq = 0 if queries is None else queries.shape[1]
    blocks, outs = [], []
    for i, blk in enumerate(vit.blocks):
        lora = tuners["lora"][i] if "lora" in tuners else None
        af = tuners["adaptformer"][i] if "adaptformer" in tuners else None
        if nq:
            z_in = torch.cat([queries[i].unsqueeze(0).expand(z.shape[0], -1, -1), z], 1)
            y = block_forward(blk, z_in, nq, lora, af)
            outs.append(y[:, :nq])
            z = y[:, nq:]
        else:
            z = block_forward(blk, z, 0, lora, af)
        blocks.append(z)
    cls = vit.norm(z)[:, 0]
    return blocks, cls, outs


def gen(root, name, use_lora, use_af, nq):
    seed({"tiny-g": 31, "tiny-h": 32, "tiny-i": 33}[name])
    vit = make_vit()
    for p in vit.parameters():
        p.requires_grad_(False)
    x = torch.randn(B, 3, 32, 32)
    labels = torch.tensor([1, 4, 5])
    params = {}  # our name -> torch leaf (Burn layout)

    def leaf(ours, shape, std):
        t = (std * torch.randn(*shape)).requires_grad_(True)
        params[ours] = t
        return t

    tuners, cfg = {}, {}
    if use_lora:
        r, alpha = 4, 8.0
        cfg["lora"] = {"rank": r, "alpha": alpha, "targets": ["q", "v"]}
        tuners["lora"] = [{"scale": alpha / r,
                           **{f"{t}.{ab}": leaf(f"backbone.blocks.{i}.attn.lora.{t}.{ab}", (D, r) if ab == "a" else (r, D), 0.3)
                              for t in "qv" for ab in "ab"}} for i in range(DEPTH)]
    if use_af:
        bn = 5
        cfg["adaptformer"] = {"bottleneck": bn, "scale": 0.1, "dropout": 0.0}
        tuners["adaptformer"] = []
        for i in range(DEPTH):
            p = f"backbone.blocks.{i}.adaptformer"
            dw, db = leaf(f"{p}.down.weight", (D, bn), 0.3), leaf(f"{p}.down.bias", (bn,), 0.3)
            uw, ub = leaf(f"{p}.up.weight", (bn, D), 0.3), leaf(f"{p}.up.bias", (D,), 0.3)
            # torch's F.linear wants [out, in]: use the transposes of the Burn-layout leaves.
            tuners["adaptformer"].append({"scale": 0.1, "down.weight": dw.t(), "down.bias": db, "up.weight": uw.t(), "up.bias": ub})
    queries = None
    if nq:
        queries = leaf("method.queries", (DEPTH, nq, D), 0.5)
        feat = D * (1 + DEPTH * nq)
        hw, hb = leaf("method.head.weight", (feat, CLASSES), 0.3), leaf("method.head.bias", (CLASSES,), 0.3)
        method = {"vqt": {"num_queries": nq}}
    else:
        hw, hb = leaf("method.weight", (D, CLASSES), 0.3), leaf("method.bias", (CLASSES,), 0.3)
        method = "linear"

    blocks, cls, outs = forward(vit, x, tuners, queries)
    if nq:
        n = lambda v: v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        feats = torch.cat([n(cls)] + [n(o.reshape(B, -1)) for o in outs], 1)
        logits = feats @ hw + hb
    else:
        logits = cls @ hw + hb
    loss = F.cross_entropy(logits, labels)
    loss.backward()

    exp = {f"tuned.block.{i}": b.detach() for i, b in enumerate(blocks)}
    exp["tuned.cls"] = cls.detach()
    for i, o in enumerate(outs):
        exp[f"tuned.query_out.{i}"] = o.detach()
    exp["tuned.logits"] = logits.detach()
    exp["tuned.loss"] = loss.detach()
    for k, t in params.items():
        exp[f"tuned.grad.{k}"] = t.grad
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    st.save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, os.path.join(d, "vit.safetensors"))
    st.save_file({"images": x.contiguous(), "labels": labels}, os.path.join(d, "inputs.safetensors"))
    st.save_file({k: v.detach().contiguous() for k, v in params.items()}, os.path.join(d, "tuned_params.safetensors"))
    st.save_file({k: v.contiguous().float() for k, v in exp.items()}, os.path.join(d, "expected.safetensors"))
    man = {"format": "vqt-parity/1",
           "model": model_manifest(32, 8, D, DEPTH, HEADS, 2.0, True, 1e-6, 0, ls=0.3),
           "checkpoint": {"file": "vit.safetensors", "naming": "timm"},
           "inputs": {"file": "inputs.safetensors"}, "tolerance": {"abs": TOL},
           "checks": {"tuned": {"tuners": cfg, "method": method, "params": "tuned_params.safetensors",
                                "file": "expected.safetensors", "tensors": list(exp.keys())}},
           "generator": f"timm {timm.__version__}, torch {torch.__version__}, tools/gen_tuner_fixtures.py"}
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(man, f, indent=2)
    print("wrote", d)


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else "fixtures"
    torch.set_num_threads(1)
    gen(root, "tiny-g", True, False, 0)
    gen(root, "tiny-h", False, True, 0)
    gen(root, "tiny-i", True, True, 2)
