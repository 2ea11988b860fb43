"""Several GPUs and machines: ``vinakit run NOTEBOOK --nproc N [--nnodes M ...] [--distributed MODE]``.

The same notebook runs once per rank. This process (the launcher) validates the parameters once and reserves
the run folder, then starts the ranks through torchrun (DDP, and Unsloth's own FSDP2) or ``accelerate launch``
with a generated accelerate config (FSDP and DeepSpeed ZeRO on ``backend: hf``). Each rank is
``python -m vinakit.launch --rank-worker ...``, which executes the notebook with papermill exactly as
``vinakit run`` does; its kernel inherits ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``, so the Trainer
joins the process group itself. No script copy of the recipe exists: the notebook is the recipe.

Run folder: rank 0's executed notebook and every record (params.yaml, manifest, metrics, plots, adapter) are the
run folder, as on one process. Rank r > 0 writes its executed notebook into ``ranks/`` and its own records into
``ranks/rank-r/`` (the one gate: :func:`vinakit.record.start_run` reads ``VINAKIT_RANK_DIR``); the trainer's
checkpoints stay one folder for all ranks (:func:`vinakit.record.shared_path`).

A failing rank: torchrun stops the others within its monitor interval (each worker kills its own kernel on
SIGTERM); the launcher then kills whatever of the process tree is left, and marks the run failed with the first
failing rank, its cell and its error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vinakit.errors import ParamsError, VinakitError
from vinakit.record import RANK_DIR_ENV, RANKS_DIR, SHARED_RUN_DIR_ENV, Run, read_json, reserve_run_dir, write_json

MODES = ("ddp", "fsdp", "deepspeed2", "deepspeed3")
# Unsloth 2026.10.9 ships DDP defaults (unsloth/models/_ddp_defaults.py) and its own FSDP2
# (UNSLOTH_FSDP2=1 under torchrun); its import raises on a DeepSpeed or FSDP1 launch (unsloth/fsdp2_launch.py).
UNSLOTH_MODES = ("ddp", "fsdp")
MODE_PURPOSE = {
    "ddp": "the model fits on one GPU: every GPU holds a copy and trains on its share of each batch (faster)",
    "fsdp": "the model does not fit on one GPU: weights, gradients and optimizer state are sharded (FSDP2)",
    "deepspeed2": "optimizer state and gradients sharded (ZeRO-2), weights replicated: LoRA on bigger models",
    "deepspeed3": "weights sharded too (ZeRO-3): full fine-tuning of models no single GPU holds",
}
LAUNCH_FILE = "launch.json"  # in ranks/: the resolved notebook values every rank executes with
ACCELERATE_CONFIG_FILE = "accelerate_config.yaml"  # in ranks/: the generated config (FSDP/DeepSpeed)
DEEPSPEED_CONFIG_FILE = "deepspeed_config.json"
_MONITOR_INTERVAL_S = 0.5  # how often torchrun looks for a failed rank
_STOP_GRACE_S = 15  # after the launcher is told to stop: time for the ranks to write their notebooks


@dataclass(frozen=True)
class Topology:
    """Where the ranks run: ``nproc`` per node on ``nnodes`` nodes, and how they train together."""

    nproc: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: a free port (one node only)
    mode: str = "ddp"

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    def check(self, run_name: str) -> None:
        """Refuse a topology that cannot start (before any folder or process is made).

        Raises:
            ParamsError: one line naming the option and what to do.
        """
        if self.mode not in MODES:
            raise ParamsError(f"--distributed {self.mode!r}: use one of {', '.join(MODES)}.")
        if self.nproc < 1 or self.nnodes < 1:
            raise ParamsError("--nproc and --nnodes must be at least 1.")
        if not 0 <= self.node_rank < self.nnodes:
            raise ParamsError(f"--node-rank {self.node_rank}: must be 0 .. {self.nnodes - 1} (--nnodes {self.nnodes}).")
        if self.nnodes > 1 and not run_name:
            raise ParamsError("Several nodes need one run name on every node: add -p run_name NAME to each command.")
        if self.nnodes > 1 and (not self.master_port or self.master_addr in ("127.0.0.1", "localhost")):
            raise ParamsError("Several nodes need --master-addr (node 0's address, reachable from every node) and "
                              "--master-port (a free port there).")


def check_backend(backend: str, mode: str) -> None:
    """Refuse a distributed mode the backend does not support (one line, with the way out).

    Raises:
        ParamsError: e.g. DeepSpeed with ``backend: unsloth``.
    """
    if backend == "unsloth" and mode not in UNSLOTH_MODES:
        raise ParamsError(f"--distributed {mode} is not supported by backend: unsloth (Unsloth 2026.10.9 supports "
                          f"{' and '.join(UNSLOTH_MODES)}): use -p backend hf.")
    if mode.startswith("deepspeed"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ParamsError(f"--distributed {mode} needs the deepspeed package, which is not installed: "
                              f"pip install deepspeed (on the GPU machine), or use --distributed fsdp.")
    if backend != "unsloth" and mode != "ddp" and not _has_gpu():
        raise ParamsError(f"--distributed {mode} with backend: {backend} needs GPUs: accelerate runs CPU ranks as "
                          f"plain DDP (it builds no FSDP/DeepSpeed engine there); use --distributed ddp on a CPU.")


def _has_gpu() -> bool:
    from vinakit.device import detected_profile

    return detected_profile().is_gpu


# --------------------------------------------------------------------------------------------------------------
# Generated configs
# --------------------------------------------------------------------------------------------------------------


def deepspeed_config(stage: int) -> dict[str, Any]:
    """A DeepSpeed ZeRO config whose sizes and precision the HF Trainer fills in (``"auto"``) from its arguments.

    ``"auto"`` keeps one source of truth: batch, accumulation, clipping and bf16/fp16 come from the notebook's
    parameters and the device policy, never from a second copy here.
    """
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": "auto"}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_gather_16bit_weights_on_model_save=True)  # a saved model is whole, not shards
    return {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}


def accelerate_config(topology: Topology, deepspeed_file: Path | None = None) -> dict[str, Any]:
    """The ``accelerate launch --config_file`` content for FSDP or DeepSpeed.

    Mixed precision is ``no`` here: the Trainer's bf16/fp16 flags, which come from the loaded model's dtype
    (:func:`vinakit.device.trainer_precision`), decide it.
    """
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE", "debug": False, "downcast_bf16": "no", "mixed_precision": "no",
        "num_machines": topology.nnodes, "num_processes": topology.world_size, "machine_rank": topology.node_rank,
        "main_process_ip": topology.master_addr, "main_process_port": topology.master_port,
        "rdzv_backend": "static", "same_network": True, "use_cpu": False, "gpu_ids": "all",
        "main_training_function": "main", "enable_cpu_affinity": False,
    }
    if topology.mode == "fsdp":
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_cpu_ram_efficient_loading": True, "fsdp_offload_params": False,
            "fsdp_reshard_after_forward": True, "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_activation_checkpointing": False,
        }
    else:
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {"deepspeed_config_file": str(deepspeed_file), "zero3_init_flag":
                                      topology.mode == "deepspeed3", "deepspeed_multinode_launcher": "standard"}
    return config


def write_accelerate_config(topology: Topology, folder: Path) -> Path:
    """Write the accelerate config (and DeepSpeed's own) into ``folder``; returns the accelerate config's path."""
    import yaml

    deepspeed_file = None
    if topology.mode.startswith("deepspeed"):
        deepspeed_file = folder / DEEPSPEED_CONFIG_FILE
        write_json(deepspeed_file, deepspeed_config(int(topology.mode[-1])))
    path = folder / ACCELERATE_CONFIG_FILE
    path.write_text(yaml.safe_dump(accelerate_config(topology, deepspeed_file), sort_keys=False), encoding="utf-8")
    return path


def accelerate_launch_env(config_file: Path) -> dict[str, str]:
    """The environment ``accelerate launch --config_file`` gives the ranks, through accelerate's own parsing.

    This checks the generated config the way the launch will read it (unknown keys, types, one engine), before
    any rank starts, also on a machine without GPUs or DeepSpeed.

    Raises:
        ValueError: accelerate refuses the config.
    """
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "vinakit.launch"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if not args.use_deepspeed:
        return prepare_multi_gpu_env(args)
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)  # as accelerate's launch_command sets it
    return prepare_deepspeed_cmd_env(args)[1]


def launch_command(topology: Topology, worker: list[str], config_file: Path | None) -> list[str]:
    """The torchrun (or ``accelerate launch``) command line that starts this node's ranks of ``worker``."""
    if config_file is not None:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
                "--max_restarts", "0", "--monitor_interval", str(_MONITOR_INTERVAL_S), "-m", *worker]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={topology.nproc}",
            f"--nnodes={topology.nnodes}", f"--node-rank={topology.node_rank}",
            f"--master-addr={topology.master_addr}", f"--master-port={topology.master_port}",
            "--max-restarts=0", f"--monitor-interval={_MONITOR_INTERVAL_S}", "-m", *worker]


