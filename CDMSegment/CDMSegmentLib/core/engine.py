"""The engine that evaluates the diffusion network on a CPU: torch (the TorchScript file) or ONNX Runtime.

On two AVX2 cores ONNX Runtime ran the bundled network 1.44x faster than TorchScript per evaluation
(timed in alternation; 1.24-2.5x across runs, most when the machine was busy, where torch's two
threads suffer), and whole volumes 1.25-1.4x faster (``bench/bench_engines.py``,
``bench/bench_speed.py``; README, Speed); the CDM difference eps(f(y1)) - eps(f(y0)) it gives agrees with torch's within 2e-4 of its
largest value. It is optional: ``pip install onnx onnxruntime`` (the panel in Slicer offers to
install them). ``auto`` takes it on a CPU whenever it is installed, torch everywhere else.

The ONNX graph is exported by torch's TorchScript-based exporter (which needs the ``onnx``
package) from the model's own weights in ``core/unet.py``'s module, once per model file, and
cached under the model cache keyed by the file's SHA256. The UNet pads inputs to a multiple
of its downsampling; the graph is traced without that padding, so windows of other sizes go
to torch (the runner's windows are all multiples of 8 px).
"""

import importlib.util
import os
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Tuple

from .errors import CDMSegmentError
from .files import new_file_mode

if TYPE_CHECKING:  # torch is imported where it is used, so the panel can ask what is installed without it
    import torch

    from .modelfile import LoadedModel

ENGINES = ("auto", "torch", "onnxruntime")
ONNX_PACKAGES = ("onnx", "onnxruntime")  # the exporter needs onnx, the run onnxruntime
# What pip installs for it: pyproject.toml's `fast` extra and the panel's install button (test_packaging.py)
ONNX_REQUIREMENTS = ("onnx>=1.14", "onnxruntime>=1.16")
ONNX_OPSET = 17
# Largest deviation of ONNX Runtime's class difference from torch's, relative to its largest value, that a graph
# may show before use (measured: 1.3e-4 to 2.2e-4 on brain-flair-phantom, bench/bench_engines.py)
AGREEMENT = 2e-3


