"""HF PEFT's LoRA, the reference implementation our methods are measured against.

Targets are resolved by our own matcher and handed to PEFT as exact module names, so
`fnmodel.targets` means the same for `lora` and `peft_lora`."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from rosa_bench.errors import UserError
from rosa_bench.methods.base import HEAD_NAMES, METHOD_ATTR, Method, attach, find_targets, model_family


class PeftLoRA(Method):
    name = "peft_lora"

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.train_biases != "none" or cfg.train_norms:
            raise UserError("fnmodel.train_biases / fnmodel.train_norms are protocol options of our own "
                            "methods; peft_lora is the plain reference: use fnmodel=lora")

    def apply(self, model: nn.Module, family: str | None = None) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        targets = find_targets(model, self.target_patterns(family or model_family(model)))
        for name in targets:
            self.check_layer(name, model.get_submodule(name))
        has_head = [h for h in HEAD_NAMES if hasattr(model, h)]
        config = LoraConfig(
            r=int(self.cfg.rank),
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            target_modules=targets,
            fan_in_fan_out=isinstance(model.get_submodule(targets[0]), Conv1D),
            modules_to_save=has_head if (has_head and self.cfg.train_head) else None,
        )
        peft_model = get_peft_model(model, config)
        attach(peft_model, self)
        return peft_model

    def merge(self, model: nn.Module) -> nn.Module:
        merged = model.merge_and_unload()
        if hasattr(merged, METHOD_ATTR):
            delattr(merged, METHOD_ATTR)
        return merged