def free_port() -> int:
    """A TCP port nobody listens on now (the rendezvous of a one-node run)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------------------------
# The launcher
# --------------------------------------------------------------------------------------------------------------


def run_distributed(notebook: str, yaml_files: list[str], overrides: list[tuple[str, str]], topology: Topology,
                    kernel_name: str = "python3") -> Path:
    """Validate once, reserve the run folder, start this node's ranks and record how the run ended.

    Returns:
        The run folder (on node 0; on another node the folder holding its ranks' notebooks).

    Raises:
        ParamsError: invalid parameters, topology or backend/mode: nothing was started.
        VinakitError: a rank failed (the run is marked failed with that rank, its cell and its error).
        RunInterrupted: SIGINT/SIGTERM to the launcher: every rank was stopped, the run marked interrupted.
    """
    from vinakit.cli import _resolve, find_notebook
    from vinakit.params import params_class

    path = find_notebook(notebook)
    cls = params_class(path.stem)
    resolved = _resolve(cls, yaml_files, overrides)  # raises ParamsError before any rank starts
    params = resolved.params
    topology.check(params.run_name)
    check_backend(getattr(params, "backend", "hf"), topology.mode)
    if not topology.master_port:
        topology = Topology(**{**asdict(topology), "master_port": free_port()})
    output_dir = Path(params.output_dir).expanduser().resolve()
    if topology.node_rank == 0:
        run_dir = reserve_run_dir(output_dir, params.run_name, notebook=cls.notebook)
    else:  # rank 0, on node 0, alone writes the run folder; this node keeps its ranks' notebooks apart
        run_dir = output_dir / f"{params.run_name}-node{topology.node_rank}"
        run_dir.mkdir(parents=True, exist_ok=False)
    ranks_dir = run_dir / RANKS_DIR
    ranks_dir.mkdir()
    values = {**resolved.values, "run_name": run_dir.name if topology.node_rank == 0 else params.run_name,
              "output_dir": str(output_dir)}
    write_json(ranks_dir / LAUNCH_FILE, {"notebook": str(path.resolve()), "values": values,
                                         "topology": asdict(topology)})
    config = write_accelerate_config(topology, ranks_dir) if _uses_accelerate(params, topology) else None
    if config is not None:
        try:
            accelerate_launch_env(config)
        except (ValueError, TypeError) as error:
            from vinakit.record import error_entry
            from vinakit.status import record_end

            record_end(run_dir, cls.notebook, "failed", **error_entry(type(error).__name__, str(error), None))
            raise VinakitError(f"accelerate refuses the generated config {config}: {error}") from error
    worker = ["vinakit.launch", "--rank-worker", str(run_dir), "--kernel", kernel_name]
    command = launch_command(topology, worker, config)
    print(f"vinakit: {topology.world_size} ranks ({topology.mode}, {topology.nnodes} node(s)): {path} -> {run_dir}",
          flush=True)
    from vinakit.status import rerun_command

    flags = launch_flags(topology)
    rerun = f"{rerun_command(notebook, yaml_files, overrides)} {' '.join(flags)}"
    return _supervise(command, run_dir, cls.notebook, topology, path.name, params, (rerun, flags))


def launch_flags(topology: Topology) -> list[str]:
    """The ``vinakit run`` options that start the same ranks again (the port is chosen anew on one node)."""
    flags = ["--nproc", str(topology.nproc), "--distributed", topology.mode]
    if topology.nnodes > 1:
        flags += ["--nnodes", str(topology.nnodes), "--node-rank", str(topology.node_rank),
                  "--master-addr", topology.master_addr, "--master-port", str(topology.master_port)]
    return flags


def _uses_accelerate(params: Any, topology: Topology) -> bool:
    """FSDP and DeepSpeed on backend hf go through ``accelerate launch``; DDP and Unsloth's FSDP2 through torchrun."""
    return topology.mode != "ddp" and getattr(params, "backend", "hf") != "unsloth"


def _rank_environment(topology: Topology, params: Any) -> dict[str, str]:
    from vinakit.colab import HOSTED_ENV_VARS
    from vinakit.device import DISTRIBUTED_MODE_ENV
    from vinakit.quiet import HEADLESS_ENV

    # Without the Colab/Kaggle markers the notebooks' install cell is a no-op in the ranks: N concurrent pip
    # installs into one environment would break it. The stack is installed already: `vinakit run` is running.
    env = {key: value for key, value in os.environ.items() if key not in HOSTED_ENV_VARS}
    env.update({DISTRIBUTED_MODE_ENV: topology.mode, HEADLESS_ENV: "1"})
    if topology.mode == "fsdp" and getattr(params, "backend", "hf") == "unsloth":
        env["UNSLOTH_FSDP2"] = "1"  # Unsloth's own FSDP2 under torchrun
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default; set here so every launcher agrees
    return env


def _supervise(command: list[str], run_dir: Path, notebook: str, topology: Topology, executed_name: str,
               params: Any, again: tuple[str, list[str]]) -> Path:
    """Run the launcher command in its own session; on a signal stop every rank; then record the end.

    ``again``: the command that runs it again, and the launch options a resume command repeats.
    """
    from vinakit.cli import RunInterrupted, _report, _signals_interrupt
    from vinakit.status import next_step, record_end

    started = time.monotonic()
    process = subprocess.Popen(command, env=_rank_environment(topology, params), start_new_session=True)
    tree: set[int] = set()
    try:
        with _signals_interrupt():
            while process.poll() is None:
                tree |= _descendants(process.pid)
                time.sleep(0.2)
    except KeyboardInterrupt as stop:
        name = getattr(stop, "signal_name", "SIGINT")
        _stop(process, tree | _descendants(process.pid))
        if topology.node_rank == 0:
            record_end(run_dir, notebook, "interrupted", interrupted_by=name, distributed_launch=asdict(topology))
        after = next_step(run_dir, notebook, *again) if topology.node_rank == 0 else ""
        raise RunInterrupted(name, f"interrupted ({name}): every rank was stopped; {run_dir} is marked "
                                   f"interrupted. {after}{_report(run_dir / executed_name)}") from None
    stopped_after = round(time.monotonic() - started, 1)
    leftover = _kill(tree)  # a kernel whose worker died without killing it (SIGKILL) must not live on
    failure = first_failure(run_dir / RANKS_DIR)
    if process.returncode == 0 and failure is None:
        if topology.node_rank == 0:
            Run(run_dir, notebook).update_manifest(distributed_launch=asdict(topology))
            note = _report(run_dir / executed_name)  # report.html of rank 0's notebook (the CLI names it)
            if "no report" in note:
                print(note.strip(), file=sys.stderr, flush=True)
        return run_dir
    failure = failure or {"rank": None, "type": "RankExited", "cell": None,
                          "message": f"a rank's process was killed or exited outside any cell (the launcher's exit "
                                     f"code {process.returncode}; out of memory is the usual cause)"}
    if topology.node_rank == 0:
        record_end(run_dir, notebook, "failed", error={k: failure[k] for k in ("type", "message", "cell")},
                   failed_rank=failure["rank"], distributed_launch=asdict(topology))
    after = f" {next_step(run_dir, notebook, *again)}" if topology.node_rank == 0 else ""
    raise VinakitError(_failure_message(failure, run_dir, stopped_after, leftover) + after +
                       _report(run_dir / executed_name))


def _failure_message(failure: dict[str, Any], run_dir: Path, seconds: float, leftover: int) -> str:
    where = f"in cell {failure['cell']}" if failure.get("cell") is not None else "outside any cell"
    rank = f"rank {failure['rank']}" if failure.get("rank") is not None else "a rank"
    notebook = failure.get("executed") or str(run_dir)
    killed = f"; {leftover} leftover process(es) killed" if leftover else ""
    return (f"{rank} failed {where}: {failure['type']}: {failure['message']}\n"
            f"vinakit: every rank was stopped ({seconds} s after the start{killed}); the run {run_dir} is marked "
            f"failed. The full error is in {notebook}.")


def first_failure(ranks_dir: Path) -> dict[str, Any] | None:
    """The error of the rank whose cell failed first (the others were stopped because of it), or None.

    None also when every rank recorded only that it was stopped: a rank was killed (out of memory, SIGKILL)
    before it could record anything, and torchrun's exit code is all there is.
    """
    errors = [read_json(path) for path in sorted(ranks_dir.glob("rank-*-error.json"))]
    failed = [error for error in errors if error.get("status") == "failed"]
    return min(failed, key=lambda error: error.get("time", 0.0)) if failed else None


def _descendants(pid: int) -> set[int]:
    import psutil

    with contextlib.suppress(psutil.Error):
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    return set()


def _stop(process: subprocess.Popen, tree: set[int]) -> None:
    """SIGTERM to the launcher's session (torchrun passes it to the ranks, which stop their kernels), then kill."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    _kill(tree)


def _kill(pids: set[int]) -> int:
    """Kill the processes of ``pids`` still alive; returns how many there were."""
    import psutil

    alive = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            process.kill()
            alive.append(process)
    psutil.wait_procs(alive, timeout=5)
    return len(alive)


# --------------------------------------------------------------------------------------------------------------
# One rank
# --------------------------------------------------------------------------------------------------------------


def rank_worker(run_dir: Path, kernel_name: str) -> int:
    """Execute the notebook as this rank (``RANK`` from torchrun); record this rank's failure in ``ranks/``.

    Returns:
        The exit status: 0 done, 1 the notebook failed, 143 stopped by a signal (another rank failed).
    """
    from vinakit.device import process_rank

    launch = read_json(run_dir / RANKS_DIR / LAUNCH_FILE)
    notebook = Path(launch["notebook"])
    rank = process_rank()
    executed = run_dir / notebook.name
    if rank != 0 or launch["topology"]["node_rank"] != 0:
        executed = run_dir / RANKS_DIR / f"{notebook.stem}-rank{rank}.ipynb"
        os.environ[RANK_DIR_ENV] = str(run_dir / RANKS_DIR / f"rank-{rank}")
        os.environ[SHARED_RUN_DIR_ENV] = str(run_dir)
    try:
        _execute_once_started(notebook, executed, launch["values"], kernel_name, rank)
    except KeyboardInterrupt as stop:
        _record_rank_error(run_dir, rank, "interrupted", getattr(stop, "signal_name", "SIGINT"),
                           "stopped because another rank failed or the launcher was stopped", None, executed)
        return 143
    except Exception as error:  # noqa: BLE001 - recorded for the launcher, which reports the first failure
        cell = getattr(error, "exec_count", None)
        kind = getattr(error, "ename", type(error).__name__)
        message = str(getattr(error, "evalue", error))
        _record_rank_error(run_dir, rank, "failed", kind, message, cell, executed)
        print(f"vinakit: rank {rank} failed in cell {cell}: {kind}: {message.splitlines()[0] if message else ''}",
              file=sys.stderr, flush=True)
        return 1
    return 0


# The ranks start their kernels at the same moment, and jupyter_client picks each kernel's ports by binding and
# releasing them: two ranks can pick the same port, and one kernel dies before any cell runs ("Address already in
# use"; seen once in CI). No cell has run then, so starting that kernel again is safe.
_KERNEL_START_FAILURE = "Kernel died before replying to kernel_info"
_KERNEL_START_TRIES = 3


def _execute_once_started(notebook: Path, executed: Path, values: dict[str, Any], kernel_name: str,
                          rank: int) -> None:
    """Execute the notebook; a kernel that died while starting (a port race between ranks) is started again."""
    from vinakit.cli import _execute

    for attempt in range(1, _KERNEL_START_TRIES + 1):
        try:
            _execute(notebook, executed, values, kernel_name, progress_bar=False)
            return
        except RuntimeError as error:
            if _KERNEL_START_FAILURE not in str(error) or attempt == _KERNEL_START_TRIES:
                raise
            print(f"vinakit: rank {rank}: its kernel died while starting ({error}); starting it again.",
                  file=sys.stderr, flush=True)
            time.sleep(0.5 + 0.5 * rank)  # ranks retry at different moments


def _record_rank_error(run_dir: Path, rank: int, status: str, kind: str, message: str, cell: int | None,
                       executed: Path) -> None:
    first = next((line for line in message.splitlines() if line.strip()), "")
    write_json(run_dir / RANKS_DIR / f"rank-{rank}-error.json",
               {"rank": rank, "status": status, "type": kind, "message": first, "cell": cell,
                "executed": str(executed), "time": time.time()})


def main(argv: list[str] | None = None) -> int:
    """``python -m vinakit.launch --rank-worker RUN_DIR [--kernel NAME]``: one rank (started by torchrun)."""
    parser = argparse.ArgumentParser(prog="python -m vinakit.launch")
    parser.add_argument("--rank-worker", required=True, metavar="RUN_DIR", help="the run folder of the launch")
    parser.add_argument("--kernel", default="python3")
    args = parser.parse_args(argv)
    return rank_worker(Path(args.rank_worker), args.kernel)


if __name__ == "__main__":
    sys.exit(main())