def onnxruntime_available() -> bool:
    """True when both packages the ONNX Runtime engine needs can be imported (without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in ONNX_PACKAGES)


def choose_engine(engine: str, device: "torch.device", precision: str = "auto") -> str:
    """'torch' or 'onnxruntime' for a run on ``device`` at ``precision``.

    auto: ONNX Runtime on a CPU in fp32 when installed, else torch. Raises CDMSegmentError for an
    unknown engine, and for onnxruntime asked for on a GPU, in reduced precision or not installed.
    """
    if engine not in ENGINES:
        raise CDMSegmentError(f"unknown engine {engine!r}; use {', '.join(ENGINES)}")
    fits = device.type == "cpu" and precision in ("auto", "fp32")
    if engine == "auto":
        return "onnxruntime" if fits and onnxruntime_available() else "torch"
    if engine == "onnxruntime":
        if not fits:
            raise CDMSegmentError("the onnxruntime engine runs on the CPU in fp32 only; use --engine torch for "
                                  f"device {device.type} at precision {precision}")
        if not onnxruntime_available():
            raise CDMSegmentError("the onnxruntime engine needs the packages onnx and onnxruntime: "
                                  "pip install onnx onnxruntime, or use --engine torch")
    return engine


class OnnxNetwork:
    """Stands in for the TorchScript network in the CDM: ``network(x_t, t, class_emb) -> eps`` through
    ONNX Runtime, and ``class_embedding(y)`` (a table lookup) through torch.

    x_t: (B, C, H, W) float32 on the CPU; t: (B,) int64; class_emb: (B, E) float32 -> eps (B, C, H, W).
    Inputs ONNX Runtime cannot take as exported (another device or dtype, H or W not a multiple of
    the UNet's downsampling) go to the torch network, so a call always returns torch's answer up to
    float rounding.
    """

    def __init__(self, torch_network, session, multiple: int):
        self.torch_network = torch_network
        self.session = session
        self.multiple = multiple

    def __call__(self, x: "torch.Tensor", t: "torch.Tensor", class_emb: "torch.Tensor") -> "torch.Tensor":
        import torch

        if (x.device.type != "cpu" or x.dtype != torch.float32 or x.shape[-1] % self.multiple
                or x.shape[-2] % self.multiple):
            return self.torch_network(x, t, class_emb)
        feed = {"x": x.contiguous().numpy(), "t": t.to(torch.int64).numpy(),
                "emb": class_emb.to(torch.float32).detach().contiguous().numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0])

    def class_embedding(self, y: "torch.Tensor") -> "torch.Tensor":
        return self.torch_network.class_embedding(y)

    def to(self, device) -> "OnnxNetwork":
        self.torch_network.to(device)
        return self


class OnnxEnsemble:
    """An ensemble (core/ensemble.py) whose members run on ONNX Runtime: ``members`` are OnnxNetworks, which
    the CDM's noise draws take turns on; called as one network it averages their eps, each on its own part
    of the class embedding, as ``UNetEnsemble`` does; ``class_embedding`` is the torch ensemble's."""

    def __init__(self, torch_network, members: list):
        self.torch_network = torch_network
        self.members = members
        self.emb_dim = int(torch_network.emb_dim)

    def __call__(self, x: "torch.Tensor", t: "torch.Tensor", class_emb: "torch.Tensor") -> "torch.Tensor":
        import torch

        parts = torch.split(class_emb, self.emb_dim, dim=1)
        return sum(member(x, t, part) for member, part in zip(self.members, parts)) / len(self.members)

    def class_embedding(self, y: "torch.Tensor") -> "torch.Tensor":
        return self.torch_network.class_embedding(y)

    def to(self, device) -> "OnnxEnsemble":
        self.torch_network.to(device)
        return self


def onnx_file(model: "LoadedModel", cache_dir: Path, member: Optional[int] = None) -> Path:
    """The cached ONNX graph of ``model`` (of its ``member``-th network when it is an ensemble), exported when
    missing (atomically: a reader never sees half a file)."""
    part = "" if member is None else f"-member{member}"
    target = Path(cache_dir) / "onnx" / f"{model.sha256[:32]}{part}-opset{ONNX_OPSET}.onnx"
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as e:
        raise CDMSegmentError(f"cannot write the ONNX graph to {target.parent} ({e.strerror or e}); set "
                              "CDMSEGMENT_CACHE to a writable folder (default ~/.cache/CDMSegment/models)") from None
    os.close(fd)
    try:
        _export(model, Path(tmp), member)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, target)
    except CDMSegmentError:
        raise
    except Exception as e:  # the exporter's and the file system's errors alike (a full disk among them)
        raise CDMSegmentError(f"could not export the ONNX graph to {target.parent} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def eager_network(model: "LoadedModel"):
    """The model's weights in ``core/unet.py``'s module (outputs bit-identical to its TorchScript file), or in
    ``core/ensemble.py``'s for an ensemble of them, for export. Raises CDMSegmentError when its metadata names
    neither architecture."""
    from .ensemble import UNetEnsemble
    from .model_metadata import ENSEMBLE_TYPE
    from .unet import ConditionalUNet, UNetConfig

    arch = dict(model.metadata.get("architecture", {}))
    kind = arch.pop("type", None)
    members = int(arch.pop("members", 0))
    if kind == "ConditionalUNet":
        network = ConditionalUNet(UNetConfig.from_dict(arch))
    elif kind == ENSEMBLE_TYPE and members >= 2:
        network = UNetEnsemble([ConditionalUNet(UNetConfig.from_dict(arch)) for _ in range(members)])
    else:
        raise CDMSegmentError(f"model {model.metadata['name']} has no ConditionalUNet architecture in its metadata, "
                              "so it cannot run on ONNX Runtime")
    network.eval().load_state_dict(model.network.state_dict())
    return network


def _export(model: "LoadedModel", path: Path, member: Optional[int] = None) -> None:
    import torch

    network = eager_network(model)
    if member is not None:
        network = network.members[member]
    size, channels = model.image_size, int(model.metadata["in_channels"])
    x = torch.zeros(2, channels, size, size)
    t = torch.zeros(2, dtype=torch.int64)
    emb = network.class_embedding(torch.tensor([1, 0])).detach()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes: the graph is checked on use
        torch.onnx.export(network, (x, t, emb), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["x", "t", "emb"], output_names=["eps"],
                          dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}, "t": {0: "b"}, "emb": {0: "b"}})


