"""Fine-tuning loop, evaluation, and the multi-seed / multi-object driver ``run_finetune``.

Schedule (both tasks): AdamW (betas 0.9/0.999, weight decay 1e-2), learning rate ``lr`` for
the pre-trained encoder and ``head_lr_mult * lr`` for the new layers (classifier head, U-Net
decoder), linear warm-up over the first 5 % of steps then cosine decay to 0. Training length
is counted in optimisation steps: ``steps`` if given, else ``epochs * ceil(n_train /
batch_size)``, else the protocol default (``DEFAULT_STEPS``).

Batches are class-balanced: half normal, half anomalous images, each class cycled in its own
reshuffled order (for k-shot this is plain shuffled epochs; for high-shot the rarer anomalies
are repeated). Augmentation, per image: random resized crop (scale 0.8-1, aspect 3/4-4/3, back
to the input size), horizontal and vertical flips, applied identically to image and mask.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence, Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import tv_tensors
from torchvision.transforms import v2

from spotdiff.configs import check_fields, named_check, rule
from spotdiff.data.transforms import normalize
from spotdiff.devices import check_device_name, resolve_device
from spotdiff.errors import ConfigError, DataError
from spotdiff.files import write_json_atomic, write_text_atomic
from spotdiff.finetune.classifier import BinaryClassifier
from spotdiff.finetune.protocols import (
    TABLE_METRICS,
    aggregate,
    aggregate_csv,
    get_protocol,
    list_objects,
    open_protocol,
    table_csv,
    table_markdown,
    table_rows,
)
from spotdiff.finetune.unet import UNet
from spotdiff.metrics import evaluate
from spotdiff.models import LoadedWeights, WeightsLike, build_backbone, check_arch, describe_weights, load_weights
from spotdiff.progress import bar
from spotdiff.schedules import warmup_cosine

log = logging.getLogger(__name__)

TASKS = ("cls", "seg")
DEFAULT_STEPS = {"highshot": 1000, "10shot": 300, "5shot": 300}
WARMUP_FRACTION = 0.05
WEIGHT_DECAY = 1e-2
CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything one ``spotdiff finetune`` run needs (see docs/finetune.md); built and checked by
    :func:`spotdiff.configs.build` (or checked by :meth:`validate` when constructed directly)."""

    task: str = field(metadata=rule(choices=TASKS))  # "cls" (binary classifier) or "seg" (U-Net)
    protocol: str = field(metadata=rule(check=named_check(get_protocol)))  # "highshot", "10shot" or "5shot"
    data: Path  # dataset root
    out: Path  # output folder
    object: str = "all"  # an object name, or "all" for every object under ``data``
    weights: str | Path | None = None  # "imagenet", a torchvision weights name, a file; None / "random" = random init
    arch: str = field(default="resnet50", metadata=rule(check=named_check(check_arch)))
    seeds: int = field(default=5, metadata=rule(minimum=1))  # runs seeds 0 .. seeds-1
    epochs: int | None = field(default=None, metadata=rule(minimum=1))
    steps: int | None = field(default=None, metadata=rule(minimum=1))
    batch_size: int = field(default=16, metadata=rule(minimum=1))
    lr: float = field(default=1e-4, metadata=rule(finite=True, above=0))  # encoder learning rate
    head_lr_mult: float = field(default=10.0, metadata=rule(finite=True, above=0))  # new layers: head_lr_mult * lr
    image_size: int = field(default=256, metadata=rule(minimum=1))
    balanced: bool = True  # class-balanced batches (see module docstring)
    device: str = field(default="auto", metadata=rule(check=check_device_name))  # "auto" = cuda when available
    workers: int = field(default=0, metadata=rule(minimum=0))  # image-decoding worker processes

    def validate(self) -> None:
        """ConfigError for any out-of-range option (checked before anything runs)."""
        check_fields(self, "finetune")
        if self.batch_size < 2 and self.balanced:
            raise ConfigError("finetune: batch_size must be >= 2 for class-balanced batches")
        if self.epochs is not None and self.steps is not None:
            raise ConfigError("finetune: give either steps or epochs, not both")


