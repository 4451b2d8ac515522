"""Training: ``run(config, workdir)`` dispatches on ``config.stage``."""
from __future__ import annotations


def run(config, workdir) -> dict:
    """Trains the stage the config names (``expert`` or ``diffusion``); resumes from ``workdir``."""
    if config.stage == "expert":
        from fadjax.train import expert_stage
        return expert_stage.train(config, workdir)
    if config.stage == "diffusion":
        if config.get("dreambooth") is not None and config.dreambooth.enabled:
            from fadjax.train import dreambooth
            return dreambooth.train(config, workdir)
        from fadjax.train import diffusion_stage
        return diffusion_stage.train(config, workdir)
    from fadjax.config_lib import ConfigError
    raise ConfigError(f"config.stage: unknown stage {config.stage!r}; expected 'expert' or 'diffusion'")
