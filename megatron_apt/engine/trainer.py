"""The trainer: DeepSpeed engines per stage and the alternating GAN scheduler.

``apt``: one update = ``d_updates_per_iter`` discriminator updates then one generator update,
each accumulating ``accumulation`` micro-batches (DeepSpeed applies the optimizer step at the
accumulation boundary), then the generator EMA. During the G phase D's parameters are frozen
and D is called through ``d_engine.module`` (two engines, one graph: CPU-FACTS.md).
``diffusion`` and ``consistency`` use the same machinery with one engine.

A non-finite loss on any rank poisons the rest of the update on every rank: the remaining
losses are multiplied by NaN so that DeepSpeed's overflow check skips the optimizer steps
still to come consistently (ZeRO-0, which has no such check, drops the gradients instead); the
EMA is not updated and ``skipped`` counts it. A non-finite D phase skips D's and G's steps; a
non-finite G phase skips G's, after D has stepped on finite losses (the paper's G phase reads
the updated D, so D cannot wait for it). After ``max_consecutive_skips`` skipped updates in a
row the run stops with exit code 4 and exports nothing: the weights or the learning rate are
broken, and a run that only skips would otherwise end "successfully" with garbage.

Each log step reduces every metric (losses, D's health, G's and D's gradient norms) in one
all-reduce over all ranks and hands the result to the collapse policy
(:mod:`megatron_apt.engine.recovery`: warn, stop, or roll back to a healthy checkpoint).
Between log steps an update reads the device once (docs/design.md, "Host synchronizations").
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_apt.checkpoint.model_init import build_discriminator, build_generator, build_mmdit
from megatron_apt.config.training import TrainConfig, parse_head_layers, plan_batch, validate
from megatron_apt.engine.checkpointing import (
    LATEST,
    checkpoint_dir,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from megatron_apt.engine.data import HOST_KEYS, build_stream, load_negative_prompt
from megatron_apt.engine.ema import EngineEMA, TargetEMA
from megatron_apt.engine.engines import create_engine, idle_zero_notice
from megatron_apt.engine.export import export_model_files
from megatron_apt.engine.grad_norm import deepspeed_has_norm, engine_grad_norm, grad_norm_of_grads
from megatron_apt.engine.preemption import ExitGuard
from megatron_apt.engine.recovery import CollapseGuard, TrainingStopped
from megatron_apt.engine.throughput import TrainingThroughput
from megatron_apt.engine.zero_init import (
    copy_weights,
    module_to,
    partitioned_build,
    uses_zero_init,
)
from megatron_apt.models.compile import compile_mmdits
from megatron_apt.models.discriminator import DiscriminatorConfig
from megatron_apt.models.families import family_of
from megatron_apt.parallel.state import comm_device, comm_tensor, initialize_parallel
from megatron_apt.stages.apt import APTConfig, discriminator_step, frozen, generator_step
from megatron_apt.stages.consistency import ConsistencyConfig, consistency_distillation_step
from megatron_apt.stages.diffusion import (
    add_noise,
    drop_condition,
    flow_matching_loss,
    timestep_shift,
)
from megatron_apt.stages.noise import rand_batch, randn_like_batch, sample_generators
from megatron_apt.utils.metrics import MetricsLogger
from megatron_apt.utils.transfer import device_scalar, to_device

SALT = {"diffusion": 0, "consistency": 3, "d": 1, "g": 2}
EXIT_NON_FINITE = 4  # exit code: too many consecutive updates skipped for non-finite losses
# metric name of each engine's gradient norm (one value per optimizer step, mean per update)
GRAD_NORM_KEYS = {"generator": "grad_norm_g", "discriminator": "grad_norm_d", "model": "grad_norm"}


class Trainer:
    def __init__(self, cfg: TrainConfig):
        validate(cfg)
        self.cfg = cfg
        self.ps = initialize_parallel(
            cfg.tensor_parallel,
            cfg.context_parallel,
            cfg.sequence_parallel,
            seed=cfg.seed,
            timeout_minutes=cfg.distributed_timeout_minutes,
        )
        self.rank = dist.get_rank()
        self.plan = plan_batch(cfg, dist.get_world_size())
        self.device = comm_device()  # the backend's: CUDA under NCCL, else the CPU
        self.dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        self.stream = build_stream(
            cfg, self.plan.micro_batch_size, self.ps.dp_rank, self.ps.dp_size
        )
        dropped = getattr(self.stream, "dropped", None)
        if dropped and self.rank == 0:
            need = self.plan.micro_batch_size * self.ps.dp_size
            print(
                f"warning: data buckets {dropped} hold fewer than micro x DP = {need} samples "
                "and are never read",
                flush=True,
            )
        self.step, self.samples, self.skipped = 0, 0, 0
        self.engines: dict = {}
        self.emas: dict = {}
        self.target_ema: TargetEMA | None = None  # consistency: the target network's fp32 EMA
        self.base_lrs: dict[str, float] = {}  # configured lr per engine (before lr_scale)
        self.grad_norms: dict[str, list[torch.Tensor]] = {}  # of this update's optimizer steps
        self.bad: torch.Tensor | None = None  # this update met a non-finite loss (device flag)
        self._bad_read: bool | None = None  # its value on the host, once read
        self.metrics: MetricsLogger | None = None
        self.uses_text_mask = family_of(cfg.model).uses_text_mask
        getattr(self, f"_build_{cfg.stage}")()
        if cfg.compile:
            self._compile()
        self.throughput = TrainingThroughput(cfg, self.ps, self.device, self.dtype)
        self.guard = CollapseGuard(self)  # collapse detector and --on-collapse policy
        if self.rank == 0:
            self._report_recompute()
            peak = self.throughput.peak
            print(f"MFU against {peak['tflops']:.4g} TFLOP/s ({peak['source']})", flush=True)
            if uses_zero_init(cfg):
                print(
                    f"ZeRO-3: {', '.join(self.engines)} built partitioned (deepspeed.zero.Init) "
                    f"over {self.ps.dp_cp_size} ranks: no rank held a whole copy",
                    flush=True,
                )
            if notice := idle_zero_notice(cfg.zero_stage, self.ps.dp_cp_size, cfg.bf16):
                print(notice, flush=True)
        error = None
        try:
            if cfg.load:  # before the logger exists: a refused --load writes nothing
                self._resume(cfg.load)
            self._check_save_dir()
        except Exception as e:  # noqa: BLE001 - re-raised by _agree_loaded on this rank
            error = e
        self._agree_loaded(error)
        self.metrics = MetricsLogger(
            cfg.log_dir, enabled=self.rank == 0, total_steps=cfg.train_iters
        )

    # ---- building ---------------------------------------------------------------------
    def _engine(self, name: str, module, lr: float, ds_json: str | None):
        self.base_lrs[name] = lr
        self.engines[name] = create_engine(
            module_to(module, self.device), self.cfg, self.plan, self.ps, lr, ds_json
        )
        return self.engines[name]

    def _partitioned(self, ds_json: str | None):
        """Where a trained network is built: under ZeRO-3 partitioned from the start."""
        return partitioned_build(self.cfg, self.plan, self.ps, ds_json)

    def _trained_mmdit(self):
        """The single trained MMDiT of the diffusion and consistency stages."""
        c = self.cfg
        with self._partitioned(c.deepspeed_config_g):
            return build_mmdit(
                c.model,
                self.ps,
                c.layer_spec,
                init_from=c.init_generator,
                recompute=c.recompute_layers,
            )

    def _build_diffusion(self) -> None:
        c = self.cfg
        model = self._trained_mmdit()
        eng = self._engine("model", model, c.optim.lr, c.deepspeed_config_g)
        self.emas["model"] = EngineEMA(eng, self.ps, c.ema_decay)
        self.uncond = (
            self._text_convention(load_negative_prompt(c, self.device))
            if c.cond_dropout > 0
            else None
        )

    def _build_consistency(self) -> None:
        c = self.cfg
        student = self._trained_mmdit()
        # teacher (the diffusion model) and EMA target start as exact copies of the student;
        # they run without gradients, so they need no recompute
        # (whole copies, not engines: under ZeRO-3 the student is gathered block by block)
        self.teacher = build_mmdit(c.model, self.ps, c.layer_spec)
        self.target = build_mmdit(c.model, self.ps, c.layer_spec)
        for m in (self.teacher, self.target):
            copy_weights(m, student)
        for m in (self.teacher, self.target):
            m.requires_grad_(False).eval().to(self.device, self.dtype)
        eng = self._engine("model", student, c.optim.lr, c.deepspeed_config_g)
        self.emas["model"] = EngineEMA(eng, self.ps, c.ema_decay)
        # the target is an EMA of the student's fp32 masters (not of its bf16 copies under
        # --bf16, where a lerp with mu = 0.95 would lose every update below bf16's resolution)
        self.target_ema = TargetEMA(eng, self.ps, c.target_ema_decay, self.target)
        self.cd = ConsistencyConfig(
            guidance_scale=c.guidance_scale,
            num_steps=c.consistency_steps,
            shift=c.shift,
            target_ema_decay=c.target_ema_decay,
        )
        self.uncond = self._text_convention(load_negative_prompt(c, self.device))

    def _build_apt(self) -> None:
        c = self.cfg
        rc = c.recompute_layers  # G's blocks and D's backbone blocks
        with self._partitioned(c.deepspeed_config_g):
            g = build_generator(
                c.model, self.ps, init_from=c.init_generator, spec=c.layer_spec, recompute=rc
            )
        heads = DiscriminatorConfig(
            head_layers=parse_head_layers(c.d_head_layers, c.model.num_layers)
        )
        with self._partitioned(c.deepspeed_config_d):
            d = build_discriminator(
                c.model,
                self.ps,
                init_from=c.init_discriminator,
                disc_cfg=heads,
                spec=c.layer_spec,
                recompute=rc,
            )
        g_eng = self._engine("generator", g, c.optim.lr, c.deepspeed_config_g)
        # a frozen D (control run) still gets an engine: checkpoints, resume and export as usual
        self._engine("discriminator", d, c.optim.lr_d or c.optim.lr, c.deepspeed_config_d)
        self.emas["generator"] = EngineEMA(g_eng, self.ps, c.ema_decay)
        self.apt = apt_config(c)

    def _compile(self) -> None:
        """Regional torch.compile of every MMDiT's blocks; not under ZeRO-3, whose
        parameter-gathering hooks run inside the blocks' submodules."""
        if self.cfg.zero_stage == 3:
            return self._say("--compile: not with ZeRO-3; the blocks run eagerly")
        extra = [getattr(self, k) for k in ("teacher", "target") if hasattr(self, k)]
        n = compile_mmdits([e.module for e in self.engines.values()] + extra)
        self._say(f"--compile: {n} MMDiT blocks compiled (torch.compile per block)")

    def _report_recompute(self) -> None:
        """One line naming the blocks each trained MMDiT recomputes (read off the modules)."""
        chosen = {}
        for name, eng in self.engines.items():
            mmdit = eng.module  # the MMDiT, or the Generator / Discriminator around one
            for attr in ("model", "backbone"):
                mmdit = getattr(mmdit, attr, mmdit)
            if mmdit.recompute_layers:
                chosen[name] = list(mmdit.recompute_layers)
        if chosen:
            print(f"activation recompute (blocks, 1-based): {chosen}", flush=True)

    # ---- micro-batches ----------------------------------------------------------------
    def _next(self, kind: str):
        """The next micro-batch of kind ``kind`` (a SALT key) and its noise generators, copied
        to the device without blocking the host; the text mask stays on the host, where the
        model reads its layout (``megatron_apt.models.specs.KeyMask``)."""
        batch, pos = self.stream.next()
        batch = self._text_convention(batch)
        batch = {k: v if k in HOST_KEYS else to_device(v, self.device) for k, v in batch.items()}
        batch["latents"] = batch["latents"].to(self.dtype)
        self.throughput.count(kind, batch)
        return batch, sample_generators(self.cfg.seed, pos, SALT[kind])

    def _text_convention(self, cond: dict) -> dict:
        """The family's text-mask convention (``ModelFamily.uses_text_mask``): a family whose
        pretrained model attends to the zero-padded text (Wan) trains without the mask, so that
        what it learns is what its exported pipeline runs; the padded tokens are zero."""
        if self.uses_text_mask or "text_mask" not in cond:
            return cond
        cond = dict(cond)
        mask = cond.pop("text_mask")
        cond["text"] = cond["text"] * mask[..., None].to(cond["text"].device, cond["text"].dtype)
        return cond

    def _poison(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate: ``loss`` while every rank's losses of this update have
        been finite, NaN from the first non-finite one on (on every rank alike: the flag is
        all-reduced). All on the device, no host sync; bit-identical to ``loss`` when finite
        (``nan_to_num`` of a finite value and ``x 1.0`` change nothing, in value or gradient)."""
        flag = torch.isfinite(loss.detach()).logical_not().any().to(self.bad.dtype)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        torch.maximum(self.bad, flag, out=self.bad)
        self._bad_read = None  # the host copy is stale
        return torch.nan_to_num(loss) * torch.where(self.bad > 0, float("nan"), 1.0)

    def _update_is_bad(self) -> bool:
        """Whether this update met a non-finite loss (a host sync, once per new loss read)."""
        if self._bad_read is None:
            self._bad_read = bool(self.bad.item())
        return self._bad_read

    def _backward_step(self, engine, loss: torch.Tensor) -> None:
        """Backward one micro-batch and step (DeepSpeed applies the optimizer step at the
        accumulation boundary). A non-finite loss on any rank poisons the rest of the update
        (:meth:`_poison`): DeepSpeed's overflow check skips the optimizer step at ZeRO 1-3;
        ZeRO-0's client optimizer has none, so there the trainer drops the gradients, the one
        decision that needs the flag on the host before the step. At the boundary the step's
        gradient norm is noted as a device tensor (NaN if poisoned)."""
        loss = self._poison(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        # DeepSpeed averages over DP x CP; the CP ranks' gradients are partial sums (each saw
        # its tokens) and must add up, so the loss is scaled by CP (megatron does the same)
        engine.backward(loss * self.ps.cp_size if self.ps.cp_size > 1 else loss)
        own_norm = boundary and not deepspeed_has_norm(engine)
        norm = grad_norm_of_grads(engine.module, self.ps) if own_norm else None
        if boundary and engine.zero_optimization_stage() == 0 and self._update_is_bad():
            for p in engine.module.parameters():
                p.grad = None
        engine.step()
        if boundary:
            if norm is None:
                norm = engine_grad_norm(engine, self.device)  # recorded by DeepSpeed's step
            norm = torch.where(self.bad > 0, float("nan"), norm)
            name = next(n for n, e in self.engines.items() if e is engine)
            self.grad_norms.setdefault(GRAD_NORM_KEYS[name], []).append(norm)

    def _pop_grad_norms(self) -> dict[str, torch.Tensor]:
        """Mean gradient norm per engine over this update's optimizer steps (device tensors)."""
        out = {k: torch.stack(v).mean() for k, v in sorted(self.grad_norms.items())}
        self.grad_norms = {}
        return out

    # ---- one update per stage -----------------------------------------------------------
    def _update_diffusion(self) -> dict:
        eng, acc = self.engines["model"], []
        c_drop = self.cfg.cond_dropout
        for _ in range(self.plan.accumulation):
            batch, rngs = self._next("diffusion")
            x = batch.pop("latents")
            b = x.shape[0]
            u = (
                rand_batch(b, rngs)
                if self.cfg.timestep_sampling == "uniform"
                else torch.sigmoid(randn_like_batch(torch.empty(b), rngs, torch.float32))
            )
            t = to_device(timestep_shift(u, self.cfg.shift), self.device)
            z = randn_like_batch(x, rngs)
            if self.uncond is not None:  # CFG training: some samples see the negative prompt
                batch = drop_condition(batch, self.uncond, rand_batch(b, rngs) < c_drop)
            loss = flow_matching_loss(eng(add_noise(x, z, t), t, **batch), x, z)
            self._backward_step(eng, loss)
            acc.append({"loss": loss.detach()})
        return _mean(acc)

    def _update_consistency(self) -> dict:
        eng, acc = self.engines["model"], []
        for _ in range(self.plan.accumulation):
            batch, rngs = self._next("consistency")
            x = batch.pop("latents")
            loss, m = consistency_distillation_step(
                eng, self.target, self.teacher, x, batch, self.uncond, self.cd, rngs
            )
            self._backward_step(eng, loss)
            acc.append(m)
        if not self._update_is_bad():
            self._update_target()
        return _mean(acc)

    def _update_target(self) -> None:
        self.target_ema.update()  # fp32 lerp of the masters, then copied into the target

    def _update_apt(self) -> dict:
        g_eng, d_eng = self.engines["generator"], self.engines["discriminator"]
        acc = []
        for _ in range(self.cfg.d_updates_per_iter):
            for _ in range(self.plan.accumulation):
                batch, rngs = self._next("d")
                if self.cfg.freeze_discriminator:  # metrics only: no backward, no step
                    with torch.no_grad():
                        _, m = discriminator_step(d_eng.module, g_eng.module, batch, self.apt, rngs)
                else:
                    loss, m = discriminator_step(d_eng, g_eng.module, batch, self.apt, rngs)
                    self._backward_step(d_eng, loss)
                acc.append(m)
        if self._d_warmup():  # D only: G neither steps nor draws its micro-batches
            return _mean(acc)
        with frozen(d_eng.module):
            for _ in range(self.plan.accumulation):
                batch, rngs = self._next("g")
                loss, m = generator_step(d_eng.module, g_eng, batch, self.apt, rngs)
                self._backward_step(g_eng, loss)
                acc.append(m)
        return _mean(acc)

    def _d_warmup(self) -> bool:
        """Whether the current update is one of the APT stage's D-only warm-up updates."""
        return self.cfg.stage == "apt" and self.step < self.cfg.d_warmup_iters

    # ---- the loop -----------------------------------------------------------------------
    def run_update(self) -> tuple[dict, bool]:
        """One update of the stage, its EMAs and counters (what the loop does per update
        besides logging and saving; ``tools/benchmark.py --phases trainer-apt`` times it).
        Returns the update's metrics (device tensors) and whether it was skipped (non-finite):
        the one host sync of an update (at ZeRO 1-3; ZeRO-0 reads the flag at its optimizer
        steps, see :meth:`_backward_step`)."""
        c = self.cfg
        warmup = self._d_warmup()
        self.bad, self._bad_read = comm_tensor(0.0), False  # no non-finite loss yet
        metrics = getattr(self, f"_update_{c.stage}")()
        metrics.update(self._pop_grad_norms())
        bad = self._update_is_bad()
        if bad:
            self.skipped += 1
        else:
            for ema in self.emas.values() if not warmup else ():
                ema.update()
        self.step += 1
        phases = (0 if warmup else 1) + (c.d_updates_per_iter if c.stage == "apt" else 0)
        self.samples += self.plan.global_batch_size * phases
        return metrics, bad

    def train(self) -> dict:
        c = self.cfg
        last, window, updates, t0 = {}, [], 0, time.perf_counter()
        exit_guard = ExitGuard(c.exit_signal_handler, c.exit_duration_in_mins)
        saved_at, streak = None, 0
        try:
            while self.step < c.train_iters:
                metrics, bad = self.run_update()
                updates += 1
                if bad:
                    streak += 1
                    if c.max_consecutive_skips and streak >= c.max_consecutive_skips:
                        self._stop_non_finite(streak)
                else:
                    streak = 0
                    window.append(metrics)
                if self.step % c.log_interval == 0 or self.step == c.train_iters:
                    # the mean over the log interval's updates (skipped ones left out, unless
                    # every one was skipped): a log step is not one noisy micro-batch sample
                    logged = {**(_mean(window) if window else metrics)}
                    # this rank's FLOPs, tokens and seconds: averaged over the ranks by _log
                    logged.update(self.throughput.raw(time.perf_counter() - t0))
                    last = self._log(logged, updates)
                    window, updates, t0 = [], 0, time.perf_counter()
                    if self.guard.after_log(self.step, last):  # may stop (raises) or roll back
                        continue  # the step counter is the reloaded checkpoint's
                if c.save and c.save_interval and self.step % c.save_interval == 0:
                    self.save()
                    saved_at = self.step
                reason = exit_guard.should_exit()  # the same answer on every rank
                if reason and self.step < c.train_iters:
                    self._exit_early(reason, saved_at)
            if c.save:
                self.save()
                self.export(Path(c.save))
        finally:
            exit_guard.restore()
            self.metrics.close()
        return last

    def _stop_non_finite(self, streak: int) -> None:
        last = latest_checkpoint(self.cfg.save) if self.cfg.save else None
        hint = f"the last checkpoint is {last}" if last else "no checkpoint was saved"
        raise TrainingStopped(
            f"{streak} consecutive updates had non-finite losses and were skipped (up to "
            f"update {self.step}): the weights or the learning rate are broken; nothing "
            f"is exported, {hint} (--max-consecutive-skips sets the limit, 0 = never stop)",
            exit_code=EXIT_NON_FINITE,
        )

    def _exit_early(self, reason: str, saved_at: int | None) -> None:
        """Save a complete checkpoint of the update just finished and stop with exit code 0."""
        c = self.cfg
        where = "nothing saved (no --save)"
        if c.save:
            path = checkpoint_dir(Path(c.save), self.step)
            if saved_at != self.step:
                path = self.save()
            where = f"checkpoint {path}; resume with --load {c.save}"
        if self.rank == 0:
            msg = f"{reason}: stopping after update {self.step}/{c.train_iters}, {where}"
            print(msg, flush=True)
        raise TrainingStopped(f"{reason} at update {self.step}: {where}", exit_code=0)

    def _log(self, metrics: dict, updates: int) -> dict:
        """One all-reduce per log step: the mean over every rank (= over data parallel; TP and
        CP peers hold the same values). Every rank gets the same reduced numbers, which the
        collapse detector relies on to decide the same on every rank without a collective.
        The step time and the throughput come from the ranks' mean FLOPs, tokens and seconds
        over the ``updates`` of the interval."""
        keys = list(metrics)  # the same order on every rank (sorted by _mean, then grad norms)
        # device tensors (losses, health, gradient norms) and host floats (throughput) in one
        # vector on the device: NCCL reduces device tensors only, and torch.stack refuses a mix
        t = torch.stack([device_scalar(metrics[k], self.device) for k in keys])
        dist.all_reduce(t)
        values = dict(zip(keys, (t / dist.get_world_size()).tolist(), strict=True))
        values = self.throughput.finish(values, updates)  # step_time_s, TFLOP/s, MFU, tokens/s
        lr = next(iter(self.engines.values())).optimizer.param_groups[0]["lr"]
        values.update(samples=self.samples, lr=lr, skipped=self.skipped)
        self.metrics.log(self.step, values)
        return values

    # ---- checkpoints ----------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "samples": self.samples,
            "skipped": self.skipped,
            "stage": self.cfg.stage,
            "stream": self.stream.state_dict(),
            "world_size": dist.get_world_size(),
            "config": self.cfg.to_dict(),
            **self.guard.state_dict(),  # lr_scale, rollbacks, health (healthy when saved?)
        }

    def _modules(self) -> dict:
        return {"target": self.target} if self.cfg.stage == "consistency" else {}

    def _all_emas(self) -> dict:
        return {**self.emas, **({"target": self.target_ema} if self.target_ema else {})}

    def save(self) -> Path:
        return save_checkpoint(
            self.cfg.save,
            self.step,
            self.engines,
            self._all_emas(),
            self.trainer_state(),
            self.rank,
            self._modules(),
        )

    def restore(self, d: Path) -> dict:
        """Load checkpoint ``d`` into the engines, EMA, modules, data stream and counters (a
        resume, or a rollback in-process); returns its trainer state. Collective."""
        d = Path(d)
        layout = {
            "tensor_parallel": self.ps.tp_size,
            "context_parallel": self.ps.cp_size,
            "zero_stage": self.cfg.zero_stage,
        }
        emas = self._all_emas()
        if self.target_ema is not None and not (d / "ema" / "target").is_dir():
            del emas["target"]  # written before the target's fp32 shadow was stored
        state = load_checkpoint(d, self.engines, emas, self._modules(), layout)
        if self.target_ema is not None and "target" not in emas:
            self.target_ema.reset_from_module()  # from the stored target network's weights
        if state.get("stage") != self.cfg.stage:
            raise ValueError(
                f"{d} is a {state.get('stage')!r} checkpoint, this run trains {self.cfg.stage!r}"
            )
        self.step, self.samples = state["step"], state["samples"]
        self.skipped = state.get("skipped", 0)
        try:
            self.stream.load_state_dict(state["stream"])
        except ValueError as e:
            raise ValueError(f"{d}: {e}") from None
        return state

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def _resume(self, root: str) -> None:
        d = latest_checkpoint(root, warn=self._say)
        if d is None:
            if Path(root).resolve() != Path(self.cfg.save or "").resolve():
                # --load elsewhere than --save names a checkpoint to continue: a typo must
                # not start a fresh run (--load = --save is the idiom of requeued jobs)
                raise ValueError(
                    f"--load {root}: no checkpoint there (no {LATEST}, no complete iter_*); "
                    "check the path, or drop --load to start from scratch"
                )
            self._say(f"no checkpoint in {root}: starting from step 0")
            return
        state = self.restore(d)
        self.guard.load_state_dict(state)  # lr scale of earlier rollbacks, detector streaks
        self._say(f"resumed from {d} at step {self.step}")

    def _agree_loaded(self, error: Exception | None) -> None:
        """All ranks agree that the start-up (resume) went well before any trains: a rank-local
        error (a missing or corrupt file of this rank) would otherwise leave the other ranks
        waiting in the first collective of training until the timeout. Collective."""
        flag = comm_tensor([float(self.rank + 1) if error is not None else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        failed = int(flag.item()) - 1
        if error is not None:
            raise error
        if failed >= 0:
            raise ValueError(
                f"rank {failed} could not start (its error is in its output); no rank trains"
            )

    def _check_save_dir(self) -> None:
        """Refuse to start when ``--save`` already holds complete checkpoints newer than the
        step this run starts from: it would replace or interleave with another run's
        (checkpoints it resumed from, or older ones, are fine)."""
        if not self.cfg.save:
            return
        newer = [(s, d) for s, d in complete_checkpoints(self.cfg.save) if s > self.step]
        if newer:
            step, d = newer[-1]
            raise ValueError(
                f"--save {self.cfg.save} holds a complete checkpoint at step {step} ({d}) "
                f"but this run starts at step {self.step}: it would overwrite or mix with "
                f"another run's checkpoints; resume it with --load {self.cfg.save}, or use "
                "another --save"
            )

    def export(self, root: Path) -> None:
        """Consolidated TP=1 fp32 model files for the next stage, streamed to rank 0's host
        one tensor at a time (:mod:`megatron_apt.engine.export`; collective)."""
        export_model_files(self, root)


def apt_config(cfg: TrainConfig) -> APTConfig:
    """The adversarial objective's settings of a run (paper values and the ablations)."""
    return APTConfig(
        shift=cfg.shift,
        r1_lambda=cfg.r1_lambda,
        r1_sigma=cfg.r1_sigma,
        r1_noise_std=cfg.r1_noise_std,
        d_timesteps=cfg.d_timesteps,
    )


def _mean(records: list[dict]) -> dict:
    keys = sorted({k for r in records for k in r})  # same order on every rank (all-reduce)
    return {k: torch.stack([r[k].float() for r in records if k in r]).mean() for k in keys}