def build_model(task: str, arch: str, weights: WeightsLike = None) -> BinaryClassifier | UNet:
    """A :class:`BinaryClassifier` (``cls``) or :class:`UNet` (``seg``) over ``build_backbone(arch, weights)``.

    New layers are initialised from torch's global RNG (seed it first for reproducibility).
    """
    backbone = build_backbone(arch, weights)
    if task == "cls":
        return BinaryClassifier(backbone)
    if task == "seg":
        return UNet(backbone, arch)
    raise ConfigError(f"unknown task {task!r}; choose one of {list(TASKS)}")


def _param_groups(model: BinaryClassifier | UNet, lr: float, head_lr_mult: float) -> list[dict[str, Any]]:
    """AdamW groups: the pre-trained encoder at ``lr``, the new layers at ``head_lr_mult * lr``."""
    encoder, new = model.parameter_groups()
    return [{"params": encoder, "lr": lr}, {"params": new, "lr": lr * head_lr_mult}]


def warmup_steps(total_steps: int) -> int:
    """Warm-up length of fine-tuning: `WARMUP_FRACTION` of the steps, at least 1."""
    return max(1, round(WARMUP_FRACTION * total_steps))


def batch_indices(
    labels: Sequence[int], batch_size: int, steps: int, seed: int, balanced: bool = True
) -> Iterator[np.ndarray]:
    """``steps`` index batches of size ``min(batch_size, len(labels))``.

    ``balanced``: alternate normal and anomalous images, each class cycled in its own
    reshuffled order. Otherwise plain reshuffled epochs over all images.
    """
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels, dtype=np.int64)
    pools = [np.flatnonzero(labels_arr == c) for c in (0, 1)] if balanced else [np.arange(len(labels_arr))]
    if any(len(p) == 0 for p in pools):
        raise ConfigError("class-balanced batches need both normal and anomalous training images")
    size = min(batch_size, len(labels_arr))
    orders = [rng.permutation(p) for p in pools]
    cursors = [0] * len(pools)
    turn = 0
    for _ in range(steps):
        batch = np.empty(size, dtype=np.int64)
        for j in range(size):
            c = turn % len(pools)
            turn += 1
            if cursors[c] == len(orders[c]):
                orders[c], cursors[c] = rng.permutation(pools[c]), 0
            batch[j] = orders[c][cursors[c]]
            cursors[c] += 1
        yield batch


@dataclass
class TensorData:
    """Images decoded once: ``images`` uint8 ``(N, 3, H, W)``, ``masks`` uint8 ``(N, H, W)`` in {0, 1},
    ``labels`` int64 ``(N,)``, plus ``defect_types`` and ``paths``."""

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    defect_types: list[str]
    paths: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def load_tensors(
    dataset: Dataset, indices: Sequence[int] | None = None, workers: int = 0, desc: str = ""
) -> TensorData:
    """Decode ``dataset`` items (at ``indices``, default all) into a :class:`TensorData`.

    Images are stored as uint8 (quantisation error <= 0.5/255) to keep high-shot sets in memory.
    """
    subset = Subset(dataset, list(indices)) if indices is not None else dataset
    loader = DataLoader(subset, batch_size=16, num_workers=workers, shuffle=False)
    images, masks, labels, types, paths = [], [], [], [], []
    with bar(total=len(cast(Sized, subset)), desc=desc or "loading images") as pbar:  # ours have a length
        for item in loader:
            images.append((item["image"] * 255).round().clamp(0, 255).to(torch.uint8))
            masks.append((item["mask"] > 0.5).to(torch.uint8))
            labels.append(torch.as_tensor(item["label"], dtype=torch.int64))
            types.extend(item["defect_type"])
            paths.extend(item["path"])
            pbar.update(len(item["path"]))
    return TensorData(torch.cat(images), torch.cat(masks), torch.cat(labels), types, paths)


def make_augmentation(size: int) -> v2.Transform:
    """Per-image training augmentation, applied identically to a ``tv_tensors.Image`` and its ``Mask``."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
        ]
    )


def augment_batch(
    images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, transform: v2.Transform
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augment each image/mask pair independently; returns float images in [0, 1], float masks, labels.

    An anomalous image whose crop leaves out every defect pixel is relabelled normal (it no
    longer shows a defect); anomalous images without a mask keep their label.
    """
    out_images, out_masks = [], []
    for img, mask in zip(images, masks):
        a, m = transform(tv_tensors.Image(img), tv_tensors.Mask(mask))
        out_images.append(a.as_subclass(torch.Tensor))
        out_masks.append(m.as_subclass(torch.Tensor))
    aug_images = torch.stack(out_images).float().div_(255)
    aug_masks = torch.stack(out_masks).float()
    had_defect = masks.flatten(1).amax(1) > 0
    keeps_defect = aug_masks.flatten(1).amax(1) > 0
    new_labels = torch.where(had_defect, keeps_defect.long(), labels)
    return aug_images, aug_masks, new_labels


