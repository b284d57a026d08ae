"""saferlhf: a kernel-optimized trainer for Safe RLHF."""
__version__ = "0.1.0"
