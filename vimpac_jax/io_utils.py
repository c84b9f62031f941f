"""Publishing a directory only when it is complete (temporary name, then rename)."""

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_directory(final, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; rename it to `final` on success.

    On an exception the temporary directory is removed and `final` is left as it was, so a
    crash never leaves a directory that looks finished (a checkpoint, an export). With `overwrite`, an
    existing `final` is replaced (removed just before the rename).
    """
    final = Path(final).absolute()
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; choose another destination or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
