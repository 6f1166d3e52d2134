#!/usr/bin/env python
"""Train any refseg method with Accelerate.

    accelerate launch scripts/train.py --config scripts/configs/risclip-b_refcoco.yaml [--key value ...]

The YAML file sets defaults for every flag below; flags given on the command line win. One
script serves every method: `refseg.training.METHODS` says how each is built and which stages it
trains in (RISCLIP: `locator`, then `refiner`) and which training sampler it uses (`MethodSpec.sampler`:
`random`, one sentence of one ref per row, or `grouped_by_image`, `--sentences_per_image` sentences
of one image as consecutive rows; `refseg.training.samples.TRAIN_SAMPLERS`).
"""

import _scripts_path  # noqa: F401  (first: keeps scripts/evaluate.py from shadowing `evaluate`)

import faulthandler
import logging
import signal
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from train_args import parse_args

from refseg.training import (
    build_stage_plan,
    evaluate_split,
    get_method,
    prune_checkpoints,
    save_checkpoint,
    staged_lr_lambda,
)
from refseg.training.best import BestTracker, parse_best_metric, write_best_folder
from refseg.training.checkpointing import pause_point
from refseg.data import RandomAffineSaturation
from refseg.training.data import is_generalized, load_eval_splits, load_train_split, resolve_split_by
from refseg.training.distributed import convert_sync_batch_norm
from refseg.training.evaluation import GENERALIZED_METRIC_COLUMNS, METRIC_COLUMNS, write_eval_results
from refseg.training.modeling import (build_model_and_processor, prepare_scalars_for_fsdp, scalar_shapes_restored,
                                     stage_parameters)
from refseg.training.optim import build_optimizer, resolve_gradient_accumulation
from refseg.training.resume import gather_main_state, is_sharded, restore_checkpoint, write_main_state, write_rng_state
from refseg.training.samples import build_train_data, forward_input_names, get_train_sampler
from refseg.training.schedules import parse_stage_learning_rates, parse_stages

logger = get_logger(__name__)


def run_evaluation(accelerator, model, processor, eval_sets, args, step, output, num_workers=0, generalized=False):
    """Score every eval split by the model output `output` (the active stage's, `MethodSpec.scored_output`);
    `generalized` (gRefCOCO, grefshapes): by gIoU, cIoU, N-acc, T-acc and precision@X of the target samples.

    Logged as `step N <split> [<output>]: ...` and tracked as `eval/<output>/<split>/<metric>` (a metric over no
    sample, None, e.g. N-acc of a split without a no-target expression, is left out of both).
    Evaluation leaves the training random state untouched (`torch.random.fork_rng`): each eval loader
    draws its base seed from the global generator, and a run that evaluates between checkpoints
    must draw the same dropout masks, Gumbel noise and word masks after a resume as without one.
    """
    results = {}
    device = accelerator.device
    forked = [device.index or 0] if device.type == "cuda" else []
    for split, samples in eval_sets.items():
        with torch.random.fork_rng(devices=forked):
            metrics = evaluate_split(accelerator.unwrap_model(model), processor, samples,
                                     accelerator=accelerator, batch_size=args.per_device_eval_batch_size,
                                     num_workers=num_workers, output=output, desc=f"eval {split} [{output}]",
                                     generalized=generalized)
        results[split] = metrics
        logger.info("step %d %s [%s]: %s", step, split, output,
                    ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                              if not k.startswith("num_") and v is not None))
        accelerator.log({f"eval/{output}/{split}/{k}": v for k, v in metrics.items() if v is not None}, step=step)
    return results


def check_model_config(model_name_or_path):
    """Fail before anything is built when a local `--model_name_or_path` folder's `config.json` does not
    load (not JSON, a field of the wrong type): a `ValueError` naming the file. Hub ids pass through."""
    config_file = Path(model_name_or_path) / "config.json"
    if not config_file.is_file():
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(model_name_or_path))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"`model_name_or_path`: {config_file} does not load as a refseg config: {err}") from err


