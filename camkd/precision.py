"""How a forward pass runs: precision (autocast, fp16's gradient scaler), memory format, torch.compile.

One frozen :class:`Precision` per job, built from its options and device, is all the training loop,
evaluation and the teachers' forward ask. fp32 (the default) enables nothing: no autocast, a disabled
scaler, the default layout, eager modules, so its numbers are exactly those of the plain code.

- bf16 / fp16: ``torch.autocast`` on the device's type around the forward passes; losses are taken in
  float32 from the logits (``.float()``), as in fp32. Its weight-cast cache is off: with it, BatchNorm
  micro-batches would share one low-precision copy of each weight and sum their gradients in that
  precision, which ranks do not, so W ranks would no longer equal W micro-batches bit for bit. fp16 adds
  a gradient scaler (loss scaling with skipped steps on overflow); its SGD is then torch's fused one,
  which reads the scaler's overflow flag on the device, so the step still never waits on the host.
- channels-last: the model's weights and every input batch in NHWC memory format (same values, other
  kernels: float results differ in rounding only).
- compile: ``torch.compile`` (inductor) of the student and the method's trainable modules; inductor
  needs a C++ compiler on the CPU and Triton on CUDA, checked up front.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from camkd.errors import CamkdError

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(DTYPES)
_CXX = ("g++", "clang++", "c++")  # what inductor's CPU backend can build its kernels with


@dataclass(frozen=True)
class Precision:
    """The forward's precision, memory format and compilation on one device type."""

    name: str = "fp32"
    device_type: str = "cpu"
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def of(cls, name: str, device: torch.device, *, channels_last: bool = False, compile: bool = False) -> Precision:
        """Checked: a known precision that autocast supports on ``device``, and what --compile needs there."""
        if name not in DTYPES:
            raise CamkdError(f"unknown --precision '{name}'; choose {', '.join(PRECISIONS)}")
        p = cls(name, device.type, channels_last, compile)
        if p.dtype is not None:
            _check_autocast(device, name, p.dtype)
        if compile:
            _check_compiler(device.type)
        return p

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: fp32, no autocast)."""
        return DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context of a forward pass: autocast to bf16/fp16, nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype, cache_enabled=False)  # see the module doc

    @property
    def scales(self) -> bool:
        """Whether the loss is scaled (fp16: its small range underflows gradients without it)."""
        return self.name == "fp16"

    def scaler(self) -> torch.amp.GradScaler:
        """fp16's gradient scaler; a disabled one (scale, step and update pass through) otherwise."""
        return torch.amp.GradScaler(self.device_type, enabled=self.scales)

    def to_memory_format(self, model: nn.Module) -> nn.Module:
        """``model`` with its 4-d weights in channels-last (in place), or as it is."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def prepare_input(self, x: Tensor) -> Tensor:
        """An image batch [B, C, H, W] in the model's memory format."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def maybe_compile(self, module: nn.Module) -> Callable:
        """``module`` compiled (a new callable sharing its parameters; the module itself, whose state_dict a
        checkpoint saves, is unchanged), or the module itself."""
        return torch.compile(module) if self.compile else module

    def compile_in_place(self, module: nn.Module) -> None:
        """Compile ``module``'s calls in place (``nn.Module.compile``: its state_dict keys stay as they are)."""
        if self.compile:
            module.compile()


def zero_momentum_buffers(opt: torch.optim.Optimizer) -> None:
    """Give every parameter of ``opt`` (SGD with momentum) a momentum buffer, zeros where it has none yet.

    torch's SGD makes a parameter's buffer at its first gradient; its fused kernel (fp16) takes either no buffers
    at all or one for every parameter with a gradient, so a parameter whose first gradient comes after the others'
    (CA-MKD's embeddings and FitNet's regressors join in epoch 2; a checkpoint saved before they joined) crashed it,
    and a first step skipped on overflow left its buffers as ``empty_like`` garbage. With dampening 0 a zero buffer is
    exactly SGD's own first step (buf = momentum * 0 + grad == grad), so every precision gets them, fp32 bit for bit
    unchanged. Called when the optimizer is built and after every checkpoint load (one from before lacks some)."""
    for group in opt.param_groups:
        if group["momentum"] == 0:
            continue
        for p in group["params"]:
            state = opt.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _check_autocast(device: torch.device | str, name: str, dtype: torch.dtype) -> None:
    """Refuse, as one line naming the device, a precision autocast does not support there: autocast warns and turns
    itself off for some (a dtype the device type does not take), raises for others (bf16 on a GPU without it: a
    RuntimeError), so both are caught; on CUDA bf16 support is asked of the GPU up front."""
    device = torch.device(device)
    if not torch.amp.is_autocast_available(device.type):
        raise CamkdError(f"--precision {name}: autocast is not available on {device.type}; use --precision fp32")
    if device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.is_available():
        with torch.cuda.device(device.index if device.index is not None else torch.cuda.current_device()):
            if not torch.cuda.is_bf16_supported():  # what autocast asks (of the current device) before it raises
                raise _unsupported(name, device, "torch.cuda.is_bf16_supported() is False")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.autocast(device_type=device.type, dtype=dtype)
    except (RuntimeError, AssertionError) as e:  # autocast's refusals: bf16 on an old GPU, a backend without AMP
        raise _unsupported(name, device, str(e)) from None
    if caught:
        raise _unsupported(name, device, str(caught[0].message))


def _unsupported(name: str, device: torch.device, why: str) -> CamkdError:
    """The one line refusing --precision ``name`` on ``device``: the device (a GPU by its name), torch's reason (its
    first sentence), the precisions to use instead."""
    why = (why.strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")
    others = {"bf16": "fp16 or fp32", "fp16": "bf16 or fp32"}.get(name, "fp32")
    return CamkdError(f"--precision {name} is not supported on {_device_words(device)}" + (f" ({why})" if why else "")
                      + f"; use --precision {others}")


def _device_words(device: torch.device) -> str:
    """``device`` in a message: its type, a GPU also by index and name (when CUDA can say it)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def _check_compiler(device_type: str) -> None:
    """torch.compile's inductor builds C++ kernels on the CPU and Triton kernels on CUDA."""
    if device_type == "cpu":
        cxx = os.environ.get("CXX")
        if not (cxx and shutil.which(cxx)) and not any(shutil.which(c) for c in _CXX):
            raise CamkdError("--compile on the CPU needs a C++ compiler (torch.compile's inductor builds C++ kernels), "
                             f"and none of {', '.join(_CXX)} is on PATH (nor $CXX); install one (e.g. g++) or drop --compile")
    elif device_type == "cuda" and importlib.util.find_spec("triton") is None:
        raise CamkdError("--compile on CUDA needs Triton (torch.compile's inductor builds Triton kernels), which is not "
                         "installed; pip install triton, or drop --compile")
