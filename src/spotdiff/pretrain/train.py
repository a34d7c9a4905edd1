"""The pre-training loop: one process on CPU or GPU, or many under ``torchrun``.

Per optimizer step: set the lr (linear warm-up then cosine, peak ``lr * batch_size / 256``), run
the method's forward under autocast (GPU), back-propagate (with loss scaling for fp16), stop on a
non-finite loss before the weights change, step the optimizer, let the method update itself
(e.g. MoCo's momentum encoder). Rank 0 writes ``RUN_DIR/log.csv``, TensorBoard events (when
``torch.utils.tensorboard`` imports), ``RUN_DIR/weights.json`` (the initial weights' record),
``RUN_DIR/checkpoint.pt`` every ``checkpoint_every`` steps and at the end, and finally
``RUN_DIR/backbone.safetensors``. SIGTERM checkpoints the step in
progress and stops.

Determinism: the data order depends on ``(seed, epoch)``, each sample's augmentation on
``(seed, epoch, index)``, and each step's random numbers (global torch RNG and the generator
given to the method's forward for SPD blending) on ``(seed, step, rank)``. A resumed run
therefore repeats exactly what the uninterrupted run would have done (bit-identical on CPU).

Reading order: ``run_pretrain`` → ``_pretrain``, which calls ``_set_up`` (data, model, resolved
config, step schedule, device, optimizer), ``_resume``, ``_data_loader``, ``_train`` (→
``_train_one_epoch`` → ``_one_step`` → ``train_step``), ``_checkpoint`` and ``_finish``.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from spotdiff.errors import ConfigError, DataError, SpotdiffError
from spotdiff.files import atomic_path, write_json_atomic, write_text_atomic
from spotdiff.models import LoadedWeights, load_weights
from spotdiff.pretrain.base import PretrainMethod
from spotdiff.pretrain.checkpoint import CHECKPOINT_NAME, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from spotdiff.pretrain.config import PretrainConfig, config_differences
from spotdiff.pretrain.data import EpochBatchSampler, PretrainImages, drop_unreadable, find_images, mix_seed
from spotdiff.pretrain.distributed import DistContext, all_reduce_mean, barrier, cleanup_distributed, init_distributed
from spotdiff.pretrain.export import write_backbone
from spotdiff.pretrain.methods import build_method
from spotdiff.pretrain.optim import build_optimizer, remember_peak_lr, set_lr
from spotdiff.progress import bar, set_quiet
from spotdiff.schedules import warmup_cosine
from spotdiff.threads import cpu_cores

log = logging.getLogger(__name__)

LOG_NAME = "log.csv"
LOG_COLUMNS = ("step", "epoch", "lr", "loss", "loss_base", "loss_spd", "img_per_s")
BACKBONE_NAME = "backbone.safetensors"
CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "weights.json"  # provenance of the initial backbone weights: {name, file, sha256}


def run_pretrain(cfg: PretrainConfig) -> Path:
    """Pre-train ``cfg.method`` on ``cfg.data``; return the final checkpoint ``cfg.out/checkpoint.pt``.

    Works as a plain process or under ``torchrun`` (one process per GPU, or several CPU
    processes with gloo). Raises SpotdiffError subclasses for bad config, data or a diverged loss.
    """
    cfg.validate()
    owned_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    ctx = init_distributed(cfg.device)
    try:
        return _pretrain(cfg, ctx)
    finally:
        if owned_group:
            cleanup_distributed()


def _pretrain(cfg: PretrainConfig, ctx: DistContext) -> Path:
    """Set up, resume if asked, train epoch by epoch, then save the checkpoint and the backbone."""
    if not ctx.is_main:
        set_quiet(True)
    ckpt_path = Path(cfg.out) / CHECKPOINT_NAME
    resume = _checkpoint_to_resume(cfg, ckpt_path)
    run = _set_up(cfg, ctx, ckpt_path, resume)
    if resume is not None:
        _resume(run, resume)
        del resume
    on_gpu = ctx.device.type == "cuda"
    model = (
        DistributedDataParallel(run.method, device_ids=[ctx.device.index] if on_gpu else None)
        if ctx.distributed
        else run.method
    )
    loader = _data_loader(run)
    if ctx.is_main:
        _write_run_record(run)
    step = _train(run, model, loader)
    _finish(run, step)
    return ckpt_path


@dataclasses.dataclass
class _Run:
    """What the loop needs, built once by ``_set_up``; ``cfg`` holds the resolved settings."""

    cfg: PretrainConfig
    ctx: DistContext
    ckpt_path: Path
    paths: list[Path]
    labels: list[int]
    class_names: list[str]
    init: LoadedWeights  # the initial backbone weights
    method: PretrainMethod
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    sampler: EpochBatchSampler
    total_steps: int
    warmup_steps: int
    peak_lr: float
    start_step: int = 0

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch


def _set_up(cfg: PretrainConfig, ctx: DistContext, ckpt_path: Path, resume: dict[str, Any] | None) -> _Run:
    """Data, model, resolved config, step schedule, device and optimizer: all before the first step."""
    paths, labels, class_names = _find_images(cfg, ctx)
    init = load_weights(cfg.arch, cfg.weights)  # read (or downloaded) and checked before anything is written
    method = _build_method(cfg, class_names, init)
    cfg = _resolve_config(cfg, method, len(paths), ctx)
    method.check_image_size(cfg.image_size)  # before anything is written
    if resume is not None:
        changed = config_differences(resume["config"], cfg)
        if changed:
            raise ConfigError(f"{ckpt_path}: cannot resume with a different config: " + "; ".join(changed))
    sampler, total_steps, warmup_steps = _schedule(cfg, ctx, len(paths), method)
    method = _place(method, cfg, ctx)
    peak_lr = method.recipe.base_lr * method.recipe.batch_size / 256
    optimizer = build_optimizer(method, peak_lr)
    remember_peak_lr(optimizer)
    on_gpu = ctx.device.type == "cuda"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if on_gpu else None
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype is torch.float16)
    return _Run(
        cfg,
        ctx,
        ckpt_path,
        paths,
        labels,
        class_names,
        init,
        method,
        optimizer,
        scaler,
        amp_dtype,
        sampler,
        total_steps,
        warmup_steps,
        peak_lr,
    )


def _find_images(cfg: PretrainConfig, ctx: DistContext) -> tuple[list[Path], list[int], list[str]]:
    """The training images, their labels and class names; unreadable ones dropped with ``skip_bad``."""
    paths, labels, class_names = find_images(cfg.data)
    if cfg.skip_bad:
        paths, labels, dropped = drop_unreadable(paths, labels)
        if ctx.is_main:  # printed even with --quiet: the run used fewer images than asked for
            for reason in dropped:
                log.warning(f"skipped {reason}")
    if cfg.method == "supervised" and not class_names:
        raise DataError(f"{cfg.data}: supervised pre-training needs class subfolders (DIR/<class>/*.png)")
    return paths, labels, class_names


def _build_method(cfg: PretrainConfig, class_names: list[str], init: LoadedWeights) -> PretrainMethod:
    """The method (backbone and heads), initialised from ``init`` and ``cfg.seed``."""
    torch.manual_seed(cfg.seed)  # model initialisation
    try:
        return build_method(
            cfg.method,
            arch=cfg.arch,
            spd=cfg.spd,
            eta=cfg.eta,
            num_classes=len(class_names) if cfg.method == "supervised" else None,
            weights=init,
            **cfg.hparams,
        )
    except TypeError as exc:
        raise ConfigError(f"hparams {cfg.hparams}: not accepted by {cfg.method} ({exc})") from exc


def _resolve_config(cfg: PretrainConfig, method: PretrainMethod, n_images: int, ctx: DistContext) -> PretrainConfig:
    """``cfg`` with the method's recipe filled in, batch size and workers capped by the data and cores.

    Also hands the resolved values back to ``method.recipe`` (the optimizer and param groups read them).
    """
    cfg = cfg.with_recipe(method.recipe)
    recipe = cfg.run_recipe(method.recipe)
    fitting = n_images - n_images % ctx.world_size  # the largest batch the data allows
    if n_images < recipe.batch_size and fitting >= ctx.world_size:
        log.info(
            f"note: batch size {recipe.batch_size} capped at {fitting}, the number of images in {cfg.data} "
            "(the peak lr scales with it)"
        )
        cfg = dataclasses.replace(cfg, batch_size=fitting)
        recipe = dataclasses.replace(recipe, batch_size=fitting)
    if n_images < recipe.batch_size:
        raise DataError(
            f"{cfg.data}: {n_images} images, fewer than one batch of {recipe.batch_size} (lower --batch-size)"
        )
    cores = cpu_cores()
    if cfg.workers > cores:
        log.info(f"note: {cfg.workers} data-loading workers capped at {cores}, the number of CPU cores")
        cfg = dataclasses.replace(cfg, workers=cores)
    method.recipe = recipe
    return cfg


def _schedule(
    cfg: PretrainConfig, ctx: DistContext, n_images: int, method: PretrainMethod
) -> tuple[EpochBatchSampler, int, int]:
    """This process's batch sampler, the total number of steps and the warm-up steps."""
    recipe = method.recipe  # resolved by _resolve_config
    if recipe.batch_size % ctx.world_size:
        raise ConfigError(f"batch_size {recipe.batch_size} is not divisible by {ctx.world_size} processes")
    sampler = EpochBatchSampler(n_images, recipe.batch_size, cfg.seed, ctx.rank, ctx.world_size)
    steps_per_epoch = sampler.batches_per_epoch
    method.check_batches(steps_per_epoch * recipe.batch_size, recipe.batch_size, ctx.world_size)
    total_steps = cfg.steps if cfg.steps is not None else recipe.epochs * steps_per_epoch
    warmup_steps = min(total_steps, round(recipe.warmup_epochs * steps_per_epoch))
    return sampler, total_steps, warmup_steps