def train_model(
    model: BinaryClassifier | UNet,
    data: TensorData,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    head_lr_mult: float = 10.0,
    balanced: bool = True,
    device: torch.device | str = "cpu",
    desc: str = "fine-tuning",
) -> list[float]:
    """Fine-tune ``model`` in place on ``data`` for ``steps`` AdamW steps; returns the loss per step.

    Seeds torch's RNG (augmentations) and the batch order with ``seed``.
    """
    device = torch.device(device)
    model.to(device).train()
    optimizer = torch.optim.AdamW(_param_groups(model, lr, head_lr_mult), weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, warmup_steps(steps)))
    transform = make_augmentation(data.images.shape[-1])
    torch.manual_seed(seed)
    losses: list[float] = []
    with bar(total=steps, desc=desc) as pbar:
        for idx in batch_indices(data.labels.tolist(), batch_size, steps, seed, balanced):
            idx_t = torch.from_numpy(idx)
            images, masks, labels = augment_batch(
                data.images[idx_t].to(device), data.masks[idx_t].to(device), data.labels[idx_t].to(device), transform
            )
            logits = model(normalize(images))
            loss = model.loss(logits, labels, masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            pbar.update(1)
            pbar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


@torch.no_grad()
def predict(
    model: BinaryClassifier | UNet, images: torch.Tensor, batch_size: int = 32, device: torch.device | str = "cpu"
) -> tuple[np.ndarray, np.ndarray | None]:
    """Anomaly scores ``(N,)`` and, for a U-Net, maps ``(N, H, W)`` (float32 in [0, 1]) for uint8 ``images``."""
    model.to(device).eval()
    scores, maps = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device).float().div_(255)
        s, m = model.predict(normalize(batch))
        scores.append(s.float().cpu())
        if m is not None:
            maps.append(m.float().cpu())
    score_arr = torch.cat(scores).numpy()
    return score_arr, (torch.cat(maps).numpy() if maps else None)


def evaluate_model(
    model: BinaryClassifier | UNet, test: TensorData, task: str, batch_size: int, device: torch.device | str
) -> dict:
    """:func:`spotdiff.metrics.evaluate` of ``model`` on ``test``: image metrics, plus pixel
    metrics for ``seg``, with the per-defect-type breakdown."""
    scores, maps = predict(model, test.images, batch_size, device)
    if not (np.isfinite(scores).all() and (maps is None or np.isfinite(maps).all())):
        raise ConfigError("training diverged: the model predicts non-finite scores; try a lower --lr")
    labels = test.labels.numpy()
    try:
        if task == "seg":
            return evaluate(scores, labels, anomaly_maps=maps, masks=test.masks.numpy(), defect_types=test.defect_types)
        return evaluate(scores, labels, defect_types=test.defect_types)
    except ValueError as exc:  # e.g. every mask of a defect type vanished when resized
        raise DataError(f"cannot evaluate the test set at {test.images.shape[-1]} px: {exc}") from exc


def training_steps(config: FinetuneConfig, n_train: int) -> int:
    """Steps for ``n_train`` training images: ``steps``, else ``epochs * ceil(n_train / batch)``,
    else ``DEFAULT_STEPS[protocol]``."""
    if config.steps is not None:
        return config.steps
    if config.epochs is not None:
        return config.epochs * math.ceil(n_train / min(config.batch_size, n_train))
    return DEFAULT_STEPS[config.protocol]


