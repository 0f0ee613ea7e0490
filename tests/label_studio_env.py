"""Label Studio's own Python (its SDK and server) live in their own virtual environment, because the
`label-studio` package pins many packages: `.ci-ls-venv/` in the repository (made by .ci/run), or
the folder in $SAMHQ_LABEL_STUDIO_VENV. Tests that need it skip cleanly without it."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ls_venv() -> Path | None:
    venv = Path(os.environ.get("SAMHQ_LABEL_STUDIO_VENV", ROOT / ".ci-ls-venv"))
    return venv if (venv / "bin" / "python").exists() else None


def ls_python() -> str:
    """The Label Studio environment's python, or skip."""
    venv = ls_venv()
    if venv is None:
        pytest.skip("Label Studio's environment is not installed (.ci/run makes .ci-ls-venv/; or set SAMHQ_LABEL_STUDIO_VENV)")
    return str(venv / "bin" / "python")


def run_in_ls(code: str, payload, tmp_path: Path):
    """Run `code` in Label Studio's python with `payload` (JSON) in IN and return the JSON it writes to OUT."""
    src, dst = tmp_path / "ls_in.json", tmp_path / "ls_out.json"
    src.write_text(json.dumps(payload))
    prelude = f"import json\nIN = json.load(open({str(src)!r}))\nOUT = {str(dst)!r}\n"
    r = subprocess.run([ls_python(), "-c", prelude + code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(dst.read_text())
