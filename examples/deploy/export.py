"""Exports TinyTranslator for a LibTorch C++ app, three ways, into one folder:

  model.pt2         torch.export (dynamic batch, source and target lengths) compiled by
                    AOTInductor into a package: torch::inductor::AOTIModelPackageLoader
  model_script.pt   torch.jit.script:  torch::jit::load
  model_trace.pt    torch.jit.trace:   torch::jit::load
  io.pt             inputs at sizes the export never saw, with Python's outputs, for the
                    app to check itself against (a scripted module of buffers)

  python examples/deploy/export.py OUT_DIR [--skip-aoti]
"""
import argparse
import os
import sys

import torch
from torch.export import Dim

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import TinyTranslator, example_inputs  # noqa: E402

# Sizes the app runs: none of them is the size exported or traced with.
CASES = [(3, 11, 6), (1, 4, 9), (5, 17, 2)]


class Tensors(torch.nn.Module):
    def __init__(self, tensors):
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t)


def export_program(model, inputs):
    batch = Dim("batch", min=1, max=256)
    src_len, tgt_len = Dim("src_len", min=2, max=4096), Dim("tgt_len", min=2, max=4096)
    # Dim(min=2): a length of 1 would be specialised by export's 0/1 rule, yet runs fine.
    shapes = {"src": {0: batch, 1: src_len}, "src_pad": {0: batch, 1: src_len},
              "tgt": {0: batch, 1: tgt_len}}
    return torch.export.export(model, inputs, dynamic_shapes=shapes)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--skip-aoti", action="store_true", help="TorchScript files only")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    model = TinyTranslator().eval()
    inputs = example_inputs(2, 8, 5)

    if not args.skip_aoti:
        program = export_program(model, inputs)
        torch._inductor.aoti_compile_and_package(
            program, package_path=os.path.join(args.out, "model.pt2"))
    torch.jit.script(model).save(os.path.join(args.out, "model_script.pt"))
    with torch.no_grad():
        torch.jit.trace(model, inputs).save(os.path.join(args.out, "model_trace.pt"))

    io = {}
    with torch.no_grad():
        for i, (b, s, t) in enumerate(CASES):
            src, src_pad, tgt = example_inputs(b, s, t, seed=i + 1)
            src_pad[-1, 1:] = True  # one source with a single real token
            logits, weights = model(src, src_pad, tgt)
            io.update({f"case{i}_src": src, f"case{i}_src_pad": src_pad, f"case{i}_tgt": tgt,
                       f"case{i}_logits": logits, f"case{i}_weights": weights})
    torch.jit.script(Tensors(io)).save(os.path.join(args.out, "io.pt"))
    print(f"wrote {args.out}: {len(CASES)} cases")


if __name__ == "__main__":
    main()
