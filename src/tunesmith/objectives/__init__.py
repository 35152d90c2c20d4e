"""Objectives decide the loss. The loop asks an objective (a module or an object) only these:

    build_datasets(cfg, tokenizer) -> Datasets      read, validate and tokenize the train and eval sets
    collate(examples, cfg, pad_id) -> batch         the tensors of one micro-batch
    units(example) -> int                           what the loss is averaged over: label tokens (sft, text), pairs
    prepare(model, method, cfg, data, device, pad_id, ctx) -> note | None
                                                    after the method is applied: heads, the reference policy
    loss_sum(model, batch, ctx) -> (loss sum, units, metric sums)    metric sums are over the same units as the loss
                                                    `ctx`: the run's context (context.py): the loss chunk, the
                                                    method's virtual tokens; a bare RunContext() without a run
    compare(before, after) -> {name: (before, after)}           the held-out metrics the report shows
    keep_in_run(run_dir)            (optional)      once the run folder is ready: write what prepare computed that a
                                                    resumed run reads back instead of recomputing (DPO's reference)
    save(model, method, cfg, folder)                the trained artifact (adapter or model, plus any head)
    own_loop                                        None, or the name of a training step of its own (train/loop.py)
"""

from tunesmith.errors import ConfigError

NAMES = ("sft", "text", "reward", "dpo", "orpo", "simpo", "kto", "ppo", "grpo", "classify")


def get_objective(name: str, settings=None):
    """The objective called `name`, configured by its config section (`cfg.dpo`, ...) where it has one."""
    from tunesmith.objectives import lm

    if name in ("sft", "text"):
        return lm
    if name == "reward":
        from tunesmith.config.objectives import RewardSettings
        from tunesmith.objectives.reward import RewardObjective

        return RewardObjective(settings or RewardSettings())
    if name == "dpo":
        from tunesmith.config.objectives import DpoSettings
        from tunesmith.objectives.dpo import DpoObjective

        return DpoObjective(settings or DpoSettings())
    if name in ("orpo", "simpo"):
        from tunesmith.config.objectives import OrpoSettings, SimpoSettings
        from tunesmith.objectives.reference_free import OrpoObjective, SimpoObjective

        if name == "orpo":
            return OrpoObjective(settings or OrpoSettings())
        return SimpoObjective(settings or SimpoSettings())
    if name == "kto":
        from tunesmith.config.objectives import KtoSettings
        from tunesmith.objectives.kto import KtoObjective

        return KtoObjective(settings or KtoSettings())
    if name == "grpo":
        from tunesmith.objectives.grpo import GrpoObjective

        if settings is None:
            raise ConfigError("grpo: objective grpo needs its settings (grpo.reward_functions or grpo.reward_model)")
        return GrpoObjective(settings)
    if name == "ppo":
        from tunesmith.objectives.ppo import PpoObjective

        if settings is None:
            raise ConfigError("ppo: objective ppo needs its settings (ppo.reward_model or ppo.reward_function)")
        return PpoObjective(settings)
    if name == "classify":
        from tunesmith.config.objectives import ClassifySettings
        from tunesmith.objectives.classify import ClassifyObjective

        return ClassifyObjective(settings or ClassifySettings())
    raise ConfigError(f"objective: unknown objective {name!r}; expected one of {sorted(NAMES)}")
