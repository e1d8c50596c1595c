"""Data, augmentation and checkpoints shared by the CIFAR examples.

The whole dataset is kept as one ``uint8`` tensor in HWC layout on the training device, and
augmentation runs on whole batches there (one gather does the random crop and the flip),
so no ``DataLoader`` workers are needed. Pixels are scaled to ``[0, 1]`` and normalized
with the dataset's channel mean and standard deviation when a batch is fed to the model.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import models

__all__ = [
    "CHECKPOINT_FORMAT",
    "DATASETS",
    "CifarArrays",
    "channel_stats",
    "default_data_path",
    "describe_machine",
    "library_state",
    "load_arrays",
    "load_checkpoint",
    "normalize",
    "random_crop_flip",
    "save_checkpoint",
    "split_indices",
    "stratified_sample",
    "stratified_subset",
    "symmetric_label_noise",
    "write_json",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_FORMAT = "convnorm_fx-examples/1"

#: Classes and channel statistics (of the training images, pixels in [0, 1]) per dataset.
DATASETS: dict[str, dict[str, Any]] = {
    "cifar10": {"classes": 10, "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)},
    "cifar100": {"classes": 100, "mean": (0.5071, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2762)},
}


@dataclass
class CifarArrays:
    """A CIFAR train/test split as ``uint8`` HWC images and ``int64`` labels (NumPy)."""

    x_train: np.ndarray  # (N, 32, 32, 3) uint8
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray  # (M, 32, 32, 3) uint8
    y_test: np.ndarray  # (M,) int64
    source: str  # where the arrays came from, for the records


def default_data_path(dataset: str) -> Path | None:
    """The shared CIFAR-10 archive next to the repository, if it exists (CIFAR-10 only)."""
    candidate = REPO_ROOT.parent / "shared" / "data" / "cifar10" / "cifar10.npz"
    return candidate if dataset == "cifar10" and candidate.is_file() else None


def _check_images(name: str, x: np.ndarray) -> np.ndarray:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{name} must be uint8 images of shape (N, H, W, 3), got {x.dtype} {x.shape}")
    return np.ascontiguousarray(x)


def _check_labels(name: str, y: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} labels for {n} images")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name} holds labels outside [0, {num_classes}); is --dataset right?")
    return y


def load_arrays(
    dataset: str,
    *,
    data: str | Path | None = None,
    torchvision_root: str | Path | None = None,
    download: bool = False,
) -> CifarArrays:
    """Load CIFAR-10/100 from a ``.npz`` archive or through ``torchvision.datasets``.

    Args:
        dataset: ``'cifar10'`` or ``'cifar100'``.
        data: a ``.npz`` with ``x_train``, ``y_train``, ``x_test``, ``y_test`` (images
            ``uint8`` ``(N, H, W, 3)``). Defaults to :func:`default_data_path` when neither
            this nor ``torchvision_root`` is given.
        torchvision_root: directory for ``torchvision.datasets.CIFAR10/100``.
        download: let torchvision download the dataset into ``torchvision_root``.

    Returns:
        The arrays, checked.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {dataset!r}")
    num_classes = DATASETS[dataset]["classes"]
    if data is not None and torchvision_root is not None:
        raise ValueError("give either --data or --torchvision-root, not both")
    if torchvision_root is not None:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
        train = cls(str(torchvision_root), train=True, download=download)
        test = cls(str(torchvision_root), train=False, download=download)
        x_train, y_train = np.asarray(train.data), np.asarray(train.targets)
        x_test, y_test = np.asarray(test.data), np.asarray(test.targets)
        source = f"torchvision.datasets.{cls.__name__}({torchvision_root})"
    else:
        path = Path(data) if data is not None else default_data_path(dataset)
        if path is None:
            raise ValueError(
                f"no data for {dataset}: pass --data ARCHIVE.npz, or --torchvision-root DIR --download "
                "to fetch it with torchvision"
            )
        if not path.is_file():
            raise FileNotFoundError(f"data archive {path} does not exist")
        with np.load(path) as archive:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(archive.files)
            if missing:
                raise ValueError(f"{path} lacks the arrays {sorted(missing)}")
            x_train, y_train = archive["x_train"], archive["y_train"]
            x_test, y_test = archive["x_test"], archive["y_test"]
        source = str(path)
    x_train, x_test = _check_images("x_train", x_train), _check_images("x_test", x_test)
    return CifarArrays(
        x_train,
        _check_labels("y_train", y_train, len(x_train), num_classes),
        x_test,
        _check_labels("y_test", y_test, len(x_test), num_classes),
        source,
    )


