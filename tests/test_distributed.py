"""Several processes: ``vinakit run NOTEBOOK --nproc N`` (vinakit.launch), proven on CPU with gloo.

Two ranks of per-device batch b train exactly like one process of batch 2b (same seed, same data): the loss at
every logged step and the final adapter agree. A failing rank stops every rank within seconds, leaves no process
behind and marks the run failed with that rank's cell and error. The 1-process baseline of each comparison runs
beside the 2-rank run (three processes on the machine's cores), so each comparison costs one run's time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CPU_TINY = str(REPO / "params" / "cpu_tiny.yaml")
LOSS_RTOL = 1e-3  # the tolerance for the logged losses
ADAPTER_RTOL = 1e-3  # largest weight difference, relative to the largest trained weight

# Few, short steps: each rank is a kernel of its own.
SFT = ["-p", "max_steps", "4", "-p", "logging_steps", "1", "-p", "eval_steps", "2", "-p", "max_new_tokens", "2",
       "-p", "preview_examples", "1", "-p", "sample_prompts", '["Xin chào"]']
# cpu_tiny's CPT trains the embeddings at their own rate (embedding_learning_rate); two short stages.
CPT = ["-p", "stages", "[new_embeddings:2,full:2]", "-p", "logging_steps", "1", "-p", "eval_steps", "100",
       "-p", "max_new_tokens", "2"]


def _vinakit(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vinakit.cli", "run", *args, "--no-progress"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, timeout: float = 600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def _runs(notebook: str, out: Path, extra: list[str], batch: int, modes: tuple[str, ...] = ("ddp",),
          ddp_extra: tuple[str, ...] = ()) -> list[Path]:
    """One process with batch 2b and, per mode, two ranks with batch b, side by side; returns the run folders."""
    common = [notebook, "-f", CPU_TINY, "-p", "output_dir", str(out), *extra]
    processes = [_vinakit(*common, "-p", "run_name", "one", "-p", "per_device_train_batch_size", str(2 * batch))]
    processes += [_vinakit(*common, "-p", "run_name", mode, "-p", "per_device_train_batch_size", str(batch),
                           "--nproc", "2", "--distributed", mode, *(ddp_extra if mode == "ddp" else ()))
                  for mode in modes]
    for process in processes:
        _finish(process)
    return [out / "one", *(out / mode for mode in modes)]


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SFT on one process (batch 4), on 2 DDP ranks and on 2 FSDP2 ranks (batch 2 each), run side by side.

    FSDP on a CPU: Unsloth's own FSDP2 (cpu_tiny's backend) shards over gloo; backend hf goes through accelerate,
    which builds no FSDP engine for CPU ranks, so the launcher refuses that (see the refusal test).
    """
    start = time.perf_counter()
    one, ddp, fsdp = _runs("sft", tmp_path_factory.mktemp("sft"), SFT, batch=2, modes=("ddp", "fsdp"),
                           ddp_extra=("-p", "save_steps", "2"))  # checkpoints 2 and 4: the resume test's
    print(f"\nSFT: 1 process, 2 DDP ranks and 2 FSDP ranks side by side: {time.perf_counter() - start:.1f} s")
    return {"one": one, "ddp": ddp, "fsdp": fsdp}


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _assert_losses_agree(one: dict, two: dict) -> float:
    """Same logged steps, losses within LOSS_RTOL; returns the largest relative difference."""
    assert one["train_loss_steps"] == two["train_loss_steps"] and len(one["train_loss_steps"]) >= 2
    worst = max(abs(a - b) / abs(a) for a, b in zip(one["train_loss_history"], two["train_loss_history"]))
    assert worst <= LOSS_RTOL, (one["train_loss_history"], two["train_loss_history"])
    return worst


def _assert_adapters_agree(one: Path, two: Path) -> float:
    """The same tensors, equal to ADAPTER_RTOL of the largest weight; returns the largest absolute difference."""
    from safetensors.torch import load_file

    a, b = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    scale = max(float(t.abs().max()) for t in a.values())
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert scale > 0 and worst <= ADAPTER_RTOL * scale, (worst, scale)
    return worst


