"""Model-level kernels and patches that change how a model computes, never what it computes: linear products
through oneDNN, fused RMSNorm, per-example attention over packed rows, the allocator setting; apply.py switches
them on for a run."""