def main(argv=None):
    model_args, data_args, args = parse_args(argv)
    if model_args.model_name_or_path:
        check_model_config(model_args.model_name_or_path)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # Parameters change their requires_grad between stages; DDP must tolerate unused ones.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    set_seed(args.seed)  # before the model is built: the seed governs initialisation

    spec = get_method(model_args.method)
    get_train_sampler(spec.sampler)  # an unknown sampler fails before anything is built
    args.gradient_accumulation_steps = resolve_gradient_accumulation(
        args.global_batch_size, args.per_device_train_batch_size, accelerator.num_processes,
        args.gradient_accumulation_steps)
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("global batch %d = %d per device x %d process(es) x %d accumulation step(s)", global_batch,
                args.per_device_train_batch_size, accelerator.num_processes, args.gradient_accumulation_steps)
    model, processor = build_model_and_processor(spec, model_args)
    if args.sync_batch_norm and accelerator.num_processes > 1:
        converted = convert_sync_batch_norm(model, accelerator.device.type)
        logger.info("sync_batch_norm: %d BatchNorm layer(s) normalise over the %d processes' batches", converted,
                    accelerator.num_processes)

    with accelerator.main_process_first():
        train_rows = load_train_split(data_args)
        eval_sets = load_eval_splits(data_args)
    generalized = is_generalized(data_args)  # scored by gIoU, cIoU, N-acc, T-acc (`--best_metric val/gIoU`)
    metric_names = (*(GENERALIZED_METRIC_COLUMNS if generalized else METRIC_COLUMNS), "num_samples")
    best_split_metric = parse_best_metric(args.best_metric, eval_sets, metric_names) if args.best_metric else None
    train_data = build_train_data(spec.sampler, train_rows, processor,
                                  per_device_batch_size=args.per_device_train_batch_size,
                                  rank=accelerator.process_index, num_processes=accelerator.num_processes,
                                  seed=args.seed, augment=RandomAffineSaturation() if data_args.augment else None,
                                  sentences_per_image=args.sentences_per_image, word_mask_rate=args.word_mask_rate,
                                  model_inputs=forward_input_names(model))
    train_samples, sampler = train_data.samples, train_data.sampler
    logger.info("sampler %r: %d training items of %d row(s) each", spec.sampler, len(train_samples),
                train_data.rows_per_item)
    # Its own generator: creating an iterator (every epoch, and after a resume) draws the workers' base
    # seed from it, never from the global RNG that dropout and augmentation use, so resume stays exact.
    loader = DataLoader(train_samples, batch_sampler=sampler, num_workers=data_args.dataloader_num_workers,
                        generator=torch.Generator().manual_seed(args.seed),
                        collate_fn=train_data.collator)
    updates_per_epoch = sampler.num_batches_per_epoch // args.gradient_accumulation_steps
    if updates_per_epoch < 1:
        raise ValueError("one epoch holds fewer batches than `gradient_accumulation_steps`")
    stage_lengths = parse_stages(args.stages) if args.stages else spec.stage_epochs(args.num_epochs)
    plan = build_stage_plan(stage_lengths, known_stages=spec.stages,
                            unit="steps" if args.stages and args.stage_unit == "steps" else "epochs",
                            updates_per_epoch=updates_per_epoch, max_steps=args.max_steps)
    logger.info("stages %s, %d updates/epoch", dict(zip(plan.names, plan.steps)), updates_per_epoch)

    params = stage_parameters(model, plan.names)  # every parameter some stage trains
    optimizer = build_optimizer(spec.param_groups(model, args.learning_rate) if spec.param_groups else params,
                                optimizer=args.optimizer, learning_rate=args.learning_rate,
                                weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
                                eps=args.adam_epsilon, implementation=args.optimizer_implementation)
    milestones = [float(m) for m in args.lr_milestones.split(",") if m.strip()]
    stage_rates = parse_stage_learning_rates(args.stage_learning_rates)
    unknown = sorted(set(stage_rates) - set(spec.stages))
    if unknown:
        raise ValueError(f"`stage_learning_rates` names stage(s) {unknown}; {model_args.method} has {list(spec.stages)}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, staged_lr_lambda(
        plan, kind=args.lr_scheduler, power=args.lr_power, milestones=milestones, gamma=args.lr_gamma,
        scope=args.lr_schedule_scope,
        # a rate for a stage this run skips (e.g. `--stages locator:N` on the quickstart config) is unused
        stage_scales={name: rate / args.learning_rate for name, rate in stage_rates.items() if name in plan.names}))
    if accelerator.distributed_type == DistributedType.FSDP:  # FSDP2 shards no 0-d parameter (CLIP's logit_scale)
        prepare_scalars_for_fsdp(model, params)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    global_step = 0
    if args.resume_from_checkpoint:
        # `latest` skips a corrupt newest checkpoint for the previous complete one (logged), and in a
        # folder without checkpoints starts a new run: a scheduler can restart a job with one command.
        restored = restore_checkpoint(args.resume_from_checkpoint, output_dir, model=raw_model,
                                      optimizer=optimizer, scheduler=scheduler, rank=accelerator.process_index)
        if restored is not None:
            checkpoint, state = restored
            global_step = state["global_step"]
            logger.info("resumed from %s at step %d", checkpoint, global_step)
        else:
            logger.info("--resume_from_checkpoint %s: no checkpoint in %s; starting a new training run",
                        args.resume_from_checkpoint, output_dir)

    best = None
    if best_split_metric:
        best = BestTracker(output_dir, *best_split_metric, mode=args.best_metric_mode, resume=global_step > 0)

    def track_best(results, step):
        """Every process calls it after an evaluation (same results everywhere); the main one writes."""
        if best is None:
            return

        def save(tmp, final, record):
            if accelerator.is_main_process:
                write_best_folder(tmp, final, record, raw_model, processor)
            accelerator.wait_for_everyone()

        best.update(results, step, save)

    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("refseg", config={k: v for k, v in {**vars(model_args), **vars(data_args),
                                  **vars(args)}.items() if isinstance(v, (int, float, str, bool))})

    def checkpoint_now(step):
        def write(tmp):
            # FSDP: every process hands in its shards, the main process writes whole tensors
            gathered = gather_main_state(raw_model, optimizer) if is_sharded(raw_model) else None
            if accelerator.is_main_process:
                write_main_state(tmp, model=raw_model, optimizer=optimizer, scheduler=scheduler, gathered=gathered)
            write_rng_state(tmp, accelerator.process_index)

        epoch, position = divmod(step, updates_per_epoch)
        save_checkpoint(output_dir, step, write, is_main_process=accelerator.is_main_process,
                        wait=accelerator.wait_for_everyone,
                        state={"global_step": step, "epoch": epoch, "updates_into_epoch": position,
                               "stage": plan.names[plan.stage_at(max(step - 1, 0))],
                               "num_processes": accelerator.num_processes, "global_batch_size": global_batch,
                               "gradient_accumulation_steps": args.gradient_accumulation_steps, "seed": args.seed})
        if accelerator.is_main_process:
            prune_checkpoints(output_dir, args.checkpoints_total_limit)

    progress = tqdm(total=plan.total_steps, initial=global_step, desc="train",
                    disable=not accelerator.is_local_main_process)
    stage = None
    model.train()
    while global_step < plan.total_steps:
        epoch, position = divmod(global_step, updates_per_epoch)
        sampler.set_epoch(epoch, start_batch=position * args.gradient_accumulation_steps)
        train_samples.set_epoch(epoch)
        batches = iter(loader)
        for _ in range(position, updates_per_epoch):
            if global_step >= plan.total_steps:
                break
            if plan.names[plan.stage_at(global_step)] != stage:
                stage = plan.names[plan.stage_at(global_step)]
                raw_model.set_training_stage(stage)
                logger.info("stage %r from step %d", stage, global_step)
            for micro in range(args.gradient_accumulation_steps):
                batch = {k: v.to(accelerator.device) for k, v in next(batches).items()}
                last = micro == args.gradient_accumulation_steps - 1
                with nullcontext() if last else accelerator.no_sync(model):  # all-reduce on the last one
                    with accelerator.autocast():
                        loss = model(**batch).loss / args.gradient_accumulation_steps
                    accelerator.backward(loss)
            pause_point(f"update-{global_step + 1}:backward")  # test hook: a kill mid-update
            if args.max_grad_norm > 0:
                accelerator.clip_grad_norm_([p for p in raw_model.parameters() if p.requires_grad],
                                            args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            progress.update(1)
            if global_step % args.logging_steps == 0 or global_step == plan.total_steps:
                logs = {"train/loss": loss.item() * args.gradient_accumulation_steps,
                        "train/lr": scheduler.get_last_lr()[0], "train/epoch": global_step / updates_per_epoch}
                progress.set_postfix(loss=f"{logs['train/loss']:.4f}", stage=stage)
                accelerator.log(logs, step=global_step)
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                checkpoint_now(global_step)
            if args.eval_steps and global_step % args.eval_steps == 0 and global_step < plan.total_steps:
                track_best(run_evaluation(accelerator, model, processor, eval_sets, args, global_step,
                                          spec.scored_output(stage), data_args.dataloader_num_workers,
                                          generalized=generalized), global_step)
    progress.close()

    # the final evaluation scores the output of the run's last stage (`logits` after RISCLIP's Refiner)
    final_output = spec.scored_output(plan.names[-1])
    results = {}
    if eval_sets:
        results = run_evaluation(accelerator, model, processor, eval_sets, args, global_step, final_output,
                                 data_args.dataloader_num_workers, generalized=generalized)
        track_best(results, global_step)
    state_dict = None
    if is_sharded(raw_model):  # FSDP: every process hands in its shards
        state_dict = scalar_shapes_restored(accelerator.get_state_dict(model), raw_model)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        raw_model.save_pretrained(output_dir, state_dict=state_dict)
        processor.save_pretrained(output_dir)
        write_eval_results(output_dir / "eval_results.json", results, dataset=data_args.dataset,
                           split_by=resolve_split_by(data_args), scored_output=final_output, global_step=global_step)
        logger.info("saved model, processor and eval_results.json to %s", output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>` prints every thread's stack: where a stuck job waits
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    main()