def _jsonable(obj: Any) -> Any:
    """Replace non-finite floats by None and numpy scalars by Python numbers (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def run_seed(
    config: FinetuneConfig,
    object_name: str,
    train: TensorData,
    test: TensorData,
    seed: int,
    device: torch.device,
    weights: LoadedWeights | None = None,
) -> dict:
    """Train on ``train`` and evaluate on ``test`` with one seed; returns the per-seed record
    (metrics from ``spotdiff.metrics.evaluate`` under ``metrics``). ``weights``: ``config.weights``
    already loaded (read here when None)."""
    steps = training_steps(config, len(train))
    torch.manual_seed(seed)
    weights = load_weights(config.arch, config.weights if weights is None else weights)
    model = build_model(config.task, config.arch, weights)
    start = time.perf_counter()
    losses = train_model(
        model,
        train,
        steps,
        config.batch_size,
        config.lr,
        seed,
        config.head_lr_mult,
        config.balanced,
        device,
        desc=f"{object_name} seed {seed}",
    )
    train_s = time.perf_counter() - start
    metrics = evaluate_model(model, test, config.task, 2 * config.batch_size, device)
    return {
        "object": object_name,
        "protocol": config.protocol,
        "task": config.task,
        "seed": seed,
        "steps": steps,
        "n_train": len(train),
        "n_train_anomalous": int(train.labels.sum()),
        "n_test": len(test),
        "n_test_anomalous": int(test.labels.sum()),
        "final_loss": float(np.mean(losses[-10:])),
        "train_seconds": round(train_s, 3),
        "train_images": train.paths,
        "weights": weights.record(),
        "metrics": metrics,
    }


def run_finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune and evaluate every seed of every requested object; write all outputs.

    Everything is validated (options, weights, every object's splits) before any training or
    writing. Outputs under ``config.out`` (all atomic):
        ``<object>/seed<k>.json``: per-seed record (metrics from ``spotdiff.metrics.evaluate``);
        ``<object>/aggregate.json`` / ``.csv``: mean ± std over seeds of every metric;
        ``table.csv`` / ``table.md``: objects as rows (+ mean row), AU-PR then AU-ROC columns;
        ``results.json``: the config, the weights record ``{name, file, sha256}``, per-object aggregates
        and the table rows.
    Returns the content of ``results.json`` plus ``per_seed`` (``{object: [record, ...]}``).
    """
    config.validate()
    protocol = get_protocol(config.protocol)
    device = resolve_device(config.device)
    weights = load_weights(config.arch, config.weights)  # fail fast on weights that do not fit, read once
    objects = list_objects(config.data, protocol) if config.object == "all" else [config.object]
    opened = [open_protocol(config.data, obj, protocol, config.image_size) for obj in objects]
    seeds = list(range(config.seeds))
    for data in opened:  # k-shot draws are cheap: check them all before training
        for seed in seeds:
            data.train_indices(seed)

    out = Path(config.out)
    per_seed: dict[str, list[dict]] = {}
    aggregates: dict[str, dict] = {}
    for data in opened:
        log.info(f"finetune {config.task} {config.protocol}: {data.object} ({len(seeds)} seed(s))")
        test = load_tensors(data.test, None, config.workers, desc=f"{data.object}: test images")
        records = []
        train: TensorData | None = None
        for seed in seeds:
            if train is None or protocol.k is not None:  # high-shot: the same images every seed
                train = load_tensors(
                    data.train_pool, data.train_indices(seed), config.workers, desc=f"{data.object}: train images"
                )
            record = run_seed(config, data.object, train, test, seed, device, weights)
            write_json_atomic(out / data.object / f"seed{seed}.json", _jsonable(record))
            records.append(record)
        per_seed[data.object] = records
        agg = aggregate([r["metrics"] for r in records])
        aggregates[data.object] = agg
        write_json_atomic(
            out / data.object / "aggregate.json", _jsonable({"object": data.object, "seeds": seeds, "metrics": agg})
        )
        write_text_atomic(out / data.object / "aggregate.csv", aggregate_csv(agg))

    metrics = TABLE_METRICS[config.task]
    rows = table_rows({obj: [r["metrics"] for r in recs] for obj, recs in per_seed.items()}, metrics)
    title = (
        f"2-class {config.task} {config.protocol}, {config.arch}, {describe_weights(weights.record(), short=True)}, "
        f"mean ± std over {len(seeds)} seed(s) (%)"
    )
    write_text_atomic(out / "table.csv", table_csv(rows, metrics))
    write_text_atomic(out / "table.md", table_markdown(rows, metrics, title))
    results = {
        "config": asdict(config),
        "weights": weights.record(),
        "seeds": seeds,
        "aggregate": aggregates,
        "table": rows,
    }
    write_json_atomic(out / "results.json", _jsonable(results))
    return {**results, "per_seed": per_seed}
