"""`pdlaunch init [DIR]`: a starter kit to copy: the embedded default's config (configs/cpu-default.yaml)
with its paths pointed at files beside it, a one-machine hostfile, example requests and the latency
profiles the config plans with. The files ship as package data (setup.py), so a pip-installed
pdlaunch runs `pdlaunch init && pdlaunch generate pdlaunch.yaml` in any directory. No torch.
"""
from __future__ import annotations

import os
import re
import shutil

from contracts.errors import UserError

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # launcher/
CONFIG = "pdlaunch.yaml"
# what the copied config points at, relative to the kit: (key, its new value, the shipped file)
FILES = (("hostfile", "hostfile", "hostfiles/localhost"),
         ("input", "prompts.jsonl", "examples/prompts.jsonl"),
         (None, "profiles/cpu-smollm2-float32.json", "configs/profiles/cpu-smollm2-float32.json"),
         (None, "profiles/cpu-smollm2-bfloat16.json", "configs/profiles/cpu-smollm2-bfloat16.json"))
PATHS = {"output": "results.jsonl", "run_dir": "runs/latest"}  # written by the job, in the kit's directory


def shipped(relative: str) -> str:
    """A file of the kit: package data when installed (launcher/starter/...), the checkout's own otherwise."""
    for root in (os.path.join(PACKAGE, "starter"), os.path.dirname(PACKAGE)):
        path = os.path.join(root, relative)
        if os.path.exists(path):
            return path
    raise UserError(f"init: '{relative}' is missing from this pdlaunch installation; reinstall it (pip install pdlaunch)")


def starter_config() -> str:
    """configs/cpu-default.yaml with its paths rewritten (comments kept)."""
    with open(shipped("configs/cpu-default.yaml"), encoding="utf-8") as f:
        text = f.read()
    for key, value in [(k, v) for k, v, _ in FILES if k] + list(PATHS.items()):
        text, n = re.subn(rf"^(\s*{key}:\s*)\S+", lambda m: m.group(1) + value, text, count=1, flags=re.M)
        assert n == 1, f"configs/cpu-default.yaml has no '{key}:' line"
    return text


def init(args) -> int:
    folder = os.path.abspath(args.dir)
    targets = [CONFIG] + [name for _, name, _ in FILES]
    existing = [t for t in targets if os.path.exists(os.path.join(folder, t))]
    if existing:
        raise UserError(f"init: {os.path.join(folder, existing[0])} exists; pass an empty directory (pdlaunch init DIR) "
                        "or remove the starter files")
    try:
        os.makedirs(os.path.join(folder, "profiles"), exist_ok=True)
        for _, name, source in FILES:
            shutil.copyfile(shipped(source), os.path.join(folder, name))
        with open(os.path.join(folder, CONFIG), "w", encoding="utf-8") as f:
            f.write(starter_config())
    except OSError as e:
        raise UserError(f"init: cannot write in '{folder}' ({e.strerror}); pass a writable directory") from None
    config = os.path.relpath(os.path.join(folder, CONFIG))
    print(f"wrote {config} (the embedded SmolLM2-135M on this machine's CPUs, 1 prefill + 1 decode instance), "
          f"its hostfile, example requests (prompts.jsonl) and planner profiles in {folder}\n"
          f"next: pdlaunch generate {config}   (results: {PATHS['output']}, run files: {PATHS['run_dir']}/)\n"
          f"      pdlaunch serve {config}")
    return 0
