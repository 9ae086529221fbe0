"""The package as a user installs it: the built wheel in a fresh virtual environment, outside the checkout.

The fresh environment sees the test environment's installed dependencies (a ``.pth`` line naming its
site-packages, which does not run that directory's own ``.pth`` files, so the editable install of the checkout
stays invisible) and gets ``axolotl-treft`` from the wheel with ``--no-deps``. ``axolotl`` and ``lm_eval``
console scripts are the dependencies' own, re-pointed at the fresh interpreter, as pip writes them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPTS = ("axolotl", "lm_eval", "torchrun", "accelerate")


@dataclass(frozen=True)
class WheelEnv:
    wheel: Path
    root: Path  # the fresh virtual environment
    workdir: Path  # an empty directory outside the checkout, the cwd of every command

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = os.pathsep.join([str(self.bin), env.get("PATH", "")])
        return {**env, **extra}

    def run(self, *argv: str, timeout: int = 600, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        exe = argv[0] if os.sep in argv[0] else str(self.bin / argv[0])
        proc = subprocess.run([exe, *argv[1:]], cwd=self.workdir, env=self.env(**env), capture_output=True,
                              text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, f"{argv}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def requires_dist(self) -> list[str]:
        with zipfile.ZipFile(self.wheel) as whl:
            meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
            lines = whl.read(meta).decode().splitlines()
        return [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]


def build_wheel(out: Path) -> tuple[Path, str]:
    """``pip wheel`` of the checkout's files (no deps, no isolation: setuptools comes from the test environment).

    It builds from a copy of what git tracks or would add (as a fresh clone has it), so neither a stale
    ``build/`` directory nor an ignored file of the working tree can reach the wheel.
    """
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    source = out / "source"
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out),
                           str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("axolotl_treft-*.whl")
    return wheel, proc.stdout + proc.stderr


def make_wheel_env(tmp: Path) -> tuple[WheelEnv, str]:
    wheel, build_log = build_wheel(tmp / "dist")
    root = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(root)
    py = root / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "test_env_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, text=True, timeout=600)
    for name in CONSOLE_SCRIPTS:
        source = Path(sys.executable).with_name(name).read_text().splitlines()
        script = root / "bin" / name
        script.write_text("\n".join([f"#!{py}", *source[1:]]) + "\n")
        script.chmod(0o755)
    workdir = tmp / "work"
    workdir.mkdir()
    return WheelEnv(wheel=wheel, root=root, workdir=workdir), build_log