def test_two_ranks_train_sft_like_one_process_with_the_double_batch(sft_runs: dict[str, Path]):
    one, two = sft_runs["one"], sft_runs["ddp"]
    loss_diff = _assert_losses_agree(_json(one / "metrics.json"), _json(two / "metrics.json"))
    adapter_diff = _assert_adapters_agree(one / "adapter", two / "adapter")
    # Evaluation is gathered across the ranks: both ranks report the loss over all validation rows. It is the
    # Trainer's mean of per-batch means, and a batch of 2 rows per rank is not one of 4 rows: close, not equal.
    eval_loss = _json(two / "metrics.json")["eval_loss"]
    assert _json(two / "ranks" / "rank-1" / "metrics.json")["eval_loss"] == eval_loss
    assert eval_loss == pytest.approx(_json(one / "metrics.json")["eval_loss"], rel=0.05)
    manifest = _json(two / "manifest.json")
    assert manifest["status"] == "completed"
    assert manifest["distributed"]["world_size"] == 2 and manifest["distributed"]["mode"] == "ddp"
    assert [r["rank"] for r in manifest["distributed"]["rank_devices"]] == [0, 1]
    assert manifest["distributed"]["effective_global_batch"] == \
        _json(one / "manifest.json")["distributed"]["effective_global_batch"] == 4
    # rank 0 wrote the run folder; rank 1 only its notebook and its own records under ranks/
    assert (two / "sft.ipynb").is_file() and (two / "ranks" / "sft-rank1.ipynb").is_file()
    assert (two / "adapter").is_dir() and (two / "loss.png").is_file() and (two / "params.yaml").is_file()
    rank1 = _json(two / "ranks" / "rank-1" / "manifest.json")
    assert rank1["distributed"] == manifest["distributed"]
    assert rank1["data"] == manifest["data"] and rank1["tokenized"] == manifest["tokenized"]  # the same data
    print(f"\nSFT 2 DDP ranks vs 1 process: max loss rel diff {loss_diff:.2e}, adapter max abs diff "
          f"{adapter_diff:.2e}")


def test_two_fsdp_ranks_train_sft_like_one_process(sft_runs: dict[str, Path]):
    one, two = sft_runs["one"], sft_runs["fsdp"]
    loss_diff = _assert_losses_agree(_json(one / "metrics.json"), _json(two / "metrics.json"))
    adapter_diff = _assert_adapters_agree(one / "adapter", two / "adapter")  # gathered from the shards
    assert _json(two / "manifest.json")["distributed"]["mode"] == "fsdp"
    assert "native FSDP2 sharded" in (two / "sft.ipynb").read_text(encoding="utf-8")  # Unsloth did shard it
    print(f"\nSFT 2 FSDP2 ranks vs 1 process: max loss rel diff {loss_diff:.2e}, adapter max abs diff "
          f"{adapter_diff:.2e}")


def test_two_ranks_train_cpt_with_embedding_rate_like_one_process(tmp_path: Path):
    start = time.perf_counter()
    one, two = _runs("cpt", tmp_path, CPT, batch=4)
    worst = 0.0
    for stage in ("01-new_embeddings", "02-full"):
        worst = max(worst, _assert_losses_agree(_json(one / "stages" / stage / "metrics.json"),
                                                _json(two / "stages" / stage / "metrics.json")))
    groups = _json(two / "stages" / "02-full" / "stage.json")["optimizer_groups"]
    assert any(group["embeddings"] and group["lr"] == 2e-3 for group in groups)  # cpu_tiny's embedding rate
    adapter_diff = _assert_adapters_agree(one / "adapter", two / "adapter")
    print(f"\nCPT 2 ranks vs 1 process: max loss rel diff {worst:.2e}, adapter max abs diff {adapter_diff:.2e}, "
          f"{time.perf_counter() - start:.1f} s")


def test_two_ranks_resumed_from_a_checkpoint_log_the_same_losses(sft_runs: dict[str, Path], tmp_path: Path):
    """The distributed sampler's order depends on (seed, world size, epoch) only: a resume sees the same batches."""
    import shutil

    earlier = shutil.copytree(sft_runs["ddp"], tmp_path / "earlier")
    shutil.rmtree(earlier / "checkpoints" / "checkpoint-4")  # as if the run had stopped after step 2
    _finish(_vinakit("sft", "-p", "resume_from", str(earlier), "-p", "run_name", "resumed", "-p", "output_dir",
                     str(tmp_path), "--nproc", "2"))
    whole, resumed = _json(sft_runs["ddp"] / "metrics.json"), _json(tmp_path / "resumed" / "metrics.json")
    assert resumed["train_loss_steps"] == [3, 4]
    for step, loss in zip(resumed["train_loss_steps"], resumed["train_loss_history"]):
        assert loss == pytest.approx(whole["train_loss_history"][whole["train_loss_steps"].index(step)], rel=1e-6)


