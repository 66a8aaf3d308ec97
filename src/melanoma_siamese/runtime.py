"""Where and how training runs: the device, precision, backend flags, and a stop on SIGTERM/SIGINT.

Training and `bench` both build these here, so a benchmark measures the configuration `train` runs.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import ConfigError, Interrupted


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA GPU (torch.cuda.is_available() "
                          "is False); use --device cpu or install a CUDA build of torch")
    return torch.device(name)


def fix_threads(threads: Optional[int] = None) -> int:
    """Fix the intra-op thread count for the run (default: torch's current one) and return it.

    CPU kernels split their sums by thread, so the count decides the bits of every result. Setting it
    through torch also turns MKL's dynamic threading off (torch.set_num_threads calls
    mkl_set_dynamic(0)); left on, as it is by default, MKL may run a matrix product on fewer threads
    than asked in one process than in another, and a resumed run would not repeat the uninterrupted one.
    """
    threads = int(threads or torch.get_num_threads())
    torch.set_num_threads(threads)
    return threads


def set_backend_flags(device: torch.device) -> None:
    """Backend switches of training, set here for `train` and `bench` alike.

    cuDNN's autotuner stays off: it times candidate convolution algorithms in each process and may pick
    different ones in a resumed process than in the uninterrupted one, so a resumed GPU run would no
    longer repeat it bit for bit (on an H200 the sampled-triplet resume test failed 10 of 10 times with
    it on; the version before, which left it off, resumed bit-exact 14 of 14 times)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False


class _NoScaler:
    """The gradient scaler's interface where no scaling is needed (fp32, bf16)."""

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def update(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class Precision:
    """Autocast dtype (None: fp32), a gradient scaler (a no-op unless fp16) and the memory format."""
    device: torch.device
    dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    scaler: object = None

    def __post_init__(self) -> None:
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else _NoScaler()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def layout(self, x):
        """A model or a 4-d batch in the memory format the run uses."""
        return x.to(memory_format=torch.channels_last) if self.channels_last else x

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    @property
    def name(self) -> str:
        kind = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return kind + (" + channels_last" if self.channels_last else "")


def precision_for(runtime, device: torch.device) -> Precision:
    """The precision the configuration's runtime section asks for, resolved for the device."""
    amp = runtime.amp
    if amp == "auto":
        amp = "off" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    channels_last = runtime.channels_last == "on" or (runtime.channels_last == "auto" and device.type == "cuda")
    return Precision(device, dtype, channels_last)


class StopFlag:
    """Set by SIGTERM/SIGINT; the training loop checks it between batches."""

    def __init__(self):
        self.signal: Optional[int] = None

    def check(self) -> None:
        if self.signal is not None:
            raise Interrupted(self.signal)


@contextlib.contextmanager
def stop_on_signals():
    """Inside, SIGTERM/SIGINT set a StopFlag instead of killing the process, so the last epoch's state
    file is complete; the previous handlers come back afterwards."""
    flag = StopFlag()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda signum, frame: setattr(flag, "signal", signum))
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
