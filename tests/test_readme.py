"""The README's quick start: its two commands, and the train -> export -> score chain they run,
here on the tiny preset so that it takes seconds."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "mp4sr_cli"]


def test_readme_opens_with_the_two_commands_and_make_has_them():
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    demo = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert [line.split()[0].rsplit("/", 1)[-1] + " " + line.split()[1] for line in demo.strip().splitlines()] == [
        "mp4sr-rt train", "mp4sr-rt export", "mp4sr-rt score"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_default_paths_chain_train_export_score(tiny_data_dir, tmp_path):
    def cli(*args: object) -> subprocess.CompletedProcess:
        r = subprocess.run([*CLI, *map(str, args)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        return r

    cli("train", "--preset", "tiny", "--data", tiny_data_dir, "--features",
        tiny_data_dir / "features.safetensors", "--quiet")
    cli("export", "--fp16")
    items = json.loads((tmp_path / "mp4sr-out" / "artifacts" / "items.json").read_text())["items"]
    (tmp_path / "history.json").write_text(json.dumps({"user": "u1", "history": items[:3]}))
    out = json.loads(cli("score", "history.json").stdout)
    assert out[0]["user"] == "u1" and len(out[0]["items"]) == 10
    assert not set(out[0]["items"]) & set(items[:3])
