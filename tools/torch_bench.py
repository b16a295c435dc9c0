#!/usr/bin/env python3
"""PyTorch reference for `vqt-bench compare`: one method's training step on a timm ViT (CPU).

Prints one JSON line with the fields `vqt-bench step` prints (median step time, images/s, peak
resident memory above the baseline, trainable/total parameters), so the two can be compared
method by method in one invocation. Optional tool: needs torch + timm (pip), never CI.

    python tools/torch_bench.py --method vqt-official --preset vit-s14-dinov2 --img-size 112 \
        --batch 32 --warmup 1 --steps 3 --threads 2

Methods, at the settings `vqt-bench` uses (random weights; timing and memory do not depend on
them): linear (frozen trunk under no_grad, head on the final class token), full-ft, lora (r = 8
on q and v of the fused qkv), adaptformer (bottleneck 8, scale 0.1, beside every MLP), vpt-deep
(10 prompts per layer), vqt-official (VQT as the official code runs it: one learnable query per
layer concatenated with the tokens and masked out of the keys, so autograd keeps the whole
backbone graph), vqt-trunk (VQT the way vqt-rs runs it: the trunk under no_grad hands each
layer's input to the queries, which alone are on the tape). Every step is forward, backward and
an AdamW update of the trainable tensors. synqt runs the *official* SynQT code
(taolinzhang/SynQT `synqt.py`, not committed: pass its path with --synqt-py) with T = 1 and
s = xi = zeta = 0.1, its ViT-B constants replaced by this backbone's width and depth as
tools/gen_synqt_fixture.py does; like the official code it runs its own block forward (no
LayerScale).
"""
import argparse
import json
import os
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from torch import nn

PRESETS = {
    "vit-ti16": "vit_tiny_patch16_224",
    "vit-s16": "vit_small_patch16_224",
    "vit-b16": "vit_base_patch16_224",
    "vit-l16": "vit_large_patch16_224",
    "vit-h14": "vit_huge_patch14_224",
    "vit-s14-dinov2": "vit_small_patch14_dinov2",
}
METHODS = ["linear", "full-ft", "lora", "adaptformer", "vpt-deep", "vqt-official", "vqt-trunk", "synqt"]


def official_synqt(path, vit, d, depth):
    """The official SynQT module with its ViT-B/16 constants set to this backbone's."""
    import re
    import types

    src = open(path).read().replace("from IPython import embed\n", "").replace("torch.ones(bs, 1).cuda()", "torch.ones(bs, 1)")
    src = re.sub(r"\b768\b", str(d), src)
    src = re.sub(r"\b12\b", str(depth), src)
    src = re.sub(r"\b37\b", str(1 + 3 * depth), src)
    mod = types.ModuleType("synqt_official")
    exec(compile(src, path, "exec"), mod.__dict__)
    vit.dist_token, vit.head_dist, vit.pre_logits = None, None, nn.Identity()
    for blk in vit.blocks:
        blk.drop_path = nn.Identity()
    args = types.SimpleNamespace(token_nums=1, feat_scale=0.1, attn_scale=0.1, ffn_scale=0.1)
    mod.set_synqt(args, vit)
    return vit


def status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.split(":")[0] == field:
                return int(line.split()[1]) * 1024
    return None


def attention(blk, h, lora=None, key_mask=None):
    """timm attention on h (already normed), optionally with LoRA on q/v and masked keys."""
    b, t, d = h.shape
    heads = blk.attn.num_heads
    qkv = blk.attn.qkv(h)
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    if lora is not None:
        q = q + (h @ lora["qa"]) @ lora["qb"]
        v = v + (h @ lora["va"]) @ lora["vb"]
    split = lambda z: z.reshape(b, t, heads, d // heads).transpose(1, 2)
    o = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=key_mask)
    return blk.attn.proj(o.transpose(1, 2).reshape(b, t, d))


def block(blk, x, lora=None, af=None, key_mask=None):
    x = x + blk.ls1(attention(blk, blk.norm1(x), lora, key_mask))
    adapt = 0.0 if af is None else 0.1 * af(x)
    return x + blk.ls2(blk.mlp(blk.norm2(x))) + adapt


class Head(nn.Module):
    def __init__(self, d, c):
        super().__init__()
        self.fc = nn.Linear(d, c)

    def forward(self, feats):
        return self.fc(feats)


