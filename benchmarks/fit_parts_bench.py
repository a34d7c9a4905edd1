"""Two parts of a 1-class fit on VisA-size input, each against its predecessor in the same process.

* **Resize**: a 1500 x 1000 JPEG decoded by Pillow, then resized to 256 px by
  ``spotdiff.data.transforms.image_to_tensor`` (Pillow's uint8 antialiased resize, then float; the
  one decoder since 2026-12-03) against torchvision's uint8 resize it replaced and the float resize
  before that; also the decode alone, and the largest differences in grey levels.
* **Staging**: the CPU time per image of PaDiM's covariance update (``GaussianAccumulator``) at
  d = 550 with 8, 16 (the default) and 32 images staged per fold, on 1024 positions, scaled to the
  4096 of a 256-px ResNet-50 grid (the cost is linear in positions).
* **Factorisation** of PaDiM's ``L^-1`` at d = 550 (the paper's ResNet-50 setting): LAPACK
  ``potrf`` + ``trtri`` (``GaussianAccumulator.inverse_cholesky_packed``'s kernel) against
  ``torch.linalg.cholesky`` + ``solve_triangular(L, I)``, float64, on the same covariances.

Both on one thread, best of ``--repeats``, alternated. Usage::

    PYTHONPATH=src python benchmarks/fit_parts_bench.py [--jpeg FILE]

Without ``--jpeg`` the first training image of the VisA-size synth written by ``scale_bench.py``
is used (``/tmp/spotdiff-visa-scale``; made on first use).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from threadpoolctl import threadpool_limits


def best_ms(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def resize_part(jpeg: Path, repeats: int) -> list[str]:
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    from spotdiff.data.transforms import image_to_tensor

    def decode() -> Image.Image:
        with Image.open(jpeg) as img:
            return img.convert("RGB")

    img = decode()

    def float_resize() -> torch.Tensor:
        t = F.to_dtype(F.pil_to_tensor(img), torch.float32, scale=True)
        return F.resize(t, [256, 256], interpolation=InterpolationMode.BILINEAR, antialias=True)

    def torchvision_uint8() -> torch.Tensor:
        t = F.resize(F.pil_to_tensor(img), [256, 256], interpolation=InterpolationMode.BILINEAR, antialias=True)
        return F.to_dtype(t, torch.float32, scale=True)

    times: dict[str, list[float]] = {"decode": [], "float": [], "tv_uint8": [], "uint8": []}
    for _ in range(repeats):  # alternated, so drifting load hits all alike
        times["decode"].append(best_ms(decode, 1))
        times["float"].append(best_ms(float_resize, 1))
        times["tv_uint8"].append(best_ms(torchvision_uint8, 1))
        times["uint8"].append(best_ms(lambda: image_to_tensor(img, 256), 1))
    best = {k: min(v) for k, v in times.items()}
    diff = float((image_to_tensor(img, 256) - float_resize()).abs().max()) * 255
    diff_tv = float((image_to_tensor(img, 256) - torchvision_uint8()).abs().max()) * 255
    return [
        f"### Resize of one {img.size[0]} x {img.size[1]} JPEG to 256 px (`{jpeg.name}`), one thread, "
        f"best of {repeats}",
        "",
        "| step | ms |",
        "|---|---:|",
        f"| Pillow decode | {best['decode']:.1f} |",
        f"| float resize (before) | {best['float']:.1f} |",
        f"| torchvision uint8 resize, then float (before 2026-12-03) | {best['tv_uint8']:.1f} |",
        f"| Pillow uint8 resize, then float (`image_to_tensor`) | {best['uint8']:.1f} |",
        f"| ratio Pillow / torchvision uint8 | {best['uint8'] / best['tv_uint8']:.2f} |",
        f"| ratio Pillow uint8 / float | {best['uint8'] / best['float']:.2f} |",
        f"| decode + resize, ratio after / before | "
        f"{(best['decode'] + best['uint8']) / (best['decode'] + best['float']):.2f} |",
        "",
        f"Largest difference: {diff:.2f} grey levels from the float resize, {diff_tv:.2f} from torchvision's uint8.",
        "",
    ]


def staging_part(d: int, positions: int = 1024, images: int = 64) -> list[str]:
    from spotdiff.detect.gaussian import GaussianAccumulator

    x = torch.randn(images, positions, d, generator=torch.Generator().manual_seed(0))
    rows = []
    for stage in (8, 16, 32):
        acc = GaussianAccumulator(positions, d, stage=stage)
        acc.update(x[:stage])  # allocates and folds once
        cpu = time.process_time()
        for i in range(stage, images, 4):
            acc.update(x[i : i + 4])
        acc._fold()
        per_image = (time.process_time() - cpu) / (images - stage) * 4096 / positions
        rows.append(f"| {stage} | {per_image * 1e3:.0f} | {stage * 4096 * d * 4 / 1e6:.0f} |")
        del acc
    return [
        f"### Covariance update per image, d = {d}, one thread ({positions} positions, scaled to 4096)",
        "",
        "| images staged | CPU ms per image | staging buffer at 4096 positions, MB |",
        "|---:|---:|---:|",
        *rows,
        "",
    ]


def factorisation_part(d: int, positions: int, repeats: int) -> list[str]:
    from spotdiff.detect.gaussian import _inverse_cholesky

    g = torch.Generator().manual_seed(0)
    x = torch.randn(positions, 2 * d, d, generator=g, dtype=torch.float64)
    cov = x.transpose(1, 2) @ x / (2 * d) + 0.01 * torch.eye(d, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)

    def torch_way() -> torch.Tensor:
        return torch.linalg.solve_triangular(torch.linalg.cholesky(cov), eye, upper=False)

    def lapack_way() -> np.ndarray:
        return np.stack([_inverse_cholesky(c.copy()) for c in cov.numpy()])

    times = {"torch": [], "lapack": []}
    with threadpool_limits(1, user_api="blas"):
        for _ in range(repeats):
            times["torch"].append(best_ms(torch_way, 1))
            times["lapack"].append(best_ms(lapack_way, 1))
        rel = float(np.abs(lapack_way() - torch_way().numpy()).max() / torch_way().abs().max())
    best = {k: min(v) / positions for k, v in times.items()}
    return [
        f"### Factorisation of `L^-1`, d = {d}, float64, one thread, {positions} positions, best of {repeats}",
        "",
        "| method | ms per position |",
        "|---|---:|",
        f"| torch.linalg.cholesky + solve_triangular(L, I) (before) | {best['torch']:.2f} |",
        f"| LAPACK potrf + trtri (now) | {best['lapack']:.2f} |",
        f"| ratio now / before | {best['lapack'] / best['torch']:.2f} |",
        "",
        f"Largest difference relative to the largest entry: {rel:.1e}.",
        "",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jpeg", type=Path, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--resize-only", action="store_true", help="only the resize part")
    p.add_argument("--d", type=int, default=550)
    p.add_argument("--positions", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)
    jpeg = args.jpeg
    if jpeg is None:
        root = Path(tempfile.gettempdir()) / "spotdiff-visa-scale"
        if not root.is_dir():
            from spotdiff.data.synth import VISA_FRAME, generate

            generate(root, seed=0, scale=1.0, image_size=384, objects=["pcb_synth"], normal=4, frame=VISA_FRAME)
        jpeg = sorted((root / "pcb_synth" / "Data" / "Images" / "Normal").glob("*.JPG"))[0]
    print(
        f"Date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {os.getloadavg()}; "
        f"torch {torch.__version__}\n"
    )
    print(
        "\n".join(
            resize_part(jpeg, args.repeats)
            + (
                []
                if args.resize_only
                else staging_part(args.d) + factorisation_part(args.d, args.positions, args.repeats)
            )
        )
    )


if __name__ == "__main__":
    main()
