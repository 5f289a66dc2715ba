"""--cuda-graph-impl local --cuda-graph-scope full_iteration (training/cuda_graph.py): on the CPU nothing is captured,
but the iteration runs through the graph's static buffers and device-scalar loss scale, and must train exactly like
the plain loop, its second iteration is checked for host syncs and its third must repeat the second
(test_graph_checks.py tests the checks); the flags' bad combinations are refused. The capture itself is checked on a
GPU (test_cuda_*)."""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import pytest
import torch

from training_helpers import load_mcore, losses, pretrain
from megatron_esft.errors import UserError
from megatron_esft.training.cuda_graph import FullIterationGraph, _culprit_frame, capture_stream, on_stream

GRAPH = ["--moe-token-counts", "device", "--cuda-graph-impl", "local", "--cuda-graph-scope", "full_iteration"]


def test_full_iteration_graph_trains_like_the_plain_loop_on_cpu(training_env, reference):
    """Static buffers + a device-scalar loss scale: the same losses and checkpoint bit for bit (warm-up 2: the
    first iteration, the watched one, then the path a GPU would capture)."""
    save = str(training_env["root"] / "graph")
    proc = pretrain(training_env["base"], save, "--expert-config", training_env["ecfg"], "--train-iters", "3",
                    "--save-interval", "3", "--eval-interval", "3", *GRAPH, "--cuda-graph-warmup-steps", "2",
                    data=training_env["data"])
    assert losses(proc) == reference["losses"][:3]
    ours, want = load_mcore(save, 3), load_mcore(reference["save"], 3)
    assert ours.keys() == want.keys() and all(torch.equal(ours[k], want[k]) for k in want)
    assert "CUDA graph: no CUDA device, so nothing is captured" in proc.stdout
    assert "captured the training iteration" not in proc.stdout


def test_full_finetuning_with_the_graph_flags_trains_like_without(training_env):
    """FFT: every weight trains, in several gradient buckets, whose all-reduce gloo coalesces into a buffer of its
    own (made without an op: the repeat check must not take it for a tensor that moved). The same losses."""
    got, want = (losses(pretrain(training_env["base"], None, "--finetune-mode", "full", "--train-iters", "3", *extra,
                                 data=training_env["data"]))
                 for extra in (GRAPH + ["--cuda-graph-warmup-steps", "2"], []))
    assert len(got) == 3 and got == want


