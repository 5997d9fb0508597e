"""skinflow.py: the Qwen2.5-VL backbone of SkinFlow (arXiv 2601.09136), written from scratch.

Under construction: the backbone (config, image processor, vision tower, decoder, tokenizer, loader,
generation) lands here next. What is final already is `build_extension`, the one place that compiles
the custom kernels in csrc/ for dve.py and rl.py.
"""
from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------------
# Custom kernels (csrc/)
#
# Every kernel ships as a pair with the same entry points: csrc/NAME.cpp (the C++ CPU twin, which also
# holds the Python binding) and csrc/NAME_cuda.cu (the GPU version). On a CPU-only torch we compile the
# .cpp alone; with CUDA we add the .cu and define WITH_CUDA so the .cpp dispatches on the tensor's device.
# This is why CI (no GPU) still compiles and tests the same functions the GPU uses.
# ---------------------------------------------------------------------------------------------------
_EXTENSIONS: dict[str, object] = {}
EXTENSION_ERRORS: dict[str, str] = {}  # name -> why it could not be built (shown by "ext" callers)


def build_extension(name: str, verbose: bool = False):
    """Compile (once per process, cached on disk by torch) and import csrc/NAME.cpp [+ NAME_cuda.cu].

    Returns the module, or None when the build is switched off (SKINFLOW_NO_EXT=1) or fails; the reason
    is kept in EXTENSION_ERRORS[name] so callers that insist on the extension can raise a clear error.
    """
    if name in _EXTENSIONS:
        return _EXTENSIONS[name]
    module = None
    if os.environ.get("SKINFLOW_NO_EXT", "") not in ("", "0"):
        EXTENSION_ERRORS[name] = "disabled by SKINFLOW_NO_EXT"
    else:
        try:
            import torch
            from torch.utils import cpp_extension

            sources = [str(HERE / "csrc" / f"{name}.cpp")]
            flags = ["-O3"]
            cuda_src = HERE / "csrc" / f"{name}_cuda.cu"
            # Only a CUDA build of torch with a visible GPU can compile and run the .cu half.
            with_cuda = torch.cuda.is_available() and torch.version.cuda is not None and cuda_src.exists()
            if with_cuda:
                sources.append(str(cuda_src))
                flags.append("-DWITH_CUDA")
            build_dir = Path(os.environ.get("SKINFLOW_EXT_DIR", Path.home() / ".cache" / "skinflow" / "ext"))
            build_dir = build_dir / f"{name}_{'cuda' if with_cuda else 'cpu'}"
            build_dir.mkdir(parents=True, exist_ok=True)
            module = cpp_extension.load(
                name=f"skinflow_{name}_{'cuda' if with_cuda else 'cpu'}",
                sources=sources,
                extra_cflags=flags,
                extra_cuda_cflags=["-O3", "-DWITH_CUDA", "--use_fast_math"] if with_cuda else None,
                build_directory=str(build_dir),
                verbose=verbose,
            )
        except Exception as exc:  # a missing compiler or ninja must never break the PyTorch path
            EXTENSION_ERRORS[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            module = None
    _EXTENSIONS[name] = module
    return module
