"""megatron_esft: Expert-Specialized Fine-Tuning (ESFT) for DeepSeek-family MoE models on Megatron-Core."""

__version__ = "0.1.0"