def _place(method: PretrainMethod, cfg: PretrainConfig, ctx: DistContext) -> PretrainMethod:
    """``method`` on the device (SyncBatchNorm under DDP on GPUs, channels-last if asked)."""
    on_gpu = ctx.device.type == "cuda"
    if ctx.distributed and on_gpu and method.sync_batchnorm:  # MoCo shuffles its BN batches instead
        # converts the BN children in place and returns ``method`` itself (the method is not a BN layer)
        nn.SyncBatchNorm.convert_sync_batchnorm(method)
    method.to(ctx.device)
    if on_gpu and cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    return method


def _resume(run: _Run, state: dict[str, Any]) -> None:
    """Load model, optimizer, loss scaler and RNG states; the run continues at the saved step."""
    run.method.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if state["scaler"]:  # empty when fp16 loss scaling was off
        run.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    run.start_step = int(state["step"])
    log.info(f"resuming {run.ckpt_path} at step {run.start_step}/{run.total_steps}")


def _data_loader(run: _Run) -> DataLoader:
    """Batches of augmented views for this process, in the sampler's (seed, epoch) order."""
    cfg = run.cfg
    dataset = PretrainImages(run.paths, run.labels, run.method.view_transform(cfg.image_size), cfg.seed)
    return DataLoader(
        dataset,
        batch_size=run.sampler.local_batch,
        sampler=run.sampler,
        num_workers=cfg.workers,
        pin_memory=run.ctx.device.type == "cuda",
        drop_last=True,
        persistent_workers=cfg.workers > 0,
    )