def _failing_notebook(folder: Path) -> Path:
    """sft.ipynb with one cell before training that raises on rank 1 only (rank 0 goes on into training)."""
    notebook = json.loads((REPO / "notebooks" / "sft.ipynb").read_text(encoding="utf-8"))
    cells = notebook["cells"]
    train = next(i for i, c in enumerate(cells) if "sft.train(" in "".join(c["source"]))
    cells.insert(train, {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
                         "source": ["import os\n", "if os.environ['RANK'] == '1':\n",
                                    "    raise RuntimeError('hỏng ở rank 1')"]})
    path = folder / "sft.ipynb"
    path.write_text(json.dumps(notebook, ensure_ascii=False), encoding="utf-8")
    return path


def test_a_failing_rank_stops_every_rank_and_marks_the_run_failed(tmp_path: Path):
    import psutil

    notebook = _failing_notebook(tmp_path)
    process = _vinakit(str(notebook), "-f", CPU_TINY, "-p", "output_dir", str(tmp_path / "out"), "-p", "run_name",
                       "fail", *SFT, "--nproc", "2")
    tree: set[psutil.Process] = set()
    while process.poll() is None:  # every process the run starts: torchrun, workers, kernels
        try:
            tree |= set(psutil.Process(process.pid).children(recursive=True))
        except psutil.Error:
            pass
        time.sleep(0.2)
    ended = time.time()
    output = process.stdout.read()
    assert process.returncode == 2, output[-4000:]
    run = tmp_path / "out" / "fail"
    error = _json(run / "ranks" / "rank-1-error.json")
    stopped_after = ended - error["time"]
    assert stopped_after < 30, f"the ranks took {stopped_after:.1f} s to stop"
    assert [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    assert "rank 1 failed in cell" in output and "RuntimeError: hỏng ở rank 1" in output
    manifest = _json(run / "manifest.json")
    assert manifest["status"] == "failed" and manifest["failed_rank"] == 1
    assert manifest["error"]["type"] == "RuntimeError" and manifest["error"]["cell"] == error["cell"]
    assert not (run / "adapter").exists()  # nothing that looks like a complete run
    print(f"\nfailing rank: every rank stopped {stopped_after:.1f} s after rank 1 failed, {len(tree)} processes")


def test_modes_a_backend_cannot_run_are_refused_before_anything_starts(tmp_path: Path, capsys):
    from vinakit.cli import main

    import importlib.util

    has_deepspeed = importlib.util.find_spec("deepspeed") is not None
    cases = [("deepspeed2", "unsloth", "use -p backend hf")]
    if not has_deepspeed:
        cases.append(("deepspeed3", "hf", "pip install deepspeed"))
    if not _has_gpu():
        cases.append(("fsdp", "hf", "needs GPUs"))
        if has_deepspeed:
            cases.append(("deepspeed3", "hf", "needs GPUs"))
    for mode, backend, says in cases:
        code = main(["run", "sft", "-f", CPU_TINY, "-p", "backend", backend, "-p", "output_dir", str(tmp_path),
                     "--nproc", "2", "--distributed", mode])
        message = capsys.readouterr().err.strip()
        assert code == 2 and len(message.splitlines()) == 1 and says in message, message
    assert list(tmp_path.iterdir()) == []  # no run folder, no process


@pytest.mark.parametrize("mode,stage", [("deepspeed2", 2), ("deepspeed3", 3)])
def test_generated_deepspeed_config_passes_accelerate_s_own_launch_parsing(tmp_path: Path, mode: str, stage: int):
    from vinakit.launch import Topology, accelerate_launch_env, write_accelerate_config

    topology = Topology(nproc=2, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29555, mode=mode)
    env = accelerate_launch_env(write_accelerate_config(topology, tmp_path))
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == str(stage == 3).lower()
    config = _json(Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]))
    assert config["zero_optimization"]["stage"] == stage
    # every "auto" is one the HF Trainer fills from its arguments (transformers/integrations/deepspeed.py)
    import transformers.integrations.deepspeed as hf_deepspeed

    source = Path(hf_deepspeed.__file__).read_text(encoding="utf-8")
    autos = [key for key, value in _flat(config) if value == "auto"]
    assert autos and all(f'"{key}"' in source for key in autos), autos


