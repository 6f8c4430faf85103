"""The mixed-adapter LoRA ops: per step, add each row's adapter delta into a projection's output.

segments.py        the step's segments (slot, first row, end row) and their passes of disjoint rows
torch_ops.py       segmented and batched matmuls in plain torch (CPU, and CUDA without triton)
triton_ops.py      the CUDA backend: the fused Triton kernels' tables and launches
triton_kernels.py  the Triton shrink and expand kernels
interpreter.py     whether triton runs in its interpreter (CPU tensors)
selector.py        the class of a resolved backend, "torch" or "triton" (engine/resolve.py resolves "auto")

Every backend is a `LoRABatch` (model/linear.py) reading one projection's `ProjectionSlots`
(lora/slots.py). Of the rest of lora/, it may import slots.py and lora_model.py only, never the
catalog (registry, store, manager) or residency (tests/test_import_graph.py).
"""