def _write_run_record(run: _Run) -> None:
    """Rank 0: the run folder with its resolved config and initial weights' record; one summary line."""
    cfg, ctx = run.cfg, run.ctx
    run.run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(run.run_dir / CONFIG_NAME, cfg)
    write_json_atomic(run.run_dir / WEIGHTS_NAME, run.init.record())
    log.info(
        f"pretrain {cfg.method}{'+spd' if cfg.spd else ''} {cfg.arch}: {len(run.paths)} images"
        f"{f' in {len(run.class_names)} classes' if run.class_names else ''}, batch {cfg.batch_size} on "
        f"{ctx.world_size} process(es) ({ctx.device.type}"
        f"{', ' + torch.distributed.get_backend() if ctx.distributed else ''}), {run.total_steps} steps "
        f"({run.steps_per_epoch}/epoch, warm-up {run.warmup_steps}), peak lr {run.peak_lr:g}"
    )


def _train(run: _Run, model: nn.Module, loader: DataLoader) -> int:
    """Train from ``run.start_step`` to ``run.total_steps``; return the last step done."""
    tracker = _Tracker(run)
    sigterm = _SigtermFlag()
    step = run.start_step
    try:
        while step < run.total_steps:
            step = _train_one_epoch(run, model, loader, step, tracker, sigterm)
    finally:
        sigterm.restore()
        tracker.close()
    return step