def _stratified_pick(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Positions (into ``labels``) of a class-stratified random ``fraction``, sorted."""
    picked = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(fraction * len(members)))
        picked.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the training set into (train, validation) indices, stratified by class.

    Args:
        labels: the training labels.
        val_fraction: fraction held out for validation (the paper: 0.1).
        seed: seed of the split (fixed across runs so every run sees the same split).

    Returns:
        ``(train_indices, val_indices)``, disjoint and sorted.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    rng = np.random.default_rng([seed, 1])
    val = _stratified_pick(labels, val_fraction, rng)
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def stratified_subset(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A class-stratified random ``fraction`` of ``indices`` (the data-scarcity runs, Table 6).

    Args:
        indices: candidate indices into ``labels``.
        labels: labels of the whole training set.
        fraction: in ``(0, 1]``.
        seed: seed of the draw.

    Returns:
        The chosen indices, sorted.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--subset must be in (0, 1], got {fraction!r}")
    if fraction == 1.0:
        return indices
    rng = np.random.default_rng([seed, 2])
    return indices[_stratified_pick(labels[indices], fraction, rng)]


def stratified_sample(indices: np.ndarray, labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """About ``count`` of ``indices``, drawn class by class in proportion (a fixed validation sample).

    Args:
        indices: candidate indices into ``labels``.
        labels: labels of the whole training set.
        count: how many to keep (each class keeps ``round(count / len(indices) * n_class)``).
        seed: seed of the draw (its stream differs from :func:`stratified_subset`'s).

    Returns:
        The chosen indices, sorted.
    """
    if not 0 < count <= len(indices):
        raise ValueError(f"count must be in [1, {len(indices)}], got {count!r}")
    rng = np.random.default_rng([seed, 4])
    return indices[_stratified_pick(labels[indices], count / len(indices), rng)]


def symmetric_label_noise(labels: np.ndarray, rate: float, num_classes: int, seed: int) -> np.ndarray:
    """Symmetric label noise of Appendix C.3.

    Each label is kept with probability ``1 - rate`` and replaced, with probability
    ``rate``, by a class drawn uniformly from **all** ``num_classes`` classes ("a random
    one-hot vector"). The draw may hit the true class, so the expected fraction of labels
    that actually change is ``rate * (num_classes - 1) / num_classes`` (72 % at ``rate=0.8``
    on CIFAR-10).

    Args:
        labels: clean labels.
        rate: the noise level ``r`` in ``[0, 1]``.
        num_classes: number of classes.
        seed: seed of the draw.

    Returns:
        Noisy labels (a new array).
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"--label-noise must be in [0, 1], got {rate!r}")
    rng = np.random.default_rng([seed, 3])
    replace = rng.random(len(labels)) < rate
    noisy = labels.copy()
    noisy[replace] = rng.integers(0, num_classes, int(replace.sum()))
    return noisy


def random_crop_flip(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Random crop after zero padding, and random horizontal flip, of a whole batch.

    The same as torchvision's ``RandomCrop(size, padding)`` followed by
    ``RandomHorizontalFlip()`` applied to each image, done with one gather.

    Args:
        images: ``uint8`` (or float) images ``(N, H, W, C)``.
        padding: zeros added on every side before cropping back to ``H x W``.
        generator: random generator on ``images.device``.

    Returns:
        Augmented images, same shape and dtype.

    Shape:
        - images: ``(N, H, W, C)``
        - output: ``(N, H, W, C)``
    """
    n, h, w, _ = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (0, 0, padding, padding, padding, padding))  # (N, H+2p, W+2p, C)
    top = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=device)
    flip = torch.randint(0, 2, (n, 1), generator=generator, device=device).bool()
    rows = top + torch.arange(h, device=device)  # (N, H)
    columns = torch.arange(w, device=device)
    cols = left + torch.where(flip, w - 1 - columns, columns)  # (N, W)
    batch = torch.arange(n, device=device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)


def normalize(images: Tensor, mean: Tensor, std: Tensor, *, channels_last: bool = False) -> Tensor:
    """``uint8`` HWC images (or float images in ``[0, 1]``) to normalized float NCHW input.

    Args:
        images: ``(N, H, W, C)`` ``uint8``, or float in ``[0, 1]``.
        mean, std: per-channel statistics, shape ``(C,)``, on the same device.
        channels_last: return a tensor in ``torch.channels_last`` memory format.

    Returns:
        ``(images / 255 - mean) / std`` as ``(N, C, H, W)`` float32.
    """
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    x = (x - mean) / std  # (N, H, W, C); the permute below yields channels-last strides
    x = x.permute(0, 3, 1, 2)  # (N, C, H, W)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def describe_machine(device: torch.device) -> dict[str, Any]:
    """Facts about the machine a run used, for the records."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": torch.multiprocessing.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info.update(library_state())
    return info


_LIBRARY_STATE: dict[str, Any] | None = None


def library_state() -> dict[str, Any]:
    """Which ``convnorm_fx`` source a run used: the repository commit, and a hash of the package files.

    The hash covers every ``.py`` file of the imported package, so runs made while the library
    had uncommitted changes can still be told apart. It is computed at the first call and then
    reused: the scripts call this at the start of ``main``, right after importing the library,
    so that later edits of the files do not change what the run records.
    """
    global _LIBRARY_STATE
    if _LIBRARY_STATE is None:
        _LIBRARY_STATE = _read_library_state()
    return dict(_LIBRARY_STATE)


def _read_library_state() -> dict[str, Any]:
    import convnorm_fx

    package = Path(convnorm_fx.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    state: dict[str, Any] = {"convnorm_fx_sha256": digest.hexdigest(), "git_commit": None, "library_dirty": None}

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=package.parent, capture_output=True, text=True, timeout=10, check=True)
        return result.stdout.strip()

    try:
        state["git_commit"] = git("rev-parse", "HEAD")
        state["library_dirty"] = bool(git("status", "--porcelain", "--", package.name))
    except (OSError, subprocess.SubprocessError):
        pass
    return state


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write ``model``'s state and what is needed to rebuild it (see :func:`load_checkpoint`)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": CHECKPOINT_FORMAT, **meta, "state_dict": state}, path)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network saved by ``train_cifar.py`` and load its weights.

    Args:
        path: a ``best.pt`` or ``final.pt`` written by ``train_cifar.py``.
        device: where to put the model.

    Returns:
        ``(model, meta)``: the model in eval mode, and the checkpoint's metadata (arch,
        variant, dataset, mean, std, epoch, accuracies ...).
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint written by examples/train_cifar.py")
    model = models.build_model(
        checkpoint["arch"],
        checkpoint["variant"],
        checkpoint["num_classes"],
        checkpoint["width"],
        affine=checkpoint["affine"],
        affine_init=checkpoint["affine_init"],
        stop_gradient=checkpoint.get("stop_gradient", True),
    )
    model.load_state_dict(checkpoint["state_dict"])
    meta = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    return model.to(device).eval(), meta


def write_json(path: Path, payload: Any) -> None:
    """Write strict JSON (NaN and infinities become strings)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not np.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path.write_text(json.dumps(clean(payload), indent=2, allow_nan=False) + "\n")


def channel_stats(dataset: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(mean, std)`` of ``dataset`` as float32 tensors of shape ``(3,)`` on ``device``."""
    stats = DATASETS[dataset]
    return (
        torch.tensor(stats["mean"], dtype=torch.float32, device=device),
        torch.tensor(stats["std"], dtype=torch.float32, device=device),
    )

