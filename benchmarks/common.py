"""What every benchmark records: the device, the versions, the commit."""
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def device_info() -> dict:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return dict(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return dict(name=f"cpu ({platform.processor() or platform.machine()}, Triton interpreter)",
                cores=os.cpu_count())


def git_state() -> dict:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return done.stdout.strip()
    return dict(commit=git("rev-parse", "HEAD") or None, dirty=bool(git("status", "--porcelain")))
