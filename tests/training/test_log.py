"""training/log.py: Megatron-LM's GPU memory line (`report_memory` in megatron/training/utils.py), printed once after
the first logged iteration on a GPU; nothing on CPU. --log-params-norm and --log-num-zeros-in-grad."""

import math
import re

import torch

from training_helpers import logged, selected_name
from megatron_esft.training.log import cuda_memory_stats, memory_line

MIB = 2**20


def test_memory_line_is_megatrons():
    stats = {"memory_allocated": 3 * MIB // 2, "max_memory_allocated": 2 * MIB, "memory_reserved": 4 * MIB,
             "max_memory_reserved": 5 * MIB + MIB // 4}
    # Megatron-LM: name + ' memory (MB)' + ' | allocated: {}'.format(bytes / 2**20) + ' | max allocated: {}' ...
    assert memory_line("(after 1 iterations)", stats) == (
        "(after 1 iterations) memory (MB) | allocated: 1.5 | max allocated: 2.0 | reserved: 4.0 | max reserved: 5.25")


def test_trainer_reports_gpu_memory_once_and_none_on_cpu(training_env, reference):
    if torch.cuda.is_available():
        assert set(cuda_memory_stats()) == {"memory_allocated", "max_memory_allocated", "memory_reserved",
                                            "max_memory_reserved"}
        lines = re.findall(r"^\[Rank 0\] \(after 1 iterations\) memory \(MB\) \| allocated: [0-9.]+ \| "
                           r"max allocated: [0-9.]+ \| reserved: [0-9.]+ \| max reserved: [0-9.]+$",
                           reference["proc"].stdout, re.M)
        assert len(lines) == 1
    else:
        assert cuda_memory_stats() is None
        assert "memory (MB)" not in reference["proc"].stdout


def test_params_norm_and_num_zeros_of_the_trained_experts(reference):
    """--log-params-norm: the L2 norm of the trained parameters after the step, here the three selected experts of
    the reference run's HF exports at iterations 3 and 6 (float64). --log-num-zeros-in-grad: a selected expert that
    got no token in an iteration has an all-zero gradient (3 x 64 x 32 entries); any other exact zero is unlikely."""
    norms = logged(reference["proc"], "params norm")
    assert len(norms) == 6
    for iteration, weights in ((3, reference["hf3"]), (6, reference["hf6"])):
        expected = math.sqrt(sum(float(t.double().pow(2).sum()) for n, t in weights.items() if selected_name(n)))
        assert abs(norms[iteration - 1] - expected) <= 6e-4, (iteration, norms[iteration - 1], expected)
    assert norms[0] != norms[5]
    zeros = logged(reference["proc"], "num zeros")
    assert len(zeros) == 6 and all(z % (3 * 64 * 32) == 0 and z <= 3 * 3 * 64 * 32 for z in zeros), zeros
