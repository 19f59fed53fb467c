"""Where and in what precision the networks run: CUDA when there is one, else the CPU, always saying which."""

import contextlib
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch

from .errors import CDMSegmentError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def choose_device(device: str = "auto", log: Callable[[str], None] = print) -> torch.device:
    """'auto': CUDA when available, else the CPU, saying which; 'cuda' without CUDA is an error."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise CDMSegmentError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device == "auto":
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log(f"device: {torch.cuda.get_device_name(chosen) if chosen.type == 'cuda' else 'CPU'} "
            f"({'CUDA found' if chosen.type == 'cuda' else 'no CUDA GPU found'})")
        return chosen
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CDMSegmentError("CUDA was requested but this PyTorch finds no usable CUDA GPU; choose the CPU "
                              "(device cpu) or auto, or install a CUDA build of PyTorch")
    return torch.device(device)


def autocast(device: torch.device, precision: str):
    """fp32 on the CPU unless asked (the CDM subtracts two close outputs; see bench/), fp16 autocast on CUDA."""
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX-BF16 or AVX-512 BF16): its flags on Linux, else
    oneDNN's own check. Without it bf16 runs 7-100x slower than fp32 (measured on AVX2), so it is never
    chosen by default and asking for it says so."""
    if cpuinfo.is_file():
        flags = set(" ".join(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
        return bool(flags & {"amx_bf16", "avx512_bf16"})
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error as eager torch raises it (torch.cuda.OutOfMemoryError), or as it
    reaches us through a TorchScript model: rewrapped as a plain RuntimeError or a torch.jit.Error
    (not a RuntimeError) that keeps only the message."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, (RuntimeError, torch.jit.Error)) and "CUDA out of memory" in str(error))


def check_finite(maps: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    """``maps`` unchanged when every value is finite; else stop the run, naming the likely cause."""
    if bool(torch.isfinite(maps).all()):
        return maps
    half = precision in ("fp16", "bf16") or (precision == "auto" and device.type == "cuda")
    if half:
        raise CDMSegmentError("the network's output overflowed in half precision (NaN or infinite values); "
                              "run again in full precision (precision fp32)")
    raise CDMSegmentError("the network's output holds NaN or infinite values: the model file is probably damaged "
                          "(compare its SHA256 with its source, or download it again) or the image holds extreme "
                          "intensities; nothing was written")


# Unsigned types beyond uint8 cross to the device as they are and are widened there: torch has only
# "limited support" for them (no top-k, and on CUDA not every comparison), and these hold every value exactly.
WIDER = {torch.uint16: torch.int32, torch.uint32: torch.int64, torch.uint64: torch.float64}


def voxel_tensor(array: Union[np.ndarray, torch.Tensor],
                 device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """An array of voxels (any shape; numpy or torch, on any device) as a tensor on ``device`` (None: where it
    is, the CPU for numpy) holding the same values: in its own dtype when torch has it, so an int16 volume
    crosses to a GPU in half the bytes of float32, else (another byte order, an object array) as float32;
    uint16 and wider unsigned types are widened on the device (WIDER). A C-ordered numpy array of another
    type stays shared on the CPU, not copied."""
    if not isinstance(array, torch.Tensor):
        a = np.asarray(array)
        if a.dtype.kind not in "biuf" or not a.dtype.isnative:
            a = a.astype(np.float32)
        if not (a.flags.c_contiguous and a.flags.writeable):  # torch refuses negative strides, warns on read-only
            a = np.array(a, order="C")
        array = torch.from_numpy(a)
    t = array if device is None else array.to(device)
    return t.to(WIDER.get(t.dtype, t.dtype))
