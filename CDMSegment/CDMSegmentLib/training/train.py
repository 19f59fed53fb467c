"""Training the class-conditional diffusion model on slices with image-level labels only.

Every random choice of a step (batch, t, eps) comes from a generator seeded with
(seed, step, rank), so a run resumed from a checkpoint continues exactly as if it
had never stopped. Multi-GPU and multi-node through torchrun + DistributedDataParallel
(NCCL on GPUs, gloo on CPUs).
"""

import contextlib
import copy
import json
import os
import pickle
import time
import warnings
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..core.device import cpu_has_bf16
from ..core.errors import CDMSegmentError
from ..core.schedule import NoiseSchedule
from ..core.unet import ConditionalUNet, UNetConfig


@dataclass
class TrainConfig:
    steps: int = 20000
    batch_size: int = 32  # per process
    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    schedule: str = "linear"
    num_timesteps: int = 1000
    seed: int = 0
    balance_classes: bool = True  # half of each batch from slices with the class, when there are any
    precision: str = "auto"  # auto: bf16 autocast on CUDA and on CPUs with bf16 units (AVX-512 BF16, AMX), else fp32
    checkpoint_every: int = 1000
    grad_clip: float = 1.0
    flip_lr: bool = True  # random left-right flips: brains are roughly symmetric, lesions are not
    image_size: int = 128  # recorded for export; the data decides
    # The noise band: t is drawn uniformly from t_range[0]..t_range[1] (inclusive); None = the full 0..T-1.
    # The CDM evaluates the network only near its own noise level (and the OOD score's few levels), so
    # samples far from them buy little; the band's upper end must reach levels where a lesion is no longer
    # visible in x_t, or the network learns to ignore the label.
    t_range: Optional[Tuple[int, int]] = None
    modalities: Tuple[str, ...] = ("flair",)
    class_names: Tuple[str, ...] = ("normal", "tumour")
    unet: UNetConfig = field(default_factory=UNetConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["unet"] = self.unet.to_dict()
        return d

    def __post_init__(self):
        self.modalities = tuple(self.modalities)
        self.class_names = tuple(self.class_names)
        if self.t_range is not None:
            self.t_range = tuple(int(t) for t in self.t_range)
            if len(self.t_range) != 2 or not 0 <= self.t_range[0] <= self.t_range[1] < self.num_timesteps:
                raise CDMSegmentError(f"the training noise band must be LO,HI with 0 <= LO <= HI <= "
                                      f"{self.num_timesteps - 1} (T - 1), got {','.join(map(str, self.t_range))}")

    @property
    def t_band(self) -> Tuple[int, int]:
        """(lo, hi) inclusive: the timesteps training draws from."""
        return self.t_range if self.t_range is not None else (0, self.num_timesteps - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**{**d, "unet": UNetConfig.from_dict(d.get("unet", {}))})


def distributed_context():
    """(rank, world size, device) from torchrun's environment; initialises the process group once."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + rank) % (2 ** 63))


def sample_batch(labels: torch.Tensor, batch_size: int, g: torch.Generator, balance: bool) -> torch.Tensor:
    """Indices of one batch; with ``balance`` half come from slices labelled > 0 (lesions are rare)."""
    positives = torch.nonzero(labels > 0).flatten()
    negatives = torch.nonzero(labels == 0).flatten()
    if not balance or len(positives) == 0 or len(negatives) == 0:
        return torch.randint(len(labels), (batch_size,), generator=g)
    n_pos = batch_size // 2
    pos = positives[torch.randint(len(positives), (n_pos,), generator=g)]
    neg = negatives[torch.randint(len(negatives), (batch_size - n_pos,), generator=g)]
    return torch.cat([pos, neg])


def to_float(images: torch.Tensor) -> torch.Tensor:
    """Slices stored as uint8 (0..255 for [-1, 1]) or float -> float32 in [-1, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    return images.float()


def _autocast(device: torch.device, precision: str):
    """bf16 autocast where it pays: on CUDA and on CPUs with bf16 units ('auto'), or when asked ('bf16');
    on an AVX2-only CPU bf16 ran 7-100x slower than fp32 (measured), so 'auto' stays fp32 there."""
    if precision not in ("auto", "bf16", "fp32"):
        raise CDMSegmentError(f"unknown training precision {precision!r}; use auto, bf16 or fp32")
    if precision == "fp32" or (precision == "auto" and device.type == "cpu" and not cpu_has_bf16()):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, progress))))