def _train_one_epoch(
    run: _Run, model: nn.Module, loader: DataLoader, step: int, tracker: _Tracker, sigterm: _SigtermFlag
) -> int:
    """The rest of the epoch that ``step`` falls in (or up to the last step); return the step reached.

    Checkpoints every ``checkpoint_every`` steps; on SIGTERM checkpoints and raises SpotdiffError.
    """
    epoch, start_batch = divmod(step, run.steps_per_epoch)
    run.sampler.set_epoch(epoch, start_batch)
    for views, labels in _reraise_data_errors(loader):
        lr = set_lr(run.optimizer, warmup_cosine(step, run.total_steps, run.warmup_steps))
        *stats, stop = _one_step(run, model, views, labels, step, sigterm)
        step += 1
        tracker.add(step, epoch, lr, stats)
        if run.cfg.checkpoint_every and step % run.cfg.checkpoint_every == 0 and step < run.total_steps:
            started = time.perf_counter()
            _checkpoint(run, step)
            tracker.window.start += time.perf_counter() - started  # img/s counts training only
        if stop and step < run.total_steps:  # SIGTERM reached some process: save and stop, all together
            _checkpoint(run, step)
            raise SpotdiffError(
                f"stopped by SIGTERM after step {step}/{run.total_steps}; checkpoint saved "
                f"to {run.ckpt_path}; continue with --resume"
            )
        if step >= run.total_steps:
            break
    return step


def _one_step(
    run: _Run, model: nn.Module, views: dict[str, torch.Tensor], labels: torch.Tensor, step: int, sigterm: _SigtermFlag
) -> list[float]:
    """Seed step ``step`` (0-based), move the batch to the device and train on it.

    Returns ``[loss, loss_base, loss_spd, stop]``; raises SpotdiffError when the loss is not finite.
    """
    cfg, ctx, device = run.cfg, run.ctx, run.ctx.device
    torch.manual_seed(mix_seed(cfg.seed, step, ctx.rank, 1))
    generator = torch.Generator(device).manual_seed(mix_seed(cfg.seed, step, ctx.rank, 2))
    channels_last = cfg.channels_last and device.type == "cuda"
    views = {k: _to_device(v, device, channels_last) for k, v in views.items()}
    labels = labels.to(device, non_blocking=True)
    stats = train_step(
        model,
        run.method,
        run.optimizer,
        run.scaler,
        views,
        labels,
        generator,
        run.amp_dtype,
        ctx,
        float(sigterm.is_set()),
    )
    if not all(math.isfinite(v) for v in stats):
        raise SpotdiffError(
            f"loss became {stats[0]} at step {step + 1} (epoch {step // run.steps_per_epoch}); stopped before "
            f"updating the weights. The last good checkpoint is kept: "
            f"{run.ckpt_path if run.ckpt_path.is_file() else 'none written yet'}. "
            "Try a lower --lr or --amp bf16/none."
        )
    return stats