def _flat(config: dict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else key
        items += _flat(value, name) if isinstance(value, dict) else [(name, value)]
    return items


def test_generated_fsdp_config_passes_accelerate_s_own_launch_parsing(tmp_path: Path):
    from vinakit.launch import Topology, accelerate_launch_env, write_accelerate_config

    env = accelerate_launch_env(write_accelerate_config(Topology(nproc=4, master_port=29555, mode="fsdp"), tmp_path))
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"  # the saved adapter is whole, not one shard per rank


def _has_gpu() -> bool:
    from vinakit.device import detected_profile

    return detected_profile().is_gpu


def test_length_buckets_of_two_ranks_make_the_one_process_batches():
    """accelerate's own batch sharding over the kit's sampler: each step's rows on 2 ranks of b = 1 process of 2b."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from vinakit.train import LengthBucketSampler

    lengths = [(i * 37) % 101 + 5 for i in range(203)]
    single = list(BatchSampler(LengthBucketSampler(lengths, 8, seed=7), 8, drop_last=False))
    sampler = LengthBucketSampler(lengths, 8, seed=7)  # the global batch: per-device 4 x 2 ranks
    ranks = [list(BatchSamplerShard(BatchSampler(sampler, 4, drop_last=False), 2, r)) for r in range(2)]
    full = [b for b in single if len(b) == 8]
    for step, batch in enumerate(full):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(batch)
    again = LengthBucketSampler(lengths, 8, seed=7)
    assert list(again) == list(sampler)  # same seed and world size: same order (a resume sees the same batches)


@pytest.mark.parametrize("stage", [2, 3])
def test_generated_deepspeed_config_is_accepted_by_deepspeed_once_the_trainer_fills_it(tmp_path: Path, stage: int):
    """With DeepSpeed installed (GPU machines; not in requirements.txt): its own config parser takes the config the
    HF Trainer makes of ours (every "auto" filled from the trainer's arguments and the model's sizes)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed here (pip install deepspeed on a GPU box)")
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import AutoConfig, TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from vinakit.launch import deepspeed_config
    from vinakit.model import tiny_model_dir

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(deepspeed_config(stage)), encoding="utf-8")
    filled = HfTrainerDeepSpeedConfig(str(path))
    arguments = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                  gradient_accumulation_steps=4, use_cpu=True)
    filled.trainer_config_process(arguments)
    model = type("Model", (), {"config": AutoConfig.from_pretrained(str(tiny_model_dir()))})()
    filled.trainer_config_finalize(arguments, model, 100)
    assert '"auto"' not in json.dumps(filled.config)
    parsed = DeepSpeedConfig(filled.config)
    assert parsed.zero_optimization_stage == stage and parsed.train_batch_size == 8


def test_plan_per_rank_shards_what_each_mode_shards(capsys):
    """``vinakit plan --nproc N``: DDP keeps a whole copy per GPU plus its gradient buckets; FSDP divides the
    weights, LoRA and optimizer state by N; the activations of a rank's own batch stay."""
    from vinakit.cli import main
    from vinakit.params import params_class
    from vinakit.plan import estimate, per_rank, plan_profile
    from vinakit.resume import resolve

    preset = str(REPO / "params" / "kaggle_2xt4.yaml")
    params = resolve(params_class("sft"), [preset], []).params
    one = estimate(params, plan_profile("t4"))
    ddp, fsdp = per_rank(one, 2, "ddp"), per_rank(one, 2, "fsdp")
    assert ddp.parts["weights"] == one.parts["weights"] and ddp.total_gib > one.total_gib
    assert fsdp.parts["weights"] == pytest.approx(one.parts["weights"] / 2)
    assert fsdp.parts["LoRA"] == pytest.approx(one.parts["LoRA"] / 2)
    assert fsdp.parts["activations"] == one.parts["activations"]
    assert main(["plan", "sft", "-f", preset, "--device", "t4", "--nproc", "2"]) == 0  # QLoRA 3B fits per T4
    assert "1 of 2 ranks (ddp)" in capsys.readouterr().out


def test_a_kernel_that_dies_while_starting_is_started_again_but_a_failed_cell_is_not(monkeypatch, tmp_path: Path):
    from vinakit import cli, launch

    calls = []

    def start(*args, **kwargs):  # fault injection: the port race of two ranks, then a cell that fails
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("Kernel died before replying to kernel_info")
        if len(calls) == 3:
            raise RuntimeError("ô mã số 7 bị lỗi: a cell failed")

    monkeypatch.setattr(cli, "_execute", start)
    monkeypatch.setattr(launch.time, "sleep", lambda seconds: None)
    launch._execute_once_started(tmp_path / "sft.ipynb", tmp_path / "out.ipynb", {}, "python3", rank=1)
    assert len(calls) == 2
    with pytest.raises(RuntimeError, match="a cell failed"):
        launch._execute_once_started(tmp_path / "sft.ipynb", tmp_path / "out.ipynb", {}, "python3", rank=1)
    assert len(calls) == 3