@pytest.mark.parametrize("extra, message", [
    (["--cuda-graph-impl", "local", "--cuda-graph-scope", "full_iteration"], "needs --moe-token-counts device"),
    (["--cuda-graph-impl", "local", "--moe-token-counts", "device"], "captures only full_iteration"),
    (GRAPH[:4] + ["--cuda-graph-scope", "attn"], "--cuda-graph-scope attn: megatron_esft captures only"),
    (["--cuda-graph-scope", "full_iteration"], "--cuda-graph-scope needs --cuda-graph-impl local"),
    (["--cuda-graph-impl", "transformer_engine"], "needs Transformer Engine"),
    (GRAPH + ["--cuda-graph-warmup-steps", "1"], "--cuda-graph-warmup-steps 1: must be at least 2"),
    (GRAPH + ["--recompute-granularity", "full"], "needs no --recompute-granularity"),
    (GRAPH + ["--overlap-grad-reduce"], "needs no --overlap-grad-reduce"),
])
def test_bad_graph_flags_are_one_line_errors(training_env, tmp_path, extra, message):
    save = tmp_path / "out"
    proc = pretrain(training_env["base"], str(save), "--expert-config", training_env["ecfg"], "--train-iters", "1",
                    *extra, check=False, data=training_env["data"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not save.exists()


def test_graph_stages_batches_and_refuses_what_it_cannot_replay():
    seen = []

    def iteration(batches, scale):
        seen.append((batches[0]["tokens"].clone(), scale.clone()))
        return [{"lm loss": (batches[0]["tokens"].float().sum() * scale).reshape(1)}]

    graph = FullIterationGraph(iteration, warmup_steps=2, device="cpu")
    first = graph([{"tokens": torch.tensor([[1, 2]])}], 0.5)
    statics = graph.static
    second = graph([{"tokens": torch.tensor([[3, 4]])}], 0.25)
    assert graph.static is statics and not graph.captured  # the same buffers, refilled; no CUDA: never captured
    assert [(t.tolist(), s.item()) for t, s in seen] == [([[1, 2]], 0.5), ([[3, 4]], 0.25)]
    assert first[0]["lm loss"].item() == 1.5 and second[0]["lm loss"].item() == 1.75
    with pytest.raises(UserError, match=r"changed \(micro-batch 0, tokens: \[1, 2\] torch.int64 -> \[1, 3\] "):
        graph([{"tokens": torch.tensor([[1, 2, 3]])}], 1.0)
    with pytest.raises(UserError, match=r"changed \(1 micro-batches -> 2\)"):
        graph([{"tokens": torch.tensor([[1, 2]])}] * 2, 1.0)
    with pytest.raises(UserError, match=r"changed \(micro-batch 0: fields \['tokens'\] -> \['labels', 'tokens'\]"):
        graph([{"tokens": torch.tensor([[1, 2]]), "labels": torch.tensor([[1, 2]])}], 1.0)

    def reads_on_host(batches, scale):
        return int(batches[0]["tokens"].sum())  # what a capture cannot do

    watched = FullIterationGraph(reads_on_host, warmup_steps=2, device="cpu")
    assert watched([{"tokens": torch.ones(2)}], 1.0) == 2  # the first iteration builds; the second is watched
    with pytest.raises(UserError, match=r"reads device values on the host \(_local_scalar_dense x1\).*--moe-token"):
        watched([{"tokens": torch.ones(2)}], 1.0)

    # a capture that fails (here: no CUDA at all) is one line too, and the graph stays eager
    with pytest.raises(UserError, match=r"capturing the training iteration failed \(.+\); train without"):
        graph._capture()
    assert not graph.captured


def test_third_iteration_must_repeat_the_second():
    """A Python number that changes per iteration (here a learning-rate-like float the iteration reads from the host
    side) would be baked into a capture: the third eager iteration differs from the second in that argument, and the
    run stops; with the static device scale the iterations repeat each other and the graph runs on."""
    floats = iter([1.0, 0.5, 0.25])

    def with_a_float(batches, scale):
        return batches[0]["x"] * next(floats)

    def with_the_device_scale(batches, scale):
        return batches[0]["x"] * scale

    graph = FullIterationGraph(with_the_device_scale, warmup_steps=2, device="cpu")
    assert [graph([{"x": torch.ones(2)}], s).tolist() for s in (1.0, 0.5, 0.25, 2.0)] == [
        [1.0, 1.0], [0.5, 0.5], [0.25, 0.25], [2.0, 2.0]]
    graph = FullIterationGraph(with_a_float, warmup_steps=2, device="cpu")
    graph([{"x": torch.ones(2)}], 1.0)
    graph([{"x": torch.ones(2)}], 1.0)
    with pytest.raises(UserError, match=r"does not repeat itself \(op 1 of 1, at .*test_whole_iteration_graph.py:\d+: "
                                        r"aten.mul.Tensor, argument 1: 0.5 -> 0.25\); a CUDA graph would"):
        graph([{"x": torch.ones(2)}], 1.0)


def test_a_sync_in_backward_is_blamed_on_the_line_outside_torch():
    """An error raised inside autograd's engine (as torch's sync debug mode raises a sync in backward) has torch's
    frames innermost; the watched iteration names the innermost line of the run's own code instead."""
    x = torch.ones(3, requires_grad=True)
    loss = (x * 2).sum()
    loss.backward()
    with pytest.raises(RuntimeError) as caught:
        loss.backward()  # again, through freed buffers: the engine raises
    innermost = traceback.extract_tb(caught.value.__traceback__)[-1]
    assert innermost.filename.startswith(str(Path(torch.__file__).parent))
    frame = _culprit_frame(caught.value)
    assert frame.filename == __file__ and frame.line.startswith("loss.backward()  # again")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture: GPU only")
@pytest.mark.timeout(400)  # two trainer processes
def test_cuda_full_iteration_graph_trains_like_eager(training_env, tmp_path):
    """bf16 on a GPU, 6 iterations: eager 1-2 (the second watched for host syncs), capture + replay at 3, replays
    4-6. The same losses and weights as the eager run within the GPU runs' tolerance (test_gpu_training.py: SDPA's
    backward may use atomics), and the frozen experts bit-identical to the base."""
    env, runs = training_env, {}
    for name, extra in (("eager", []), ("graph", GRAPH[2:] + ["--cuda-graph-warmup-steps", "2"])):
        save = str(tmp_path / name)
        proc = pretrain(env["base"], save, "--expert-config", env["ecfg"], "--bf16", "--train-iters", "6",
                        "--moe-token-counts", "device", *extra, data=env["data"])
        runs[name] = (proc, load_mcore(save, 6))
    assert re.search(r"captured the training iteration in a CUDA graph at iteration 3 \(its memory pool: "
                     r"[0-9]+\.[0-9]{2} GiB\); later iterations replay it", runs["graph"][0].stdout)
    got, want = losses(runs["graph"][0]), losses(runs["eager"][0])
    assert len(got) == len(want) == 6 and all(abs(a - b) <= 1e-3 * abs(b) for a, b in zip(got, want)), (got, want)
    weights, eager = runs["graph"][1], runs["eager"][1]
    for key, value in eager.items():
        rel = ((weights[key].double() - value.double()).norm() / value.double().norm().clamp_min(1e-30)).item()
        assert rel < 1e-2, key
    base = load_mcore(env["base"], 0)
    key = "decoder.layers.{}.mlp.experts.experts.linear_fc{}.weight"
    for proj in (1, 2):  # layer 3 trains no expert, layer 2 only expert 5 (training_helpers.ECFG)
        assert torch.equal(base[key.format(3, proj)].to(weights[key.format(3, proj)].dtype),
                           weights[key.format(3, proj)])
        frozen = [e for e in range(8) if e != 5]
        assert torch.equal(base[key.format(2, proj)][frozen].to(torch.bfloat16), weights[key.format(2, proj)][frozen])
        assert not torch.equal(base[key.format(2, proj)][5].to(torch.bfloat16), weights[key.format(2, proj)][5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture: GPU only")
def test_cuda_graph_replays_what_the_eager_iteration_computes():
    """Eager (watched, then unwatched), captured, replayed: each call's loss and gradient are those of its own batch
    and scale; a torch.compile'd function in the iteration still runs compiled after the watched iteration."""
    lin = torch.nn.Linear(16, 8, device="cuda")
    grad = torch.zeros_like(lin.weight)
    compiled_runs = []

    def backend(gm, example_inputs):
        def run(*args):
            compiled_runs.append(1)
            return gm.forward(*args)
        return run

    act = torch.compile(lambda h: torch.nn.functional.silu(h) * 2, backend=backend)

    def iteration(batches, scale):
        loss = act(lin(batches[0]["x"])).square().sum() * scale
        grad.copy_(torch.autograd.grad(loss, lin.weight)[0])
        return loss.detach()

    def eager(x, scale):
        loss = (torch.nn.functional.silu(lin(x)) * 2).square().sum() * scale
        return loss.detach(), torch.autograd.grad(loss, lin.weight)[0]

    graph = FullIterationGraph(iteration, warmup_steps=2, device="cuda")
    for call in range(5):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(call)).pin_memory()
        loss = graph([{"x": x}], 0.5 + call).clone()
        want_loss, want_grad = eager(x.cuda(), 0.5 + call)
        torch.testing.assert_close(loss, want_loss)
        torch.testing.assert_close(grad, want_grad)
        assert graph.captured == (call >= 2)
        # the pool holds the capture's temporaries (a few small blocks, each rounded up to at least 512 bytes)
        assert (graph.pool_gib() is None) if call < 2 else (0 < graph.pool_gib() * 2**30 < 64 << 20)
        if call == 1:  # the watched iteration ran the compiled function, compiled in the first one
            assert len(compiled_runs) == 2, "the compiled function stopped running compiled"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture: GPU only")
def test_cuda_graph_captures_the_gradient_hooks_of_kept_accumulation_nodes():
    """Megatron's DDP makes one gradient-accumulation node per trained parameter when it is built, keeps it, and adds
    the gradient into an fp32 main_grad in a hook on it. A node runs on the stream it was made on; made inside
    `on_stream(capture_stream(...))`, as the trainer builds DDP, the capture succeeds and every call (eager, watched,
    captured, replayed) accumulates its own batch's gradient (made on the default stream, the capture would fail:
    cuda_graph.py's docstring)."""
    stream = capture_stream("cuda")
    lin = torch.nn.Linear(16, 8, bias=False, device="cuda")
    main_grad = torch.zeros_like(lin.weight, dtype=torch.float32)

    def add_to_main_grad(*_):
        main_grad.add_(lin.weight.grad)
        lin.weight.grad = None

    with on_stream(stream):  # Megatron DDP's own way to reach the node
        node = lin.weight.expand_as(lin.weight).grad_fn.next_functions[0][0]
        node.register_hook(add_to_main_grad)

    def iteration(batches, scale):
        loss = lin(batches[0]["x"]).square().sum() * scale
        loss.backward()
        return loss.detach()

    graph = FullIterationGraph(iteration, warmup_steps=2, device="cuda", stream=stream)
    assert graph.stream is stream
    for call in range(5):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(call)).pin_memory()
        main_grad.zero_()
        loss = graph([{"x": x}], 0.5 + call).clone()
        weight = lin.weight.detach().clone().requires_grad_()
        want_loss = (x.cuda() @ weight.t()).square().sum() * (0.5 + call)
        torch.testing.assert_close(loss, want_loss.detach())
        torch.testing.assert_close(main_grad, torch.autograd.grad(want_loss, weight)[0])
        assert graph.captured == (call >= 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's sync debug mode: GPU only")
def test_cuda_watched_iteration_names_a_host_read():
    def iteration(batches, scale):
        if batches[0]["x"].sum().item() > 0:  # a read on the host
            return scale * 2
        return scale

    graph = FullIterationGraph(iteration, warmup_steps=2, device="cuda")
    graph([{"x": torch.ones(3)}], 1.0)  # the first iteration is not watched
    with pytest.raises(UserError, match=r"a synchronizing CUDA operation at .*test_whole_iteration_graph.py:\d+"):
        graph([{"x": torch.ones(3)}], 1.0)
    assert torch.cuda.get_sync_debug_mode() == 0  # restored