def _checkpoint(run: _Run, step: int) -> None:
    """Rank 0 saves everything needed to resume after ``step``; all processes wait for it."""
    if run.ctx.is_main:
        save_checkpoint(
            run.ckpt_path,
            {
                "step": step,
                "epoch": step // run.steps_per_epoch,
                "world_size": run.ctx.world_size,
                "config": run.cfg.to_dict(),
                "model": run.method.state_dict(),
                "backbone": run.method.backbone.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scaler": run.scaler.state_dict(),
                "rng": rng_state(),
            },
        )
    barrier(run.ctx)


def _finish(run: _Run, step: int) -> None:
    """Save the final checkpoint (unless the run was already complete) and the backbone."""
    if run.start_step < run.total_steps or not run.ckpt_path.is_file():
        _checkpoint(run, step)
    if run.ctx.is_main:
        cfg = run.cfg
        write_backbone(
            run.method.backbone.state_dict(),
            cfg.arch,
            run.run_dir / BACKBONE_NAME,
            {
                "method": cfg.method,
                "spd": cfg.spd,
                "eta": cfg.eta,
                "step": step,
                "init_weights": run.init.name,
                "init_sha256": run.init.sha256,
            },
        )
        log.info(f"pretrain done: {run.ckpt_path}, backbone {run.run_dir / BACKBONE_NAME}")
    barrier(run.ctx)


def train_step(
    model: nn.Module,
    method: PretrainMethod,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    views: dict[str, torch.Tensor],
    labels: torch.Tensor,
    generator: torch.Generator,
    amp_dtype: torch.dtype | None,
    ctx: DistContext,
    stop: float = 0.0,
) -> list[float]:
    """One optimizer step of the loop on a batch already on the device.

    ``model`` is ``method`` or its DDP wrapper. Returns ``[loss, loss_base, loss_spd, stop]``
    averaged over processes; when a loss is not finite the weights are left unchanged (the loop
    then stops with an error).
    """
    stats = _forward_backward(model, views, labels, generator, amp_dtype, scaler, stop, ctx)
    if all(math.isfinite(v) for v in stats):
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        method.after_step()
    return stats


