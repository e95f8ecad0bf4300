"""Hardware profiles: YAML files in configs/hardware/ (no hardware figure lives in Python).

Each profile gives a device's memory (capacity, the share left to the model, bandwidth), its peak
compute and the defaults engines take on it (context, memory share, eager mode), with sources.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgelmm.config import CONFIGS_DIR, HardwareProfile, load_yaml
from edgelmm.errors import EdgelmmError

PROFILE_DIR = CONFIGS_DIR / "hardware"


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name: str | Path) -> HardwareProfile:
    """A bundled profile by name, or any profile YAML by path (for your own board)."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILE_DIR / f"{name}.yaml"
        if not path.is_file():
            raise EdgelmmError(
                f"unknown hardware profile '{name}'",
                f"available: {', '.join(list_profiles())}; or give the path of a profile YAML",
            )
    profile = load_yaml(path, HardwareProfile)
    if profile.name != path.stem:
        raise EdgelmmError(
            f"{path}: key 'name' is '{profile.name}' but the file is {path.name}",
            f"set name: {path.stem}, so that --hardware {path.stem} finds this profile",
        )
    return profile


def guess_profile(device: Any, memory_gb: float | None = None) -> HardwareProfile | None:
    """The profile for a device: 'cpu', 'cuda[:i]', a torch.device, or a device name.

    A profile matches when one of its `match` substrings occurs in the device name. Several Jetson
    modules share one name ("Orin"), so among matches the one whose capacity is nearest the device's
    memory wins (the smallest when the memory is unknown: the conservative plan). None when no
    profile matches, so that callers can still run without a roofline.
    """
    name = str(device)
    if name.split(":")[0] == "cuda":
        import torch

        props = torch.cuda.get_device_properties(torch.device(name).index or 0)
        name, memory_gb = props.name, props.total_memory / 1e9
    matches = [
        profile
        for profile in map(load_profile, list_profiles())
        if any(m.lower() in name.lower() for m in profile.match)
    ]
    if not matches:
        return None

    def distance(profile: HardwareProfile) -> float:
        capacity = profile.memory.capacity_gb
        return abs(capacity - memory_gb) if memory_gb else capacity

    return min(matches, key=distance)


def peak_16bit_flops(profile: HardwareProfile) -> float | None:
    """Dense FLOP/s for 16-bit matmuls; FP32 where a device (a CPU) publishes no faster 16-bit rate.

    Weight-only quantization (W4A16, W8A16) still multiplies in 16 bits, so this rate serves every
    weight_bits.
    """
    c = profile.compute
    tflops = c.bf16_tflops or c.fp16_tflops or c.fp32_tflops
    return tflops * 1e12 if tflops else None
