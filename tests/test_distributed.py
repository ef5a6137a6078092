"""Data-parallel training: two gloo processes on CPU take the same steps as one process with the same global batch.

The processes are forks of the test process (they inherit the tiny model, so they start at once), join the
group from torchrun's environment variables through ``distributed.joined`` like ``interp-steer train`` under
``torchrun --nproc_per_node 2`` does, and report back through files.
"""

import importlib
import json
import multiprocessing
import os
import signal
import socket
import traceback

import pytest
import torch
from safetensors.torch import load_file, save_file

import interp_steer.app.commands as commands_mod
from interp_steer.config import DemoRun, EvalRun, LossConfig, TrainConfig, TrainRun
from interp_steer.method.data import persona_pairs
from interp_steer.storage.io import SteeringArtifact, load_checkpoint
from interp_steer.training import distributed
from interp_steer.training.distributed import World, check_shards
from interp_steer.training.loop import train

train_mod = importlib.import_module("interp_steer.training.loop")  # (ist.train is the function)

# 9 training pairs in 3 global batches of 3: the two processes take 2 and 1 pairs of each (uneven on purpose).
# KL on: the tiny model's 4 usable generic texts (of 8) in batches of 3 and 1, so one process has no text of the
# second batch. Rank 16 and θ, λ of std 1 put the KL (~6e-4) far above float32 noise in its estimate, and the
# budget below it makes both multipliers rise.
CFG = TrainConfig(layers=(0, 1), loss_layer=2, rank=16, init_scale=1.0, steps=4, batch_pairs=3, n_pairs=12,
                  held_out=0.25, checkpoint_every=2, kl_texts=8, kl_batch=3,
                  loss=LossConfig(kl_budget=3e-4, kl_dual_lr=0.5))
TOL = 1e-5  # max |Δ| of any adapter parameter, one process vs two (measured: 1.5e-6)


def params(adapters):
    return torch.cat([p.detach().flatten() for p in adapters.parameters()])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, size: int, port: int, job, out: str) -> None:
    torch.set_num_threads(1)  # two processes on the test machine's cores; forked, so no OpenMP pool may be used
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    writes = {"artifact": 0, "checkpoint": 0}

    def counting(fn, key):
        def wrapped(*a, **kw):
            writes[key] += 1
            return fn(*a, **kw)
        return wrapped

    train_mod.save_artifact = counting(train_mod.save_artifact, "artifact")
    train_mod.save_checkpoint = counting(train_mod.save_checkpoint, "checkpoint")
    report = {"rank": rank}
    try:
        result = job(rank)
        save_file({"params": params(result.adapters), "d_steer": result.d_steer}, f"{out}/rank{rank}.safetensors")
        report.update(history=result.history, held_out=result.metrics["held_out"])
    except KeyboardInterrupt:
        report["interrupted"] = True
    except BaseException:
        report["error"] = traceback.format_exc()
    report["writes"] = writes
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(report, f)


def run_parallel(job, tmp_path, size: int = 2) -> list[dict]:
    """``job(rank)`` in ``size`` forked processes joined into one gloo group; their reports, by rank."""
    out = tmp_path / f"reports-{free_port()}"
    out.mkdir()
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, size, port, job, str(out))) for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    paths = [out / f"rank{r}.json" for r in range(size)]
    reports = [json.loads(p.read_text()) if p.exists() else {"error": f"no report (exit code {proc.exitcode})"}
               for p, proc in zip(paths, procs)]
    failed = [f"process {r}: {rep['error']}" for r, rep in enumerate(reports) if "error" in rep]
    assert not failed, "\n".join(failed)
    for r, rep in enumerate(reports):
        if (out / f"rank{r}.safetensors").exists():
            rep.update(load_file(str(out / f"rank{r}.safetensors")))
    return reports


@pytest.fixture(scope="module")
def one_process(_tiny_cached):
    """The single-process run every two-process run must reproduce."""
    bridge, tok = _tiny_cached
    return train(bridge, tok, persona_pairs(tok), CFG, progress=False)