def build(method, vit, d, depth, classes):
    """Returns (trainable modules, forward(x) -> logits)."""
    for p in vit.parameters():
        p.requires_grad_(method == "full-ft")
    extra = nn.ModuleDict()
    if method in ("linear", "full-ft", "lora", "adaptformer", "vpt-deep"):
        extra["head"] = Head(d, classes)
    if method == "lora":
        r = 8
        extra["lora"] = nn.ParameterList()
        loras = []
        for _ in range(depth):
            ps = {"qa": nn.Parameter(torch.randn(d, r) * 0.02), "qb": nn.Parameter(torch.zeros(r, d)),
                  "va": nn.Parameter(torch.randn(d, r) * 0.02), "vb": nn.Parameter(torch.zeros(r, d))}
            extra["lora"].extend(ps.values())
            loras.append(ps)
    if method == "adaptformer":
        extra["af"] = nn.ModuleList(nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, d)) for _ in range(depth))
    if method == "vpt-deep":
        extra["prompts"] = nn.ParameterList(nn.Parameter(torch.randn(1, 10, d) * 0.02) for _ in range(depth))
    if method.startswith("vqt"):
        extra["queries"] = nn.ParameterList(nn.Parameter(torch.randn(1, 1, d) * 0.02) for _ in range(depth))
        extra["head"] = Head(d * (depth + 1), classes)

    def embed(x):
        return vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))

    def forward(x):
        if method == "linear":
            with torch.no_grad():
                cls = vit.forward_features(x)[:, 0]
            return extra["head"](cls)
        z = embed(x)
        if method == "full-ft":
            for blk in vit.blocks:
                z = blk(z)
            return extra["head"](vit.norm(z)[:, 0])
        if method in ("lora", "adaptformer"):
            for i, blk in enumerate(vit.blocks):
                z = block(blk, z, lora=loras[i] if method == "lora" else None, af=extra["af"][i] if method == "adaptformer" else None)
            return extra["head"](vit.norm(z)[:, 0])
        if method == "vpt-deep":
            n = z.shape[1]
            for i, blk in enumerate(vit.blocks):
                p = extra["prompts"][i].expand(z.shape[0], -1, -1)
                z = blk(torch.cat([z[:, :1], p, z[:, 1:n]], 1) if i == 0 else torch.cat([z[:, :1], p, z[:, 11:]], 1))
            return extra["head"](vit.norm(z)[:, 0])
        b, n = z.shape[0], z.shape[1]
        outs = []
        if method == "vqt-official":
            # [tokens ; query]: the query is not a key (masked), so tokens are unchanged, but the
            # whole sequence, tokens included, is on the tape.
            mask = torch.zeros(n + 1, n + 1)
            mask[:, n:] = float("-inf")
            for i, blk in enumerate(vit.blocks):
                y = block(blk, torch.cat([z, extra["queries"][i].expand(b, -1, -1)], 1), key_mask=mask)
                z, q_out = y[:, :n], y[:, n:]
                outs.append(q_out[:, 0])
            cls = vit.norm(z)[:, 0]
        else:  # vqt-trunk: trunk without autograd; queries read each layer's keys/values
            with torch.no_grad():
                layer_inputs = []
                for blk in vit.blocks:
                    layer_inputs.append(z)
                    z = blk(z)
                cls = vit.norm(z)[:, 0]
            for i, blk in enumerate(vit.blocks):
                heads, dh = blk.attn.num_heads, d // blk.attn.num_heads
                with torch.no_grad():
                    kv = blk.attn.qkv(blk.norm1(layer_inputs[i]))[..., d:]
                    k = kv[..., :d].reshape(b, n, heads, dh).transpose(1, 2)
                    v = kv[..., d:].reshape(b, n, heads, dh).transpose(1, 2)
                qry = extra["queries"][i].expand(b, -1, -1)
                hq = blk.norm1(qry)
                qq = F.linear(hq, blk.attn.qkv.weight[:d], blk.attn.qkv.bias[:d] if blk.attn.qkv.bias is not None else None)
                o = F.scaled_dot_product_attention(qq.reshape(b, 1, heads, dh).transpose(1, 2), k, v)
                y = qry + blk.ls1(blk.attn.proj(o.transpose(1, 2).reshape(b, 1, d)))
                y = y + blk.ls2(blk.mlp(blk.norm2(y)))
                outs.append(y[:, 0])
        feats = torch.cat([F.normalize(f, dim=-1) for f in [cls] + outs], -1)
        return extra["head"](feats)

    return extra, forward


