"""DeepSpeed ZeRO behind Lightning's strategy names, on CUDA as stock and on a CPU accelerator too.

Lightning's ``DeepSpeedStrategy`` refuses anything but CUDA, although DeepSpeed itself runs ZeRO stage 2
and 3 on CPU processes with its CPU accelerator and gloo. ``DeepSpeedStrategy`` here is the stock class
with three CPU-only detours (on CUDA every method is the stock one):

1. DDP's environment setup instead of the CUDA-only guard;
2. world ranks and DeepSpeed's distributed init without the GPU-index check;
3. ``deepspeed.initialize`` gets ``device_rank=local_rank`` (the stock code passes ``root_device.index``,
   which is ``None`` for a CPU device and which DeepSpeed compares with 0).

Importing this module re-registers every ``deepspeed*`` strategy name (``deepspeed_stage_2``,
``deepspeed_stage_3_offload``, ...) with the same options on this class, so ``--trainer.strategy
deepspeed_stage_3`` works on either accelerator. It overrides private Lightning methods, which is why
``pyproject.toml`` pins ``lightning`` exactly; ``tests/test_scale_out.py`` runs it.
"""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies import DeepSpeedStrategy as StockDeepSpeedStrategy
from torch.nn import Module


class DeepSpeedStrategy(StockDeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy``, which also runs on a CPU accelerator (gloo)."""

    @property
    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if not self._on_cpu:
            super().setup_environment()
            return
        self._refuse_offload()
        # DeepSpeed picks its accelerator when first imported; say it instead of letting it guess (and warn)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # the stock override only adds the CUDA guard; DDP's setup calls our setup_distributed
        DDPStrategy.setup_environment(self)

    def _refuse_offload(self) -> None:
        zero = (self.config or {}).get("zero_optimization") or {}
        offloaded = [key for key in ("offload_optimizer", "offload_param") if zero.get(key)]
        if offloaded:
            raise ValueError(
                f"the DeepSpeed config offloads {offloaded} from GPU to CPU memory; on a CPU accelerator "
                "everything is in CPU memory already: use deepspeed_stage_2 / deepspeed_stage_3 (no _offload), "
                "or drop the offload entries from the JSON config."
            )

    def setup_distributed(self) -> None:
        if not self._on_cpu:
            super().setup_distributed()
            return
        reset_seed()
        self.set_world_ranks()
        with _without_shared_memory_allreduce():
            self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model: Module, optimizer, lr_scheduler=None):
        if not self._on_cpu:
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        with _device_rank(self.local_rank):
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)

    def _initialize_deepspeed_inference(self, model: Module) -> None:
        if not self._on_cpu:
            super()._initialize_deepspeed_inference(model)
            return
        with _device_rank(self.local_rank):
            super()._initialize_deepspeed_inference(model)


@contextmanager
def _device_rank(local_rank: int) -> Iterator[None]:
    """Within the block, ``deepspeed.initialize`` receives ``args.device_rank = local_rank``."""
    import deepspeed

    stock_initialize = deepspeed.initialize

    def initialize(*args, **kwargs):
        kwargs["args"] = argparse.Namespace(device_rank=local_rank)
        return stock_initialize(*args, **kwargs)

    deepspeed.initialize = initialize
    try:
        yield
    finally:
        deepspeed.initialize = stock_initialize


@contextmanager
def _without_shared_memory_allreduce() -> Iterator[None]:
    """Skip compiling DeepSpeed's shared-memory all-reduce op while its CPU backend starts.

    That op serves only tensor-parallel *inference* (``inference_all_reduce``); training collectives go
    through gloo. Building it costs ~30 s of g++ on the first run and fails on machines without a
    compiler, for nothing ZeRO uses.
    """
    # `deepspeed.comm.torch` as an attribute is the torch package (re-exported); the module is what we want
    deepspeed_torch_comm = importlib.import_module("deepspeed.comm.torch")
    stock_build = deepspeed_torch_comm.build_shm_op
    deepspeed_torch_comm.build_shm_op = lambda: None
    try:
        yield
    finally:
        deepspeed_torch_comm.build_shm_op = stock_build


def register_deepspeed_names() -> list[str]:
    """Point every registered ``deepspeed*`` name at :class:`DeepSpeedStrategy`, keeping its options."""
    names = []
    for name, entry in list(StrategyRegistry.items()):
        if entry["strategy"] is StockDeepSpeedStrategy:
            StrategyRegistry.register(
                name, DeepSpeedStrategy, description=entry["description"], override=True, **entry["init_params"]
            )
            names.append(name)
    return names


DEEPSPEED_STRATEGY_NAMES = register_deepspeed_names()

__all__ = ["DEEPSPEED_STRATEGY_NAMES", "DeepSpeedStrategy", "register_deepspeed_names"]
