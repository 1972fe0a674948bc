"""The site's mask-conditioned diffusion generator (diffusers model + schedulers).

A site trains it on its private image/mask pairs and sends only its weights (plus two numbers
describing its mask sizes); the server samples synthetic (image, mask) pairs from it.

Design (measured on 2 CPU cores, see DESIGN.md section 5): the paper's ControlNet idea in its
smallest form. The mask is an extra input channel of a diffusers ``UNet2DModel`` that denoises the
RGB image (4 in, 3 out) at 64 px, trained with a ``DDPMScheduler`` (cosine betas,
v-prediction), AdamW with warm-up and cosine decay, and an EMA of the weights; sampled with
``DDIMScheduler`` (trailing spacing). The masks that condition sampling are random irregular
ellipses whose only link to the site is the mean and spread of its log foreground fraction: no
real mask ever leaves the site (the paper's server conditions on masks "tied to" each client).

Training is budgeted by steps *and* wall seconds, whichever ends first.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class GeneratorConfig:
    size: int = 32
    widths: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    norm_groups: int = 8
    train_steps: int = 3000
    max_seconds: float = 180.0
    batch_size: int = 32
    learning_rate: float = 6e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    sample_steps: int = 50
    seed: int = 0


@dataclass(frozen=True)
class DPSGD:
    """Differentially private generator training (opacus DP-SGD with Poisson sampling)."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float


def build_unet(cfg: GeneratorConfig):
    from diffusers import UNet2DModel

    n = len(cfg.widths)
    return UNet2DModel(
        sample_size=cfg.size,
        in_channels=4,
        out_channels=3,
        block_out_channels=tuple(cfg.widths),
        layers_per_block=cfg.layers_per_block,
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        norm_num_groups=cfg.norm_groups,
    )


def _train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
    )


def _sample_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        clip_sample=True,
    )


def mask_statistics(masks: np.ndarray) -> tuple[float, float]:
    """Mean and std of log foreground fraction over non-empty masks (the only mask info shared)."""
    frac = masks.reshape(len(masks), -1).mean(1)
    frac = frac[frac > 0]
    if len(frac) == 0:
        return math.log(0.05), 0.5
    logs = np.log(frac)
    return float(logs.mean()), float(max(logs.std(), 0.1))


def random_masks(n: int, size: int, log_mean: float, log_std: float, seed: int) -> np.ndarray:
    """Irregular ellipses: (n,1,size,size) {0,1}, area drawn from the site's size statistics."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.zeros((n, 1, size, size), np.uint8)
    for i in range(n):
        frac = float(np.clip(np.exp(rng.normal(log_mean, log_std)), 0.005, 0.6))
        ratio = rng.uniform(0.6, 1.0)
        a = math.sqrt(frac / (math.pi * ratio))
        b = a * ratio
        cx, cy = rng.uniform(a, 1 - a) if a < 0.5 else 0.5, rng.uniform(b, 1 - b) if b < 0.5 else 0.5
        th = rng.uniform(0, math.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * math.cos(th) + dy * math.sin(th)) / a
        v = (-dx * math.sin(th) + dy * math.cos(th)) / b
        phi = np.arctan2(v, u)
        wobble = 1 + sum(
            rng.uniform(0, 0.12) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
        )
        out[i, 0] = (np.sqrt(u**2 + v**2) <= wobble).astype(np.uint8)
    return out


def _to_model_space(images: np.ndarray, masks: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(images).float() / 127.5 - 1.0
    m = torch.from_numpy(masks).float() * 2.0 - 1.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area")
        m = (F.interpolate((m + 1) / 2, size=(size, size), mode="area") > 0.5).float() * 2 - 1
    return x, m


def train_generator(
    images: np.ndarray,
    masks: np.ndarray,
    cfg: GeneratorConfig,
    device: torch.device | str = "cpu",
    log=None,
    dp: DPSGD | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """Train on (N,3,S,S) uint8 images and (N,1,S,S) {0,1} masks; return EMA weights and stats.

    With ``dp`` the UNet trains with opacus DP-SGD (per-sample clipping, Gaussian noise, Poisson
    sampling; the generator's Conv2d, GroupNorm and Linear layers all have per-sample gradients)
    and the stats carry the ε spent at ``dp.delta`` (RDP accountant)."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_all, m_all = _to_model_space(images, masks, cfg.size)
    unet = build_unet(cfg).to(device)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    sched = _train_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
    lr_sched = get_cosine_schedule_with_warmup(
        opt, min(cfg.warmup_steps, cfg.train_steps // 5 + 1), cfg.train_steps
    )
    t0, losses, step = time.time(), [], 0
    # bf16 autocast pays off on GPUs; on CPUs without bf16 units it made a step 15x slower
    dev_type = torch.device(device).type
    autocast = torch.autocast(
        device_type=dev_type, dtype=torch.bfloat16, enabled=dev_type == "cuda" and dp is None
    )
    engine, batches = None, None
    if dp is not None:
        engine, model, opt, batches = _make_private(unet, opt, x_all, m_all, cfg, dp, gen)
    else:
        model = unet
    unet.train()
    while step < cfg.train_steps and time.time() - t0 < cfg.max_seconds:
        if batches is not None:
            x, m = next(batches)
            if len(x) == 0:  # Poisson sampling may draw an empty batch
                continue
            x, m = x.to(device), m.to(device)
        else:
            idx = torch.randint(0, len(x_all), (min(cfg.batch_size, len(x_all)),), generator=gen)
            x, m = x_all[idx].to(device), m_all[idx].to(device)
        flip = torch.rand(len(x), generator=gen) < 0.5  # horizontal flips: cheap augmentation
        x[flip], m[flip] = x[flip].flip(-1), m[flip].flip(-1)
        noise = torch.randn(x.shape, generator=gen).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x),), generator=gen).to(device)
        noisy = sched.add_noise(x, noise, t)
        target = sched.get_velocity(x, noise, t)
        with autocast:
            pred = model(torch.cat([noisy, m], dim=1), t).sample
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if engine is None:  # DP-SGD clips per sample instead
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        losses.append(float(loss.detach()))
        step += 1
        if log is not None and step % 100 == 0:
            log(
                f"generator step {step}/{cfg.train_steps}, loss {np.mean(losses[-100:]):.4f}, {time.time() - t0:.0f} s"
            )
    ema.copy_to(unet.parameters())
    state = {k: v.detach().cpu().float().numpy() for k, v in unet.state_dict().items()}
    log_mean, log_std = mask_statistics(masks)
    stats = {
        "steps": step,
        "seconds": time.time() - t0,
        "loss_first": float(np.mean(losses[:20])) if losses else float("nan"),
        "loss_last": float(np.mean(losses[-20:])) if losses else float("nan"),
        "mask_log_fg_mean": log_mean,
        "mask_log_fg_std": log_std,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
    }
    if engine is not None:
        stats.update(
            dp_epsilon=float(engine.get_epsilon(dp.delta)),
            dp_delta=dp.delta,
            dp_noise_multiplier=dp.noise_multiplier,
            dp_max_grad_norm=dp.max_grad_norm,
        )
    return state, stats


