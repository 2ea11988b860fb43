"""Download, here, the wheels the GPU machine lacks, in parts small enough to travel with one device call each.

The lent GPU machine (Python 3.12, Linux x86-64, no network) already has torch, transformers, peft, accelerate,
pandas and matplotlib. The kit also needs trl, bitsandbytes, unsloth, unsloth_zoo, datasets, papermill,
nbformat, ipykernel and sacrebleu, with whatever of their dependencies is not already there. This script takes
the exact versions this checkout's venv resolved, walks their dependencies with ``importlib.metadata``, drops
everything the machine has (the dependency closure of its preinstalled packages), downloads the rest as
manylinux / pure-Python wheels for CPython 3.12, and packs them into ``.whl/part-N/`` folders of at most
``--part-mib`` MiB (a device call carries at most 64 MiB).

    .venv/bin/python bench/gpu_wheels.py          # or: make gpu-wheels
    # then, per part, one device call that carries .whl/part-N and runs `make gpu-install PART=.whl/part-N`;
    # the last call runs `make gpu-check` (which installs any parts it carries first).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WANTED = ("trl", "bitsandbytes", "unsloth", "unsloth_zoo", "datasets", "papermill", "nbformat", "ipykernel",
          "sacrebleu", "cut-cross-entropy", "torchao", "pyyaml", "tqdm")
ON_THE_GPU_MACHINE = ("torch", "transformers", "peft", "accelerate", "pandas", "matplotlib")
# Also in the lent H200 machine's image (the device tool's KINDS.md, read 2026-11-17): not carried either.
ALSO_THERE = frozenset("aiohappyeyeballs aiohttp aiosignal attrs charset-normalizer colorama einops frozenlist lxml "
                       "multidict portalocker propcache protobuf pyarrow requests sacrebleu sentencepiece tabulate "
                       "urllib3 wheel xxhash yarl".split())
# Never carried: the machine's own CUDA stack, and packages Unsloth lists but the kit's text models never load.
NEVER = re.compile(r"^(nvidia-.*|triton|torch|torchvision|xformers|cuda-.*)$")
PLATFORMS = ("manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64",
             "linux_x86_64")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(name: str) -> list[str]:
    """The names an installed distribution requires (extras and environment-excluded ones left out)."""
    try:
        requires = metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return []
    names = []
    for line in requires:
        if "extra ==" in line or "sys_platform == \"win32\"" in line or "platform_system == \"Windows\"" in line:
            continue
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)", line)
        if match:
            names.append(match.group(1))
    return names


def closure(roots: tuple[str, ...]) -> dict[str, str]:
    """{canonical name: installed version} of the roots and everything they require, as installed here."""
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = canonical(todo.pop())
        if name in found:
            continue
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here: optional on this platform
        todo.extend(requirements(name))
    return found


def download(pins: dict[str, str], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(folder),
            "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
            "--abi", "none"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    for name, version in sorted(pins.items()):
        result = subprocess.run([*args, f"{name}=={version}"], capture_output=True, text=True)
        if result.returncode != 0:
            print(f"  {name}=={version}: no wheel for CPython 3.12 x86-64 ({result.stderr.strip()[-160:]})")


def pack(folder: Path, part_mib: float) -> list[Path]:
    """Move the wheels into part-N folders of at most ``part_mib`` MiB, biggest first (first fit)."""
    wheels = sorted(folder.glob("*.whl"), key=lambda p: -p.stat().st_size)
    parts: list[list[Path]] = []
    sizes: list[int] = []
    limit = int(part_mib * 2**20)
    for wheel in wheels:
        size = wheel.stat().st_size
        index = next((i for i, used in enumerate(sizes) if used + size <= limit), None)
        if index is None:
            parts.append([]), sizes.append(0)
            index = len(parts) - 1
        parts[index].append(wheel)
        sizes[index] += size
    folders = []
    for number, (members, size) in enumerate(zip(parts, sizes), start=1):
        target = folder / f"part-{number}"
        target.mkdir(exist_ok=True)
        for wheel in members:
            wheel.rename(target / wheel.name)
        print(f"{target.relative_to(REPO)}: {len(members)} wheels, {size / 2**20:.1f} MiB")
        folders.append(target)
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / ".whl"))
    parser.add_argument("--part-mib", type=float, default=60.0, help="largest part (a device call carries 64 MiB)")
    args = parser.parse_args(argv)
    present = closure(ON_THE_GPU_MACHINE)
    needed = {name: version for name, version in closure(WANTED).items()
              if name not in present and name not in ALSO_THERE and not NEVER.match(name)}
    print(f"{len(needed)} packages to carry: {', '.join(f'{n}=={v}' for n, v in sorted(needed.items()))}")
    out = Path(args.out)
    if out.exists() and any(out.rglob("*.whl")):
        print(f"{out} already holds wheels: remove it first to download again.")
        return 1
    download(needed, out)
    pack(out, args.part_mib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