# on_checkpoint(step, ema network, mean loss since the last checkpoint) -> (a line for the log, the figures it
# states as a JSON-able dict for progress.jsonl), or None
OnCheckpoint = Callable[[int, torch.nn.Module, float], Optional[Tuple[str, dict]]]

LossFn = Callable[[torch.nn.Module, torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                  torch.Tensor]


def diffusion_loss(model, net, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The simple loss ||eps - eps_theta(x_t, t, f(y))||^2 (Ho et al. eq. 14)."""
    pred = model(x_t, t, net.class_embedding(y))
    return F.mse_loss(pred.float(), eps)


def train_diffusion(images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, run_dir: Path,
                    progress: bool = True, log: Callable[[str], None] = print,
                    stop_after: Optional[int] = None, on_checkpoint: Optional[OnCheckpoint] = None) -> Path:
    """Train eps_theta(x_t, t, f(y)) with the simple loss ||eps - eps_theta||^2 over t in ``cfg.t_band``.

    images: (N, C, S, S) uint8 or float in [-1, 1]; labels: (N,) image-level class per slice.
    The band must reach high noise: the label carries information only where the noisy image
    no longer shows the lesion. Writes ``run_dir/checkpoint.pt`` (resumed automatically)
    and returns its path. stop_after: stop at this step (to test exact resumption).
    """
    return train_network(lambda: ConditionalUNet(cfg.unet), diffusion_loss, images, labels, cfg, run_dir,
                         kind="diffusion", progress=progress, log=log, stop_after=stop_after,
                         on_checkpoint=on_checkpoint)


def train_network(build: Callable[[], torch.nn.Module], loss_fn: LossFn, images: torch.Tensor, labels: torch.Tensor,
                  cfg: TrainConfig, run_dir: Path, *, kind: str, progress: bool = True,
                  log: Callable[[str], None] = print, stop_after: Optional[int] = None,
                  on_checkpoint: Optional[OnCheckpoint] = None) -> Path:
    """The shared training loop on noisy slices x_t = q_sample(x_0, t, eps), t uniform over ``cfg.t_band``.

    build() makes the network (after seeding, so its initial weights are reproducible);
    loss_fn(model, net, x_t, t, y, eps) -> scalar runs under autocast (``model`` may be the DDP
    wrapper of ``net``). kind ("diffusion" or "classifier") is stored in the checkpoint, so a
    run folder of one kind is never resumed as the other. At every checkpoint a line (step, samples,
    hours, mean loss, and what ``on_checkpoint`` measures on the EMA network) is logged and appended
    to ``run_dir/progress.jsonl``, and the EMA weights are kept as ``run_dir/snapshots/step-N.pt``
    (a learning curve can be measured afterwards).
    """
    rank, world, device = distributed_context()
    if images.shape[1] != cfg.unet.in_channels:
        raise CDMSegmentError(f"the data has {images.shape[1]} channels, the network expects {cfg.unet.in_channels}")
    if int(labels.max()) >= cfg.unet.num_classes:
        raise CDMSegmentError(f"labels go up to {int(labels.max())} but the network knows {cfg.unet.num_classes} classes")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    torch.manual_seed(cfg.seed)
    net = build().to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, seconds = 0, 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        saved = TrainConfig.from_dict(state["config"])
        if dataclasses.replace(saved, steps=cfg.steps).to_dict() != cfg.to_dict() or state.get("kind", "diffusion") != kind:
            raise CDMSegmentError(f"{ckpt_path} was made with another configuration; use a new run folder")
        if cfg.steps < state["step"]:
            raise CDMSegmentError(f"{ckpt_path} is already at step {state['step']}; ask for at least that many steps "
                                  f"(--steps) to resume it, or use a new run folder")
        net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step, seconds = state["step"], state["seconds"]
        log(f"resuming at step {step}")
        if cfg.steps != saved.steps:
            log(f"the schedule goes from {saved.steps} to {cfg.steps} steps: the learning rate follows the longer "
                f"cosine from here ({lr_at(step, saved):.2g} -> {lr_at(step, cfg):.2g})")
    # channels-last pays on CUDA; on an AVX2 CPU in fp32 a training step took 2.2x as long with it (measured)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    schedule = NoiseSchedule(cfg.schedule, cfg.num_timesteps)
    alphas = schedule.alphas_cumprod.float().to(device)
    data = images.to(device) if device.type == "cuda" else images
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=step, unit="step", desc=f"training {kind}")
    last = stop_after if stop_after is not None else cfg.steps
    t_lo, t_hi = cfg.t_band
    loss_sum = torch.zeros((), device=device)  # summed on the device: no per-step host sync for the log
    loss_count = 0
    start = time.perf_counter()
    while step < last:
        g = step_generator(cfg.seed, step, rank)
        idx = sample_batch(labels, cfg.batch_size, g, cfg.balance_classes)
        x_0 = to_float(data[idx.to(data.device)]).to(device, non_blocking=True)
        if cfg.flip_lr:
            flip = (torch.rand(cfg.batch_size, generator=g) < 0.5).to(device)
            x_0 = torch.where(flip.view(-1, 1, 1, 1), x_0.flip(-1), x_0)
        y = labels[idx].to(device)
        t = torch.randint(t_lo, t_hi + 1, (cfg.batch_size,), generator=g).to(device)
        eps = torch.randn(x_0.shape, generator=g).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = (a.sqrt() * x_0 + (1 - a).sqrt() * eps).contiguous(memory_format=memory_format)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with _autocast(device, cfg.precision):
            loss = loss_fn(model, net, x_t, t, y, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p, 1 - cfg.ema_decay)
        step += 1
        loss_sum += loss.detach()
        loss_count += 1
        if bar is not None:
            bar.update(1)
        if rank == 0 and (step % cfg.checkpoint_every == 0 or step == last):
            elapsed = seconds + time.perf_counter() - start
            _save(ckpt_path, net, ema, opt, step, elapsed, cfg, kind)
            mean_loss = float(loss_sum) / max(1, loss_count)
            _report(run_dir, step, cfg, elapsed, mean_loss, ema, on_checkpoint, log if bar is None else bar.write)
            loss_sum.zero_()
            loss_count = 0
    if bar is not None:
        bar.close()
    if world > 1:
        dist.barrier()
    return ckpt_path


def _report(run_dir: Path, step: int, cfg: TrainConfig, seconds: float, mean_loss: float, ema: torch.nn.Module,
            on_checkpoint: Optional[OnCheckpoint], log: Callable[[str], None]) -> None:
    """How far the run is: one log line and one JSON line, and a copy of the EMA weights of this step."""
    snapshots = run_dir / "snapshots"
    snapshots.mkdir(exist_ok=True)
    torch.save(ema.state_dict(), snapshots / f"step-{step}.pt")
    measured, figures = (on_checkpoint(step, ema, mean_loss) if on_checkpoint is not None else None) or ("", {})
    line = (f"step {step}/{cfg.steps}, {step * cfg.batch_size} samples, {seconds / 3600:.2f} h, "
            f"loss {mean_loss:.4f}" + (f", {measured}" if measured else ""))
    log(line)
    with open(run_dir / "progress.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "samples": step * cfg.batch_size, "hours": round(seconds / 3600, 4),
                            "loss": round(mean_loss, 5), "held_out": figures}) + "\n")


def _save(path: Path, net, ema, opt, step: int, seconds: float, cfg: TrainConfig, kind: str) -> None:
    """Write atomically: an interrupted save never corrupts the last good checkpoint."""
    tmp = path.with_name(path.name + ".partial")
    torch.save({"model": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "seconds": seconds, "config": cfg.to_dict(), "kind": kind}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, weights: str = "ema", kind: str = "diffusion",
                    build: Callable[[UNetConfig], torch.nn.Module] = ConditionalUNet):
    """-> (network made by ``build`` with the EMA (or raw) weights on the CPU, TrainConfig, checkpoint dict)."""
    try:
        with warnings.catch_warnings():  # torch's note when the file is TorchScript: the line below says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as e:
        raise CDMSegmentError(f"cannot read checkpoint {path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, IndexError, KeyError, AttributeError, ImportError):
        raise CDMSegmentError(f"{path} is not the checkpoint.pt of a 'cdmsegment train' run (not a PyTorch file); "
                              "give the checkpoint.pt in the run folder of 'cdmsegment train'") from None
    if not isinstance(state, dict):
        raise CDMSegmentError(f"{path} is not the checkpoint.pt of a 'cdmsegment train' run (a model file, already "
                              "exported? use it as it is, or change its defaults with 'cdmsegment set-defaults')")
    if state.get("kind", "diffusion") != kind:
        raise CDMSegmentError(f"{path} is a {state.get('kind', 'diffusion')} checkpoint, but a {kind} checkpoint is needed")
    cfg = TrainConfig.from_dict(state["config"])
    net = build(cfg.unet)
    net.load_state_dict(state[weights])
    return net.eval(), cfg, state


def write_run_info(run_dir: Path, info: dict) -> None:
    (Path(run_dir) / "run.json").write_text(json.dumps(info, indent=1, sort_keys=True))