def _make_private(unet, opt, x_all, m_all, cfg: GeneratorConfig, dp: DPSGD, gen: torch.Generator):
    """Wrap model, optimiser and a Poisson-sampled loader with opacus; batches cycle forever."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    engine = PrivacyEngine(accountant="rdp")
    loader = DataLoader(
        TensorDataset(x_all, m_all), batch_size=min(cfg.batch_size, len(x_all)), generator=gen
    )
    model, opt, loader = engine.make_private(
        module=unet,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
    )

    def cycle():
        while True:
            yield from loader

    return engine, model, opt, cycle()


@torch.no_grad()
def sample_images(
    state: dict[str, np.ndarray],
    cfg: GeneratorConfig,
    masks: np.ndarray,
    seed: int,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> np.ndarray:
    """DDIM-sample RGB images (N,3,size,size) uint8 conditioned on {0,1} masks at ``cfg.size``."""
    unet = build_unet(cfg)
    try:
        unet.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"generator weights do not fit the configured generator: {str(exc)[:300]}") from None
    unet.to(device).eval()
    sched = _sample_scheduler()
    sched.set_timesteps(cfg.sample_steps)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(masks), batch_size):
        m = torch.from_numpy(masks[i : i + batch_size]).float().to(device) * 2 - 1
        x = torch.randn((len(m), 3, cfg.size, cfg.size), generator=gen).to(device)
        for t in sched.timesteps:
            v = unet(torch.cat([x, m], dim=1), t).sample
            x = sched.step(v, t, x).prev_sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 3, cfg.size, cfg.size), np.uint8)


def generator_config_from_run(run) -> GeneratorConfig:
    """The generator settings the federation agreed on (run config ``gen-*`` keys). At 64 px and
    more the UNet gets a fourth, narrow level (16, 32, 64, 64): about the same 1.0 M parameters as
    the 3-level net at 32 px, the design that learned fastest at 64 px on 2 CPU cores (DESIGN.md)."""
    return GeneratorConfig(
        size=run.gen_size,
        widths=(16, 32, 64, 64) if run.gen_size >= 64 else (32, 64, 64),
        train_steps=run.gen_steps,
        max_seconds=run.gen_seconds,
        batch_size=run.gen_batch_size,
        sample_steps=run.gen_sample_steps,
        seed=run.seed,
    )
