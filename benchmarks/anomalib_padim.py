"""anomalib's PaDiM on spotdiff's images, weights and channel subset: the peer side of ``scale_bench.py``.

Runs in an environment with anomalib installed (``pip install anomalib==2.7.0`` beside the same
torch), never in spotdiff's: it imports torch, torchvision, PIL, safetensors, scikit-learn and
anomalib only. ``scale_bench.py --anomalib-python PY`` writes its input and reads its one JSON line:

* ``--spec``: JSON ``{arch, train_paths, image_size, layers, n_features, channel_index, weights}``;
  ``weights`` a safetensors file of the torchvision backbone that spotdiff fits (loaded into
  anomalib's timm feature extractor, which names its tensors the same way);
* ``--test``: safetensors ``images`` ``(N, 3, H, W)`` uint8, ``masks`` ``(N, H, W)`` uint8, ``labels``.

Training images are decoded here, as spotdiff's fit decodes them (PIL, uint8 antialiased bilinear
resize, ImageNet normalisation), by one thread beside the model, and fed to
``PadimModel`` in its training mode (it keeps every embedding, then ``fit()`` stacks them and
estimates the Gaussians): that is what ``Engine.fit`` runs, without Lightning's loop. ``--max-memory-gb``
caps the address space (``RLIMIT_AS``) so that running out of memory is an error here, not the
kernel's OOM killer elsewhere.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Images(Dataset):
    def __init__(self, paths: list[str], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as img:
            t = F.pil_to_tensor(img.convert("RGB"))
        t = F.resize(t, [self.size, self.size], interpolation=InterpolationMode.BILINEAR, antialias=True)
        return F.normalize(F.to_dtype(t, torch.float32, scale=True), MEAN, STD)


def batches(images: Images, size: int, ahead: int = 8) -> Iterator[torch.Tensor]:
    """Batches of ``size`` images decoded by one thread beside the model, at most ``ahead`` batches early.

    A thread, not a DataLoader worker process: with a forked worker, anomalib's ``torch.linalg.inv``
    failed after the loop ("Pivots given to lu_solve must all be greater or equal to 1"), while
    the same images fed from one process fitted (2026-12-01, 900 images at 128 px)."""
    starts = range(0, len(images), size)
    with ThreadPoolExecutor(1) as pool:
        pending: deque = deque()
        for start in starts:
            pending.append(
                pool.submit(lambda a: torch.stack([images[i] for i in range(a, min(a + size, len(images)))]), start)
            )
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spec", type=Path, required=True)
    p.add_argument("--test", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-memory-gb", type=float, default=18.0, help="address-space cap; 0: none")
    args = p.parse_args()
    if args.max_memory_gb > 0:  # RLIMIT_AS counts mapped libraries and thread reservations too
        cap = int(args.max_memory_gb * 1e9)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    if args.threads != torch.get_num_threads():
        torch.set_num_threads(args.threads)
    import anomalib
    from anomalib.models.image.padim.torch_model import PadimModel

    spec = json.loads(args.spec.read_text())
    start_rss = peak_rss()
    model = PadimModel(backbone=spec["arch"], layers=spec["layers"], pre_trained=False, n_features=spec["n_features"])
    state = load_file(spec["weights"])
    missing, _ = model.feature_extractor.feature_extractor.load_state_dict(state, strict=False)
    if missing:
        raise SystemExit(f"weights do not cover anomalib's extractor: missing {missing[:5]}")
    model.idx = torch.tensor(spec["channel_index"], dtype=torch.int64)  # spotdiff's subset: same features
    loader = batches(Images(spec["train_paths"], spec["image_size"]), 4)
    out: dict = {"anomalib": anomalib.__version__, "images": len(spec["train_paths"]), "rss_after_imports": start_rss}
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        model.train()
        model.feature_extractor.eval()
        with torch.no_grad():
            for batch in loader:
                model(batch)
            model.fit()
    except (MemoryError, RuntimeError) as exc:  # out of memory (or LAPACK failing to allocate under the cap)
        out.update(
            error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
            cap_gb=args.max_memory_gb,
            fit_wall_s=time.perf_counter() - wall,
            peak_rss=peak_rss(),
        )
        print(json.dumps(out))
        return
    out.update(
        fit_wall_s=time.perf_counter() - wall,
        fit_cpu_s=time.process_time() - cpu,
        peak_rss=peak_rss(),
        model_tensor_bytes=sum(
            t.numel() * t.element_size() for t in (model.gaussian.mean, model.gaussian.inv_covariance)
        ),
    )
    # imported only now: loaded before the fit, scikit-learn's OpenMP/BLAS runtime made anomalib's
    # torch.linalg.inv fail ("Pivots given to lu_solve must all be greater or equal to 1")
    from sklearn.metrics import roc_auc_score

    test = load_file(str(args.test))
    model.eval()
    scores, maps = [], []
    with torch.no_grad():
        for i in range(0, test["images"].shape[0], 4):
            x = F.normalize(F.to_dtype(test["images"][i : i + 4], torch.float32, scale=True), MEAN, STD)
            result = model(x)
            scores.append(result.pred_score.flatten())
            maps.append(result.anomaly_map.reshape(x.shape[0], *x.shape[-2:]))
    labels = test["labels"].numpy()
    out["image_auroc"] = float(roc_auc_score(labels, torch.cat(scores).numpy()))
    out["pixel_auroc"] = float(roc_auc_score(test["masks"].flatten().numpy(), torch.cat(maps).flatten().numpy()))
    out["test_images"] = len(labels)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
