"""The method registry: `fnmodel.name` -> Method class. A new method is one module here,
one entry below, one conf/fnmodel/<name>.yaml and its tests."""

from __future__ import annotations

from rosa_bench.config import MethodConfig
from rosa_bench.errors import choices_error
from rosa_bench.methods.base import Method, attached_method
from rosa_bench.methods.cola import ColA
from rosa_bench.methods.full import FullFineTuning
from rosa_bench.methods.lora import LoRA
from rosa_bench.methods.loraxs import LoraXS
from rosa_bench.methods.peft_lora import PeftLoRA
from rosa_bench.methods.rocoft import RoCoFT
from rosa_bench.methods.rosa import ROSA

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (FullFineTuning, LoRA, PeftLoRA, ROSA, LoraXS, RoCoFT, ColA)
}


def method_names() -> list[str]:
    return sorted(METHODS)


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise choices_error("method (fnmodel.name)", name, method_names())
    return METHODS[name]


def build_method(cfg: MethodConfig) -> Method:
    return method_class(cfg.name)(cfg)


__all__ = ["METHODS", "Method", "attached_method", "build_method", "method_class", "method_names"]
