"""The EMA of the ControlNet's weights (PyTorch), on the device or in host memory (--ema_on_cpu).

Not diffusers' EMAModel: its step averages on the parameters' device and copies, not averages, any tensor that
does not require grad, so host copies of the weights cannot go through it; one implementation for both placements
makes them agree bit for bit. The decay schedule is EMAModel's warm-up form (ema.py; the tests compare the two).
The average is float32 whatever the weights' dtype (DeepSpeed keeps bf16/fp16 weights in the module).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ..ema import EMASettings


class WeightsEMA:
    """Averages `params` after the optimizer steps EMASettings.updates_at names. Registered with accelerate's
    checkpointing (state_dict / load_state_dict), so a checkpoint holds it and resume continues it exactly."""

    def __init__(self, params: Sequence[torch.nn.Parameter], settings: EMASettings):
        self.params, self.settings = list(params), settings
        device = torch.device("cpu") if settings.on_cpu else None
        self.shadow = [p.detach().to(device=device or p.device, dtype=torch.float32, copy=True) for p in self.params]
        self.updates = 0
        self._host: list[torch.Tensor] | None = None  # --ema_on_cpu: the weights copied out, not yet averaged in
        self._copied: torch.cuda.Event | None = None
        self._pending = False

    def after_step(self, global_step: int) -> None:
        if not self.settings.updates_at(global_step):
            return
        if not self.settings.on_cpu:
            self._average([p.detach() for p in self.params])
            return
        # Host memory: average the previous copy in (long arrived by now), then start this step's copy without
        # waiting for it; it is averaged in at the next update, or when the average is read (flush).
        self.flush()
        pinned = torch.cuda.is_available()
        if self._host is None:
            self._host = [torch.empty(p.shape, dtype=p.dtype, pin_memory=pinned) for p in self.params]
        with torch.no_grad():
            for host, param in zip(self._host, self.params, strict=True):
                host.copy_(param.detach(), non_blocking=pinned)
        if pinned:
            self._copied = torch.cuda.Event()
            self._copied.record()
        self._pending = True

    def flush(self) -> None:
        """Average in a copy still waiting (--ema_on_cpu); before the average is read or saved."""
        if not self._pending:
            return
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        self._average(self._host)
        self._pending = False

    @torch.no_grad()
    def _average(self, values: list[torch.Tensor]) -> None:
        weight = 1.0 - self.settings.decay_at(self.updates)  # the first update (weight 1) copies exactly
        torch._foreach_lerp_(self.shadow, [v.float() for v in values], weight)
        self.updates += 1

    def state_dict(self) -> dict:
        self.flush()
        return {"shadow": [s.cpu() for s in self.shadow], "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(
                f"the checkpoint's EMA holds {len(state['shadow'])} tensors, this ControlNet has {len(self.shadow)}"
            )
        with torch.no_grad():
            for shadow, saved in zip(self.shadow, state["shadow"], strict=True):
                shadow.copy_(saved)
        self.updates, self._pending = int(state["updates"]), False

    @contextlib.contextmanager
    def weights_in(self) -> Iterator[None]:
        """The averaged weights in the model while inside (validation, the final export); the raw ones, kept in
        host memory meanwhile, are put back exactly afterwards."""
        self.flush()
        raw = [p.detach().to("cpu", copy=True) for p in self.params]
        with torch.no_grad():
            for param, shadow in zip(self.params, self.shadow, strict=True):
                param.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self.params, raw, strict=True):
                    param.copy_(saved)