def _forward_backward(
    model: nn.Module,
    views: dict[str, torch.Tensor],
    labels: torch.Tensor,
    generator: torch.Generator,
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler,
    stop: float,
    ctx: DistContext,
) -> list[float]:
    """Losses of one batch, back-propagated.

    Returns ``[loss, loss_base, loss_spd, stop]`` averaged over processes (one all-reduce); ``stop``
    is > 0 when any process asked to stop.
    """
    autocast = torch.autocast(ctx.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    with autocast:
        out = model(views, labels=labels, generator=generator)
    scaler.scale(out["loss"]).backward()
    zero = torch.zeros((), device=ctx.device)
    stats = [out[k].detach().float() if k in out else zero for k in ("loss", "loss_base", "loss_spd")]
    return all_reduce_mean(torch.stack([*stats, zero + stop]), ctx).tolist()


class _SigtermFlag:
    """Records SIGTERM (pre-emption, ``kill``, torchrun shutting down) instead of dying at once.

    The loop then checkpoints at the end of the current step and stops. Only the main thread
    can install signal handlers; elsewhere the flag is never set.
    """

    def __init__(self) -> None:
        self._set = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _checkpoint_to_resume(cfg: PretrainConfig, ckpt_path: Path) -> dict[str, Any] | None:
    """The checkpoint to resume from, None to start fresh; refuses to overwrite a run silently."""
    if not ckpt_path.is_file():
        if cfg.resume:
            log.info(f"no checkpoint at {ckpt_path}; starting from step 0")
        return None
    if not cfg.resume:
        raise ConfigError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    return load_checkpoint(ckpt_path)


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _reraise_data_errors(loader: DataLoader):
    """Iterate ``loader``; a DataError raised in a worker comes back as one clean line."""
    try:
        yield from loader
    except DataError as exc:
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        last = lines[-1] if lines else str(exc)
        raise DataError(last.split("DataError: ", 1)[-1] + " (use --skip-bad to skip unreadable images)") from None


def _write_config(path: Path, cfg: PretrainConfig) -> None:
    import yaml

    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


class _Window:
    """Loss and throughput averaged over the steps since the last log row."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums = [0.0, 0.0, 0.0]
        self.steps = 0
        self.images = 0
        self.start = time.perf_counter()

    def add(self, stats: list[float], images: int) -> None:
        self.sums = [s + v for s, v in zip(self.sums, stats, strict=True)]
        self.steps += 1
        self.images += images

    def row(self, step: int, epoch: int, lr: float) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        loss, loss_base, loss_spd = (s / self.steps for s in self.sums)
        row = {
            "step": step,
            "epoch": epoch,
            "lr": lr,
            "loss": loss,
            "loss_base": loss_base,
            "loss_spd": loss_spd,
            "img_per_s": self.images / elapsed,
        }
        self.reset()
        return row


class _Tracker:
    """The progress bar, the loss/throughput window and (rank 0) the log rows of one run."""

    def __init__(self, run: _Run) -> None:
        cfg = run.cfg
        self.total_steps, self.log_every, self.batch_size = run.total_steps, cfg.log_every, run.method.recipe.batch_size
        self.logger = _RunLogger(run.run_dir, run.start_step, cfg.tensorboard) if run.ctx.is_main else None
        run_name = f"pretrain {cfg.method}{'+spd' if cfg.spd else ''}"  # names the run: simsiam vs simsiam+spd
        self.progress = bar(total=run.total_steps, desc=run_name, initial=run.start_step, unit="step")
        self.window = _Window()

    def add(self, step: int, epoch: int, lr: float, stats: list[float]) -> None:
        """Count step ``step`` (1-based) with its losses; write a log row every ``log_every`` steps."""
        self.window.add(stats, self.batch_size)
        self.progress.update(1)
        if self.logger is not None and (step % self.log_every == 0 or step == self.total_steps):
            row = self.window.row(step, epoch, lr)
            self.logger.write(row)
            self.progress.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.1f}")

    def close(self) -> None:
        self.progress.close()
        if self.logger is not None:
            self.logger.close()


class _RunLogger:
    """Rank 0's CSV log (append-only; rows past a resumed step are dropped) and TensorBoard."""

    def __init__(self, run_dir: Path, start_step: int, tensorboard: bool):
        path = run_dir / LOG_NAME
        kept: list[list[str]] = []
        if start_step > 0 and path.is_file():
            with open(path, newline="") as fh:
                kept = [r for r in list(csv.reader(fh))[1:] if r and int(r[0]) <= start_step]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            csv.writer(fh).writerows([list(LOG_COLUMNS), *kept])
        self.file = open(path, "a", newline="")  # noqa: SIM115 - kept open for the whole run
        self.csv = csv.writer(self.file)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("TensorBoard not installed; logging to CSV only")
            else:
                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)

    def write(self, row: dict[str, float]) -> None:
        self.csv.writerow([f"{row[k]:.6g}" if isinstance(row[k], float) else row[k] for k in LOG_COLUMNS])
        self.file.flush()
        if self.tb is not None:
            for key in LOG_COLUMNS[2:]:
                self.tb.add_scalar(f"pretrain/{key}", row[key], row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