def test_shards_partition_every_batch_and_too_small_a_batch_is_refused():
    for n in range(1, 12):
        for size in range(1, 5):
            spans = [World(r, size).bounds(n) for r in range(size)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(hi - lo for lo, hi in spans) - min(hi - lo for lo, hi in spans) <= 1
    check_shards(9, 3, World(0, 2))  # 2 + 1 pairs of every batch: fine
    with pytest.raises(ValueError, match="batch_pairs 3 is less than that; use --batch-pairs 4"):
        check_shards(12, 3, World(0, 4))
    with pytest.raises(ValueError, match="last batch of the 10 training pairs holds 1; use --batch-pairs 4"):
        check_shards(10, 3, World(0, 2))
    with pytest.raises(ValueError, match="fewer processes or more pairs"):
        check_shards(1, 1, World(0, 2))


def test_two_processes_take_the_steps_of_one_and_only_rank_0_writes(_tiny_cached, one_process, tmp_path,
                                                                     monkeypatch, capfd):
    """`interp-steer train` under torchrun with 2 processes (the model load replaced by the tiny model): the same
    adapters, direction, losses and KL multipliers as one process, in both processes; rank 0 alone wrote the
    checkpoints and the artifact, and alone printed."""
    bridge, tok = _tiny_cached
    monkeypatch.setattr(commands_mod, "load_model", lambda name, device="auto", dtype=None: (bridge, tok))
    run = TrainRun(out=str(tmp_path / "art"), train=CFG)
    reps = run_parallel(lambda rank: commands_mod.run_train(run, progress=False), tmp_path)
    ref = params(one_process.adapters)
    for rep in reps:
        assert (rep["params"] - ref).abs().max() <= TOL
        assert (rep["d_steer"] - one_process.d_steer).abs().max() <= TOL
        for h, h1 in zip(rep["history"], one_process.history, strict=True):
            assert h["step"] == h1["step"]
            for k in ("loss", "obj", "coh", "mono", "dnll", "kl_plus", "kl_minus", "lam_plus", "lam_minus"):
                # sums in another order move the float32 KL estimate by ~1e-8, which λ / budget multiplies
                assert h[k] == pytest.approx(h1[k], rel=1e-3, abs=1e-6), (k, h["step"])
    assert torch.equal(reps[0]["params"], reps[1]["params"])  # summed gradients: the processes stay in lockstep
    assert reps[0]["history"] == reps[1]["history"] and reps[0]["held_out"] == reps[1]["held_out"]
    assert reps[0]["history"][-1]["lam_plus"] > 0  # the dual ascent ran, on the global KL, the same everywhere
    assert [r["writes"] for r in reps] == [{"artifact": 1, "checkpoint": 1}, {"artifact": 0, "checkpoint": 0}]
    art = SteeringArtifact.load(tmp_path / "art", bridge)
    assert torch.equal(params(art.adapters), reps[0]["params"])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("reports")) == ["art"]
    printed = capfd.readouterr().out
    assert printed.count("artifact written to") == 1 and printed.count("2 processes") == 1
    print(f"max |Δparam| one vs two processes: {(reps[0]['params'] - ref).abs().max().item():.3g}")


def test_a_ctrl_c_in_one_process_stops_both_at_one_checkpoint_and_resume_matches(_tiny_cached, one_process,
                                                                                  tmp_path):
    """SIGINT reaches rank 1 only, after step 1: both processes agree to stop after that step, rank 0 writes the
    step-2 checkpoint, and two processes resuming from it end where one uninterrupted process does."""
    bridge, tok = _tiny_cached
    pairs = persona_pairs(tok)

    def ctrl_c_on_rank_1(step, adapters):
        if step == 1 and distributed.current().rank == 1:
            os.kill(os.getpid(), signal.SIGINT)

    def interrupted(rank):
        with distributed.joined():
            return train(bridge, tok, pairs, CFG, tmp_path / "r", progress=False, callback=ctrl_c_on_rank_1)

    reps = run_parallel(interrupted, tmp_path)
    assert all(r.get("interrupted") for r in reps)
    assert [r["writes"]["checkpoint"] for r in reps] == [1, 0]
    ckpt = load_checkpoint(tmp_path / "r.ckpt", bridge)
    assert ckpt.step == 2 and len(ckpt.duals) == 2

    def resumed(rank):
        with distributed.joined():
            return train(bridge, tok, pairs, CFG, tmp_path / "r", resume=True, progress=False)

    reps = run_parallel(resumed, tmp_path)
    for rep in reps:
        assert [h["step"] for h in rep["history"]] == [2, 3]
        assert (rep["params"] - params(one_process.adapters)).abs().max() <= TOL
    assert torch.equal(reps[0]["params"], reps[1]["params"])
    assert [r["writes"] for r in reps] == [{"artifact": 1, "checkpoint": 0}, {"artifact": 0, "checkpoint": 0}]
    assert not (tmp_path / "r.ckpt").exists() and (tmp_path / "r").is_dir()


def test_processes_with_different_pairs_refuse_to_train_before_any_work(_tiny_cached, tmp_path):
    bridge, tok = _tiny_cached
    pairs = persona_pairs(tok)

    def job(rank):
        with distributed.joined():
            with pytest.raises(ValueError, match="disagree on the training pairs"):
                train(bridge, tok, pairs[::-1] if rank else pairs, CFG, progress=False)
            raise KeyboardInterrupt  # reported as "interrupted": both processes got here

    assert all(r.get("interrupted") for r in run_parallel(job, tmp_path))


def test_only_train_runs_under_torchrun_with_several_processes(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for cmd, run in (("eval", commands_mod.run_eval), ("demo", commands_mod.run_demo)):
        cfg = {"eval": EvalRun(artifact=str(tmp_path / "a")), "demo": DemoRun(out=str(tmp_path / "d"))}[cmd]
        with pytest.raises(ValueError, match=f"`{cmd}` runs in one process"):
            run(cfg)
    assert not any(tmp_path.iterdir())  # refused before writing anything