def kernels(spec, reps):
    """`vqt-bench kernels`' products, formed as timm forms them, timed like ours."""
    results = []
    for s in spec:
        b, h, m, k, n = s["batch"], s["heads"], s["m"], s["k"], s["n"]
        op = s["op"]
        if op == "linear":
            x, w = torch.randn(b, m, k), torch.randn(n, k)  # nn.Linear stores [out, in]
            f = lambda: F.linear(x, w)
        elif op == "linear_dx":  # autograd's grad_input = grad_output.mm(weight), weight [out, in]
            dy, w = torch.randn(b * m, k), torch.randn(k, n)
            f = lambda: dy.mm(w)
        elif op == "linear_dw":  # autograd's grad_weight = grad_output.t().mm(input)
            dy, x = torch.randn(k, n), torch.randn(k, m)
            f = lambda: dy.t().mm(x)
        elif op in ("scores", "av"):
            dh = k if op == "scores" else n
            qkv = torch.randn(b, m, 3, h, dh).permute(2, 0, 3, 1, 4)  # timm's head views
            if op == "scores":
                f = lambda: qkv[0] @ qkv[1].transpose(-2, -1)
            else:
                p = torch.rand(b, h, m, k)
                f = lambda: p @ qkv[2]
        else:
            raise SystemExit(f"unknown kernel op {op}")
        f()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            times.append((time.perf_counter() - t0) * 1e3)
        ms = statistics.median(times)
        results.append({"shape": s, "ms_median": ms, "gflops": 2.0 * b * h * m * k * n / (ms * 1e6)})
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=METHODS)
    ap.add_argument("--kernels", help="JSON list of vqt-bench kernel shapes: time them and print [framework, results]")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--preset", default="vit-s14-dinov2", choices=sorted(PRESETS))
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--synqt-py", help="path of the official SynQT synqt.py (method synqt)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("RAYON_NUM_THREADS", os.cpu_count())))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.kernels:
        with torch.no_grad():
            res = kernels(json.loads(a.kernels), a.reps)
        print(json.dumps([f"torch {torch.__version__}", res]))
        return
    if not a.method:
        ap.error("--method or --kernels is required")
    if a.method == "synqt":
        if not a.synqt_py:
            ap.error("--method synqt needs --synqt-py PATH (the official SynQT synqt.py)")
        vit = timm.create_model(PRESETS[a.preset], pretrained=False, img_size=a.img_size, num_classes=a.classes).eval()
        d, depth = vit.embed_dim, len(vit.blocks)
        vit = official_synqt(a.synqt_py, vit, d, depth)
        for n, p in vit.named_parameters():
            p.requires_grad_(n.startswith("synqt.") or n.startswith("head."))
        extra, forward = nn.ModuleDict(), vit
    else:
        vit = timm.create_model(PRESETS[a.preset], pretrained=False, img_size=a.img_size, num_classes=0).eval()
        d, depth = vit.embed_dim, len(vit.blocks)
        extra, forward = build(a.method, vit, d, depth, a.classes)
    params = [p for p in list(vit.parameters()) + list(extra.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    images = [torch.randn(a.batch, 3, a.img_size, a.img_size) for _ in range(a.warmup + a.steps)]
    targets = torch.arange(a.batch) % a.classes
    baseline = status_bytes("VmRSS")
    times, phases = [], []
    for i, x in enumerate(images):
        t0 = time.perf_counter()
        loss = F.cross_entropy(forward(x), targets)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if i >= a.warmup:
            times.append((t3 - t0) * 1e3)
            phases.append(((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3))
    text = open("/proc/self/status").read()
    peak = next(int(l.split()[1]) * 1024 for l in text.splitlines() if l.startswith("VmHWM:"))
    step_ms = statistics.median(times)
    # Inference of the trained model (eval mode, no autograd), timed after the training peak was
    # read, over the same batches, as `vqt-bench step` does.
    vit.eval()
    extra.eval()
    infer = []
    with torch.inference_mode():
        for i, x in enumerate(images):
            t0 = time.perf_counter()
            forward(x)
            if i >= a.warmup:
                infer.append((time.perf_counter() - t0) * 1e3)
    infer_ms = statistics.median(infer)
    print(json.dumps({
        "method": a.method,
        "framework": f"torch {torch.__version__}, timm {timm.__version__}, {a.threads} threads",
        "backbone": a.preset,
        "img_size": a.img_size,
        "batch": a.batch,
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in list(vit.parameters()) + list(extra.parameters())),
        "step_ms_median": step_ms,
        "train_images_per_s": a.batch / (step_ms / 1e3),
        "rss_baseline_bytes": baseline,
        "rss_peak_bytes": peak,
        "rss_train_bytes": max(peak - baseline, 0),
        "infer_ms_median": infer_ms,
        "infer_images_per_s": a.batch / (infer_ms / 1e3),
        # Medians per phase, as `vqt-bench step` reports them.
        "phases": {
            "forward_ms": statistics.median(p[0] for p in phases),
            "backward_ms": statistics.median(p[1] for p in phases),
            "optimizer_ms": statistics.median(p[2] for p in phases),
        },
    }))


if __name__ == "__main__":
    main()