def with_engine(model: "LoadedModel", engine: str, cache_dir: Optional[Path] = None,
                log: Callable[[str], None] = print, required: bool = False) -> Tuple["LoadedModel", str]:
    """(``model`` as it runs on ``engine``, the engine it runs on); engine: 'torch' or 'onnxruntime', from
    ``choose_engine``.

    For ONNX Runtime the model is a copy whose network is an OnnxNetwork (an ensemble's: an OnnxEnsemble of
    one per member), checked against the torch network on one batch before use; a graph that fails to load or
    to agree is exported again once.
    When ONNX Runtime still cannot run the model (it fails to import, the cache cannot be written, the
    graph does not agree), the run stays on torch and ``log`` says why in one line, or, with
    ``required`` (the user asked for onnxruntime by name), CDMSegmentError is raised. A model whose own
    output is not finite stays on torch silently: the run then stops with that finding.
    cache_dir: default ``download.default_cache_dir()``.
    """
    if engine == "torch":
        return model, "torch"
    try:
        onnx_model = _on_onnxruntime(model, cache_dir, log)
    except CDMSegmentError as e:
        if required:
            raise CDMSegmentError(f"the onnxruntime engine cannot run: {e} (--engine torch runs without it)") from None
        log(f"ONNX Runtime not used: {e}; this run uses torch")
        return model, "torch"
    return (model, "torch") if onnx_model is None else (onnx_model, "onnxruntime")


def _on_onnxruntime(model: "LoadedModel", cache_dir: Optional[Path], log) -> Optional["LoadedModel"]:
    """The model on ONNX Runtime; None when torch's own output is not finite (nothing to compare with)."""
    try:
        import onnx  # noqa: F401 (the exporter's)
        import onnxruntime  # noqa: F401
    except ImportError as e:  # installed but broken (a missing library): torch still runs
        raise CDMSegmentError(f"onnxruntime could not be loaded ({e})") from None
    import torch

    from .download import default_cache_dir
    from .ensemble import ensemble_members

    members = ensemble_members(model.network)
    onnx_members = []
    for k, member in enumerate(members):
        probe = _probe(model, member)
        with torch.no_grad():
            expected = member(*probe)
        if not torch.isfinite(expected).all():
            return None
        onnx_members.append(_agreeing_graph(model, member, None if len(members) == 1 else k, probe, expected,
                                            cache_dir or default_cache_dir(), log))
    if len(members) == 1:
        return replace(model, network=onnx_members[0])
    return replace(model, network=OnnxEnsemble(model.network, onnx_members))


def _agreeing_graph(model: "LoadedModel", member, k: Optional[int], probe: tuple, expected, cache_dir: Path,
                    log) -> OnnxNetwork:
    """The OnnxNetwork of ``member`` (the ``k``-th of an ensemble, None for a single network) whose output on
    ``probe`` agrees with torch's ``expected``, exported once more when the cached graph does not."""
    for attempt in range(2):
        path = onnx_file(model, cache_dir, k)
        network = _onnx_network(model, member, path)
        if network is not None and _agrees(network, probe, expected):
            return network
        path.unlink(missing_ok=True)
        if attempt == 0:
            log(f"the cached ONNX graph {path} did not reproduce the model's output; exporting it again")
    raise CDMSegmentError("its graph's output did not reproduce the model's")


def _onnx_network(model: "LoadedModel", torch_network, path: Path) -> Optional[OnnxNetwork]:
    """An OnnxNetwork on ``path`` standing in for ``torch_network``, or None when ONNX Runtime refuses the file."""
    import onnxruntime
    import torch

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only: its warnings are not the user's business
    if getattr(model.network, "members", None) is not None:
        # an ensemble's sessions run in turn: threads that spin waiting for work would hold the cores from the next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception:  # a damaged file (ONNX Runtime raises its own exception types)
        return None
    if sorted(i.name for i in session.get_inputs()) != ["emb", "t", "x"]:
        return None
    return OnnxNetwork(torch_network, session, 2 ** (len(model.metadata["architecture"]["channel_mults"]) - 1))


def _probe(model: "LoadedModel", network) -> tuple:
    """One seeded batch (x_t, t, class_emb) as the CDM makes it for ``network`` (the model's, or one member's):
    one slice twice, at the model's noise level, conditioned on f(y1) and f(y0)."""
    import torch

    size, channels = model.image_size, int(model.metadata["in_channels"])
    x = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1)
    t = torch.full((2,), model.schedule().timestep_for_alpha_bar(model.defaults.get("noise_level", 0.5)))
    return x, t, network.class_embedding(torch.tensor([1, 0])).detach()


def _agrees(network: OnnxNetwork, probe: tuple, expected) -> bool:
    """Whether ``network`` gives the class difference eps(f(y1)) - eps(f(y0)) of ``expected`` (torch's
    output on ``probe``) within AGREEMENT of its largest value."""
    import torch

    with torch.no_grad():
        try:
            got = network(*probe)
        except Exception:  # ONNX Runtime's own errors: a graph that does not run is one that does not agree
            return False
    if got.shape != expected.shape:
        return False
    expected_difference, difference = expected[0] - expected[1], got[0] - got[1]
    scale = float(expected_difference.abs().max()) or 1.0
    return float((difference - expected_difference).abs().max()) <= AGREEMENT * scale
