"""The training loop: a base classifier under noise, or a noise parameter generator (NPG).

Two targets (``ucan train classifier ...`` / ``ucan train npg ...``):

* ``classifier``: noise-augmented training (Cohen et al. 2019): every batch is
  ``x + noise`` with noise of any family of :mod:`ucan_smoothing.core.noises`,
  isotropic, or anisotropic with the fixed ``sigma`` of a pattern-fixed NPG
  (``--kind pattern``) or of a trained NPG (``--npg-checkpoint``); loss =
  cross-entropy.
* ``npg``: the paper's loss ``-w * mean(sigma) + CE(f(x + eps * sigma + mu), y)``
  (``w`` = ``--sigma-weight``), with the base classifier loaded from a
  checkpoint (``--base``) and frozen, or trained jointly (``--joint``).
  The two SOUND input-adaptive kinds train a shift ``mu`` under FIXED noise
  (isotropic, or that of a trained fixed NPG given by ``--npg-checkpoint``)
  with the cross-entropy alone: ``--kind noisy_shift`` learns
  ``f(z + mu(z))`` on the noisy sample ``z`` (certified as that base
  classifier), ``--kind lipschitz_shift`` learns ``f(x + mu(x) + noise)``
  with a capped Lipschitz bound ``L`` (certified with radius ``R / (1 + L)``);
  docs/adaptive.md.

A run folder (``--out``) holds ``config.json`` (the resolved configuration,
versions, seed, the command line), ``metrics.csv`` (one row per epoch),
``last.pt`` (everything needed to resume, rewritten atomically after every
epoch, and every ``--checkpoint-every`` steps inside one) and ``final.pt`` (written at the end); NPG runs and anisotropic
classifier runs add ``sigma.png`` (the sigma map, per channel, with colour
bars), ``sigma.pt`` and ``mu.pt``. ``--resume`` continues from ``last.pt``
and gives bit-for-bit the weights of an uninterrupted run on the same
device (the training noise is seeded per step, and an epoch resumed inside
skips the batches it trained); it refuses a changed configuration (the number of epochs may be
raised, the device, thread count and data folder may change); on a run that has
trained all its epochs it changes nothing and returns the run folder. An empty,
truncated or foreign ``last.pt`` or ``config.json`` is refused with a ValueError.

Multi-process: ``torchrun --nproc_per_node=N -m ucan_smoothing.cli train ...``
runs DistributedDataParallel (gloo on CPU, nccl on CUDA); ``--batch-size`` is
the global batch, split over the processes; only rank 0 writes files. The
thread count is torch's (it follows ``OMP_NUM_THREADS``) unless ``threads`` is
given; several processes on one CPU want ``OMP_NUM_THREADS=cores/processes``.

Python API: :func:`train_classifier`, :func:`train_generator` (both return the
run folder), :func:`train` (either), and :func:`ucan_smoothing.runs.load_trained`
(a checkpoint back as model + noise, with checks).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import load_dataset
from ..distributed import DistContext, cleanup, init_distributed
from ..figures import save_sigma_png
from ..models import build_model, model_spec, save_checkpoint
from ..core.noises import make_noise
from ..npg.generators import make_generator, sigma_stats
from ..npg.shifts import SHIFTS, make_shift
from ..runs import FINAL, LAST, load_trained
from ..fileio import atomic_write_bytes
from .batches import Batches
from .checkpoints import (
    NOISE_SEEDING,
    atomic_torch_save,
    checkpoint_extra,
    generator_label,
    read_resume_checkpoint,
    read_run_record,
    restore_rng,
    rng_states,
    versions,
    write_metrics,
)
from .config import RESUMABLE_CHANGES, TrainConfig, config_differences, describe_training_noise, resolve_config
from .noise import NoiseSource, step_generator


class _Run:
    """One training run (both targets): set-up, resume, epochs, files."""

    def __init__(self, cfg: TrainConfig, context: DistContext, command: str):
        self.cfg, self.context, self.command = cfg, context, command
        self.device = context.device
        self.out = Path(cfg.out) if cfg.out else self._default_out()
        self.spec = model_spec(cfg.model)
        self.base_noise = make_noise(cfg.noise, cfg.scale, **cfg.noise_params)

    def _default_out(self) -> Path:
        cfg = self.cfg
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kind = f"-{cfg.npg['kind']}" if cfg.npg else ""
        name = f"{cfg.target}-{cfg.model}-{cfg.noise}{cfg.scale:g}{kind}-{stamp}"
        return Path("runs") / self.context.broadcast_object(name)

    # -- set-up ------------------------------------------------------------------
    def setup(self) -> None:
        cfg, ctx = self.cfg, self.context
        if cfg.threads:  # only when asked: otherwise torch's default, which follows OMP_NUM_THREADS
            torch.set_num_threads(int(cfg.threads))
        self._check_out_folder()
        self.checkpoint = None  # last.pt, when resuming it
        self.finished = False
        if cfg.resume and not self.restarted:
            self.checkpoint = self._read_checkpoint()
            self.finished = self.checkpoint["extra"]["ucan_train"]["epoch"] >= cfg.epochs
            if self.finished:
                return  # nothing to train: load no data, build nothing
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        self.train_data = Batches(load_dataset(cfg.dataset, "train", cfg.data_root), self._per_rank_batch(),
                                   ctx, cfg.seed, shuffle=True, workers=cfg.workers, limit=cfg.max_train)
        # No gradients at test time: larger batches are faster and give the same numbers.
        self.test_data = Batches(load_dataset(cfg.dataset, "test", cfg.data_root), 4 * self._per_rank_batch(),
                                  ctx, cfg.seed, shuffle=False, workers=cfg.workers, limit=cfg.max_test)
        self._build_model_and_noise()
        self._build_optimizer()
        self.rows: list = []
        self.start_epoch, self.start_step, self.partial_sums = 1, 0, None
        if self.checkpoint is not None:
            self._resume(self.checkpoint)

    def _per_rank_batch(self) -> int:
        world = self.context.world_size
        if self.cfg.batch_size % world:
            raise ValueError(f"--batch-size {self.cfg.batch_size} (the global batch) must be divisible by the "
                             f"{world} processes")
        return self.cfg.batch_size // world

    def _check_out_folder(self) -> None:
        """Refuse to overwrite a run that saved a checkpoint; resume it with --resume.

        A folder with ``config.json`` but no checkpoint is a run killed before
        its first checkpoint: nothing finished is lost by starting it again, so
        a fresh start is allowed, and ``--resume`` starts it from scratch (with
        the saved configuration: a changed one is refused as for any resume).
        """
        cfg = self.cfg
        config_path = self.out / "config.json"
        has_checkpoint = (self.out / LAST).is_file() or (self.out / FINAL).is_file()
        self.restarted = False
        if cfg.resume and not has_checkpoint:
            if not config_path.is_file():
                raise FileNotFoundError(f"nothing to resume: {str(self.out / LAST)!r} does not exist")
            saved = TrainConfig.from_dict(read_run_record(self.out)["config"])
            differences = config_differences(saved, cfg)
            if differences:
                raise ValueError(f"cannot restart {str(self.out)!r} with a changed configuration: "
                                 + "; ".join(differences))
            self.restarted = True
        elif not cfg.resume and has_checkpoint:
            raise ValueError(f"{str(self.out)!r} already holds a run; pass --resume to continue it "
                             "or choose another --out")
        elif not cfg.resume and config_path.is_file():
            self.restarted = True
        if self.restarted and self.context.is_main and cfg.progress:
            print(f"note: {str(self.out)!r} holds config.json but no checkpoint (a run stopped before its first "
                  "checkpoint): starting it from scratch", file=sys.stderr)
        if self.context.is_main:
            self.out.mkdir(parents=True, exist_ok=True)

    def _build_model_and_noise(self) -> None:
        cfg = self.cfg
        self.generator = None
        self.shift = None
        shift_kind = cfg.npg is not None and cfg.npg["kind"] in SHIFTS
        #: an NPG run that trains the generator (not a shift kind, whose generator is the fixed noise)
        self.trains_generator = cfg.target == "npg" and not shift_kind
        fixed = None
        if cfg.target == "npg" and cfg.base is not None:
            trained = load_trained(cfg.base, expected_model=cfg.model, expected_dataset=cfg.dataset,
                                   expected_noise={"family": cfg.noise, "scale": cfg.scale})
            self.model = trained.model
        else:
            self.model = build_model(cfg.model)
        self.model.to(self.device)
        if shift_kind:
            params = {k: v for k, v in cfg.npg.items() if k != "kind"}
            self.shift = make_shift(cfg.npg["kind"], self.spec.input_shape, **params).to(self.device)
        if cfg.npg is not None and not shift_kind:
            params = {k: v for k, v in cfg.npg.items() if k != "kind"}
            self.generator = make_generator(cfg.npg["kind"], self.spec.input_shape, **params).to(self.device)
        elif cfg.npg_checkpoint:
            trained = load_trained(cfg.npg_checkpoint, expected_model=cfg.model, expected_dataset=cfg.dataset,
                                   expected_noise={"family": cfg.noise, "scale": cfg.scale})
            if trained.generator is None:
                raise ValueError(f"{cfg.npg_checkpoint!r} holds no noise parameter generator")
            self.generator = trained.generator.to(self.device)
        if self.generator is not None and not self.trains_generator:
            fixed = self.generator.to_noise(self.base_noise)  # raises for input-dependent generators
            self.generator.requires_grad_(False)
        self.noise = NoiseSource(self.base_noise, self.generator if self.trains_generator else None, fixed)
        self.train_classifier = cfg.target == "classifier" or cfg.joint
        self.model.requires_grad_(self.train_classifier)
        self.model_ddp = self.model
        self.generator_ddp = self.generator
        self.shift_ddp = self.shift
        if self.context.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            if self.train_classifier:
                self.model_ddp = DDP(self.model, device_ids=ids)
            if self.trains_generator and self.generator.has_trainable_parameters():
                self.generator_ddp = DDP(self.generator, device_ids=ids)
            if self.shift is not None:
                self.shift_ddp = DDP(self.shift, device_ids=ids)

    def _shifted_logits(self, x: torch.Tensor, rng: torch.Generator | None, model, shift) -> torch.Tensor:
        """Logits of a shift run: ``f(z + mu(z))`` with ``z = x + noise`` (noisy_shift) or
        ``f(x + mu(x) + noise)`` (lipschitz_shift); ``rng=None``: the clean input (no noise)."""
        if self.shift.clean_input:
            shifted = x + shift(x)
            return model(shifted if rng is None else self.noise.perturb(shifted, rng))
        z = x if rng is None else self.noise.perturb(x, rng)
        return model(z + shift(z))

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        groups = []
        if self.trains_generator:
            params = [p for p in self.generator.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": cfg.lr})
        if self.shift is not None:
            groups.append({"params": list(self.shift.parameters()), "lr": cfg.lr})
        if self.train_classifier:
            lr = cfg.classifier_lr if (cfg.target == "npg" and cfg.classifier_lr) else cfg.lr
            groups.append({"params": list(self.model.parameters()), "lr": lr})
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = (torch.optim.lr_scheduler.StepLR(self.optimizer, cfg.lr_step, cfg.lr_decay)
                          if cfg.lr_step else None)

    def _read_checkpoint(self) -> dict:
        """last.pt, checked to be this run's (same configuration, model and data set)."""
        payload = read_resume_checkpoint(self.out)
        saved = TrainConfig.from_dict(payload["extra"]["config"])
        differences = config_differences(saved, self.cfg)
        if differences:
            raise ValueError(f"cannot resume {str(self.out)!r} with a changed configuration: "
                             + "; ".join(differences) + ". Resume with the original options "
                             "(only " + ", ".join(RESUMABLE_CHANGES) + " may change).")
        if payload["model_name"] != self.cfg.model or payload["dataset"] != self.cfg.dataset:
            raise ValueError(f"{str(self.out / LAST)!r} holds {payload['model_name']} on {payload['dataset']}")
        return payload

    def _resume(self, payload: dict) -> None:
        path = self.out / LAST
        extra = payload["extra"]
        state = extra["train_state"]
        saved_world = extra["ucan_train"].get("world_size", 1)
        if saved_world != self.context.world_size and self.context.is_main:
            print(f"warning: {str(self.out)!r} ran with {saved_world} process(es), resumed with "
                  f"{self.context.world_size}: the data split and noise streams change, so the result will not be "
                  "bit-identical to an uninterrupted run", file=sys.stderr)
        if extra["ucan_train"].get("noise_seeding") != NOISE_SEEDING and self.context.is_main:
            print(f"warning: {str(path)!r} was written by an older version that seeded the training noise per "
                  "epoch: the resumed run is valid but not bit-identical to an uninterrupted one", file=sys.stderr)
        self.model.load_state_dict(payload["state_dict"])
        if self.generator is not None and extra.get("npg_state") is not None:
            self.generator.load_state_dict(extra["npg_state"])
        if self.shift is not None:
            if extra.get("shift_state") is None:
                raise ValueError(f"{str(path)!r} holds no {self.shift.kind} network to resume")
            self.shift.load_state_dict(extra["shift_state"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        self.start_epoch = extra["ucan_train"]["epoch"] + 1
        partial = state.get("partial")  # saved inside an epoch (--checkpoint-every)
        if partial is not None:
            self.start_step, self.partial_sums = partial["step"], partial["sums"]
        self.rows = [r for r in state["metrics"] if r["epoch"] < self.start_epoch]

    # -- files ---------------------------------------------------------------------
    def write_config(self) -> None:
        if not self.context.is_main:
            return
        path = self.out / "config.json"
        record = {
            "config": self.cfg.to_dict(),
            "command": self.command,
            "argv": list(sys.argv),
            "seed": self.cfg.seed,
            "versions": versions(),
            "world_size": self.context.world_size,
            "device": str(self.device),
            "noise": describe_training_noise(self.cfg),
            "npg": None if self.generator is None else self.generator.describe(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if self.shift is not None:
            record["shift"] = self.shift.describe()
        if self.restarted and path.is_file():
            old = read_run_record(self.out)
            record["restarted"] = old.get("restarted", []) + [
                {"command": self.command, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "previous_start": old.get("started")}]
        elif self.cfg.resume and path.is_file():
            old = read_run_record(self.out)
            record["started"] = old.get("started", record["started"])
            record["resumed"] = old.get("resumed", []) + [
                {"at_epoch": self.start_epoch, "command": self.command, "time": time.strftime("%Y-%m-%d %H:%M:%S")}]
            record["command"] = old.get("command", self.command)
        atomic_write_bytes(path, (json.dumps(record, indent=2, sort_keys=False) + "\n").encode())

    def _train_state(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": rng_states(),
            "metrics": self.rows,
        }

    def _save_partial(self, epoch: int, steps_done: int, sums: torch.Tensor) -> None:
        """last.pt inside ``epoch`` after ``steps_done`` steps; its ``epoch`` field stays the last
        finished one, so readers of last.pt see the same as before."""
        total = sums.clone()
        self.context.all_reduce_sum(total)  # every rank's running sums, summed: resumed on rank 0
        if not self.context.is_main:
            return
        state = {**self._train_state(), "partial": {"epoch": epoch, "step": steps_done, "sums": total.tolist()}}
        extra = checkpoint_extra(self.cfg, self.generator, epoch - 1, state, self.context.world_size, self.shift)
        extra["ucan_train"]["inside_epoch"] = {"epoch": epoch, "step": steps_done}  # weights from mid-epoch
        save_checkpoint(self.out / LAST, self.model, model_name=self.cfg.model, dataset=self.cfg.dataset,
                        extra=extra)

    def _save(self, epoch: int, final: bool = False) -> None:
        if not self.context.is_main:
            return
        train_state = self._train_state()
        world = self.context.world_size
        save_checkpoint(self.out / LAST, self.model, model_name=self.cfg.model, dataset=self.cfg.dataset,
                        extra=checkpoint_extra(self.cfg, self.generator, epoch, train_state, world, self.shift))
        if final:
            save_checkpoint(self.out / FINAL, self.model, model_name=self.cfg.model, dataset=self.cfg.dataset,
                            extra=checkpoint_extra(self.cfg, self.generator, epoch, None, world, self.shift))
        write_metrics(self.out / "metrics.csv", self.rows)
        if self.generator is not None:
            self._save_sigma(epoch)

    def _save_sigma(self, epoch: int) -> None:
        gen = self.generator
        title = (f"{generator_label(gen)}\nepoch {epoch}: noise = eps * sigma + mu, eps ~ {self.cfg.noise} "
                 f"of scale {self.cfg.scale:g}")
        with torch.no_grad():
            if gen.input_dependent:
                x, _ = next(iter(self.test_data))
                x = x[:4]
                sigma, mu = gen(x)
                atomic_torch_save(self.out / "sigma_examples.pt", {"x": x.cpu(), "sigma": sigma.cpu(),
                                                                     "mu": mu.cpu()})
                label = "" if gen.is_certificate else " (NOT a certificate)"  # elastic_sigma is sound
                save_sigma_png(self.out / "sigma.png", sigma, mu, title + label, images=x)
            else:
                sigma, mu = gen()
                atomic_torch_save(self.out / "sigma.pt", sigma.detach().cpu().contiguous())
                atomic_torch_save(self.out / "mu.pt", mu.detach().cpu().contiguous())
                save_sigma_png(self.out / "sigma.png", sigma, mu, title)

    # -- epochs ----------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> dict:
        cfg, ctx = self.cfg, self.context
        self.model.train(self.train_classifier)
        if self.generator is not None:
            self.generator.train(self.trains_generator)
        if self.shift is not None:
            self.shift.train()
        self.train_data.set_epoch(epoch)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss*n, ce*n, correct, n
        first, earlier = 0, 0.0
        if epoch == self.start_epoch and self.start_step:  # resumed inside this epoch
            first = self.start_step
            earlier = float(self.partial_sums[3])  # samples trained before the interruption
            if ctx.is_main:  # all ranks' sums so far; the epoch-end all-reduce adds them up
                sums += torch.tensor(self.partial_sums, dtype=torch.float64, device=self.device)
        steps = len(self.train_data)
        bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False,
                   disable=not (ctx.is_main and cfg.progress), dynamic_ncols=True)
        npg = self.trains_generator
        for step, (x, y) in enumerate(self.train_data.batches(first), start=first):
            # noise seeded per step, so a run resumed at any step draws what it would have drawn
            rng = step_generator(self.device, cfg.seed, epoch, ctx.rank, 1, step)
            if self.shift is not None:
                logits = self._shifted_logits(x, rng, self.model_ddp, self.shift_ddp)
            else:
                if npg:
                    sigma, mu = self.noise.params(x, self.generator_ddp)
                    noisy = self.noise.perturb(x, rng, sigma, mu)
                else:
                    noisy = self.noise.perturb(x, rng)
                logits = self.model_ddp(noisy)
            ce = F.cross_entropy(logits, y)
            loss = ce - cfg.sigma_weight * sigma.mean() if npg else ce
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            with torch.no_grad():
                n = y.shape[0]
                sums += torch.stack([loss.detach().double() * n, ce.detach().double() * n,
                                     (logits.argmax(1) == y).sum().double(),
                                     torch.tensor(float(n), dtype=torch.float64, device=self.device)])
            bar.update(1)
            if ctx.is_main and cfg.progress and (step % 20 == 0 or step == steps - 1):
                s = sums.tolist()
                bar.set_postfix(loss=f"{s[0] / s[3]:.4f}", acc=f"{s[2] / s[3]:.4f}")
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                self._save_partial(epoch, step + 1, sums)
        bar.close()
        ctx.all_reduce_sum(sums)
        s = sums.tolist()
        # "samples": those trained in this call, for the throughput column of a resumed epoch
        return {"train_loss": s[0] / s[3], "train_ce": s[1] / s[3], "train_acc": s[2] / s[3],
                "samples": s[3] - earlier}

    @torch.no_grad()
    def _evaluate(self) -> dict:
        cfg, ctx = self.cfg, self.context
        self.model.eval()
        if self.generator is not None:
            self.generator.eval()
        if self.shift is not None:
            self.shift.eval()
        rng = step_generator(self.device, cfg.seed, 0, ctx.rank, 2)  # the same test noise every epoch
        counts = torch.zeros(3, dtype=torch.float64, device=self.device)  # noisy correct, clean correct, n
        # sigma statistics over the test set (input-dependent) or of the fixed sigma
        stats = torch.tensor([0.0, math.inf, -math.inf, 0.0, 0.0], dtype=torch.float64, device=self.device)
        fixed_sigma = None
        if self.generator is not None and not self.generator.input_dependent:
            fixed_sigma = self.generator()[0]
        for x, y in self.test_data:
            if self.shift is not None:
                counts[0] += (self._shifted_logits(x, rng, self.model, self.shift).argmax(1) == y).sum()
                counts[1] += (self._shifted_logits(x, None, self.model, self.shift).argmax(1) == y).sum()
                counts[2] += y.shape[0]
                continue
            if self.generator is not None and self.trains_generator:
                sigma, mu = self.noise.params(x)
                noisy = self.noise.perturb(x, rng, sigma, mu)
                if self.generator.input_dependent:
                    s = sigma.double()
                    stats[0] += s.sum()
                    stats[1] = torch.minimum(stats[1], s.min())
                    stats[2] = torch.maximum(stats[2], s.max())
                    stats[3] += s.log().sum()
                    stats[4] += s.numel()
            else:
                noisy = self.noise.perturb(x, rng)
            counts[0] += (self.model(noisy).argmax(1) == y).sum()
            counts[1] += (self.model(x).argmax(1) == y).sum()
            counts[2] += y.shape[0]
        ctx.all_reduce_sum(counts)
        result = {"test_acc_noisy": float(counts[0] / counts[2]), "test_acc_clean": float(counts[1] / counts[2])}
        if fixed_sigma is not None:
            result.update(sigma_stats(fixed_sigma))
        elif self.generator is not None and self.generator.input_dependent:
            if ctx.distributed:
                import torch.distributed as dist
                for i, op in ((0, dist.ReduceOp.SUM), (1, dist.ReduceOp.MIN), (2, dist.ReduceOp.MAX),
                              (3, dist.ReduceOp.SUM), (4, dist.ReduceOp.SUM)):
                    part = stats[i:i + 1].clone()
                    dist.all_reduce(part, op=op)
                    stats[i] = part[0]
            s = stats.tolist()
            result.update(sigma_mean=s[0] / s[4], sigma_min=s[1], sigma_max=s[2], sigma_geomean=math.exp(s[3] / s[4]))
        return result

    def run(self) -> Path:
        cfg, ctx = self.cfg, self.context
        if self.finished:  # resumed after its last epoch: touch nothing, so "run until done" loops end
            if ctx.is_main:
                done = self.checkpoint["extra"]["ucan_train"]["epoch"]
                print(f"{self.out} is finished ({done} of {cfg.epochs} epochs); nothing to do", file=sys.stderr)
            return self.out
        self.write_config()
        if ctx.is_main and cfg.progress:
            what = f"{cfg.npg['kind']} NPG" if cfg.target == "npg" else "classifier"
            if self.shift is not None:
                what = f"{cfg.npg['kind']} mu network (sound input-adaptive mode)"
            print(f"training {what} {cfg.model} on {cfg.dataset} ({self.train_data.count} images) with "
                  f"{cfg.noise} noise of scale {cfg.scale:g}, epochs {self.start_epoch}..{cfg.epochs}, "
                  f"{ctx.world_size} process(es) on {self.device}; run folder {str(self.out)!r}", file=sys.stderr)
        for epoch in range(self.start_epoch, cfg.epochs + 1):
            lr = self.optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            metrics = self._train_epoch(epoch)
            train_time = time.perf_counter() - start
            if self.scheduler is not None:
                self.scheduler.step()
            metrics.update(self._evaluate())
            elapsed = time.perf_counter() - start
            row = {"epoch": epoch, "lr": lr, "epoch_time_s": round(elapsed, 3),
                   "train_samples_per_s": round(metrics.pop("samples") / train_time, 1), **metrics}
            self.rows.append(row)
            self._save(epoch, final=epoch == cfg.epochs)
            if ctx.is_main and cfg.progress:
                extra = (f", sigma mean {row['sigma_mean']:.3f} [{row['sigma_min']:.3f}, {row['sigma_max']:.3f}]"
                         if row.get("sigma_mean") is not None else "")
                print(f"epoch {epoch}/{cfg.epochs}: loss {row['train_loss']:.4f}, train acc {row['train_acc']:.4f}, "
                      f"test acc under noise {row['test_acc_noisy']:.4f} (clean {row['test_acc_clean']:.4f}), "
                      f"{elapsed:.1f} s{extra}", file=sys.stderr)
        ctx.barrier()
        if os.environ.get("UCAN_DEBUG_DDP"):
            checksum = sum(float(p.detach().double().sum()) for p in self.model.parameters())
            if self.generator is not None:
                checksum += sum(float(p.detach().double().sum()) for p in self.generator.parameters())
            if self.shift is not None:
                checksum += sum(float(p.detach().double().sum()) for p in self.shift.parameters())
            # one write per line: print() writes text and newline separately, and the two ranks'
            # lines then interleave on the shared stderr pipe
            sys.stderr.write(f"rank {ctx.rank}/{ctx.world_size}: parameter checksum {checksum:.12e}\n")
            sys.stderr.flush()
        return self.out


def train(config: TrainConfig | dict | None = None, *, command: str | None = None, **options) -> Path:
    """Run training (either target) and return the run folder. Works under ``torchrun`` too."""
    values = {} if config is None else (config.to_dict() if isinstance(config, TrainConfig) else dict(config))
    values.update(options)
    cfg = resolve_config(values)
    if command is None:
        command = "python API: ucan_smoothing.training.train(" + ", ".join(
            f"{k}={v!r}" for k, v in values.items()) + ")"
    context = init_distributed(cfg.device)
    threads = torch.get_num_threads()
    try:
        run = _Run(cfg, context, command)
        run.setup()
        return run.run()
    finally:
        torch.set_num_threads(threads)  # set_num_threads is process-wide: leave it as found
        cleanup(context)


def train_classifier(config: TrainConfig | dict | None = None, **options) -> Path:
    """Noise-augmented training of a base classifier; returns the run folder."""
    return train(config, **{**options, "target": "classifier"})


def train_generator(config: TrainConfig | dict | None = None, **options) -> Path:
    """Train a noise parameter generator (``npg={"kind": ...}``); returns the run folder."""
    return train(config, **{**options, "target": "npg"})
