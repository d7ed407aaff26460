"""Loads the compiled extension fused_optim._C, which registers torch.ops.fused_optim.*.

A missing or broken extension never breaks `import fused_optim`: the reference backend is used
instead, with one warning, and asking for a native backend explicitly raises BUILD_HINT.

The warning says which case it is: a source tree with no extension built in it (typically the
clone's root shadowing a copy installed into site-packages), an extension that fails to load, or
an extension built against another torch than the one imported (fused_optim/_build_info.py,
written by setup.py, records the torch version it was compiled against).
"""

import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import sys
import warnings
from urllib.parse import unquote, urlparse

import torch

BUILD_HINT = (
    "build it with `pip install --no-build-isolation .` (or `pip install --no-build-isolation -e .`) "
    "from the fused_optim source tree; a CUDA toolkit and a CUDA-enabled torch add the CUDA kernels"
)

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _build_info():
    """fused_optim/_build_info.py as a module, or None (not built, or built before it existed)."""
    try:
        if importlib.util.find_spec("fused_optim._build_info") is None:
            return None
        from fused_optim import _build_info

        return _build_info
    except Exception:  # a broken generated file must not break the import either
        return None


def _extension_files(directory: str) -> list[str]:
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    try:
        return [n for n in os.listdir(directory) if n.startswith("_C.") and n.endswith(suffixes)]
    except OSError:
        return []


def installed_copy(here: str = PACKAGE_DIR) -> str | None:
    """Where pip installed fused_optim, when that is another directory than `here` (the package
    being imported, which then shadows it); None when there is no other installed copy."""
    here = os.path.realpath(here)
    try:
        dists = list(importlib.metadata.distributions(name="fused_optim"))
    except Exception:
        return None
    for dist in dists:
        try:
            init = str(dist.locate_file("fused_optim/__init__.py"))
            if os.path.isfile(init):  # a regular install into site-packages
                there = os.path.dirname(init)
                if os.path.realpath(there) != here:
                    return there
                continue
            url = json.loads(dist.read_text("direct_url.json") or "{}")
            if url.get("dir_info", {}).get("editable") and url.get("url", "").startswith("file:"):
                there = os.path.join(unquote(urlparse(url["url"]).path), "fused_optim")
                if os.path.realpath(there) != here:
                    return f"{there} (an editable install)"
        except Exception:  # unreadable metadata: not worth failing the import over
            continue
    return None


def _not_built_here_message() -> str:
    root = os.path.dirname(PACKAGE_DIR)
    is_source_tree = os.path.isfile(os.path.join(root, "setup.py"))
    where = "the source tree" if is_source_tree else "the directory"
    msg = (
        f"fused_optim: importing fused_optim from {where} {PACKAGE_DIR}, which has no built "
        "extension (no fused_optim/_C*.so in it), so the pure-PyTorch reference backend is used."
    )
    other = installed_copy()
    if other:
        msg += (
            f" It shadows the installed fused_optim at {other}: Python finds this copy first (the "
            "current directory comes before site-packages on sys.path). Run Python from another directory to "
            f"use the installed copy, or build this tree in place: `pip install --no-build-isolation -e .` "
            f"in {root}."
        )
    elif is_source_tree:
        msg += (
            f" To get the fused kernels, build it: `pip install --no-build-isolation -e .` in {root} "
            "(in place), or `pip install --no-build-isolation .` and run Python from another directory."
        )
    else:
        msg += f" To get the fused kernels, {BUILD_HINT}."
    return msg


def _mismatch_message(built: str) -> str:
    return (
        f"fused_optim._C was built against torch {built}, but torch {torch.__version__} is imported; "
        "rebuild it against this torch: `pip install --no-build-isolation .` (or "
        "`pip install --no-build-isolation -e .` for an editable install) from the fused_optim source tree"
    )


def _built_here() -> bool:
    """Whether this package's own directory has a compiled _C (find_spec also finds one elsewhere,
    e.g. through an editable install's finder when another copy of the sources is imported: that
    one was built from other sources, and is not loaded)."""
    try:
        spec = importlib.util.find_spec("fused_optim._C")
    except (ImportError, ValueError):  # ValueError: blocked through sys.modules
        spec = None
    package_path = getattr(sys.modules.get("fused_optim"), "__path__", None) or [PACKAGE_DIR]
    dirs = {os.path.abspath(p) for p in package_path}
    if spec is not None and spec.origin:
        return os.path.dirname(os.path.abspath(spec.origin)) in dirs
    return any(_extension_files(d) for d in dirs)  # present on disk but blocked: try, and say why


built_torch_version: str | None = getattr(_build_info(), "TORCH_VERSION", None)
version_mismatch = built_torch_version is not None and built_torch_version != torch.__version__

load_error: Exception | None = None
_warning: str | None = None

if not _built_here():
    # Not built here. Importing it anyway would fail with a misleading "circular import" message.
    load_error = ImportError(f"no compiled fused_optim._C in {PACKAGE_DIR}")
    _warning = _not_built_here_message()
    if version_mismatch:  # a stale _build_info.py with no _C next to it
        _warning += (
            f" (Its _build_info.py records a build against torch {built_torch_version}; "
            f"torch {torch.__version__} is imported now.)"
        )
else:
    try:
        from fused_optim import _C  # noqa: F401
    except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
        load_error = exc
        _warning = (
            f"fused_optim: native extension not available ({exc}); using the pure-PyTorch reference backend."
        )
        if version_mismatch:
            _warning += f" The likely cause: {_mismatch_message(built_torch_version)}."
        else:
            _warning += f" To get the fused kernels, {BUILD_HINT}."
    else:
        if version_mismatch:
            _warning = (
                f"fused_optim: {_mismatch_message(built_torch_version)}. It loaded, but an extension "
                "compiled against another torch can crash or compute wrong results."
            )
if _warning:
    warnings.warn(_warning, RuntimeWarning, stacklevel=2)


def has_kernels(dispatch_key: str) -> bool:
    """True when the extension registered kernels for `dispatch_key` ("CPU" or "CUDA")."""
    return load_error is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fused_optim::adam_", dispatch_key
    )
