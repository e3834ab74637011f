"""Train one run: `python train.py fnmodel.name=lora dataset.name=e2e train.max_steps=20`.

Hydra composes conf/; the run folder is <output.path>/<task>/<run name>; rerunning the same
command resumes from its last checkpoint, or does nothing if the run is complete."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rosa_bench.cli import exit_on_config_error, exit_on_user_error, normalize_overrides
from rosa_bench.config import validate


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from rosa_bench.pipeline import train

    train(validate(cfg), list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    sys.argv[1:] = exit_on_user_error(normalize_overrides)(sys.argv[1:])
    exit_on_config_error(main)()
