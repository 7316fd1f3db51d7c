"""Measuring a case: memory (allocator, tensors, process), time against a control workload, FLOPs, the machine."""
