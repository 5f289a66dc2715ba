"""What building a model tells the user: no Megatron-Core notes about our own choices that nobody can act on."""

import logging

from tests.conftest import run_tool


def test_building_a_model_is_quiet_about_megatrons_own_defaults(tiny_hf, tmp_path):
    """0.16.1 warns that its own default cuda_graph_scope "full" is deprecated, and logs "Unknown MLP type ... Using
    default kwargs" for each MoE layer of our MoELayer subclass (experts/permutation.py): neither reaches the user."""
    import megatron_esft.experts.permutation  # noqa: F401 (installs the filter, as building a model does)

    proc = run_tool("convert_hf_to_mcore", "--hf", tiny_hf("deepseek-v3"), "--out", tmp_path / "mcore")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Unknown MLP type" not in proc.stderr and "full scope is deprecated" not in proc.stderr
    # the filter is that one note's: the same note for another class, and every other record, still pass
    logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    assert logger.filter(logging.makeLogRecord({"msg": "Unknown MLP type: <class 'torch.nn.Linear'>"}))
    assert logger.filter(logging.makeLogRecord({"msg": "anything else"}))
    assert not logger.filter(logging.makeLogRecord(
        {"msg": "Unknown MLP type: <class 'megatron.core.transformer.spec_utils.ModuleSpec'>. Using default kwargs."}))
