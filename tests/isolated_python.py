"""Run a Python script in a fresh process, with or without compressm_hf importable (for Auto-class tests).

``run_script(path, compressm_hf=False)`` starts a Python that can import torch and transformers but not
compressm_hf: ``-I`` ignores PYTHONPATH, the user site and the cwd; ``-S`` skips ``site``, so the ``.pth``
file of the editable install never runs, and the venv's site-packages is added as a plain path entry.
With ``compressm_hf=True`` it is the ordinary interpreter (the package installed). Both run offline, with
a private ``HF_HOME`` (the ``transformers_modules`` cache of ``trust_remote_code`` loads lands there).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path


def python_command(*, compressm_hf: bool) -> list[str]:
    """The interpreter command prefix; the script path follows it."""
    if compressm_hf:
        return [sys.executable]
    purelib = sysconfig.get_paths()["purelib"]
    boot = (
        f"import sys; sys.argv = sys.argv[1:]; sys.path.append({purelib!r}); exec(open(sys.argv[0]).read())"
    )
    return [sys.executable, "-I", "-S", "-c", boot]


def run_script(
    script: str | os.PathLike, *, compressm_hf: bool, args: tuple[str, ...] = (), timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``script`` (a file) in a fresh process next to it; returns the finished process (text output)."""
    script = Path(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(
        HF_HOME=str(script.parent / "hf_home"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return subprocess.run(
        [*python_command(compressm_hf=compressm_hf), str(script), *args],
        cwd=script.parent,
        env=env,
        stdin=subprocess.DEVNULL,  # a trust_remote_code prompt fails instead of waiting
        capture_output=True,
        text=True,
        timeout=timeout,
    )
