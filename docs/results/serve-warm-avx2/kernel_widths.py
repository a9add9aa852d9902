"""Weight-major ÷ packed time of one float32 linear call, per weight shape and row count
(interleaved medians of 15 calls each): the data behind ``packed_linear.TUNED_MAX_MACS``.
Run on the 2-core AMD EPYC without AVX-512; output in kernel_widths.txt."""

import torch

from distillspec.decoding import packed_linear
from distillspec.decoding.timing import interleaved_medians

SHAPES = [(49152, 576), (8192, 576), (8960, 1536), (1536, 576), (576, 1536)]

torch.manual_seed(0)
for out_features, in_features in SHAPES:
    weight = torch.randn(out_features, in_features) * 0.02
    cells = []
    with torch.no_grad():
        for rows in (2, 4, 8, 16, 32):
            x = torch.randn(rows, in_features)
            medians = interleaved_medians(
                {"packed": lambda x=x, w=weight: packed_linear._packed_call(x, w, None),
                 "weight_major": lambda x=x, w=weight: packed_linear._weight_major_call(x, w, None)},
                15)
            ratio = medians["weight_major"] / medians["packed"]
            cells.append(f"{rows}:{ratio:.2f}({medians['packed'] * 1e3:.2f}ms)")
    print((out_features, in_features), " ".join(cells), flush=True)
