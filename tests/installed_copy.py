"""A non-editable install of this checkout in a fresh virtual environment, for tests that run
`vimpac` as a user of `pip install .` does: from another directory, with no checkout in sight.

The environment is new (`python -m venv --without-pip`) but borrows the running interpreter's
installed dependencies: a .pth file adds a directory of links to them as a site directory,
leaving out vimpac-jax itself (an editable install's finder would map the package back to the
checkout). The package is built from a copy of the files setup.py installs, so the build writes
nothing into the checkout, and installed with `pip install --no-deps .` (not `-e`).
"""

import dataclasses
import importlib.util
import os
import shutil
import site
import subprocess
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "vimpac_jax", "configs", "launch")
_OWN = ("vimpac_jax", "vimpac-jax", "__editable__.vimpac_jax", "__editable___vimpac_jax")


@dataclasses.dataclass(frozen=True)
class Installed:
    prefix: Path  # the virtual environment
    bin: Path

    def env(self, path_prefix: tuple[Path, ...] = ()) -> dict:
        """Our environment with PATH_PREFIX and the venv's bin first on PATH, and no PYTHONPATH."""
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["PATH"] = os.pathsep.join([*map(str, path_prefix), str(self.bin), env.get("PATH", "")])
        return env

    def run(self, *args, cwd: Path, path_prefix: tuple[Path, ...] = (), timeout: float | None = None):
        """`vimpac ARGS` (the installed console script) in CWD; the CompletedProcess (text)."""
        return subprocess.run([str(self.bin / "vimpac"), *map(str, args)], cwd=cwd, env=self.env(path_prefix),
                              capture_output=True, text=True, timeout=timeout)

    def python(self, code: str, *, cwd: Path) -> str:
        """The stdout of the venv's `python -c CODE` in CWD."""
        return subprocess.run([str(self.bin / "python"), "-c", code], cwd=cwd, env=self.env(),
                              capture_output=True, text=True, check=True).stdout


def _link_dependencies(links: Path) -> None:
    links.mkdir(parents=True)
    for directory in dict.fromkeys([*site.getsitepackages(), site.getusersitepackages()]):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            if entry.name.startswith(_OWN) or (links / entry.name).exists():
                continue
            (links / entry.name).symlink_to(entry.path)


def non_editable_install(root: Path) -> Installed:
    """Builds ROOT/venv with this checkout installed non-editably; returns its paths."""
    root = Path(root)
    src, links, prefix = root / "src", root / "deps", root / "venv"
    src.mkdir(parents=True)
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    _link_dependencies(links)
    venv.EnvBuilder(with_pip=False).create(prefix)
    bin_dir = prefix / ("Scripts" if os.name == "nt" else "bin")
    purelib = subprocess.run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # addsitedir (not a bare path line): the dependencies' own .pth files are processed too.
    Path(purelib, "borrowed_dependencies.pth").write_text(f"import site; site.addsitedir({str(links)!r})\n")
    # The build backend from the borrowed packages when they have one (no network needed), else
    # pip's isolated build environment (it downloads pyproject.toml's build requirements).
    borrowed_backend = all(importlib.util.find_spec(m) for m in ("setuptools", "wheel"))
    flags = ["--no-build-isolation"] if borrowed_backend else []
    result = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", *flags, str(src)],
                            cwd=root, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return Installed(prefix, bin_dir)


_INSTALLED: dict[str, Installed] = {}


def installed_vimpac(tmp_path_factory) -> Installed:
    """One non-editable install per test process (the demo chain and tests/test_install.py share it)."""
    if "copy" not in _INSTALLED:
        _INSTALLED["copy"] = non_editable_install(tmp_path_factory.mktemp("installed"))
    return _INSTALLED["copy"]
