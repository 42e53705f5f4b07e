"""ImageNet starting weights from torchvision: choosing the variant, downloading to the torch hub
cache (or a file the user has), checking its sha256, loading it without unpickling."""

from __future__ import annotations

from pathlib import Path

from mammacls.archs import ARCH_SPECS
from mammacls.choices import check_arch
from mammacls.errors import MammaclsError


IMAGENET_TERMS = ("ImageNet-trained weights carry ImageNet's terms: non-commercial research and educational use")


def imagenet_weights(arch: str, variant: str = "DEFAULT"):
    """torchvision's weights entry for ``arch`` (``DEFAULT``, or a variant such as ``IMAGENET1K_V1``)."""
    from torchvision import models

    enum = models.get_model_weights(arch)
    key = variant.upper()
    if key == "DEFAULT":
        return enum.DEFAULT
    if key not in enum.__members__:
        raise MammaclsError(f"no ImageNet weights {variant!r} for {arch}: choose auto, "
                            f"{', '.join(enum.__members__)} or a .pth file")
    return enum[key]


def hub_checkpoint_path(weights) -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]


def expected_sha256_prefix(weights) -> str:
    """torchvision names each weights file after the first hex digits of its sha256."""
    return weights.url.rsplit("/", 1)[-1].rsplit(".", 1)[0].rsplit("-", 1)[-1]


def _choose_imagenet(arch: str, choice: str):
    """(weights entry, local file or None) for ``choice``: auto, a variant name, or a file path."""
    from torchvision import models

    if choice.lower() == "auto":  # the default variant, else the first one already in the hub cache
        enum = models.get_model_weights(arch)
        candidates = [enum.DEFAULT, *(w for w in enum if w is not enum.DEFAULT)]
        cached = [w for w in candidates if hub_checkpoint_path(w).is_file()]
        return (cached[0] if cached else enum.DEFAULT), None
    path = Path(choice).expanduser()
    if path.suffix.lower() in (".pth", ".pt") or path.exists() or "/" in choice:
        if not path.is_file():
            raise MammaclsError(f"ImageNet weights file not found: {path}")
        from mammacls.store import sha256_file

        digest = sha256_file(path)
        for weights in models.get_model_weights(arch):
            if digest.startswith(expected_sha256_prefix(weights)):
                return weights, path
        known = ", ".join(f"{w.url.rsplit('/', 1)[-1]} ({w})" for w in models.get_model_weights(arch))
        raise MammaclsError(f"{path} is not a torchvision ImageNet file for {arch} (sha256 {digest[:12]}…; "
                            f"known: {known})")
    return imagenet_weights(arch, choice), None


def load_imagenet_state_dict(arch: str, choice: str = "auto"):
    """ImageNet weights and a record of them; the file is checked against its sha256.

    ``choice`` is ``auto`` (torchvision's default variant, or a variant
    already in the torch hub cache), a variant name (``IMAGENET1K_V1``) or a
    local ``.pth`` file. Files are read with ``weights_only=True``: never unpickled.
    """
    import urllib.error

    import torch

    check_arch(arch)
    weights, local = _choose_imagenet(arch, choice)
    target = local or hub_checkpoint_path(weights)
    if local is None and not target.is_file():
        try:
            torch.hub.download_url_to_file(weights.url, str(_partial(target)), progress=False)
            _partial(target).replace(target)
        except (urllib.error.URLError, OSError, TimeoutError, ConnectionError) as exc:
            _partial(target).unlink(missing_ok=True)
            reason = getattr(exc, "reason", None) or exc
            raise MammaclsError(
                f"cannot get ImageNet weights {weights} for {arch} ({reason}): download {weights.url} "
                f"to {target}, or pass --imagenet-weights FILE, or use --no-pretrained"
                + (f"; {ARCH_SPECS[arch].imagenet_offline_note}" if ARCH_SPECS[arch].imagenet_offline_note else "")
            ) from None
    from mammacls.store import sha256_file

    digest = sha256_file(target)
    if not digest.startswith(expected_sha256_prefix(weights)):
        raise MammaclsError(f"ImageNet weights file {target} is damaged (sha256 {digest[:12]}… does not match "
                            f"{weights}): delete it and retry, or use --no-pretrained")
    try:
        state = torch.load(target, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file: zip, pickle or key errors
        raise MammaclsError(f"ImageNet weights file {target} is damaged ({str(exc).splitlines()[0][:120]}): "
                            "delete it and retry, or use --no-pretrained") from None
    record = {"source": "torchvision", "weights": str(weights), "file": target.name, "sha256": digest,
              "url": weights.url, "terms": IMAGENET_TERMS}
    return state, record


def _partial(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.with_name(target.name + ".partial")
